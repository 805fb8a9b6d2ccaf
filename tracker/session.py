"""Live tracking sessions and the inference worker that runs them.

A :class:`TrackingSession` is one source + one :class:`StreamingPredictor` + its
objects. Its reader thread takes the source's newest frame and leaves it in a
one-slot mailbox (a newer frame replaces an unprocessed one: lag never grows).

One :class:`InferenceWorker` per device owns the model. It runs every
session's model work on its own thread, prompts first (an operator waits on
them), then the newest frames of up to ``max_batch`` sessions through the
image encoder as one batch, then each session's memory attention and heads.
Sessions are served round-robin, so none waits more than one step for another.

A failure inside a step (a model error, CUDA out of memory, a bad frame) is
contained to its session: its subscribers get an ``error`` event, the frame is
dropped, and every other session carries on.

Subscribers are plain callables taking a :class:`FrameResult` or a
:class:`SessionEvent`; they are called on the worker or reader thread and must
not block (the server hands them to its event loop).

No network code here: ``server`` builds on this.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tracker.errors import SourceError, TrackerError
from tracker.model import autocast_context
from tracker.predictor import StreamingPredictor
from tracker.results import FrameResult, ObjectResult

logger = logging.getLogger(__name__)


class SessionError(TrackerError):
    """A session operation cannot be done (limits, closed session, unknown id)."""


@dataclass
class SessionEvent:
    """Something that happened to a session or one of its objects.

    kinds: ``lost`` / ``found`` (object score stayed <= 0 for ``lost_after``
    frames / came back), ``error`` (a step failed; the frame was dropped),
    ``source_dropped`` / ``source_reconnected`` / ``source_ended`` /
    ``source_failed``, ``paused`` / ``resumed``, ``closed``.
    """

    kind: str
    session_id: str
    message: str = ""
    obj_id: int | None = None
    frame_idx: int | None = None
    time_s: float = field(default_factory=time.time)


Subscriber = Callable[["FrameResult | SessionEvent"], None]
#: (the Frame the model took, its result): for video egress, which needs the image
FrameSubscriber = Callable[[Any, FrameResult], None]


@dataclass
class SessionLimits:
    max_objects: int = 16
    lost_after_frames: int = 15
    idle_timeout_s: float = 60.0


@dataclass
class StageTimes:
    """Recent per-frame latencies (seconds) for metrics; bounded."""

    encode: deque = field(default_factory=lambda: deque(maxlen=512))
    track: deque = field(default_factory=lambda: deque(maxlen=512))
    queue_wait: deque = field(default_factory=lambda: deque(maxlen=512))


@dataclass
class SessionStats:
    frames_in: int = 0  # frames the reader handed to the mailbox
    frames_processed: int = 0
    frames_dropped: int = 0  # replaced in the mailbox before the worker took them
    step_errors: int = 0
    prompts: int = 0
    times: StageTimes = field(default_factory=StageTimes)


class TrackingSession:
    """One live source tracked by one predictor; see the module docstring."""

    def __init__(
        self,
        source: Any,
        predictor: StreamingPredictor,
        worker: "InferenceWorker",
        *,
        name: str = "",
        limits: SessionLimits | None = None,
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or uuid.uuid4().hex[:12]
        self.name = name or self.id
        self.source = source
        self.predictor = predictor
        self.worker = worker
        self.limits = limits or SessionLimits()
        self.stats = SessionStats()
        self.state = "running"
        self.created_s = time.time()
        self.last_subscriber_s = time.time()
        self._subscribers: dict[int, Subscriber] = {}
        self._frame_subscribers: dict[int, FrameSubscriber] = {}
        self._sub_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._mailbox: Any = None  # newest unprocessed frame (one slot)
        self._encoded_idx: int | None = None  # set by the worker between encode and propagate
        self._pending_ids: set[int] = set()  # object ids prompted, not yet applied by the worker
        self._last_event_seq = -1  # newest source event already forwarded
        self._not_visible: dict[int, int] = {}  # obj_id -> consecutive frames with score <= 0
        self._lost: set[int] = set()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name=f"session-{self.id}-reader", daemon=True)
        worker.attach(self)
        self._reader.start()

    # ------------------------------------------------------------ subscribers

    def subscribe(self, callback: Subscriber) -> int:
        with self._lock:
            if self.state == "closed":
                raise SessionError(f"session {self.id} is closed")
            sub_id = next(self._sub_ids)
            self._subscribers[sub_id] = callback
            self.last_subscriber_s = time.time()
            return sub_id

    def subscribe_frames(self, callback: FrameSubscriber) -> int:
        """Like :meth:`subscribe` for results only, with the frame each was computed
        on: ``callback(frame, result)`` on the worker thread (video egress)."""
        with self._lock:
            if self.state == "closed":
                raise SessionError(f"session {self.id} is closed")
            sub_id = next(self._sub_ids)
            self._frame_subscribers[sub_id] = callback
            self.last_subscriber_s = time.time()
            return sub_id

    def unsubscribe(self, sub_id: int) -> None:
        with self._lock:
            self._subscribers.pop(sub_id, None)
            self._frame_subscribers.pop(sub_id, None)
            self.last_subscriber_s = time.time()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers) + len(self._frame_subscribers)

    def _publish(self, item: "FrameResult | SessionEvent") -> None:
        with self._lock:
            subs = list(self._subscribers.values())
        for callback in subs:
            try:
                callback(item)
            except Exception:  # a broken subscriber must not stop the session
                logger.exception("session %s: subscriber failed", self.id)

    def _event(self, kind: str, message: str = "", **kw: Any) -> None:
        self._publish(SessionEvent(kind=kind, session_id=self.id, message=message, **kw))

    # ------------------------------------------------------------ control

    def pause(self) -> None:
        if self.state == "running":
            self.state = "paused"
            self._event("paused")

    def resume(self) -> None:
        if self.state == "paused":
            self.state = "running"
            self._event("resumed")

    def add_prompt(self, obj_id: int | None, **prompt: Any) -> "Future[ObjectResult]":
        """Prompt an object (``None``: a new id) on a recent frame; runs on the worker.

        The future holds the object's mask on the prompted frame, or the
        PromptError/SessionError that refused it.
        """
        self._check_open()
        with self._lock:
            # ids handed out but not yet applied by the worker count too, so two
            # clients creating objects at the same moment get two ids
            known = set(self.predictor.obj_ids) | self._pending_ids
            if obj_id is None:
                obj_id = max(known, default=0) + 1
            if obj_id not in known and len(known) >= self.limits.max_objects:
                raise SessionError(
                    f"session {self.id} already tracks {self.limits.max_objects} objects (the limit); remove one first"
                )
            self._pending_ids.add(obj_id)
        self.stats.prompts += 1

        def run() -> ObjectResult:
            try:
                return self.predictor.add_prompt(obj_id, **prompt)
            finally:
                with self._lock:
                    self._pending_ids.discard(obj_id)

        return self.worker.submit(run)

    def remove_object(self, obj_id: int) -> "Future[None]":
        self._check_open()

        def run() -> None:
            self.predictor.remove_object(obj_id)
            self._not_visible.pop(obj_id, None)
            self._lost.discard(obj_id)

        return self.worker.submit(run)

    def reset(self) -> "Future[None]":
        self._check_open()

        def run() -> None:
            self.predictor.reset()
            self._not_visible.clear()
            self._lost.clear()

        return self.worker.submit(run)

    def close(self, reason: str = "closed") -> None:
        with self._lock:
            if self.state == "closed":
                return
            self.state = "closed"
        self._stop.set()
        self.worker.detach(self)
        try:
            self.source.close()
        except Exception:
            logger.exception("session %s: closing the source failed", self.id)
        self._event("closed", reason)
        with self._lock:
            self._subscribers.clear()
            self._frame_subscribers.clear()
        # free model state on the worker thread, after any step in flight
        self.worker.submit(self.predictor.close)

    def _check_open(self) -> None:
        if self.state == "closed":
            raise SessionError(f"session {self.id} is closed")

    def info(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "name": self.name,
            "source": getattr(self.source.spec, "display", str(getattr(self.source, "spec", ""))),
            "state": self.state,
            "objects": self.predictor.obj_ids,
            "subscribers": self.subscriber_count,
            "frames_processed": self.stats.frames_processed,
            "frames_dropped": self.stats.frames_dropped,
            "newest_frame_idx": self.predictor.newest_frame_idx,
        }

    # ------------------------------------------------------------ reader / worker side

    def _forward_source_events(self) -> bool:
        """Publish the source's new events (by sequence number: the log keeps only
        the newest ones); True once it reported its end."""
        ended = False
        for ev in self.source.events.snapshot():
            if ev.seq <= self._last_event_seq:
                continue
            self._last_event_seq = ev.seq
            ended = ended or ev.kind.value in ("ended", "failed")
            self._event(f"source_{ev.kind.value}", ev.message)
        return ended

    def _read_loop(self) -> None:
        ended = False
        try:
            for frame in self.source:
                if self._stop.is_set():
                    break
                ended = self._forward_source_events() or ended
                if self.state != "running":
                    continue
                with self._lock:
                    if self._mailbox is not None:
                        self.stats.frames_dropped += 1
                    self._mailbox = (frame, time.perf_counter())
                    self.stats.frames_in += 1
                self.worker.wake()
        except SourceError as e:
            if not self._stop.is_set():
                self._forward_source_events()
                self._event("source_failed", str(e))
        except Exception as e:  # never let a reader thread die silently
            logger.exception("session %s: reader failed", self.id)
            self._event("source_failed", f"{type(e).__name__}: {e}")
        else:
            if not self._stop.is_set():
                ended = self._forward_source_events() or ended
                if not ended:
                    self._event("source_ended", "the source has no more frames")

    def take_frame(self) -> Any:
        with self._lock:
            item, self._mailbox = self._mailbox, None
            return item

    def has_frame(self) -> bool:
        return self._mailbox is not None and self.state == "running"

    def finish_step(self, result: FrameResult, frame: Any = None) -> None:
        """Object lifecycle bookkeeping, then fan the result out (with its frame to
        frame subscribers)."""
        self.stats.frames_processed += 1
        for obj_id, r in result.objects.items():
            if r.visible:
                self._not_visible[obj_id] = 0
                if obj_id in self._lost:
                    self._lost.discard(obj_id)
                    self._event("found", f"object {obj_id} is visible again", obj_id=obj_id, frame_idx=result.frame_idx)
            else:
                n = self._not_visible.get(obj_id, 0) + 1
                self._not_visible[obj_id] = n
                if n == self.limits.lost_after_frames and obj_id not in self._lost:
                    self._lost.add(obj_id)
                    self._event(
                        "lost",
                        f"object {obj_id} not visible for {n} frames (still tracked)",
                        obj_id=obj_id,
                        frame_idx=result.frame_idx,
                    )
        if frame is not None:
            with self._lock:
                frame_subs = list(self._frame_subscribers.values())
            for callback in frame_subs:
                try:
                    callback(frame, result)
                except Exception:  # a broken subscriber must not stop the session
                    logger.exception("session %s: frame subscriber failed", self.id)
        self._publish(result)

    def fail_step(self, exc: BaseException) -> None:
        self.stats.step_errors += 1
        logger.warning("session %s: step failed, frame dropped: %s", self.id, exc)
        self._event("error", f"{type(exc).__name__}: {exc}; frame dropped")


class InferenceWorker:
    """The one thread that runs model work for every session on one device."""

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 4, name: str = "inference") -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.max_batch = max(1, int(max_batch))
        self._sessions: list[TrackingSession] = []
        self._rr = 0
        self._commands: "queue.SimpleQueue[tuple[Callable[[], Any], Future]]" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.steps = 0
        self.batched_frames = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def attach(self, session: TrackingSession) -> None:
        with self._lock:
            self._sessions.append(session)

    def detach(self, session: TrackingSession) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)

    def wake(self) -> None:
        self._wake.set()

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker thread (before any pending frames); returns a Future."""
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(SessionError("the inference worker has stopped"))
            return fut
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while not self._stop.is_set():
                did = self._run_commands()
                did = self._step_frames() or did
                if not did:
                    break
        self._run_commands()

    def _run_commands(self) -> bool:
        did = False
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return did
            did = True
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # delivered to whoever waits on the future
                fut.set_exception(e)

    def _step_frames(self) -> bool:
        with self._lock:
            ready = [s for s in self._sessions if s.has_frame()]
            if not ready:
                return False
            # round-robin: start after the last session served first
            self._rr = (self._rr + 1) % max(1, len(self._sessions))
            ready.sort(key=lambda s: (self._sessions.index(s) - self._rr) % len(self._sessions))
            batch = ready[: self.max_batch]
        items = []
        for s in batch:
            taken = s.take_frame()
            if taken is not None:
                items.append((s, *taken))
        if not items:
            return False
        self.steps += 1
        self.batched_frames += len(items)
        self._encode_batch(items)
        for session, frame, _ in items:
            if session._encoded_idx is None:
                continue
            t0 = time.perf_counter()
            try:
                result = session.predictor.propagate(session._encoded_idx)
            except Exception as e:
                session.fail_step(e)
                self._maybe_free_cuda(e)
                continue
            finally:
                session._encoded_idx = None
            session.stats.times.track.append(time.perf_counter() - t0)
            session.finish_step(result, frame)
        return True

    def _encode_batch(self, items: list[tuple[TrackingSession, Any, float]]) -> None:
        """Newest frames of several sessions through the image encoder as one batch."""
        t0 = time.perf_counter()
        good = []
        for session, frame, queued_s in items:
            session._encoded_idx = None
            session.stats.times.queue_wait.append(t0 - queued_s)
            try:
                good.append((session, frame, session.predictor.to_model_input(frame.image_rgb)))
            except Exception as e:
                session.fail_step(e)
        if not good:
            return
        try:
            with torch.inference_mode(), autocast_context(self.device):
                backbone = self.model.forward_image(torch.cat([g[2] for g in good], dim=0))
        except Exception as e:
            for session, _, _ in good:
                session.fail_step(e)
            self._maybe_free_cuda(e)
            return
        dt = time.perf_counter() - t0
        for i, (session, frame, _) in enumerate(good):
            one = {
                "backbone_fpn": [f[i : i + 1] for f in backbone["backbone_fpn"]],
                "vision_pos_enc": [p[i : i + 1] for p in backbone["vision_pos_enc"]],
            }
            try:
                session._encoded_idx = session.predictor.encode_features(
                    one,
                    source_size=frame.source_size,
                    pts_s=frame.pts_s,
                    arrival_s=frame.arrival_s,
                    source_index=frame.index,
                )
            except Exception as e:
                session.fail_step(e)
            session.stats.times.encode.append(dt / len(good))

    def _maybe_free_cuda(self, exc: BaseException) -> None:
        if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()


class SessionManager:
    """Every open session of a server: opening (with limits), lookup, closing, and
    closing sessions nobody has watched for ``idle_timeout_s``."""

    def __init__(
        self,
        worker: InferenceWorker,
        *,
        max_sessions: int = 8,
        limits: SessionLimits | None = None,
        predictor_options: dict[str, Any] | None = None,
    ) -> None:
        self.worker = worker
        self.max_sessions = max_sessions
        self.limits = limits or SessionLimits()
        self.predictor_options = predictor_options or {}
        self._sessions: dict[str, TrackingSession] = {}
        self._lock = threading.Lock()

    def open(self, source: Any, *, name: str = "") -> TrackingSession:
        """Start tracking an opened source (``tracker.ingest.open_source``, live mode)."""
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                source.close()
                raise SessionError(
                    f"the server already runs {self.max_sessions} sessions (the limit); close one or subscribe to one"
                )
            predictor = StreamingPredictor(self.worker.model, **self.predictor_options)
            session = TrackingSession(source, predictor, self.worker, name=name, limits=self.limits)
            self._sessions[session.id] = session
        logger.info("session %s opened on %s", session.id, session.info()["source"])
        return session

    def get(self, session_id: str) -> TrackingSession:
        session = self._sessions.get(session_id)
        if session is None or session.state == "closed":
            raise SessionError(f"unknown session {session_id!r}; list_sessions shows the open ones")
        return session

    def find_by_name(self, name: str) -> TrackingSession | None:
        for s in self._sessions.values():
            if s.name == name and s.state != "closed":
                return s
        return None

    def list(self) -> list[TrackingSession]:
        return [s for s in self._sessions.values() if s.state != "closed"]

    def close(self, session_id: str, reason: str = "closed by a client") -> None:
        session = self.get(session_id)
        with self._lock:
            self._sessions.pop(session_id, None)
        session.close(reason)
        logger.info("session %s closed: %s", session_id, reason)

    def reap_idle(self, now: float | None = None) -> list[str]:
        """Close sessions without subscribers for longer than the idle timeout."""
        now = time.time() if now is None else now
        closed = []
        for s in self.list():
            if s.subscriber_count == 0 and now - s.last_subscriber_s > self.limits.idle_timeout_s:
                self.close(s.id, f"no subscriber for {self.limits.idle_timeout_s:g} s")
                closed.append(s.id)
        return closed

    def close_all(self) -> None:
        for s in self.list():
            self.close(s.id, "server shutting down")
