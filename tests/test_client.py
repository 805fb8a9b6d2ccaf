"""server.client against a real server on 127.0.0.1: the async API (open, click,
frames with numpy masks equal to the predictor's, boxes, timestamps, every
mask format, events, errors, lost connections), the sync wrapper, a server of
another protocol version, and ``samples/client_click.py`` run as printed."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from websockets.asyncio.server import serve

from server.client import Client, ClientError, ConnectionLostError, RemoteError, SyncClient
from server.protocol import PROTOCOL_VERSION
from tests.frames import shape_centres
from tests.test_server import FRAMES, H, ROOT, W, make_config, running, source_of
from tracker.predictor import StreamingPredictor

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]


def test_open_click_and_frames_equal_the_predictor(model):
    with running(model) as st:

        async def main() -> None:
            async with Client(st.url) as c:
                assert c.hello is not None and c.hello.protocol_version == PROTOCOL_VERSION
                s = await c.open("cam")
                src = source_of(st, s.id)
                ref = StreamingPredictor(model)
                src.push(FRAMES[0], pts_s=0.0)
                first = await s.next_frame(timeout=60)
                ref.track(FRAMES[0], pts_s=0.0)
                cx, cy = shape_centres(0, H, W)[0]
                obj = await s.click(cx, cy, frame=first.frame_idx)
                assert obj == 1
                ref.add_points(1, [[cx, cy]], [1])
                for f in range(1, 4):
                    src.push(FRAMES[f], pts_s=f / 30)
                    frame = await s.next_frame(timeout=60)
                    expected = ref.track(FRAMES[f], pts_s=f / 30).objects[1]
                    assert frame.frame_idx == f and frame.pts_s == pytest.approx(f / 30)
                    mask = frame.masks[obj]
                    assert mask.dtype == np.bool_ and mask.shape == (H, W)
                    np.testing.assert_array_equal(mask, expected.mask_hw)
                    assert frame.boxes[obj] == expected.box_xyxy
                    assert frame.scores[obj] == pytest.approx(expected.score, abs=1e-5)
                    assert frame.visible[obj] is expected.visible
                    assert frame.arrival_s <= frame.processed_s <= frame.sent_s <= frame.received_s
                    assert 0 < frame.latency_s < 60 and frame.model_s > 0
                box_obj = await s.box(*[v - 5 for v in shape_centres(3, H, W)[1]], *[v + 5 for v in shape_centres(3, H, W)[1]])
                assert box_obj == 2
                assert await s.remove(1) == [2]
                assert [x.objects for x in await c.list_sessions()] == [[2]]
                stats = await c.stats(s.id)
                assert stats.sessions[0].frames_processed == 4 and stats.client[0].frames_sent == 4

        asyncio.run(main())


@pytest.mark.parametrize("mask_format", ["png", "polygon", "none"])
def test_every_mask_format_decodes(model, mask_format):
    with running(model) as st:

        async def main() -> None:
            async with Client(st.url) as rle_client, Client(st.url) as other:
                a = await rle_client.open("cam")
                b = await other.open("cam", mask_format=mask_format)
                src = source_of(st, a.id)
                src.push(FRAMES[0], pts_s=0.0)
                await a.next_frame(timeout=60)
                await b.next_frame(timeout=60)
                await a.click(30, 30)
                src.push(FRAMES[1], pts_s=1 / 30)
                fa, fb = await a.next_frame(timeout=60), await b.next_frame(timeout=60)
                assert fa.frame_idx == fb.frame_idx == 1 and fa.boxes == fb.boxes
                if mask_format == "none":
                    assert fb.masks == {} and fb.payload == b""
                elif mask_format == "png":
                    np.testing.assert_array_equal(fb.masks[1], fa.masks[1])
                else:  # polygons: outlines, holes filled
                    assert (fb.masks[1] != fa.masks[1]).mean() < 0.2

        asyncio.run(main())


def test_errors_events_and_a_lost_connection(model):
    st_cm = running(model, make_config(limits={"lost_after_frames": 1}))
    st = st_cm.__enter__()
    try:

        async def main() -> None:
            c = Client(st.url, request_timeout=30)
            await c.connect()
            s = await c.open("cam")
            seen = []
            s.on_event = lambda ev: seen.append(ev.kind)
            src = source_of(st, s.id)
            src.push(FRAMES[0], pts_s=0.0)
            await s.next_frame(timeout=60)
            with pytest.raises(RemoteError) as err:
                await s.click(500, 20)
            assert (err.value.code, err.value.message) == ("prompt_error", "point (500, 20) is outside the 160x120 frame")
            assert str(err.value) == "prompt_error: point (500, 20) is outside the 160x120 frame"
            with pytest.raises(RemoteError) as err:
                await c.open("cam", mask_format="jpeg")
            assert (err.value.code, err.value.field) == ("invalid_message", "mask_format")
            with pytest.raises(RemoteError) as err:
                await c.subscribe("nope")
            assert err.value.code == "unknown_session"
            with pytest.raises(TimeoutError):
                await s.next_frame(timeout=0.3)
            await s.pause()
            await s.resume()
            assert (await s.next_event(timeout=30)).kind == "paused"  # events come after the reply
            for _ in range(3000):
                if s._events:
                    break
                await asyncio.sleep(0.01)
            assert [e.kind for e in s.drain_events()] == ["resumed"] and s.drain_events() == []
            assert seen == ["paused", "resumed"]
            # the server goes away: waiting consumers and new requests learn it
            waiting = asyncio.ensure_future(s.next_frame())
            await asyncio.get_running_loop().run_in_executor(None, st.stop)
            with pytest.raises(ConnectionLostError):
                await asyncio.wait_for(waiting, 30)
            assert s.closed and s.close_reason == "server shutting down"
            assert [f async for f in s.frames()] == []
            with pytest.raises(ConnectionLostError):
                await c.list_sessions()
            await c.close()

        asyncio.run(main())
    finally:
        st_cm.__exit__(None, None, None)


def test_a_server_of_another_protocol_version_is_refused():
    async def main() -> None:
        async def handler(ws) -> None:
            await ws.send(json.dumps({
                "type": "hello", "protocol_version": 99, "server": "sam2-stream", "server_version": "9", "client_id": 1,
                "model": {"name": "m", "image_size": 1, "device": "cpu"}, "mask_formats": ["rle"], "sources": [],
                "limits": {"max_sessions": 1, "max_objects": 1, "prompts_per_s": 1, "max_message_bytes": 1,
                           "lost_after_frames": 1, "idle_timeout_s": 1},
            }))
            await ws.wait_closed()

        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(ClientError) as err:
                await Client(f"ws://127.0.0.1:{port}").connect()
            assert str(err.value) == (
                f"ws://127.0.0.1:{port} speaks protocol version 99; this client speaks 1: use a matching sam2-stream version"
            )

    asyncio.run(main())


def test_sync_client(model):
    with running(model) as st, SyncClient(st.url) as c:
        assert c.hello is not None and c.hello.sources == ["cam"]
        s = c.open("cam")
        src = source_of(st, s.id)
        src.push(FRAMES[0], pts_s=0.0)
        assert s.next_frame(timeout=60).frame_idx == 0
        assert s.click(30, 30) == 1
        frames = []
        for f in range(1, 4):
            src.push(FRAMES[f], pts_s=f / 30)
            frames.extend(s.frames(timeout=60, limit=1))
        assert [f.frame_idx for f in frames] == [1, 2, 3]
        assert all(f.masks[1].shape == (H, W) for f in frames)
        assert s.remove(1) == []
        assert [x.session_id for x in c.list_sessions()] == [s.id]
        # a consumer slower than the results: with the default buffer it gets the newest
        for f in range(4, 7):
            src.push(FRAMES[f], pts_s=f / 30)
            deadline = time.time() + 60
            while s.session.frames_received < f + 1 and time.time() < deadline:
                time.sleep(0.02)
        assert s.next_frame(timeout=10).frame_idx == 6 and s.session.frames_skipped >= 2
        s.close()
        with pytest.raises(ConnectionLostError):
            s.next_frame(timeout=10)


def test_the_sample_script_works_as_printed():
    """README: serve the sample config, then ``python samples/client_click.py ws://… cam1 --x 100 --y 80``."""
    serve_cmd = [sys.executable, "-m", "server.cli", "serve", "--random-weights", "0", "--image-size", "256",
                 "--config", "samples/server.toml", "--port", "0", "--device", "cpu"]
    server = subprocess.Popen(serve_cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.time() + 90
        while url is None and time.time() < deadline:
            line = server.stderr.readline()
            assert line, "the server exited"
            match = re.search(r"listening on (ws://127\.0\.0\.1:\d+/)", line)
            url = match.group(1) if match else None
        out = subprocess.run(
            [sys.executable, "samples/client_click.py", url, "cam1", "--x", "100", "--y", "80", "--frames", "6"],
            cwd=ROOT, capture_output=True, text=True, timeout=90,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "connected to sam2-stream 0.1.0: sam2.1-tiny at 256 px on cpu; sources: cam1"
        assert re.fullmatch(r"session [0-9a-f]{12}: clicked \(100, 80\) on frame \d+ -> object 1", lines[1])
        assert len(lines) == 8
        assert any(re.fullmatch(r"frame \d+ pts \d+\.\d\d s latency \d+ ms: object 1 box \(\d+, \d+, \d+, \d+\) "
                                r"score -?\d+\.\d\d area \d+", line) for line in lines[2:]), lines
    finally:
        server.terminate()
        server.wait(30)


def test_a_robot_publishes_over_webrtc_and_a_viewer_gets_the_video(model):
    """``samples/robot_publisher.py --server`` against this server, then a browser-like viewer."""
    pytest.importorskip("aiortc")
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from server.webrtc import description_to_dict, peer_configuration

    config = make_config(webrtc={"ice_host_addresses": ["127.0.0.1"]})
    with running(model, config) as st:
        out = subprocess.run(
            [sys.executable, "samples/robot_publisher.py", "--server", st.url, "--ice-host", "127.0.0.1",
             "--frames", "3", "--timeout", "90"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        assert re.fullmatch(r"clicked \(60, 40\) on frame \d+: object 1", lines[0]), lines
        assert len([line for line in lines if line.startswith("frame ")]) == 3

        async def main() -> None:
            async with Client(st.url) as c:
                assert c.hello is not None and c.hello.features == ["webrtc_publish", "webrtc_view", "images"]
                with pytest.raises(RemoteError) as err:
                    await c.publish_webrtc({"sdp": "hello", "type": "offer"}, name="bad")
                assert (err.value.code, err.value.field) == ("webrtc_error", "offer")
                assert await c.list_sessions() == []  # the robot closed its session; the bad offer opened none
                s = await c.open("cam")
                src = source_of(st, s.id)
                stop = asyncio.Event()

                async def camera() -> None:
                    k = 0
                    while not stop.is_set():
                        src.push(FRAMES[k % len(FRAMES)], pts_s=k / 10)
                        k += 1
                        await asyncio.sleep(0.1)

                feeding = asyncio.ensure_future(camera())
                pc = RTCPeerConnection(peer_configuration())
                pc.addTransceiver("video", direction="recvonly")
                got: asyncio.Future = asyncio.get_running_loop().create_future()
                pc.on("track", lambda track: got.done() or got.set_result(track))
                await pc.setLocalDescription(await pc.createOffer())
                answer = await c.view_webrtc(s.id, description_to_dict(pc.localDescription), draw_masks=True)
                await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
                try:
                    track = await asyncio.wait_for(got, 30)
                    frame = await asyncio.wait_for(track.recv(), 60)
                    assert (frame.width, frame.height) == (W, H)
                finally:
                    stop.set()
                    await feeding
                    await pc.close()

        asyncio.run(main())
