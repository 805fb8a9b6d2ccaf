"""End to end through the real server on 127.0.0.1: the engine's side of issue 11.

* A prompt flood (``clear_old_points: false`` on one paused frame, from several
  clients at once) gets the accumulated-points error, while a client on a
  second session keeps receiving frames.
* New object ids stay in the protocol's range (1 .. 2^31 - 1).
* A real UDP camera (the ``ffmpeg`` CLI) stops sending: ``source_dropped`` reaches
  the client within a second of the ingest noticing, with no frame in between,
  and ``source_reconnected`` when the camera is back.
* A click while each model step takes seconds (longer than ``prompt_window_s``)
  is accepted on the frame on screen, and the object is in the next frames.

Every wait is bounded in count and time; nothing asserts on speed except the
event latency the issue names (one second).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from server.app import ServerThread
from server.config import SourceEntry
from tests.frames import moving_shapes, shape_centres
from tests.servers.processes import FfmpegSender, ffmpeg_available
from tests.test_server import Raw, make_config, objects_of, running, source_of
from tests.videogen import free_port
from tracker.ingest import EventKind

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

H, W = 120, 160
FRAMES = moving_shapes(12, H, W)


class Camera:
    """A thread pushing frames into a push source, stamped with its own clock, until stopped (at most ``limit_s``)."""

    def __init__(self, st: ServerThread, session_id: str, fps: float = 20.0, limit_s: float = 90.0) -> None:
        self.source = source_of(st, session_id)
        self.fps, self.limit_s = fps, limit_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Camera:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        t0 = time.monotonic()
        n = 0
        while not self._stop.is_set() and time.monotonic() - t0 < self.limit_s:
            self.source.push(FRAMES[n % len(FRAMES)], pts_s=time.monotonic() - t0)
            n += 1
            self._stop.wait(1.0 / self.fps)


def grid(k: int, n: int = 8) -> list[list[float]]:
    """``n`` distinct points inside the frame, different for each ``k``."""
    return [[float(5 + ((k * n + i) % 30) * 5), float(5 + ((k * n + i) // 30) * 5 % 110)] for i in range(n)]


def test_a_prompt_flood_gets_the_points_limit_while_another_session_keeps_its_frames(model):
    """Three clients on one paused session each send prompts of 8 points with
    ``clear_old_points: false`` on its frame: 8 prompts fill the 64-point budget of
    object 1, every later one is refused with the limit; a client on a second
    session receives frames all the while (at least 5 during the flood)."""
    config = make_config(
        {"cam": "push:cam", "cam2": "push:cam2"},
        limits={"prompts_per_s": 1000.0, "prompt_burst": 1000.0},
    )
    with running(model, config) as st:
        flooders = [Raw(st.url) for _ in range(3)]
        sid = flooders[0].request("open", source="cam")["session"]["session_id"]
        for c in flooders[1:]:
            c.request("open", source="cam")
        source_of(st, sid).push(FRAMES[0], pts_s=0.0)
        for c in flooders:
            assert c.next_frame()["frame_idx"] == 0
        flooders[0].request("pause", session_id=sid)
        watcher = Raw(st.url)
        sid2 = watcher.request("open", source="cam2")["session"]["session_id"]
        answers: list[dict] = []
        lock = threading.Lock()

        def flood(c: Raw, k: int) -> None:
            for j in range(6):
                msg = c.answer(c.send("add_points", session_id=sid, obj_id=1, frame_idx=0,
                                      points_xy=grid(3 * j + k), labels=[1] * 8, clear_old_points=False))
                with lock:
                    answers.append(msg)

        with Camera(st, sid2):
            watcher.next_frame()
            threads = [threading.Thread(target=flood, args=(c, k), daemon=True) for k, c in enumerate(flooders)]
            start = time.time()
            for t in threads:
                t.start()
            seen = 0
            while any(t.is_alive() for t in threads) and time.time() - start < 90:
                try:
                    msg = watcher.recv(timeout=0.5)
                except TimeoutError:
                    continue
                if msg["type"] == "frame":
                    seen += 1
            end = time.time()
            for t in threads:
                t.join(5)
        assert len(answers) == 18
        accepted = [a for a in answers if a["type"] == "reply"]
        refused = [a for a in answers if a["type"] == "error"]
        assert len(accepted) == 8 and len(refused) == 10
        assert {(e["code"], e["message"]) for e in refused} == {(
            "prompt_error",
            "object 1 would have 72 points on frame 0, more than the 64 allowed per object and frame; "
            "send clear_old_points true to replace its points there, or prompt on a newer frame",
        )}
        # frames keep coming while the flood runs (the worker-level order of work is proven
        # in tests/test_session.py; here a count, not a rate: this machine's speed varies)
        assert seen >= 3, f"the second session got {seen} frames in {end - start:.1f} s of prompt flood"
        predictor = st.server.manager.get(sid).predictor
        assert predictor._objects[1].point_inputs[0]["point_labels"].shape[1] == 64


def test_new_object_ids_stay_in_the_protocol_range(model):
    """After obj_id 2147483647 a new object gets 1 (the lowest free id), which
    ``remove_object`` can name, not 2147483648."""
    with running(model) as st:
        c = Raw(st.url)
        sid = c.request("open", source="cam")["session"]["session_id"]
        source_of(st, sid).push(FRAMES[0], pts_s=0.0)
        c.next_frame()
        top = 2**31 - 1
        assert c.request("add_points", session_id=sid, obj_id=top, points_xy=[[30, 30]], labels=[1])["obj_id"] == top
        new = c.request("add_points", session_id=sid, points_xy=[[110, 80]], labels=[1])["obj_id"]
        assert new == 1
        assert c.request("remove_object", session_id=sid, obj_id=new)["objects"] == [top]
        assert c.request("add_points", session_id=sid, points_xy=[[60, 60]], labels=[1])["obj_id"] == 1
        source_of(st, sid).push(FRAMES[1], pts_s=1 / 30)
        assert sorted(objects_of(c.next_frame())) == [1, top]
        err = c.error("add_points", session_id=sid, obj_id=top + 1, points_xy=[[30, 30]], labels=[1])
        assert err["code"] == "invalid_message"


@pytest.mark.skipif(not ffmpeg_available(), reason="ffmpeg CLI missing: apt-get install ffmpeg")
def test_source_dropped_reaches_the_client_while_the_camera_is_silent(model, tmp_path):
    """A live UDP MPEG-TS camera (``ffmpeg``) stops: the reader notices after its
    read timeout (1.5 s) and the client has ``source_dropped`` within a second of
    that, before any new frame; ``source_reconnected`` when the camera is back."""
    port = free_port(socket.SOCK_DGRAM)
    uri = f"udp://127.0.0.1:{port}"
    sender = FfmpegSender(["-f", "mpegts", f"{uri}?pkt_size=1316"], tmp_path)
    config = make_config({"udpcam": SourceEntry(uri=uri, options={"timeout_s": 1.5, "max_backoff_s": 0.5})})
    sender.start()
    try:
        with running(model, config) as st:
            c = Raw(st.url)
            sid = c.request("open", source="udpcam")["session"]["session_id"]
            for _ in range(3):
                c.next_frame(timeout=30)
            events = st.server.manager.get(sid).source.events
            last_seq = max((e.seq for e in events.snapshot()), default=-1)
            sender.stop()
            noticed = events.wait_for(EventKind.DROPPED, timeout=15, after_seq=last_seq)
            assert noticed is not None, events.snapshot()
            got = c.next_event("source_dropped", timeout=10)
            assert got["_received_s"] - noticed.time_s < 1.0
            assert got["message"] == noticed.message
            late = [f for f in c.frames if f["source_index"] >= noticed.next_index]
            assert late == []  # it came with no new frame
            sender.start()
            back = c.next_event("source_reconnected", timeout=40)
            assert back["session_id"] == sid
            index = -1
            for _ in range(60):  # frames stashed while waiting for the events come first
                index = c.next_frame(timeout=30)["source_index"]
                if index >= noticed.next_index:
                    break
            assert index >= noticed.next_index  # frames flow again
    finally:
        sender.stop()


def test_a_click_on_the_frame_on_screen_is_accepted_while_a_model_step_takes_seconds(model, monkeypatch):
    """SAM 2 at 1024 px on a CPU takes 6-11 s per step, longer than the 2 s prompt
    window, so the window in seconds held only the newest frame and the click on
    the frame on screen (one step older) was refused. Here the test model stays
    at 256 px and the image encoder is slowed by an injected 3 s sleep per step
    (fault injection, as the issue allows): a camera at 20 fps stamps frames with
    its clock, so processed frames are 3 s apart. The click on the frame the
    client last received is accepted, and the object is in the next frames."""
    forward_image = model.forward_image

    def slow_forward_image(img: Any) -> Any:
        time.sleep(3.0)
        return forward_image(img)

    monkeypatch.setattr(model, "forward_image", slow_forward_image)
    with running(model) as st:
        c = Raw(st.url)
        sid = c.request("open", source="cam")["session"]["session_id"]
        with Camera(st, sid, limit_s=60):
            first = c.next_frame(timeout=30)
            on_screen = c.next_frame(timeout=30)  # the frame the operator clicks on
            assert on_screen["pts_s"] - first["pts_s"] > 2.0  # steps slower than the window
            index = on_screen["source_index"] % len(FRAMES)
            cx, cy = shape_centres(index, H, W)[0]
            reply = c.request("add_points", session_id=sid, points_xy=[[cx, cy]], labels=[1],
                              frame_idx=on_screen["frame_idx"])
            assert reply["obj_id"] == 1 and reply["frame_idx"] == on_screen["frame_idx"]
            assert reply["object"]["obj_id"] == 1
            # the step in flight at the click (frame on_screen + 1) may have gone out
            # before the prompt ran; every frame after it has the object
            after: list[dict] = []
            for _ in range(4):
                frame = c.next_frame(timeout=30)
                if frame["frame_idx"] >= on_screen["frame_idx"] + 2:
                    after.append(frame)
                if len(after) == 2:
                    break
    assert len(after) == 2 and all(sorted(objects_of(f)) == [1] for f in after)
