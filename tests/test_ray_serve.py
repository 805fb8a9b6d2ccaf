"""``serve --ray``: WebSocket fronts over session hosts on a real local 3-node Ray cluster
(head + 2 worker nodes, one CPU each, ``sim_gpu`` standing in for a GPU on the workers;
in a loopback-only namespace, see tests/ray_netns.py).

- a session opened through a front runs on a host actor and its masks equal the
  single-machine server's on the same frames and prompts;
- a second front joins the same session by name and both clients get every frame;
  ``list_sessions`` and ``stats`` work from both;
- bad prompts, a model the server lacks and ``webrtc_view`` get clear errors with the
  embedded server's codes, and the session goes on;
- a robot publishes its video over WebRTC to a front: the frames are relayed to a
  host, where the session runs, and the clicked object is tracked;
- the node holding the session is removed mid-stream: the session goes on on the
  other node's host, clients get a ``moved`` event and the object prompted before
  the loss is still tracked.

Frames come from a configured ``push:`` source, pushed one at a time through the
front (relayed to the host, :class:`server.ray_front.RelayPushSource`), each result
awaited, so no frame is dropped and both servers process the same frames. The hosts
run one torch thread: so does the single-machine reference (CPU floats depend on it).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.ray_netns import in_namespace, run_module_in_namespace

if not in_namespace():

    def test_in_loopback_namespace() -> None:
        """Re-executes this module under ``unshare -n`` (see tests/ray_netns.py)."""
        run_module_in_namespace(__file__, timeout_s=420)

else:
    import numpy as np
    import torch

    from tests.frames import moving_shapes, shape_centres

    MIB = 2**20
    NODE = dict(num_cpus=1, memory=1024 * MIB, object_store_memory=96 * MIB)
    H, W = 120, 160
    FRAMES = moving_shapes(16, H, W, seed=11)
    POINT = tuple(float(v) for v in shape_centres(0, H, W)[0])

    def config(checkpoint, cluster_address: str | None):
        from server.config import ClusterSection, ModelSection, ServerConfig, SourceEntry

        cfg = ServerConfig(sources={"cam": SourceEntry(uri="push:cam")})
        cfg.server.port = 0
        cfg.model = ModelSection(name="sam2.1-tiny", checkpoint=str(checkpoint), device="cpu", image_size=256)
        cfg.limits.prompts_per_s = 1000
        cfg.limits.opens_per_s = 1000
        if cluster_address is not None:
            cfg.cluster = ClusterSection(address=cluster_address, hosts=2, host_cpus=1, host_resources={"sim_gpu": 1},
                                         snapshot_every=2, start_timeout_s=180)
        return cfg

    @pytest.fixture(scope="module")
    def cluster():
        import ray
        from ray.cluster_utils import Cluster

        c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        c.add_node(**NODE, resources={"sim_gpu": 1})
        c.add_node(**NODE, resources={"sim_gpu": 1})
        ray.init(address=c.address, logging_level="WARNING", namespace="sam2-stream")
        c.wait_for_nodes()
        yield c
        ray.shutdown()
        c.shutdown()

    @pytest.fixture(scope="module")
    def fronts(cluster, model, random_checkpoint):
        """Two fronts (WebSocket servers) over the same cluster: they share hosts and directory."""
        from server.app import ServerThread, TrackingServer

        started = []
        try:
            for _ in range(2):
                started.append(ServerThread(TrackingServer(config(random_checkpoint, cluster.address), model)).start(240))
            yield started
        finally:
            for st in started:
                st.stop()

    def push(server, session_id: str, image) -> None:
        assert server.manager.get(session_id).source.push(image)

    async def next_frame(session, after: int | None, timeout_s: float = 60.0):
        """The next frame newer than ``after``, with the events that came before it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            frame = await session.next_frame(timeout=max(0.1, deadline - time.monotonic()))
            if after is None or frame.frame_idx > after:
                return frame
        raise AssertionError(f"no frame after {after} within {timeout_s:g} s")

    def masks_of(frame) -> dict[int, tuple[bytes, float]]:
        return {k: (np.packbits(m).tobytes(), frame.scores[k]) for k, m in frame.masks.items()}

    async def drive(server, url: str, frames) -> tuple[str, list[dict]]:
        """Open cam, push frame 0, click the shape on it, then push the rest one at a time."""
        from server.client import Client

        out = []
        async with Client(url) as c:
            s = await c.open("cam")
            await asyncio.to_thread(push, server, s.id, frames[0])
            f = await next_frame(s, None)
            reply = await s.add_points([POINT], [1], frame=f.frame_idx)
            assert reply.obj_id == 1
            out.append({"prompt": (reply.object.score, reply.object.box_xyxy)})
            last = f.frame_idx
            for image in frames[1:]:
                await asyncio.to_thread(push, server, s.id, image)
                f = await next_frame(s, last)
                last = f.frame_idx
                out.append({"frame_idx": f.frame_idx, "masks": masks_of(f)})
            await s.unsubscribe()
        return s.id, out

    def test_a_session_through_a_front_runs_on_a_host_and_equals_the_single_machine_server(
            cluster, fronts, model, random_checkpoint):
        import ray

        from server.app import ServerThread, TrackingServer

        front = fronts[0]
        sid, remote = asyncio.run(drive(front.server, front.url, FRAMES[:6]))
        host = ray.get(ray.get_actor(f"sam2-stream-host0").find.remote("cam")), \
            ray.get(ray.get_actor(f"sam2-stream-host1").find.remote("cam"))
        assert sid in host  # it runs on a host actor, not in the front
        assert front.server.manager.workers == [] and not front.server.worker.steps
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ServerThread(TrackingServer(config(random_checkpoint, None), model)).start() as local:
                _, want = asyncio.run(drive(local.server, local.url, FRAMES[:6]))
        finally:
            torch.set_num_threads(threads)
        assert [r.get("frame_idx") for r in remote] == [None, 1, 2, 3, 4, 5]
        assert all(sorted(r["masks"]) == [1] for r in remote[1:])
        assert remote == want

    def test_two_fronts_share_one_session_and_both_clients_get_every_frame(fronts):
        from server.client import Client

        a, b = fronts

        async def run():
            async with Client(a.url, frame_buffer=64) as ca, Client(b.url, frame_buffer=64) as cb:
                sa = await ca.open("cam")
                sb = await cb.open("cam")
                assert sa.id == sb.id  # joined by name on the other front
                listed = await cb.list_sessions()
                assert [(s.name, s.objects) for s in listed] == [("cam", [1])]
                stats = await cb.stats(sb.id)
                assert stats.sessions[0].objects == 1
                sources = {a.server.manager.get(sa.id).source.display}
                assert sources == {"push:cam"}
                got_a, got_b = [], []
                for image in FRAMES[6:10]:
                    await asyncio.to_thread(push, a.server, sa.id, image)
                    fa = await next_frame(sa, got_a[-1] if got_a else None)
                    fb = await next_frame(sb, got_b[-1] if got_b else None)
                    got_a.append(fa.frame_idx)
                    got_b.append(fb.frame_idx)
                    assert masks_of(fa) == masks_of(fb) and sorted(fa.masks) == [1]
                assert got_a == got_b == sorted(got_a) and len(set(got_a)) == 4
                assert got_a == list(range(got_a[0], got_a[0] + 4))
                await sa.unsubscribe()
                await sb.unsubscribe()

        asyncio.run(run())

    def test_bad_requests_through_a_front_get_the_embedded_servers_errors(fronts):
        """Errors raised on the host reach the client with the codes the embedded server uses; the session goes on."""
        from server.client import Client, RemoteError

        a = fronts[0]

        async def run():
            async with Client(a.url) as c:
                s = await c.open("cam")
                await asyncio.to_thread(push, a.server, s.id, FRAMES[6])
                f = await next_frame(s, None)
                with pytest.raises(RemoteError) as err:
                    await s.add_points([(W * 10, H * 10)], [1], frame=f.frame_idx, obj=1)
                assert err.value.code == "prompt_error" and "outside" in str(err.value)
                with pytest.raises(RemoteError) as err:
                    await s.add_points([POINT], [1], frame=10_000, obj=1)
                assert err.value.code == "frame_not_available"
                with pytest.raises(RemoteError) as err:
                    await c.open("cam", model="nope")
                assert err.value.code == "invalid_option"
                with pytest.raises(RemoteError) as err:
                    await c.view_webrtc(s.id, {"sdp": "v=0", "type": "offer"})
                assert err.value.code == "not_supported" and "Ray session host" in str(err.value)
                await s.pause()  # controls are actor calls: the host's session pauses, its event comes back
                event = await s.next_event(timeout=30)
                while event.kind != "paused":
                    event = await s.next_event(timeout=30)
                await s.resume()
                event = await s.next_event(timeout=30)
                while event.kind != "resumed":
                    event = await s.next_event(timeout=30)
                await asyncio.to_thread(push, a.server, s.id, FRAMES[7])
                f = await next_frame(s, f.frame_idx)
                assert sorted(f.masks) == [1]  # the object and the session are as they were
                await s.unsubscribe()

        asyncio.run(run())

    def test_video_published_over_webrtc_to_a_front_is_relayed_to_a_host_and_tracked(fronts):
        """A robot publishes its camera to a front: the session runs on a host, frames relayed by the front."""
        import av
        import ray
        from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

        from server.client import Client
        from server.webrtc_signalling import description_to_dict, ice_host_addresses, peer_configuration

        class Clip(MediaStreamTrack):
            kind = "video"

            def __init__(self) -> None:
                super().__init__()
                self.count = 0

            async def recv(self):
                await asyncio.sleep(1 / 5)
                frame = av.VideoFrame.from_ndarray(FRAMES[self.count % len(FRAMES)], format="rgb24")
                frame.pts, frame.time_base = self.count * 18_000, __import__("fractions").Fraction(1, 90_000)
                self.count += 1
                return frame

        b = fronts[1]

        async def run():
            pc = RTCPeerConnection(peer_configuration())
            pc.addTrack(Clip())
            async with Client(b.url) as c:
                await pc.setLocalDescription(await pc.createOffer())
                answer, sid = await c.publish_webrtc(description_to_dict(pc.localDescription), name="robot")
                await pc.setRemoteDescription(RTCSessionDescription(**answer))
                hosts = [ray.get(ray.get_actor(f"sam2-stream-host{i}").find.remote("webrtc:robot")) for i in range(2)]
                assert sid in hosts  # the publisher's session runs on a host
                s = await c.subscribe(sid)
                first = await next_frame(s, None, 60)
                obj = await s.click(*POINT, frame=first.frame_idx)
                f = await next_frame(s, first.frame_idx, 60)
                f = await next_frame(s, f.frame_idx, 60)
                assert sorted(f.masks) == [obj] and f.masks[obj].shape == (H, W)
                relay = b.server.manager.get(sid).source
                assert relay.relayed >= 3
                await s.close()
            await pc.close()

        with ice_host_addresses(["127.0.0.1"]):
            asyncio.run(run())

    def test_removing_the_node_of_a_session_moves_it_with_its_objects(cluster, fronts):
        import ray

        from server.client import Client

        a, b = fronts

        async def run():
            async with Client(a.url, frame_buffer=64) as ca, Client(b.url, frame_buffer=64) as cb:
                sa = await ca.open("cam")
                sb = await cb.open("cam")
                await asyncio.to_thread(push, a.server, sa.id, FRAMES[10])
                before = await next_frame(sa, None)
                assert sorted(before.masks) == [1]
                await next_frame(sb, None)
                directory = ray.get_actor("sam2-stream-directory")
                head = cluster.head_node.node_id
                assert ray.get(directory.node_id.remote()) == head  # on the head: it survives any worker node
                host_name = ray.get(directory.host_of.remote("cam"))
                node_id = ray.get(ray.get_actor(host_name).node_id.remote())
                node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
                cluster.remove_node(node, allow_graceful=False)
                moved = {}
                for name, s in (("a", sa), ("b", sb)):
                    deadline = time.monotonic() + 90
                    while time.monotonic() < deadline and name not in moved:
                        try:
                            event = await s.next_event(timeout=5)
                        except asyncio.TimeoutError:
                            continue
                        if event.kind == "moved":
                            moved[name] = event
                assert sorted(moved) == ["a", "b"], "both fronts' clients are told the session moved"
                assert "after sam2-stream-host" in moved["a"].message and host_name in moved["a"].message
                new_host = ray.get(ray.get_actor("sam2-stream-directory").host_of.remote("cam"))
                assert new_host != host_name
                last = before.frame_idx
                for image in FRAMES[11:14]:
                    await asyncio.to_thread(push, a.server, sa.id, image)
                    f = await next_frame(sa, -1)
                    fb = await next_frame(sb, -1)
                    assert sorted(f.masks) == [1] and sorted(fb.masks) == [1]  # the object prompted before the loss
                deadline = time.monotonic() + 30  # each front's table follows within a few refreshes
                while True:
                    listed = await ca.list_sessions()
                    if new_host in listed[0].device or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
                assert [(s.session_id, s.name, s.objects) for s in listed] == [(sa.id, "cam", [1])]
                assert listed[0].device == f"cpu on {new_host}"

        asyncio.run(run())

        # a front that dies loses only its connections: its client rejoins through the other front
        a.stop()

        async def rejoin():
            async with Client(b.url) as cb:
                s = await cb.open("cam")
                await asyncio.to_thread(push, b.server, s.id, FRAMES[14])
                f = await next_frame(s, None)
                assert sorted(f.masks) == [1]

        asyncio.run(rejoin())
