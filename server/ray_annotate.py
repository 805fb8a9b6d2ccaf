"""Annotating many videos on a Ray cluster: an actor pool, one video per worker at a time.

``sam2-stream annotate FOLDER|--manifest FILE --out OUT --ray auto``: the job
(:mod:`tracker.annotate_many`) is cut into videos; each :class:`AnnotateWorker`
actor (one per device: one GPU each where the cluster has GPUs, else one CPU)
loads the model once and annotates one video at a time through the very function
the one-video command runs, so every video's files are what single-machine
``annotate`` writes. Propagation is sequential within a video, so a video is
never split.

Faults:

* a video that fails (bad prompts, unreadable file) is that video's failure,
  reported in the summary; the others go on;
* a worker that dies mid-video (process killed, node removed) loses nothing
  written: the video goes to another worker with ``resume=True``, which continues
  from the video's saved state (``OUT/NAME/.annotate-work``, every
  ``--save-state-every`` frames) and the writers' journals, with output identical
  to an uninterrupted run. This needs ``OUT`` on storage every node sees (one
  machine, NFS, a shared mount). Ray's own actor restarts are off: they would
  re-run the constructor and keep no state; the pool starts a fresh worker and
  resumes from disk instead. A video whose workers die ``max_attempts`` times fails.

Why core actors and not Ray Data: a video is one long sequential task with its
own resumable state and its own output folder; an actor pool with a queue of
videos gives exactly that, per-video retry with resume, and live progress,
without ``ray[data]`` (and pandas) on every node.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from server.ray_cluster import ClusterError, WorkerShape, connect, torch_threads_for_actor
from tracker.allocator import keep_freed_memory
from tracker.annotate_many import AnnotateOptions, JobProgress, ModelSpec, VideoJob, VideoOutcome, annotate_job_video, describe_error

logger = logging.getLogger(__name__)

#: how often the driver asks running workers how far they are
PROGRESS_EVERY_S = 1.0
#: how often the whole job's progress line is logged
LOG_EVERY_S = 10.0


class AnnotateWorker:
    """One Ray actor: the model, loaded once, and one video at a time.

    Threaded (``max_concurrency=2``) so :meth:`progress` answers while
    :meth:`run` works.
    """

    def __init__(self, spec: ModelSpec, options: AnnotateOptions) -> None:
        import torch

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(torch_threads_for_actor())
        keep_freed_memory()  # an actor's process does not go through the CLI
        self.spec, self.options = spec, options
        self._model: Any = None
        self._current: str | None = None
        self._frames = 0

    def where(self) -> str:
        import ray

        return f"{ray.util.get_node_ip_address()} pid {os.getpid()}"

    def warm(self) -> str:
        """Load the model now (a worker is ready once it can run a video); returns :meth:`where`."""
        if self._model is None:
            self._model = self.spec.build()
        return self.where()

    def _loaded_model(self) -> Any:
        self.warm()
        return self._model

    def run(self, job: VideoJob, resume: bool) -> VideoOutcome:
        self._current, self._frames = job.name, 0

        def on_frame(_: int) -> None:
            self._frames += 1

        try:
            outcome = annotate_job_video(job, self.options, self._loaded_model, resume=resume, on_frame=on_frame)
        finally:
            self._current = None
        outcome.worker = self.where()
        return outcome

    def progress(self) -> tuple[str | None, int]:
        """The video being annotated and its frames written so far."""
        return self._current, self._frames


@dataclass
class PoolEvent:
    """What the pool tells its caller: a video ``started`` on a worker, its ``progress``, ``finished``, a worker ``lost``."""

    kind: str
    name: str
    actor: Any = None
    frames: int = 0
    outcome: VideoOutcome | None = None
    attempt: int = 1


@dataclass
class _Running:
    actor: Any
    job: VideoJob
    attempt: int
    frames: int = 0


def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import NodeDiedError, OwnerDiedError, RayActorError, WorkerCrashedError

    return (RayActorError, WorkerCrashedError, NodeDiedError, OwnerDiedError)


def run_on_ray(
    jobs: Sequence[VideoJob],
    options: AnnotateOptions,
    spec: ModelSpec,
    *,
    address: str = "auto",
    workers: int | None = None,
    shape: WorkerShape | None = None,
    resume: bool = False,
    max_attempts: int = 3,
    progress: JobProgress | None = None,
    on_event: Callable[[PoolEvent], None] | None = None,
    progress_every_s: float = PROGRESS_EVERY_S,
    start_timeout_s: float = 600.0,
) -> list[VideoOutcome]:
    """Annotate ``jobs`` on the cluster at ``address``; one outcome per video, in the order they ended.

    Args:
        workers: actors at once (default: as many as the cluster's resources
            hold of ``shape``, at most one per video).
        shape: what each worker asks Ray for (default: 1 CPU).
        resume: continue each video from what is on disk; finished ones are skipped.
        max_attempts: workers a video may lose before it counts as failed.
        on_event: called on the driver for each :class:`PoolEvent` (tests kill
            workers from here).
        start_timeout_s: how long to wait for a first worker when none runs
            (the cluster lost the nodes that could hold one).
    """
    if max_attempts < 1:
        raise ClusterError(f"max_attempts must be at least 1, got {max_attempts}")
    shape = shape or WorkerShape()
    progress = progress if progress is not None else JobProgress(len(jobs))
    emit = on_event or (lambda event: None)
    pending: collections.deque[tuple[VideoJob, int, bool]] = collections.deque()
    for job in jobs:
        if resume and job.is_finished():
            progress.finished(VideoOutcome(job.name, True, skipped=True))
        else:
            pending.append((job, 1, resume))
    if not pending:
        return progress.outcomes

    was_connected = _ray_initialized()
    ray = connect(address)
    lost = _lost_worker_errors()
    room = shape.fits(ray.cluster_resources())
    target = min(len(pending), workers if workers is not None else room)
    if target < 1 or room < 1:
        raise ClusterError(
            f"the Ray cluster has no room for an annotate worker of {shape.describe()} "
            f"(it has {ray.cluster_resources()}); ask for less with --ray-worker-cpus/--ray-worker-gpus"
        )
    Worker = ray.remote(max_concurrency=2, max_restarts=0)(AnnotateWorker)
    logger.info("annotating %d videos on %d Ray workers (%s each)", len(pending), target, shape.describe())

    starting: dict[Any, Any] = {}  # warm() ref -> actor
    idle: list[Any] = []
    running: dict[Any, _Running] = {}
    actors: list[Any] = []
    waiting_since = time.monotonic()
    last_progress = last_log = time.monotonic()

    def start_worker() -> None:
        actor = Worker.options(**shape.options()).remote(spec, options)
        actors.append(actor)
        starting[actor.warm.remote()] = actor

    try:
        while pending or running:
            while len(idle) + len(running) + len(starting) < min(target, len(pending) + len(running)):
                start_worker()
            while idle and pending:
                actor = idle.pop()
                job, attempt, job_resume = pending.popleft()
                ref = actor.run.remote(job, job_resume)
                running[ref] = _Running(actor, job, attempt)
                emit(PoolEvent("started", job.name, actor, attempt=attempt))
            if running or idle:
                waiting_since = time.monotonic()
            elif time.monotonic() - waiting_since > start_timeout_s:
                raise ClusterError(
                    f"no annotate worker of {shape.describe()} could start in {start_timeout_s:.0f} s "
                    f"(cluster now: {ray.cluster_resources()})"
                )
            ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=progress_every_s)
            for ref in ready:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        where = ray.get(ref)
                    except lost as e:
                        logger.warning("an annotate worker died while starting: %s", e)
                        continue
                    except Exception as e:  # the model cannot load there: no video can run
                        raise ClusterError(f"an annotate worker could not load the model: {describe_error(e)}") from e
                    logger.debug("annotate worker ready on %s", where)
                    idle.append(actor)
                    continue
                r = running.pop(ref)
                try:
                    outcome: VideoOutcome = ray.get(ref)
                except lost as e:
                    emit(PoolEvent("lost", r.job.name, r.actor, frames=r.frames, attempt=r.attempt))
                    progress.running_frames.pop(r.job.name, None)
                    if r.attempt < max_attempts:
                        logger.warning(
                            "%s: its worker died (%s); resuming it on another worker (attempt %d of %d)",
                            r.job.name, type(e).__name__, r.attempt + 1, max_attempts,
                        )
                        pending.appendleft((r.job, r.attempt + 1, True))
                        continue
                    outcome = VideoOutcome(
                        r.job.name, False, error=f"its worker died {r.attempt} times (last: {type(e).__name__})"
                    )
                else:
                    idle.append(r.actor)
                outcome.attempts = r.attempt
                progress.finished(outcome)
                emit(PoolEvent("finished", r.job.name, r.actor, frames=outcome.frames, outcome=outcome, attempt=r.attempt))
                logger.info("%s: %s — %s", r.job.name, _word(outcome), progress.line())
            now = time.monotonic()
            if running and now - last_progress >= progress_every_s:
                last_progress = now
                _poll_progress(ray, running, progress, emit, timeout_s=progress_every_s)
            if now - last_log >= LOG_EVERY_S:
                last_log = now
                logger.info("%s", progress.line())
    finally:
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        if not was_connected:
            ray.shutdown()
    return progress.outcomes


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _poll_progress(ray: Any, running: dict[Any, _Running], progress: JobProgress, emit: Callable[[PoolEvent], None], timeout_s: float) -> None:
    """Ask each running worker how far its video is (a worker that died answers nothing; the run ref says why)."""
    asks = {r.actor.progress.remote(): r for r in running.values()}
    done, _ = ray.wait(list(asks), num_returns=len(asks), timeout=timeout_s)
    for ref in done:
        r = asks[ref]
        try:
            name, frames = ray.get(ref)
        except Exception:
            continue
        if name == r.job.name:
            r.frames = frames
            progress.running(name, frames)
            emit(PoolEvent("progress", name, r.actor, frames=frames, attempt=r.attempt))


def _word(outcome: VideoOutcome) -> str:
    if not outcome.ok:
        return f"FAILED ({outcome.error})"
    extra = f", resumed after frame {outcome.resumed_from}" if outcome.resumed_from is not None else ""
    retried = f" (attempt {outcome.attempts})" if outcome.attempts > 1 else ""
    return f"{outcome.frames} frames in {outcome.seconds:.1f} s on {outcome.worker}{extra}{retried}"


__all__ = ["AnnotateWorker", "PoolEvent", "run_on_ray"]
