"""Live tracking sessions and the inference worker that runs them.

A :class:`TrackingSession` is one source + one predictor (:mod:`tracker.predictor_api`) + its
objects. Its reader thread takes the source's newest frame and leaves it in a
one-slot mailbox (a newer frame replaces an unprocessed one: lag never grows).

One :class:`InferenceWorker` per device owns the model. It runs every
session's model work on its own thread, in rounds: a few prompt/control
commands of each session that has some (at most its ``prompts_per_step``,
sessions round-robin: an operator waits on them), then the newest frames of up
to ``max_batch`` sessions through the image encoder as one batch, then each
session's memory attention and heads. Sessions are served round-robin, so none
waits more than one step for another, and a flood of one session's prompts
neither starves other sessions' frames nor queues ahead of their prompts.

Source events (dropped, reconnected, ended, failed) reach subscribers as the
source emits them, not with the next frame: a dropped camera sends none.

A failure inside a step (a model error, CUDA out of memory, a bad frame) is
contained to its session: its subscribers get an ``error`` event, the frame is
dropped, and every other session carries on. Where the manager is built with
``cpu_fallback``, a session that runs out of CUDA memory moves to a CPU copy of
its model (its tracking state moves with it) and says so in a ``moved`` event.

A session picks its model among the manager's (``SessionManager(models=...)``)
and its own tracking options; sessions on one device share one worker, which
batches the frames of sessions with the same model.

Subscribers are plain callables taking a :class:`FrameResult` or a
:class:`SessionEvent`; they are called on the worker or reader thread and must
not block (the server hands them to its event loop).

No network code here: ``server`` builds on this.
"""

from __future__ import annotations

import io
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from tracker.errors import SourceError, TrackerError
from tracker.families import make_predictor
from tracker.predictor_api import Predictor
from tracker.prompts import OBJ_ID_MAX, OBJ_ID_MIN, check_obj_id
from tracker.results import FrameResult, ObjectResult

logger = logging.getLogger(__name__)


class SessionError(TrackerError):
    """A session operation cannot be done (limits, closed session, unknown id)."""


class OptionError(ValueError):
    """A session's model or tracking option cannot be used; ``option`` names it
    (None: the model name)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass
class SessionEvent:
    """Something that happened to a session or one of its objects.

    kinds: ``lost`` / ``found`` (object score stayed <= 0 for ``lost_after``
    frames / came back), ``error`` (a step failed; the frame was dropped),
    ``moved`` (out of CUDA memory: the session now runs on the CPU),
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


def notify_all(callbacks: Iterable[Callable[..., None]], *args: Any, what: str) -> None:
    """Call each callback with ``args``; one that raises is logged (``what`` names
    whose subscriber it was) and skipped, so a broken subscriber never stops a
    session or starves the other subscribers."""
    for callback in callbacks:
        try:
            callback(*args)
        except Exception:
            logger.exception("%s: subscriber failed", what)


@dataclass
class SessionLimits:
    max_objects: int = 16
    lost_after_frames: int = 15
    idle_timeout_s: float = 60.0
    #: points one object may accumulate on one frame (over all its prompts there)
    max_points_per_frame: int = 64
    #: prompt/control commands the worker runs for this session between frame steps
    prompts_per_step: int = 1


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
        predictor: Predictor,
        worker: "InferenceWorker",
        *,
        name: str = "",
        limits: SessionLimits | None = None,
        session_id: str | None = None,
        model_name: str = "",
        predictor_options: dict[str, Any] | None = None,
        tracking: dict[str, Any] | None = None,
    ) -> None:
        self.id = session_id or uuid.uuid4().hex[:12]
        self.name = name or self.id
        self.model_name = model_name
        #: the keywords ``predictor`` was built with (a move to another device rebuilds it)
        self.predictor_options = dict(predictor_options or {})
        #: the tracking options it was opened with (``SessionManager.open``)
        self.tracking = dict(tracking or {})
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
        self._pending_ids: set[int] = set()  # object ids prompted, not yet applied by the worker
        self._last_event_seq = -1  # newest source event already forwarded
        self._events_lock = threading.Lock()  # the reader and the source's thread both forward events
        self._source_over = False  # the source reported its end (ended / failed)
        self._not_visible: dict[int, int] = {}  # obj_id -> consecutive frames with score <= 0
        self._lost: set[int] = set()
        self._stop = threading.Event()
        #: called on the worker thread after a step ran out of CUDA memory (the manager's CPU fallback)
        self.on_out_of_memory: Callable[[TrackingSession], None] | None = None
        self._reader = threading.Thread(target=self._read_loop, name=f"session-{self.id}-reader", daemon=True)
        worker.attach(self)
        events = getattr(source, "events", None)
        self._events = events if hasattr(events, "add_listener") else None
        if self._events is not None:
            self._events.add_listener(self._on_source_event)
        self._reader.start()

    # ------------------------------------------------------------ subscribers

    def subscribe(self, callback: Subscriber) -> int:
        return self._add_subscriber(self._subscribers, callback)

    def subscribe_frames(self, callback: FrameSubscriber) -> int:
        """Like :meth:`subscribe` for results only, with the frame each was computed
        on: ``callback(frame, result)`` on the worker thread (video egress)."""
        return self._add_subscriber(self._frame_subscribers, callback)

    def _add_subscriber(self, table: dict[int, Any], callback: Any) -> int:
        with self._lock:
            if self.state == "closed":
                raise SessionError(f"session {self.id} is closed")
            sub_id = next(self._sub_ids)
            table[sub_id] = callback
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
        notify_all(subs, item, what=f"session {self.id}")

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
        PromptError/SessionError that refused it. Raised at once: SessionError
        (closed session, object limit, no free id), PromptError (``obj_id``
        outside [1, 2^31 - 1]). A new object gets the id after the largest in
        use, or the lowest free one once that would pass 2^31 - 1.
        """
        self._check_open()
        if obj_id is not None:
            obj_id = check_obj_id(obj_id)
        with self._lock:
            # ids handed out but not yet applied by the worker count too, so two
            # clients creating objects at the same moment get two ids
            known = set(self.predictor.obj_ids) | self._pending_ids
            if obj_id is None:
                obj_id = self._new_obj_id(known)
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

        return self.worker.submit(run, session=self)

    def _new_obj_id(self, known: set[int]) -> int:
        """The next id after the largest one in use; once that would leave
        [OBJ_ID_MIN, OBJ_ID_MAX] (which clients can name), the lowest free one."""
        candidate = max(known, default=OBJ_ID_MIN - 1) + 1
        if candidate <= OBJ_ID_MAX:
            return candidate
        expected = OBJ_ID_MIN
        for used in sorted(known):
            if used != expected:
                return expected
            expected += 1
        raise SessionError(
            f"session {self.id} has no free object id: every id in [{OBJ_ID_MIN}, {OBJ_ID_MAX}] is taken; "
            "remove an object first"
        )

    def remove_object(self, obj_id: int) -> "Future[None]":
        self._check_open()

        def run() -> None:
            self.predictor.remove_object(obj_id)
            self._not_visible.pop(obj_id, None)
            self._lost.discard(obj_id)

        return self.worker.submit(run, session=self)

    def reset(self) -> "Future[None]":
        self._check_open()

        def run() -> None:
            self.predictor.reset()
            self._not_visible.clear()
            self._lost.clear()

        return self.worker.submit(run, session=self)

    def close(self, reason: str = "closed") -> None:
        with self._lock:  # worker and predictor as they are now: a move to the CPU cannot slip in
            if self.state == "closed":
                return
            self.state = "closed"
            worker, predictor = self.worker, self.predictor
        self._stop.set()
        worker.detach(self)
        if self._events is not None:
            self._events.remove_listener(self._on_source_event)
        try:
            self.source.close()
        except Exception:
            logger.exception("session %s: closing the source failed", self.id)
        self._event("closed", reason)
        with self._lock:
            self._subscribers.clear()
            self._frame_subscribers.clear()
        # free model state on the worker thread, after any step in flight and
        # after this session's queued commands
        worker.submit(predictor.close, session=self)

    def tracking_values(self) -> dict[str, Any]:
        """Every tracking option's value in this session (chosen or default)."""
        p, limits = self.predictor, self.limits
        return {
            "prompt_window_s": p.prompt_window_s,
            "max_prompt_frames": p.max_prompt_frames,
            "max_cond_frames": p.max_cond_frames,
            "corrections_as_cond": p.corrections_as_cond,
            "batch_objects": p.batch_objects,
            "lost_after_frames": limits.lost_after_frames,
            "max_objects": limits.max_objects,
        }

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
            "model": self.model_name,
            "device": str(self.predictor.device),
            "tracking": dict(self.tracking),
            "subscribers": self.subscriber_count,
            "frames_processed": self.stats.frames_processed,
            "frames_dropped": self.stats.frames_dropped,
            "newest_frame_idx": self.predictor.newest_frame_idx,
        }

    # ------------------------------------------------------------ reader / worker side

    def _on_source_event(self, event: Any) -> None:
        """The source's EventLog listener (on the thread that emitted the event):
        forward at once, so a source that stopped delivering frames is still heard."""
        if not self._stop.is_set():
            self._forward_source_events()

    def _forward_source_events(self) -> bool:
        """Publish the source's new events, each once (by sequence number: the log
        keeps only the newest ones, and both the reader and the source's listener
        call this); True once the source reported its end."""
        with self._events_lock:
            for ev in self.source.events.snapshot():
                if ev.seq <= self._last_event_seq:
                    continue
                self._last_event_seq = ev.seq
                self._source_over = self._source_over or ev.kind.value in ("ended", "failed")
                self._event(f"source_{ev.kind.value}", ev.message)
            return self._source_over

    def _read_loop(self) -> None:
        ended = False
        try:
            for frame in self.source:
                if self._stop.is_set():
                    break
                ended = self._forward_source_events() or ended  # events from before the listener
                if self.state != "running":
                    continue
                with self._lock:
                    if self._mailbox is not None:
                        self.stats.frames_dropped += 1
                    self._mailbox = (frame, time.perf_counter())
                    self.stats.frames_in += 1
                self.worker.wake()
        except SourceError as e:
            if not self._stop.is_set() and not self._forward_source_events():
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
            notify_all(frame_subs, frame, result, what=f"session {self.id} (frames)")
        self._publish(result)

    def fail_step(self, exc: BaseException) -> None:
        self.stats.step_errors += 1
        logger.warning("session %s: step failed, frame dropped: %s", self.id, exc)
        self._event("error", f"{type(exc).__name__}: {exc}; frame dropped")
        if isinstance(exc, torch.cuda.OutOfMemoryError) and self.on_out_of_memory is not None:
            try:
                self.on_out_of_memory(self)
            except Exception:
                logger.exception("session %s: moving off the GPU failed; it stays where it is", self.id)

    def move_to(self, predictor: Predictor, worker: "InferenceWorker", why: str) -> bool:
        """Carry on with another predictor (holding this one's tracking state) on
        another worker. Call on the current worker's thread, between steps.
        False (and ``predictor`` closed) when the session closed meanwhile."""
        with self._lock:
            moved = self.state != "closed"
            if moved:
                old = self.worker
                old.detach(self)
                self.predictor, self.worker = predictor, worker
                worker.attach(self)
        if not moved:
            predictor.close()
            return False
        self._event("moved", why)
        worker.wake()
        if old is not worker:
            old.wake()
        return True


class InferenceWorker:
    """The one thread that runs model work for every session on one device.

    ``model`` fixes the device; sessions may bring other models on that device
    (each step batches the sessions that share one model).

    Commands (prompts, removals, resets: :meth:`submit`) wait in one FIFO per
    session. Each round runs at most ``prompts_per_step`` of each session's
    commands (its ``limits.prompts_per_step``; commands of no session take
    this worker's ``prompts_per_step``), sessions in turn, then one frame step:
    however many prompts one session queues, another session's frames are
    stepped between them, and its commands wait behind a bounded number.

    Image mode (``tracker.segment``) shares the thread: prompts on embeddings
    (:meth:`submit_image_prompt`, decoder only, milliseconds) run first in each
    round, at most ``image_prompts_per_step`` of them (an operator waits on
    them); images to embed (:meth:`submit_image_embed`) wait together and each
    round sends those pending through the image encoder as **one**
    ``ImageSegmenter.embed`` call (up to ``max_image_batch``), between the
    commands and the frame step. A live session therefore waits at most one
    image batch between two of its frame steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_batch: int = 4,
        name: str = "inference",
        prompts_per_step: int = 1,
        max_image_batch: int = 8,
        image_prompts_per_step: int = 16,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.max_batch = max(1, int(max_batch))
        self.prompts_per_step = max(1, int(prompts_per_step))
        self._sessions: list[TrackingSession] = []
        self._rr = 0
        #: owner (a session, or None) -> its commands, oldest first; owners in turn order
        self._commands: "OrderedDict[TrackingSession | None, deque[tuple[Callable[[], Any], Future]]]" = OrderedDict()
        self._commands_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.steps = 0
        self.batched_frames = 0
        self.max_image_batch = max(1, int(max_image_batch))
        self.image_prompts_per_step = max(1, int(image_prompts_per_step))
        self._image_prompts: deque[tuple[Callable[[], Any], Future]] = deque()
        #: (segmenter, prepared image, cache, future) of images waiting for the encoder
        self._image_embeds: deque[tuple[Any, Any, Any, Future]] = deque()
        self._images_lock = threading.Lock()
        self.image_batches = 0  # encoder calls made for images
        self.images_embedded = 0  # images those calls took (cache hits included)
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

    def submit(self, fn: Callable[[], Any], *, session: TrackingSession | None = None) -> Future:
        """Run ``fn`` on the worker thread, in ``session``'s command queue (see the
        class docstring: before that session's next frame unless it has queued
        more than ``prompts_per_step`` commands); returns a Future."""
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(SessionError("the inference worker has stopped"))
            return fut
        with self._commands_lock:
            self._commands.setdefault(session, deque()).append((fn, fut))
        self._wake.set()
        return fut

    def submit_image_prompt(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` (a prompt on an image embedding: decoder only) on the worker
        thread ahead of this round's commands and encoder work; returns a Future."""
        return self._queue_image(self._image_prompts, (fn,))

    def submit_image_embed(self, segmenter: Any, image: Any, cache: Any = None) -> Future:
        """Embed ``image`` (a ``tracker.segment.PreparedImage``) with ``segmenter``
        on the worker thread, in one encoder batch with every other image pending
        for the same segmenter; the Future's result is a ``tracker.segment.Embedded``
        (looked up in ``cache`` first, on this thread, and put there)."""
        return self._queue_image(self._image_embeds, (segmenter, image, cache))

    def _queue_image(self, queue: deque, item: tuple) -> Future:
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(SessionError("the inference worker has stopped"))
            return fut
        with self._images_lock:
            queue.append((*item, fut))
        self._wake.set()
        return fut

    def queued_images(self) -> tuple[int, int]:
        """(image prompts, images to embed) not yet started."""
        with self._images_lock:
            return len(self._image_prompts), len(self._image_embeds)

    def queued_commands(self, session: TrackingSession | None = None) -> int:
        """Commands of ``session`` (None: of no session) not yet started."""
        with self._commands_lock:
            return len(self._commands.get(session, ()))

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while not self._stop.is_set():
                did = self._run_image_prompts()
                did = self._run_commands() or did
                did = self._run_image_batch() or did
                did = self._step_frames() or did
                if not did:
                    break
        while self._run_commands(drain=True):  # stopping: finish what was asked
            pass
        with self._images_lock:
            left = [item[-1] for item in (*self._image_prompts, *self._image_embeds)]
            self._image_prompts.clear()
            self._image_embeds.clear()
        for fut in left:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(SessionError("the inference worker has stopped"))

    def _run_image_prompts(self) -> bool:
        """Up to ``image_prompts_per_step`` image prompts, oldest first. True if any ran."""
        did = False
        for _ in range(self.image_prompts_per_step):
            with self._images_lock:
                if not self._image_prompts:
                    break
                fn, fut = self._image_prompts.popleft()
            did = True
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)
        return did

    def _image_batch_limit(self) -> int:
        """Images one round may encode. On a CPU a batch costs the sum of its images
        (seconds each at 1024 px: batching does not pay there, ``ImageSegmenter.embed``),
        so while a live session waits for its next step one image goes per round."""
        if self.device.type == "cpu":
            with self._lock:
                if any(s.has_frame() for s in self._sessions):
                    return 1
        return self.max_image_batch

    def _run_image_batch(self) -> bool:
        """One ``embed`` call for the images pending on the oldest one's segmenter
        (at most ``max_image_batch``); the others wait for the next round.
        Image prompts that came meanwhile go first: they are milliseconds."""
        self._run_image_prompts()
        with self._images_lock:
            if not self._image_embeds:
                return False
            segmenter, cache = self._image_embeds[0][0], self._image_embeds[0][2]
            limit = self._image_batch_limit()
            batch, rest = [], deque()
            while self._image_embeds:
                item = self._image_embeds.popleft()
                if item[0] is segmenter and item[2] is cache and len(batch) < limit:
                    batch.append(item)
                else:
                    rest.append(item)
            self._image_embeds = rest
        batch = [item for item in batch if item[3].set_running_or_notify_cancel()]
        if not batch:
            return True
        self.image_batches += 1
        self.images_embedded += len(batch)
        try:
            embedded = segmenter.embed([item[1] for item in batch], cache)
        except BaseException as e:  # CUDA out of memory for one image alone: the caller's fallback
            self._maybe_free_cuda(e)
            for item in batch:
                item[3].set_exception(e)
            return True
        for item, result in zip(batch, embedded):
            item[3].set_result(result)
        return True

    def _run_commands(self, drain: bool = False) -> bool:
        """One round: each owner's next commands, at most its ``prompts_per_step``
        (``drain``: all of them), owners in turn. True if any ran."""
        did = False
        with self._commands_lock:
            owners = list(self._commands)
        for owner in owners:
            budget = owner.limits.prompts_per_step if owner is not None else self.prompts_per_step
            taken = 0
            while drain or taken < max(1, budget):
                with self._commands_lock:
                    pending = self._commands.get(owner)
                    if not pending:
                        self._commands.pop(owner, None)
                        break
                    fn, fut = pending.popleft()
                    if pending:
                        self._commands.move_to_end(owner)  # its turn is over: the others go first next round
                    else:
                        del self._commands[owner]
                taken += 1
                did = True
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn())
                except BaseException as e:  # delivered to whoever waits on the future
                    fut.set_exception(e)
        return did

    def _step_frames(self) -> bool:
        with self._lock:
            ready = [s for s in self._sessions if s.has_frame()]
            if not ready:
                return False
            # round-robin: start after the last session served first
            self._rr = (self._rr + 1) % max(1, len(self._sessions))
            ready.sort(key=lambda s: (self._sessions.index(s) - self._rr) % len(self._sessions))
            # one encoder call per model: the first session's model takes this step
            model = ready[0].predictor.model
            batch = [s for s in ready if s.predictor.model is model][: self.max_batch]
        items = []
        for s in batch:
            taken = s.take_frame()
            if taken is not None:
                items.append((s, *taken))
        if not items:
            return False
        self.steps += 1
        self.batched_frames += len(items)
        for session, frame, frame_idx in self._encode_batch(items):
            if session.worker is not self:  # moved to the CPU while another frame failed
                continue
            t0 = time.perf_counter()
            try:
                result = session.predictor.propagate(frame_idx)
            except Exception as e:
                self._maybe_free_cuda(e)
                session.fail_step(e)
                continue
            session.stats.times.track.append(time.perf_counter() - t0)
            session.finish_step(result, frame)
        return True

    def _encode_batch(self, items: list[tuple[TrackingSession, Any, float]]) -> list[tuple[TrackingSession, Any, int]]:
        """Newest frames of several sessions through the image encoder as one batch;
        returns (session, frame, frame index in its predictor) for each one encoded."""
        t0 = time.perf_counter()
        inputs = []
        for session, frame, queued_s in items:
            session.stats.times.queue_wait.append(t0 - queued_s)
            try:
                inputs.append((session, frame, session.predictor.to_model_input(frame.image_rgb)))
            except Exception as e:
                session.fail_step(e)
        return self._encode(inputs, t0) if inputs else []

    def _encode(self, inputs: list[tuple[TrackingSession, Any, torch.Tensor]], t0: float) -> list[tuple[TrackingSession, Any, int]]:
        try:
            # the first session's predictor runs its family's image encoder for all
            # (the batch holds sessions of one model only: see _step_frames)
            features = inputs[0][0].predictor.forward_batch(torch.cat([x[2] for x in inputs], dim=0))
        except Exception as e:
            self._maybe_free_cuda(e)
            if isinstance(e, torch.cuda.OutOfMemoryError) and len(inputs) > 1:
                # too big together: one at a time, so only a frame that fails alone costs its session
                logger.warning("image encoder out of memory for %d frames at once; encoding them one by one", len(inputs))
                return [r for x in inputs for r in self._encode([x], time.perf_counter())]
            for session, _, _ in inputs:
                session.fail_step(e)
            return []
        dt = time.perf_counter() - t0
        encoded = []
        for i, (session, frame, _) in enumerate(inputs):
            session.stats.times.encode.append(dt / len(inputs))
            try:
                frame_idx = session.predictor.encode_features(
                    features[i],
                    source_size=frame.source_size,
                    pts_s=frame.pts_s,
                    arrival_s=frame.arrival_s,
                    source_index=frame.index,
                )
            except Exception as e:
                session.fail_step(e)
                continue
            encoded.append((session, frame, frame_idx))
        return encoded

    def _maybe_free_cuda(self, exc: BaseException) -> None:
        if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of a model on the CPU that never asks the GPU for memory
    (``copy.deepcopy`` would clone every weight on the GPU first, just after it
    ran out): the weights stream through host memory."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=False).float().eval()


#: per-session tracking options a client may choose (``SessionManager.open``)
TRACKING_OPTIONS: tuple[str, ...] = (
    "prompt_window_s",
    "max_prompt_frames",
    "max_cond_frames",
    "corrections_as_cond",
    "batch_objects",
    "lost_after_frames",
    "max_objects",
)


def check_tracking_options(
    models: list[str], max_objects: int, model: str | None = None, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``model`` (one of ``models``) and the tracking options, checked: the options, or an
    :class:`OptionError` naming what is wrong. Where sessions run elsewhere (a Ray
    session host) the front checks with the same rules before anything opens."""
    if model is not None and model not in models:
        raise OptionError(f"no model {model!r} on this server (it has: {', '.join(models)})")
    options = dict(options or {})
    unknown = sorted(set(options) - set(TRACKING_OPTIONS))
    if unknown:
        raise OptionError(
            f"unknown tracking option {unknown[0]!r} (known: {', '.join(TRACKING_OPTIONS)})", unknown[0]
        )
    ranges = {
        "prompt_window_s": (0.0, 60.0),
        "max_prompt_frames": (1, 600),
        "max_cond_frames": (2, 64),
        "lost_after_frames": (1, 100_000),
        "max_objects": (1, max_objects),
    }
    for key, value in options.items():
        if key in ("corrections_as_cond", "batch_objects"):
            if not isinstance(value, bool):
                raise OptionError(f"tracking option {key} must be true or false, not {value!r}", key)
            continue
        lo, hi = ranges[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(lo, int) and not isinstance(value, int)):
            kind = "an integer" if isinstance(lo, int) else "a number"
            raise OptionError(f"tracking option {key} must be {kind}, not {value!r}", key)
        if not lo <= value <= hi:
            raise OptionError(f"tracking option {key} must be in [{lo}, {hi}], not {value!r}", key)
    return options


class SessionManager:
    """Every open session of a server: opening (with limits), lookup, closing, and
    closing sessions nobody has watched for ``idle_timeout_s``.

    Args:
        worker: the inference worker of the default model's device.
        max_sessions: open sessions at most.
        limits: per-session defaults (``max_objects`` is also the ceiling a
            session's own ``max_objects`` may ask for).
        predictor_options: predictor keywords for every session (``StreamingPredictor``'s).
        models: the models sessions may ask for by name (default: ``{"default":
            worker.model}``); the first is the default. A model on another device
            gets its own worker.
        cpu_fallback: a session that runs out of CUDA memory moves to a CPU copy
            of its model (made once per model) instead of dropping frame after frame.
    """

    def __init__(
        self,
        worker: InferenceWorker,
        *,
        max_sessions: int = 8,
        limits: SessionLimits | None = None,
        predictor_options: dict[str, Any] | None = None,
        models: dict[str, torch.nn.Module] | None = None,
        cpu_fallback: bool = False,
    ) -> None:
        self.worker = worker
        self.max_sessions = max_sessions
        self.limits = limits or SessionLimits()
        self.predictor_options = predictor_options or {}
        self.models: dict[str, torch.nn.Module] = dict(models) if models else {"default": worker.model}
        self.cpu_fallback = cpu_fallback
        self._workers: dict[str, InferenceWorker] = {str(worker.device): worker}
        self._cpu_models: dict[int, torch.nn.Module] = {}  # id(model) -> its CPU copy
        self._copy_lock = threading.Lock()  # one copy at a time, never under _lock (open() takes it)
        self._sessions: dict[str, TrackingSession] = {}
        self._lock = threading.Lock()

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    @property
    def workers(self) -> list[InferenceWorker]:
        return list(self._workers.values())

    def check_options(self, model: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The tracking options, checked, or an :class:`OptionError` saying what is
        wrong: a server checks them before it opens a source (a camera connection)."""
        return check_tracking_options(list(self.models), self.limits.max_objects, model, options)

    def open(
        self,
        source: Any,
        *,
        name: str = "",
        model: str | None = None,
        options: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> TrackingSession:
        """Start tracking an opened source (``tracker.ingest.open_source``, live mode)
        with a model of :attr:`models` (default: the first) and tracking options
        (:data:`TRACKING_OPTIONS`; see :meth:`check_options`). The source is
        closed when the session cannot open. ``session_id``: keep a session's id
        where it is re-created (a session host taking over a lost host's session)."""
        try:
            options = self.check_options(model, options)
        except OptionError:
            source.close()
            raise
        model_name = model or self.default_model
        net = self.models[model_name]
        tracking = dict(options)
        limits = SessionLimits(
            max_objects=int(options.pop("max_objects", self.limits.max_objects)),
            lost_after_frames=int(options.pop("lost_after_frames", self.limits.lost_after_frames)),
            idle_timeout_s=self.limits.idle_timeout_s,
            max_points_per_frame=self.limits.max_points_per_frame,
            prompts_per_step=self.limits.prompts_per_step,
        )
        # the point budget is a limit, not a client's choice; kept with the options
        # so a move to the CPU rebuilds the predictor with it
        predictor_options = {**self.predictor_options, **options, "max_points_per_frame": limits.max_points_per_frame}
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                source.close()
                raise SessionError(
                    f"the server already runs {self.max_sessions} sessions (the limit); close one or subscribe to one"
                )
            worker = self._worker_for(net)
            predictor = make_predictor(net, **predictor_options)
            session = TrackingSession(
                source,
                predictor,
                worker,
                name=name,
                limits=limits,
                model_name=model_name,
                predictor_options=predictor_options,
                tracking=tracking,
                session_id=session_id,
            )
            if self.cpu_fallback:
                session.on_out_of_memory = self._move_to_cpu
            self._sessions[session.id] = session
        logger.info("session %s opened on %s (model %s on %s)", session.id, session.info()["source"], model_name, worker.device)
        return session

    def _worker_for(self, model: torch.nn.Module) -> InferenceWorker:
        """The worker of the model's device (one per device), started on first use."""
        device = str(next(model.parameters()).device)
        worker = self._workers.get(device)
        if worker is None:
            worker = self._workers[device] = InferenceWorker(
                model, max_batch=self.worker.max_batch, name=f"inference-{device}", prompts_per_step=self.worker.prompts_per_step
            )
        return worker

    def _move_to_cpu(self, session: TrackingSession) -> None:
        """CPU fallback after CUDA ran out of memory: the session's tracking state
        (memories, pointers, prompts) moves to a CPU copy of its model; prompts on
        frames before the move can no longer be placed (their features stay behind)."""
        old = session.predictor
        with self._copy_lock:
            if any(m is old.model for m in self._cpu_models.values()):
                return  # already moved: dropping the frame is all that is left
            cpu_model = self._cpu_models.get(id(old.model))
            if cpu_model is None:
                cpu_model = self._cpu_models[id(old.model)] = _cpu_copy(old.model)
        with self._lock:
            worker = self._worker_for(cpu_model)
        predictor = make_predictor(cpu_model, **session.predictor_options)
        predictor.load_state_dict(old.state_dict())
        why = f"out of CUDA memory on {old.device}: session {session.id} now runs on the CPU (slower)"
        if session.move_to(predictor, worker, why):
            logger.warning("%s", why)
            old.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

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
