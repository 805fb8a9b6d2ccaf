"""Live sessions on the inference worker: results equal the predictor's, faults stay
inside their session, object lifecycle events, limits, idle close, encoder batching."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from tests.frames import moving_shapes, shape_centres
from tracker.ingest import PushSource
from tracker.predictor import StreamingPredictor
from tracker.results import FrameResult, ObjectResult
from tracker.session import InferenceWorker, SessionError, SessionEvent, SessionLimits, SessionManager

H, W = 120, 160
FRAMES = moving_shapes(10, H, W)


@pytest.fixture()
def worker(model):
    w = InferenceWorker(model, max_batch=4)
    yield w
    w.stop()


def collect(session) -> "queue.Queue":
    q: queue.Queue = queue.Queue()
    session.subscribe(q.put)
    return q


def next_result(q: queue.Queue, timeout: float = 30.0) -> FrameResult:
    deadline = time.time() + timeout
    while time.time() < deadline:
        item = q.get(timeout=max(0.01, deadline - time.time()))
        if isinstance(item, FrameResult):
            return item
    raise AssertionError("no frame result in time")


def test_session_results_equal_the_predictor(model, worker):
    manager = SessionManager(worker)
    src = PushSource("cam")
    session = manager.open(src, name="cam")
    q = collect(session)
    got = []
    src.push(FRAMES[0], pts_s=0.0)
    first = next_result(q)
    assert first.objects == {}
    cx, cy = shape_centres(0, H, W)[0]
    r0 = session.add_prompt(1, points_xy=[[cx, cy]], labels=[1], frame_idx=first.frame_idx).result(30)
    got.append(r0.logits_hw)
    for f in range(1, 6):
        src.push(FRAMES[f], pts_s=f / 30)  # one at a time: nothing is dropped
        res = next_result(q)
        assert res.frame_idx == f and res.pts_s == pytest.approx(f / 30)
        got.append(res.objects[1].logits_hw)
    ref = StreamingPredictor(model)
    ref.track(FRAMES[0])
    expected = [ref.add_points(1, [[cx, cy]], [1]).logits_hw] + [ref.track(FRAMES[f]).objects[1].logits_hw for f in range(1, 6)]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-5)
    manager.close_all()
    assert session.state == "closed"


def test_a_failing_step_is_contained_to_its_session(model, worker):
    manager = SessionManager(worker)
    a_src, b_src = PushSource("a"), PushSource("b")
    a, b = manager.open(a_src), manager.open(b_src)
    qa, qb = collect(a), collect(b)
    original = a.predictor.propagate
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (injected)")
        return original(*args, **kw)

    a.predictor.propagate = flaky
    a_events = []
    for f in range(4):
        a_src.push(FRAMES[f])
        b_src.push(FRAMES[f])
        assert next_result(qb).frame_idx == f  # b never notices
        while True:
            item = qa.get(timeout=30)
            if isinstance(item, SessionEvent):
                a_events.append(item)
                if item.kind == "error":
                    break
            else:
                break
    errors = [e for e in a_events if e.kind == "error"]
    assert len(errors) == 1
    assert errors[0].message == "RuntimeError: CUDA out of memory (injected); frame dropped"
    assert a.stats.step_errors == 1 and b.stats.step_errors == 0
    a_src.push(FRAMES[5])
    assert next_result(qa).frame_idx == 4  # a carries on after the dropped frame
    manager.close_all()


def test_lost_and_found_events(model, worker):
    manager = SessionManager(worker, limits=SessionLimits(lost_after_frames=3))
    session = manager.open(PushSource("x"))
    events = []
    session.subscribe(lambda item: events.append(item) if isinstance(item, SessionEvent) else None)
    mask = np.zeros((H, W), bool)
    for f, score in enumerate([2.0, -1.0, -1.0, -1.0, -1.0, 0.5, -1.0]):
        result = FrameResult(frame_idx=f, height=H, width=W)
        result.objects[1] = ObjectResult(obj_id=1, mask_hw=mask, score=score)
        session.finish_step(result)
    kinds = [(e.kind, e.frame_idx) for e in events if e.kind in ("lost", "found")]
    assert kinds == [("lost", 3), ("found", 5)]
    assert events[0].message == "object 1 not visible for 3 frames (still tracked)"
    manager.close_all()


def test_limits_and_idle_close(model, worker):
    manager = SessionManager(worker, max_sessions=1, limits=SessionLimits(max_objects=1, idle_timeout_s=5))
    src = PushSource("only")
    session = manager.open(src)
    with pytest.raises(SessionError) as err:
        manager.open(PushSource("second"))
    assert str(err.value) == "the server already runs 1 sessions (the limit); close one or subscribe to one"
    q = collect(session)
    src.push(FRAMES[0])
    next_result(q)
    session.add_prompt(1, points_xy=[[20, 20]], labels=[1]).result(30)
    with pytest.raises(SessionError) as err:
        session.add_prompt(2, points_xy=[[40, 40]], labels=[1])
    assert str(err.value) == f"session {session.id} already tracks 1 objects (the limit); remove one first"
    # a bad prompt comes back through the future, the session goes on
    with pytest.raises(Exception) as err:
        session.add_prompt(1, points_xy=[[999, 20]], labels=[1]).result(30)
    assert str(err.value) == "point (999, 20) is outside the 160x120 frame"
    assert manager.reap_idle(now=time.time() + 100) == []  # it has a subscriber
    session.unsubscribe(1)
    assert manager.reap_idle(now=time.time() + 100) == [session.id]
    assert session.state == "closed"
    with pytest.raises(SessionError):
        manager.get(session.id)


def test_newest_frames_of_several_sessions_share_one_encoder_call(model):
    worker = InferenceWorker(model, max_batch=4)
    try:
        manager = SessionManager(worker)
        sources = [PushSource(f"cam{i}") for i in range(3)]
        sessions = [manager.open(s) for s in sources]
        queues = [collect(s) for s in sessions]
        gate = threading.Event()
        worker.submit(lambda: gate.wait(30))  # hold the worker while all frames arrive
        for s in sources:
            s.push(FRAMES[0])
        deadline = time.time() + 10
        while not all(s.has_frame() for s in sessions) and time.time() < deadline:
            time.sleep(0.01)
        gate.set()
        for q in queues:
            next_result(q)
        assert worker.steps == 1 and worker.batched_frames == 3
        manager.close_all()
    finally:
        worker.stop()


def test_slow_worker_drops_frames_never_queues(model, worker):
    manager = SessionManager(worker)
    src = PushSource("fast")
    session = manager.open(src)
    q = collect(session)
    gate = threading.Event()
    worker.submit(lambda: gate.wait(30))
    for f in range(8):
        src.push(FRAMES[f])
    deadline = time.time() + 10
    while session.source.stats.delivered + session.source.stats.dropped < 8 and time.time() < deadline:
        time.sleep(0.01)
    while session._mailbox is None and time.time() < deadline:
        time.sleep(0.01)
    gate.set()
    res = next_result(q)
    # of everything pushed while the worker was busy, only the newest is processed
    assert res.source_index == 7
    assert session.stats.frames_processed == 1
    assert session.source.stats.dropped + session.stats.frames_dropped == 7
    manager.close_all()
