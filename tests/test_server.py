"""End to end: real ``websockets`` clients against a real server on 127.0.0.1.

The model is the seeded random-weight SAM 2.1 tiny at image size 256 (conftest);
frames come from push sources the test feeds one at a time (``tests.frames``),
so every processed frame can be compared with a plain ``StreamingPredictor``
run on the same frames and prompts. Also: several clients on one session, a
slow client next to a fast one, session errors and limits, lifecycle events,
fault containment, idle close, graceful shutdown, /healthz and /metrics, a
looping file source, and ``sam2-stream serve`` as a process.

Helpers here (``make_config``, ``running``, ``Raw``) are shared by the other
server test modules.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
import pytest
from pycocotools import mask as mask_util
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from server.app import ServerThread, TrackingServer
from server.config import ServerConfig
from server.protocol import decode_server_message
from tests.faults import fail_on_call
from tests.frames import moving_shapes, shape_centres
from tracker.ingest import PushSource
from tracker.predictor import StreamingPredictor
from tracker.results import FrameResult, ObjectResult

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

H, W = 120, 160
FRAMES = moving_shapes(12, H, W)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def make_config(sources: dict[str, Any] | None = None, **sections: dict[str, Any]) -> ServerConfig:
    """A config for tests: port 0, quiet log, ``cam`` = a push source; ``sections``
    override keys, e.g. ``limits={"max_objects": 1}``."""
    config = ServerConfig(sources=sources if sources is not None else {"cam": "push:cam"})
    config.server.port = 0
    config.server.log_every_s = 0
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


@contextmanager
def running(model, config: ServerConfig | None = None) -> Iterator[ServerThread]:
    st = ServerThread(TrackingServer(config or make_config(), model)).start()
    try:
        yield st
    finally:
        st.stop()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


class Raw:
    """A plain websockets client speaking the protocol by hand (JSON dicts)."""

    def __init__(self, url: str, **kw: Any) -> None:
        kw.setdefault("proxy", None)
        kw.setdefault("compression", None)
        kw.setdefault("max_size", 2**24)
        self.ws = connect(url, open_timeout=20, **kw).__enter__()  # websockets 17 wants connect() entered
        self.hello = json.loads(self.ws.recv(timeout=20))
        self.frames: list[dict] = []  # frames read while waiting for something else
        self.events: list[dict] = []
        self.errors: list[dict] = []
        self._ids = iter(range(1, 10**9))

    def recv(self, timeout: float = 60.0) -> dict:
        data = self.ws.recv(timeout=timeout)
        if isinstance(data, bytes):
            msg, payload = decode_server_message(data)
            out = json.loads(data[8 : 8 + int.from_bytes(data[4:8], "big")])
            out["_payload"], out["_msg"] = payload, msg
            return out
        out = json.loads(data)
        out["_received_s"] = time.time()
        return out

    def _stash(self, msg: dict) -> None:
        {"frame": self.frames, "event": self.events, "error": self.errors}.get(msg["type"], []).append(msg)

    def send(self, type: str, **fields: Any) -> int:
        req_id = next(self._ids)
        self.ws.send(json.dumps({"type": type, "id": req_id, **fields}))
        return req_id

    def answer(self, req_id: int, timeout: float = 60.0) -> dict:
        deadline = time.time() + timeout
        while True:
            msg = self.recv(max(0.1, deadline - time.time()))
            if msg["type"] in ("reply", "error") and msg.get("id") == req_id:
                return msg
            self._stash(msg)

    def request(self, type: str, **fields: Any) -> dict:
        """Send a request, return its reply; raise AssertionError on an error reply."""
        msg = self.answer(self.send(type, **fields))
        assert msg["type"] == "reply", msg
        return msg

    def error(self, type: str, **fields: Any) -> dict:
        msg = self.answer(self.send(type, **fields))
        assert msg["type"] == "error", msg
        return msg

    def next_frame(self, timeout: float = 60.0) -> dict:
        if self.frames:
            return self.frames.pop(0)
        deadline = time.time() + timeout
        while True:
            msg = self.recv(max(0.1, deadline - time.time()))
            if msg["type"] == "frame":
                return msg
            self._stash(msg)

    def next_event(self, kind: str | None = None, timeout: float = 60.0) -> dict:
        deadline = time.time() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if kind is None or ev["kind"] == kind:
                    return self.events.pop(i)
            msg = self.recv(max(0.1, deadline - time.time()))
            self._stash(msg)

    def close(self) -> None:
        self.ws.close()


def source_of(st: ServerThread, session_id: str) -> PushSource:
    return st.server.manager.get(session_id).source


def rle_mask(mask: dict) -> np.ndarray:
    """A wire RLE mask decoded by pycocotools (proves COCO compatibility)."""
    assert mask["format"] == "rle"
    return mask_util.decode({"size": mask["size"], "counts": mask["counts"].encode()}).astype(bool)


def objects_of(frame: dict) -> dict[int, dict]:
    return {o["obj_id"]: o for o in frame["objects"]}


def write_clip(path: Path, n: int, h: int = 120, w: int = 160, fps: int = 25) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "18"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for image in moving_shapes(n, h, w):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


pytestmark.append(pytest.mark.filterwarnings("ignore::DeprecationWarning"))  # pycocotools vs numpy 2


# ---------------------------------------------------------------- the user path


def test_click_to_mask_equals_the_predictor(model):
    """Open, click, receive masks equal to the predictor's; a second object mid-stream; remove one."""
    with running(model) as st:
        c = Raw(st.url)
        assert c.hello["type"] == "hello" and c.hello["protocol_version"] == 1
        assert c.hello["sources"] == ["cam"] and c.hello["model"]["image_size"] == 256
        opened = c.request("open", source="cam")
        assert opened["created"] is True and opened["subscribed"] is True and opened["mask_format"] == "rle"
        sid = opened["session"]["session_id"]
        src = source_of(st, sid)
        ref = StreamingPredictor(model)

        def step(f: int) -> dict:
            src.push(FRAMES[f], pts_s=f / 30)
            msg = c.next_frame()
            expected = ref.track(FRAMES[f], pts_s=f / 30)
            assert msg["session_id"] == sid and msg["frame_idx"] == f == expected.frame_idx
            assert msg["source_index"] == f and msg["pts_s"] == pytest.approx(f / 30)
            assert (msg["width"], msg["height"]) == (W, H)
            assert msg["arrival_s"] <= msg["processed_s"] <= msg["sent_s"] <= msg["_received_s"]
            assert msg["model_s"] > 0 and msg["queue_s"] >= 0
            got = objects_of(msg)
            assert sorted(got) == sorted(expected.objects)
            for obj_id, r in expected.objects.items():
                np.testing.assert_array_equal(rle_mask(got[obj_id]["mask"]), r.mask_hw)
                assert got[obj_id]["area"] == r.area and got[obj_id]["visible"] == r.visible
                assert got[obj_id]["box_xyxy"] == (list(r.box_xyxy) if r.box_xyxy else None)
                assert got[obj_id]["score"] == pytest.approx(r.score, abs=1e-5)
            return msg

        assert step(0)["objects"] == []
        cx, cy = shape_centres(0, H, W)[0]
        reply = c.request("add_points", session_id=sid, points_xy=[[cx, cy]], labels=[1], frame_idx=0)
        assert reply["obj_id"] == 1 and reply["frame_idx"] == 0
        expected = ref.add_points(1, [[cx, cy]], [1])
        np.testing.assert_array_equal(rle_mask(reply["object"]["mask"]), expected.mask_hw)
        for f in (1, 2, 3):
            step(f)

        # a second object mid-stream, by box, on the frame the operator saw
        gx, gy = shape_centres(3, H, W)[1]
        box = [gx - 12, gy - 12, gx + 12, gy + 12]
        reply = c.request("add_box", session_id=sid, box_xyxy=box, frame_idx=3)
        assert reply["obj_id"] == 2 and reply["frame_idx"] == 3
        expected = ref.add_box(2, box)
        np.testing.assert_array_equal(rle_mask(reply["object"]["mask"]), expected.mask_hw)
        for f in (4, 5):
            assert sorted(objects_of(step(f))) == [1, 2]

        reply = c.request("remove_object", session_id=sid, obj_id=1)
        assert reply["objects"] == [2]
        ref.remove_object(1)
        for f in (6, 7):
            assert sorted(objects_of(step(f))) == [2]
        listed = c.request("list_sessions")["sessions"]
        assert [(s["session_id"], s["name"], s["objects"], s["subscribers"]) for s in listed] == [(sid, "cam", [2], 1)]
        assert (listed[0]["width"], listed[0]["height"], listed[0]["frames_processed"]) == (W, H, 8)
        c.close()


def test_two_clients_on_one_session_receive_every_frame(model):
    with running(model) as st:
        a, b = Raw(st.url), Raw(st.url)
        ra = a.request("open", source="cam")
        rb = b.request("open", source="cam", mask_format="png")
        sid = ra["session"]["session_id"]
        assert ra["created"] is True and rb["created"] is False and rb["session"]["session_id"] == sid
        src = source_of(st, sid)
        got_a, got_b = [], []
        for f in range(6):
            src.push(FRAMES[f], pts_s=f / 30)
            fa, fb = a.next_frame(), b.next_frame()
            got_a.append(fa["frame_idx"])
            got_b.append(fb["frame_idx"])
            for oa, ob in zip(fa["objects"], fb["_msg"].objects):
                assert oa["obj_id"] == ob.obj_id
                np.testing.assert_array_equal(rle_mask(oa["mask"]), decode_mask_png(ob.mask, fb["_payload"]))
            if f == 1:  # one client clicks, both see the object from the next frame on
                x, y = shape_centres(1, H, W)[2]
                assert b.request("add_points", session_id=sid, points_xy=[[x, y]], labels=[1])["obj_id"] == 1
            if f >= 2:
                assert [o["obj_id"] for o in fa["objects"]] == [1] and [o.obj_id for o in fb["_msg"].objects] == [1]
        assert got_a == got_b == list(range(6))
        stats = a.request("stats", session_id=sid)
        assert stats["sessions"][0]["subscribers"] == 2 and stats["sessions"][0]["frames_processed"] == 6
        assert stats["client"] == [{"session_id": sid, "mask_format": "rle", "frames_sent": 6, "frames_dropped": 0}]


def decode_mask_png(mask, payload: bytes) -> np.ndarray:
    from server.protocol import decode_mask

    out = decode_mask(mask, payload)
    assert out is not None
    return out


def test_a_slow_client_gets_the_newest_frame_and_never_delays_the_other(model):
    """B stops reading: its kernel and write buffers fill, its one-frame slot keeps
    only the newest result (drops counted), and A still gets every frame at once."""
    config = make_config(server={"send_buffer_bytes": 4096, "write_limit_bytes": 4096})
    big = moving_shapes(10, 240, 320)
    n = len(big)
    with running(model, config) as st:
        a = Raw(st.url)
        sid = a.request("open", source="cam")["session"]["session_id"]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", st.server.port))
        b = Raw(st.url, sock=sock, max_queue=1)  # the library stops reading for B at once
        assert b.request("open", source="cam")["created"] is False  # from here on, B reads nothing
        src = source_of(st, sid)
        src.push(big[0], pts_s=0.0)
        assert a.next_frame()["frame_idx"] == 0
        for x, y in ((64, 72), (224, 156)):  # two objects: ~9 KB of RLE per frame at 320x240
            a.request("add_points", session_id=sid, points_xy=[[x, y]], labels=[1], frame_idx=0)
        a_frames = [0]
        a_delay = []
        for f in range(1, n):
            src.push(big[f], pts_s=f / 30)
            msg = a.next_frame()
            a_frames.append(msg["frame_idx"])
            a_delay.append(msg["_received_s"] - msg["processed_s"])
            assert len(msg["objects"]) == 2
        per_client = st.call(lambda: {
            c.id: (c.frames_sent, c.frames_dropped, sum(s.slot is not None for s in c.subs.values()))
            for c in st.server.clients
        })
        a_sent, a_dropped, _ = per_client[a.hello["client_id"]]
        b_sent, b_dropped, b_waiting = per_client[b.hello["client_id"]]
        assert a_frames == list(range(n)) and (a_sent, a_dropped) == (n, 0)
        # every frame was written to B, replaced in its slot by a newer one, or is the newest, waiting
        # (and one may be half written when we look)
        assert b_dropped > 0 and n - 1 <= b_sent + b_dropped + b_waiting <= n, (b_sent, b_dropped, b_waiting)
        assert max(a_delay) < 1.0, a_delay  # A never waited for B
        # B reads again: what was buffered, then the newest frame from its slot
        b_frames = []
        while not b_frames or b_frames[-1] != n - 1:
            b_frames.append(b.next_frame(timeout=30)["frame_idx"])
        assert b_frames == sorted(b_frames) and len(b_frames) < n and b_frames[-1] == n - 1
        metrics = http_get(st.url.replace("ws://", "http://") + "metrics")[1]
        assert f'sam2_stream_client_dropped_frames{{client="{b.hello["client_id"]}"}} {float(b_dropped)}' in metrics


# ---------------------------------------------------------------- session control and errors


def test_session_errors_and_limits_are_error_replies(model):
    config = make_config(
        sources={"cam": "push:cam", "cam2": "push:cam2"},
        limits={"max_sessions": 1, "max_objects": 1, "prompts_per_s": 0.01, "prompt_burst": 5},
    )
    with running(model, config) as st:
        c = Raw(st.url)
        sid = c.request("open", source="cam")["session"]["session_id"]
        err = c.error("open", source="cam2")
        assert (err["code"], err["message"]) == (
            "limit_exceeded", "the server already runs 1 sessions (the limit); close one or subscribe to one"
        )
        err = c.error("open", source="cam9")
        assert err["code"] == "unknown_source" and err["field"] == "source"
        assert err["message"] == (
            "no source named 'cam9' on this server (configured: cam, cam2); a file needs an absolute path "
            "or a file: URI, and the server's policy must allow it"
        )
        err = c.error("add_points", session_id=sid, points_xy=[[10, 10]], labels=[1])
        assert (err["code"], err["message"]) == (
            "frame_not_available", "no frame has been processed yet; prompt after the first frame arrives"
        )
        source_of(st, sid).push(FRAMES[0], pts_s=0.0)
        c.next_frame()
        err = c.error("add_points", session_id=sid, points_xy=[[999, 20]], labels=[1], obj_id=1)
        assert (err["code"], err["message"]) == ("prompt_error", "point (999, 20) is outside the 160x120 frame")
        err = c.error("add_points", session_id=sid, points_xy=[[10, 20]], labels=[1], frame_idx=5)
        assert (err["code"], err["message"]) == ("frame_not_available", "frame 5 has not been processed yet (newest is 0)")
        assert c.request("add_points", session_id=sid, points_xy=[[20, 20]], labels=[1])["obj_id"] == 1
        err = c.error("add_points", session_id=sid, points_xy=[[40, 40]], labels=[1])
        assert (err["code"], err["field"], err["message"]) == (
            "limit_exceeded", "obj_id", f"session {sid} already tracks 1 objects (the limit); remove one first"
        )
        err = c.error("add_points", session_id=sid, points_xy=[[40, 40]], labels=[1], obj_id=1)
        assert err["code"] == "rate_limited" and err["message"].startswith("more than 0.01 prompts per second; retry in ")
        err = c.error("remove_object", session_id=sid, obj_id=7)
        assert (err["code"], err["message"]) == ("prompt_error", "unknown object id 7; tracked object ids: [1]")
        err = c.error("pause", session_id="nope")
        assert (err["code"], err["field"], err["message"]) == (
            "unknown_session", "session_id", "unknown session 'nope'; list_sessions shows the open ones"
        )
        err = c.error("unsubscribe", session_id="nope")
        assert err["code"] == "not_subscribed"
        err = c.error("open", source="cam", options={"resize": 64})
        assert err["code"] == "invalid_message" and err["field"] == "options"
        # the session and the connection carry on
        source_of(st, sid).push(FRAMES[1], pts_s=1 / 30)
        assert [o["obj_id"] for o in c.next_frame()["objects"]] == [1]


def test_pause_resume_reset_close_and_events(model):
    with running(model) as st:
        a, b = Raw(st.url), Raw(st.url)
        sid = a.request("open", source="cam")["session"]["session_id"]
        b.request("subscribe", session_id=sid, mask_format="none")
        src = source_of(st, sid)
        src.push(FRAMES[0], pts_s=0.0)
        a.next_frame()
        assert b.next_frame()["objects"] == []
        a.request("add_points", session_id=sid, points_xy=[[30, 30]], labels=[1])
        assert a.request("pause", session_id=sid)["state"] == "paused"
        assert a.next_event("paused")["session_id"] == sid and b.next_event("paused")
        src.push(FRAMES[1], pts_s=1 / 30)  # not processed while paused
        with pytest.raises(TimeoutError):
            a.next_frame(timeout=1.0)
        assert a.request("resume", session_id=sid)["state"] == "running"
        b.next_event("resumed")
        src.push(FRAMES[2], pts_s=2 / 30)
        msg = b.next_frame()
        assert msg["frame_idx"] == 1 and msg["objects"][0]["mask"] is None and msg["objects"][0]["box_xyxy"]
        a.request("reset", session_id=sid)
        src.push(FRAMES[3], pts_s=3 / 30)
        while (msg := a.next_frame())["frame_idx"] < 2:
            pass
        assert msg["objects"] == []
        assert b.request("close", session_id=sid)["state"] == "closed"
        ev = a.next_event("closed")
        assert ev["message"] == f"closed by client {b.hello['client_id']}"
        assert a.request("list_sessions")["sessions"] == []
        assert a.error("pause", session_id=sid)["code"] == "unknown_session"


def test_lost_and_found_events_reach_subscribers(model):
    """Occlusion (lost, then found: still tracked) is told apart from failure (error)."""
    with running(model, make_config(limits={"lost_after_frames": 2})) as st:
        c = Raw(st.url)
        sid = c.request("open", source="cam")["session"]["session_id"]
        session = st.server.manager.get(sid)
        mask = np.zeros((H, W), bool)
        for f, score in enumerate([2.0, -1.0, -1.0, -1.0, 0.5]):
            result = FrameResult(frame_idx=f, height=H, width=W, arrival_s=time.time(), processed_s=time.time())
            result.objects[3] = ObjectResult(obj_id=3, mask_hw=mask, score=score)
            session.finish_step(result)
        lost, found = c.next_event("lost"), c.next_event("found")
        assert (lost["obj_id"], lost["frame_idx"], lost["message"]) == (3, 2, "object 3 not visible for 2 frames (still tracked)")
        assert (found["obj_id"], found["frame_idx"], found["message"]) == (3, 4, "object 3 is visible again")
        assert [e["kind"] for e in c.events] == []


def test_a_failing_step_is_an_error_event_and_other_sessions_carry_on(model):
    config = make_config(sources={"a": "push:a", "b": "push:b"})
    with running(model, config) as st:
        ca, cb = Raw(st.url), Raw(st.url)
        sa = ca.request("open", source="a")["session"]["session_id"]
        sb = cb.request("open", source="b")["session"]["session_id"]
        session_a = st.server.manager.get(sa)
        fail_on_call(session_a.predictor, "propagate", 2, RuntimeError("CUDA out of memory (injected)"))
        got_a, got_b = [], []
        for f in range(4):
            source_of(st, sa).push(FRAMES[f], pts_s=f / 30)
            source_of(st, sb).push(FRAMES[f], pts_s=f / 30)
            got_b.append(cb.next_frame()["frame_idx"])
            if f == 1:
                assert ca.next_event("error")["message"] == "RuntimeError: CUDA out of memory (injected); frame dropped"
            else:
                got_a.append(ca.next_frame()["frame_idx"])
        assert got_b == [0, 1, 2, 3] and got_a == [0, 2, 3]  # a's frame 1 was dropped, a went on
        stats = {s["session_id"]: s for s in ca.request("stats")["sessions"]}
        assert stats[sa]["step_errors"] == 1 and stats[sb]["step_errors"] == 0


def test_a_session_nobody_watches_is_closed(model):
    with running(model, make_config(limits={"idle_timeout_s": 0.5})) as st:
        c = Raw(st.url)
        sid = c.request("open", source="cam")["session"]["session_id"]
        time.sleep(1.0)
        assert [s["session_id"] for s in c.request("list_sessions")["sessions"]] == [sid]  # watched: kept
        c.request("unsubscribe", session_id=sid)
        deadline = time.time() + 20
        while c.request("list_sessions")["sessions"] and time.time() < deadline:
            time.sleep(0.2)
        assert c.request("list_sessions")["sessions"] == []
        reopened = c.request("open", source="cam")
        assert reopened["created"] is True and reopened["session"]["session_id"] != sid


def test_graceful_shutdown_tells_clients_and_closes_sessions(model):
    st = ServerThread(TrackingServer(make_config(), model)).start()
    c = Raw(st.url)
    sid = c.request("open", source="cam")["session"]["session_id"]
    session = st.server.manager.get(sid)
    worker = st.server.worker
    st.stop()
    assert c.next_event("closed")["message"] == "server shutting down"
    with pytest.raises(ConnectionClosed) as err:
        c.recv(timeout=10)
    assert err.value.rcvd.code == 1001
    assert session.state == "closed" and not worker._thread.is_alive()


def test_healthz_and_metrics(model):
    with running(model) as st:
        base = st.url.replace("ws://", "http://")
        status, body, headers = http_get(base + "healthz")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"status": "ok", "protocol_version": 1, "sessions": 0, "clients": 0}
        c = Raw(st.url)
        sid = c.request("open", source="cam")["session"]["session_id"]
        src = source_of(st, sid)
        src.push(FRAMES[0], pts_s=0.0)
        c.next_frame()
        c.request("add_points", session_id=sid, points_xy=[[30, 30]], labels=[1])
        for f in (1, 2):
            src.push(FRAMES[f], pts_s=f / 30)
            c.next_frame()
        status, text, headers = http_get(base + "metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
        for line in (
            "sam2_stream_sessions 1.0",
            "sam2_stream_clients 1.0",
            "sam2_stream_objects 1.0",
            f'sam2_stream_frames_processed_total{{name="cam",session="{sid}"}} 3.0',
            f'sam2_stream_frames_in_total{{name="cam",session="{sid}"}} 3.0',
            f'sam2_stream_frames_dropped_total{{name="cam",session="{sid}",where="worker"}} 0.0',
            'sam2_stream_stage_seconds_count{stage="total"} 3.0',
            'sam2_stream_stage_seconds_count{stage="encode"} 3.0',
            "sam2_stream_frames_sent_total 3.0",
            'sam2_stream_requests_total{type="add_points"} 1.0',
            "sam2_stream_worker_batched_frames_total 3.0",
        ):
            assert line in text, line
        assert http_get(base + "nothing")[0] == 404


def test_a_file_source_loops_as_a_camera(model, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", n=8)
    config = make_config(sources={"clip": str(clip)})  # files loop unless loop = false
    with running(model, config) as st:
        c = Raw(st.url)
        opened = c.request("open", source="clip")
        assert opened["session"]["source"] == str(clip)
        assert (opened["session"]["width"], opened["session"]["height"], opened["session"]["fps"]) == (160, 120, 25.0)
        frames = []
        deadline = time.time() + 60
        while (not frames or frames[-1]["source_index"] < 12) and time.time() < deadline:
            frames.append(c.next_frame())
        indices = [f["source_index"] for f in frames]
        pts = [f["pts_s"] for f in frames]
        assert indices[-1] >= 12, indices  # past the clip's 8 frames: it looped
        assert indices == sorted(set(indices)) and pts == sorted(set(pts))  # time never goes back


def test_serve_command_runs_and_stops_on_sigterm(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('[models.second]\nname = "sam2.1-tiny"\nimage_size = 256\nrandom_weights = 1\ndevice = "cpu"\n'
                      'precision = "bf16"\n')
    cmd = [sys.executable, "-m", "server.cli", "serve", "--random-weights", "0", "--image-size", "256",
           "--port", "0", "--source", "cam=push:cam", "--device", "cpu", "--config", str(config), "--cpu-fallback"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    url = None
    try:
        deadline = time.time() + 90
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"listening on (ws://127\.0\.0\.1:\d+/)", line)
            url = match.group(1) if match else None
        assert url, "".join(lines)
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        c = Raw(url)
        assert c.hello["sources"] == ["cam"]
        assert [(m["name"], m["precision"]) for m in c.hello["models"]] == [("sam2.1-tiny", "auto"), ("second", "bf16")]
        status, page, _ = http_get(url.replace("ws://", "http://"))
        assert status == 200 and page.startswith("<!doctype html>")  # the operator page
        assert c.request("open", source="cam", model="second")["session"]["model"] == "second"
        proc.send_signal(signal.SIGTERM)
        assert c.next_event("closed")["message"] == "server shutting down"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(lines)
    for text in ("loading model sam2.1-tiny (sam2.1-tiny at 256 px on cpu)",
                 "loading model second (sam2.1-tiny at 256 px on cpu, bf16)", "on cpu (also: second)", "operator page: http://127.0.0.1:", "client 1 connected",
                 "signal received; stopping",
                 "shutting down: closing 1 session(s), 1 client(s)", "stopped"):
        assert text in log, log


# ---------------------------------------------------------------- engine bugs found while building the server (fixed)


def test_engine_prompt_then_a_frame_more_than_the_window_later(model):
    predictor = StreamingPredictor(model)
    predictor.track(FRAMES[0], pts_s=0.0)
    predictor.add_points(1, [[30, 30]], [1])
    # e.g. a session paused for a few seconds, a stream stall, or a CPU step slower than prompt_window_s
    result = predictor.track(FRAMES[1], pts_s=5.0)
    assert 1 in result.objects


def two_clients_on_cam(st: ServerThread) -> tuple[Raw, Raw, str]:
    """Two clients subscribed to ``cam``, both past its first frame."""
    a, b = Raw(st.url), Raw(st.url)
    sid = a.request("open", source="cam")["session"]["session_id"]
    b.request("open", source="cam")
    source_of(st, sid).push(FRAMES[0], pts_s=0.0)
    a.next_frame(), b.next_frame()
    return a, b, sid


def test_two_clients_adding_new_objects_at_once_get_two_ids(model):
    """Two clients creating objects at the same moment get two ids."""
    with running(model) as st:
        a, b, sid = two_clients_on_cam(st)
        gate = threading.Event()
        st.server.worker.submit(lambda: gate.wait(30))  # both prompts wait for the busy worker
        ida = a.send("add_points", session_id=sid, points_xy=[[30, 30]], labels=[1])
        idb = b.send("add_points", session_id=sid, points_xy=[[110, 80]], labels=[1])
        time.sleep(0.3)
        gate.set()
        ra, rb = a.answer(ida), b.answer(idb)
        assert sorted([ra["obj_id"], rb["obj_id"]]) == [1, 2]
        source_of(st, sid).push(FRAMES[1], pts_s=1 / 30)
        assert sorted(objects_of(a.next_frame())) == [1, 2]


def test_the_object_limit_counts_prompts_in_flight(model):
    with running(model, make_config(limits={"max_objects": 1})) as st:
        a, b, sid = two_clients_on_cam(st)
        gate = threading.Event()
        st.server.worker.submit(lambda: gate.wait(30))
        ida = a.send("add_points", session_id=sid, points_xy=[[30, 30]], labels=[1])
        time.sleep(0.3)  # a's prompt is in flight, not applied
        err = b.error("add_points", session_id=sid, points_xy=[[110, 80]], labels=[1])
        gate.set()
        assert a.answer(ida)["obj_id"] == 1
        assert (err["code"], err["message"]) == (
            "limit_exceeded", f"session {sid} already tracks 1 objects (the limit); remove one first"
        )


def test_routes_serve_pages_next_to_the_websocket(model):
    """The hook the operator page uses: plain GETs to routes, upgrades to the protocol."""
    config = make_config()
    server = TrackingServer(config, model, routes={
        "/": lambda conn, req: conn.respond(200, "<html>operator page</html>"),
        "/static/": lambda conn, req: conn.respond(200, f"file {req.path}"),
    })
    st = ServerThread(server).start()
    try:
        base = st.url.replace("ws://", "http://")
        assert http_get(base)[:2] == (200, "<html>operator page</html>")
        assert http_get(base + "static/js/app.js")[:2] == (200, "file /static/js/app.js")
        assert http_get(base + "elsewhere")[0] == 404
        assert Raw(st.url).request("list_sessions")["sessions"] == []  # "/" still speaks WebSocket
    finally:
        st.stop()


# ---------------------------------------------------------------- config file and command line


def test_config_file_and_command_line(tmp_path, monkeypatch):
    from server.cli import build_parser, config_from_args
    from server.config import ConfigError, SourceCatalog, load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    clip = write_clip(tmp_path / "conf" / "clip.mp4", n=2)
    path = tmp_path / "conf" / "server.toml"
    path.write_text(
        '[server]\nport = 9000\n[limits]\nmax_objects = 3\n'
        '[sources]\nclip = "clip.mp4"\nonce = { uri = "clip.mp4", loop = false }\ncam = "rtsp://u:pw@10.0.0.5/s"\n'
    )
    config = load_config(path)
    assert (config.server.port, config.limits.max_objects) == (9000, 3)
    catalog = SourceCatalog(config)
    spec, loop = catalog.spec("clip")
    assert (spec.location, spec.mode, spec.realtime, loop) == (str(clip), "live", True, True)  # next to the file
    assert catalog.spec("once")[1] is False
    assert catalog.spec("cam")[0].display == "rtsp://u:***@10.0.0.5/s"

    args = build_parser().parse_args(
        ["serve", "--config", str(path), "--port", "0", "--source", "extra=push:x", "--max-objects", "5",
         "--image-size", "256", "--random-weights", "0", "--allow-origin", "https://ops.example.org"]
    )
    config = config_from_args(args)
    assert (config.server.port, config.limits.max_objects, config.model.image_size, config.model.random_weights) == (
        0, 5, 256, 0)
    assert config.model.name == "sam2.1-tiny" and config.model.device == "auto"  # the file's / defaults kept
    assert config.model.precision == "auto"
    assert config_from_args(build_parser().parse_args(["serve", "--precision", "bf16"])).model.precision == "bf16"
    assert list(config.sources) == ["clip", "once", "cam", "extra"]
    assert config.server.allow_origins == ["https://ops.example.org"]

    path.write_text("[server]\nport = 'x'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: Expected `int`, got `str` - at `$.server.port`"
    path.write_text("[limits]\nmax_object = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: Object contains unknown field `max_object` - at `$.limits`"
    path.write_text("[model]\nprecision = 'int8'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: Invalid enum value 'int8' - at `$.model.precision`"
    path.write_text("[server\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path} is not valid TOML: ")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "missing.toml")
    assert str(err.value) == f"cannot read the config file {tmp_path / 'missing.toml'}: No such file or directory"
    with pytest.raises(ConfigError) as err:
        make_config(sources={"bad name": "push:x"}).check()
    assert str(err.value) == "source name 'bad name': use 1-64 letters, digits, '_', '.', '-'"
    with pytest.raises(ConfigError) as err:
        make_config(sources={"x": "ftp://host/file"}).check()
    assert str(err.value).startswith("source 'x' in the config: ")
    with pytest.raises(ConfigError) as err:
        config_from_args(build_parser().parse_args(["serve", "--source", "nouri"]))
    assert str(err.value) == "--source 'nouri': expected NAME=URI, e.g. cam1=rtsp://10.0.0.5/stream"


# ---------------------------------------------------------------- per-session model and tracking options


def test_open_chooses_the_model_and_tracking_options_of_its_session(model, second_model):
    from server.client import SyncClient
    from server.config import SourceEntry

    config = make_config(
        sources={
            "cam": "push:cam",
            "cam2": "push:cam2",
            "dock": SourceEntry(uri="push:dock", model="b", tracking={"max_objects": 2}),
        },
        limits={"opens_per_s": 100.0, "open_burst": 100.0},
    )
    with ServerThread(TrackingServer(config, model, models={"b": second_model})).start() as st:
        c = Raw(st.url)
        assert [(m["name"], m["image_size"], m["device"]) for m in c.hello["models"]] == [
            ("sam2.1-tiny", 256, "cpu"), ("b", 256, "cpu")]
        assert c.hello["model"]["name"] == "sam2.1-tiny"

        opened = c.request("open", source="cam", model="b", tracking={"max_objects": 1, "lost_after_frames": 3})
        info = opened["session"]
        assert (info["model"], info["device"], info["tracking"]) == ("b", "cpu", {"max_objects": 1, "lost_after_frames": 3})
        sid = info["session_id"]
        session = st.server.manager.get(sid)
        assert session.predictor.model is second_model and session.limits.lost_after_frames == 3
        # the masks are the chosen model's
        src = source_of(st, sid)
        src.push(FRAMES[0])
        c.next_frame()
        ref = StreamingPredictor(second_model)
        ref.track(FRAMES[0])
        cx, cy = shape_centres(0, H, W)[0]
        reply = c.request("add_points", session_id=sid, points_xy=[[cx, cy]], labels=[1], frame_idx=0)
        np.testing.assert_array_equal(rle_mask(reply["object"]["mask"]), ref.add_points(1, [[cx, cy]], [1]).mask_hw)
        src.push(FRAMES[1])
        np.testing.assert_array_equal(rle_mask(objects_of(c.next_frame())[1]["mask"]), ref.track(FRAMES[1]).objects[1].mask_hw)
        err = c.error("add_points", session_id=sid, points_xy=[[5, 5]], labels=[1], frame_idx=1)
        assert err["code"] == "limit_exceeded"  # this session's max_objects = 1

        # joining: same choices or none are fine; others are refused
        d = Raw(st.url)
        assert d.request("open", source="cam")["created"] is False
        assert d.request("open", source="cam", model="b", tracking={"max_objects": 1})["created"] is False
        # a value equal to the session's default is no conflict
        assert d.request("open", source="cam", tracking={"batch_objects": True, "max_cond_frames": 8})["created"] is False
        err = d.error("open", source="cam", model="sam2.1-tiny")
        assert (err["code"], err["field"]) == ("invalid_option", "model")
        assert err["message"] == "'cam' already runs with model 'b'; join it without a model, or close it first"
        err = d.error("open", source="cam", tracking={"max_objects": 2})
        assert (err["code"], err["field"]) == ("invalid_option", "tracking.max_objects")

        # the config's choices for a named source
        dock = d.request("open", source="dock")["session"]
        assert (dock["model"], dock["tracking"]) == ("b", {"max_objects": 2})

        # bad choices: clear errors naming the field, and no session or source left behind
        before = len(st.server.manager.list())
        for fields, code, field, message in [
            ({"model": "sam2.1-large"}, "invalid_option", "model",
             "no model 'sam2.1-large' on this server (it has: sam2.1-tiny, b)"),
            ({"tracking": {"max_objects": 99}}, "invalid_option", "tracking.max_objects",
             "tracking option max_objects must be in [1, 16], not 99"),
            ({"tracking": {"max_cond_frames": 1}}, "invalid_message", "tracking.max_cond_frames",
             "Expected `int` >= 2 - at `$.tracking.max_cond_frames`"),
            ({"tracking": {"resize": 640}}, "invalid_message", "tracking.resize",
             "Object contains unknown field `resize` - at `$.tracking`"),
            ({"tracking": {"batch_objects": "yes"}}, "invalid_message", "tracking.batch_objects",
             "Expected `bool | null`, got `str` - at `$.tracking.batch_objects`"),
        ]:
            err = d.error("open", source="cam2", **fields)
            assert (err["code"], err["field"], err["message"]) == (code, field, message)
        assert len(st.server.manager.list()) == before

        # the Python client
        with SyncClient(st.url) as client:
            remote = client.open("cam2", model="b", tracking={"batch_objects": False, "max_cond_frames": 4})
            assert (remote.info.model, remote.info.tracking) == ("b", {"max_cond_frames": 4, "batch_objects": False})
            predictor = st.server.manager.get(remote.id).predictor
            assert predictor.batch_objects is False and predictor.max_cond_frames == 4
            with pytest.raises(ValueError) as exc:
                client.open("cam2", tracking={"max_cond_frames": "many"})
            assert str(exc.value) == "tracking: Expected `int | null`, got `str` - at `$.max_cond_frames`"
        c.close()
        d.close()


def test_config_models_and_source_choices_are_checked_at_start(model, second_model):
    from server.config import ConfigError, ModelEntry, SourceEntry

    config = make_config(sources={"dock": SourceEntry(uri="push:dock", model="large")})
    with pytest.raises(ConfigError) as err:
        ServerThread(TrackingServer(config, model)).start()
    assert str(err.value) == "source 'dock' in the config: no model 'large' on this server (it has: sam2.1-tiny)"
    config.models = {"sam2.1-tiny": ModelEntry()}
    with pytest.raises(ConfigError) as err:
        config.check()
    assert str(err.value) == "[models.sam2.1-tiny] has the default model's name ([model] name = 'sam2.1-tiny'); rename one"
    config = make_config(sources={"dock": SourceEntry(uri="push:dock", tracking={"max_objects": 0})})
    with pytest.raises(ConfigError) as err:
        ServerThread(TrackingServer(config, model)).start()
    assert str(err.value) == "source 'dock' in the config: tracking option max_objects must be in [1, 16], not 0"
    # a model the config lists is one sessions may choose
    config = make_config(sources={"dock": SourceEntry(uri="push:dock", model="b")})
    with ServerThread(TrackingServer(config, model, models={"b": second_model})).start() as st:
        assert [m.name for m in st.server.hello(1).models] == ["sam2.1-tiny", "b"]
