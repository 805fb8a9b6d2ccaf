"""Live sessions on session-host actors of a real local 2-node Ray cluster (in a
loopback-only namespace, see tests/ray_netns.py): a session placed on a host gives
the masks an in-process session gives on the same frames and prompts, and a second
reader (another front) of its stream gets every frame; when its host
is killed mid-stream it is re-created on the other host from its last snapshot, with
a ``moved`` event and its objects, tracking as a session restored from that snapshot.

Frames are pushed one at a time (``push:`` source) and each result awaited, so no
frame is dropped and both sides process the same frames. Workers have one CPU each:
the in-process reference runs on one thread too (CPU float results depend on it).
"""

from __future__ import annotations

import time

import pytest

from tests.ray_netns import in_namespace, run_module_in_namespace

if not in_namespace():

    def test_in_loopback_namespace() -> None:
        """Re-executes this module under ``unshare -n`` (see tests/ray_netns.py)."""
        run_module_in_namespace(__file__, timeout_s=300)

else:
    import torch

    from tests.frames import moving_shapes, shape_centres

    MIB = 2**20
    NODE = dict(num_cpus=1, resources={"sim_gpu": 1}, memory=1024 * MIB, object_store_memory=96 * MIB)
    H, W = 120, 160
    FRAMES = moving_shapes(10, H, W, seed=7)

    @pytest.fixture(scope="module")
    def cluster():
        import ray
        from ray.cluster_utils import Cluster

        c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        c.add_node(**NODE)
        ray.init(address=c.address, logging_level="WARNING")
        c.wait_for_nodes()
        yield c
        ray.shutdown()
        c.shutdown()

    class Local:
        """The same session in this process: a SessionManager over a push source."""

        def __init__(self, model) -> None:
            from tracker.ingest import open_source
            from tracker.session import InferenceWorker, SessionManager

            self.worker = InferenceWorker(model, max_batch=1)
            self.manager = SessionManager(self.worker)
            self.source = open_source("push:local", mode="live")
            self.session = self.manager.open(self.source, name="local")
            self.results: list = []
            self.session.subscribe(lambda item: self.results.append(item) if hasattr(item, "objects") else None)

        def step(self, image) -> dict:
            from server.ray_hosts import result_record

            n = len(self.results)
            self.source.push(image)
            deadline = time.monotonic() + 60
            while len(self.results) == n and time.monotonic() < deadline:
                time.sleep(0.01)
            return result_record(self.results[n])

        def close(self) -> None:
            self.manager.close_all()
            self.worker.stop()

    def remote_step(host, sid: str, image, seq: int) -> tuple[dict, int, list[dict]]:
        """Push one frame to the host and wait for its result; also returns the events before it."""
        import ray

        ray.get(host.push.remote(sid, image))
        events = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for record in ray.get(host.poll.remote(sid, seq, 2.0)):
                seq = record["seq"]
                if record["kind"] == "result":
                    return record, seq, events
                events.append(record)
        raise AssertionError("no result from the host within 60 s")

    def masks(record: dict) -> dict:
        return {k: (v["mask_rle"]["counts"], v["score"]) for k, v in record["objects"].items()}

    def test_session_on_a_host_equals_in_process_and_survives_its_host(cluster, model, random_checkpoint):
        import ray

        from server.ray_hosts import SessionDirectory, decode_state, place, recover, start_hosts
        from tracker.annotate_many import ModelSpec

        spec = ModelSpec(model="sam2.1-tiny", checkpoint=str(random_checkpoint), device="cpu", image_size=256)
        directory = ray.remote(SessionDirectory).remote()
        hosts = start_hosts(spec, 2, directory=directory, resources={"sim_gpu": 1}, snapshot_every=2)
        first = place(hosts)
        info = ray.get(hosts[first].open.remote("push:cam", name="cam"))
        sid, seq = info["session_id"], 0
        assert ray.get(directory.host_of.remote("cam")) == first

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        local = Local(model)
        try:
            point = [list(shape_centres(0, H, W)[0])]
            r0, seq, _ = remote_step(hosts[first], sid, FRAMES[0], seq)
            l0 = local.step(FRAMES[0])
            assert masks(r0) == masks(l0) == {}
            got = ray.get(hosts[first].add_prompt.remote(sid, 1, points_xy=point, labels=[1], frame_idx=r0["frame_idx"]))
            want = local.session.add_prompt(1, points_xy=point, labels=[1], frame_idx=l0["frame_idx"]).result(60)
            assert got["score"] == want.score and got["obj_id"] == 1
            for image in FRAMES[1:6]:
                r, seq, _ = remote_step(hosts[first], sid, image, seq)
                assert sorted(r["objects"]) == [1]
                assert masks(r) == masks(local.step(image))
            local.close()
            # a second front joins by name and reads the same stream: every frame's result
            assert ray.get(hosts[first].find.remote("cam")) == sid
            again = [r for r in ray.get(hosts[first].poll.remote(sid, 0, 0.0)) if r["kind"] == "result"]
            assert [r["frame_idx"] for r in again] == list(range(6))
            listed = ray.get(hosts[first].sessions.remote())
            assert [(s["name"], s["objects"], s["frames_processed"]) for s in listed] == [("cam", [1], 6)]

            # the host dies mid-stream: the session goes to the other host from its last snapshot
            ray.kill(hosts[first], no_restart=True)
            time.sleep(1.0)
            snapshot = ray.get(directory.snapshot.remote("cam"))
            assert snapshot.obj_ids == [1] and snapshot.host == first and snapshot.frames >= 2
            second, moved = recover("cam", hosts, directory, lost=first)
            assert second != first and moved["name"] == "cam"
            assert ray.get(directory.host_of.remote("cam")) == second
            restored = Local(model)  # the reference: a session restored from the same snapshot
            restored.worker.submit(lambda: restored.session.predictor.load_state_dict(decode_state(snapshot.state)),
                                   session=restored.session).result(60)
            seq = 0
            for i, image in enumerate(FRAMES[6:]):
                r, seq, events = remote_step(hosts[second], moved["session_id"], image, seq)
                if i == 0:
                    assert [e["kind"] for e in events] == ["moved"]
                    assert events[0]["obj_ids"] == [1]
                    assert events[0]["message"] == f"session cam moved to {second} after {first} was lost"
                assert sorted(r["objects"]) == [1]
                assert masks(r) == masks(restored.step(image))
            restored.close()
        finally:
            torch.set_num_threads(threads)
            for h in hosts.values():
                ray.kill(h, no_restart=True)

    def test_a_full_cluster_is_a_clear_error(cluster, random_checkpoint):
        import ray

        from server.ray_cluster import ClusterError
        from server.ray_hosts import SessionDirectory, place, start_hosts
        from tracker.annotate_many import ModelSpec

        spec = ModelSpec(model="sam2.1-tiny", checkpoint=str(random_checkpoint), device="cpu", image_size=256)
        hosts = start_hosts(spec, 1, directory=ray.remote(SessionDirectory).remote(), resources={"sim_gpu": 1},
                            max_sessions=1)
        try:
            name = place(hosts)
            ray.get(hosts[name].open.remote("push:a", name="a"))
            with pytest.raises(ClusterError) as err:
                place(hosts)
            assert str(err.value) == "every session host is full or unreachable (1 hosts); add hosts or close sessions"
        finally:
            for h in hosts.values():
                ray.kill(h, no_restart=True)
