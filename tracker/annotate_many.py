"""Many videos, one job: ``sam2-stream annotate`` over a manifest or a folder of videos.

A job is a list of :class:`VideoJob` (a video, its prompts file, a name, an
output folder of its own), read from a manifest (:func:`load_manifest`) or found
in a folder (:func:`find_videos`). Each video is annotated by the very function
the one-video command runs (:func:`tracker.cli.annotate_video`), into
``OUT/NAME/``, so its files are byte for byte what ``sam2-stream annotate VIDEO
--prompts P --out OUT/NAME --video-name NAME`` writes.

Here the videos run one after another in this process (:func:`run_local`), with
one model load; ``server.ray_annotate`` runs the same jobs on a Ray cluster, one
video per worker at a time. Both report through :class:`JobProgress`: videos done
and failed, frames and frames/s for the whole job, and a summary of failures.
A failing video never stops the others.

Nothing here imports Ray or any network code.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from tracker.errors import TrackerError

logger = logging.getLogger(__name__)

#: file suffixes taken as videos in a folder of videos
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")
#: a sub-folder holding files of these suffixes is a video (its frames)
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
#: where a video's prompts live in a folder of videos: ``NAME.json`` beside it
PROMPTS_SUFFIX = ".json"

_MANIFEST_FIELDS = {"video", "prompts", "name"}


class ManifestError(TrackerError, ValueError):
    """A manifest or a folder of videos that cannot make a job (names the entry and field)."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build the model, as the command line gives it: small, picklable, built where it runs."""

    model: str = "sam2.1-tiny"
    checkpoint: str | None = None
    device: str = "auto"
    image_size: int | None = None
    precision: str | None = None
    random_weights: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelSpec":
        return cls(
            model=args.model,
            checkpoint=args.checkpoint,
            device=args.device,
            image_size=args.image_size,
            precision=args.precision,
            random_weights=args.random_weights,
        )

    def build(self) -> torch.nn.Module:
        from tracker.model import build_model

        return build_model(
            self.model,
            checkpoint=self.checkpoint,
            device=self.device,
            image_size=self.image_size,
            random_weights_seed=self.random_weights,
            precision=self.precision or "auto",
        )


@dataclass(frozen=True)
class AnnotateOptions:
    """What every video of a job is written with (the one-video command's flags)."""

    formats: tuple[str, ...] = ("coco",)
    save_state_every: int = 50
    #: the model's name as chosen, recorded in each video's run summary
    model_name: str | None = None


@dataclass(frozen=True)
class VideoJob:
    """One video of a job: its source, its prompts file, its name and output folder."""

    video: str
    prompts: str
    name: str
    out: str

    def is_finished(self) -> bool:
        """Written completely by an earlier run: its run summary is there and no resume state."""
        from tracker.evaluate import run_summary_path

        out = Path(self.out)
        return run_summary_path(out, self.name).is_file() and not (out / WORK_DIR).exists()


#: the one-video command's resume folder inside a video's output folder
WORK_DIR = ".annotate-work"


@dataclass
class VideoOutcome:
    """How one video ended: written (``ok``) or failed with ``error``; ``attempts`` counts workers lost."""

    name: str
    ok: bool
    frames: int = 0
    seconds: float = 0.0
    error: str | None = None
    attempts: int = 1
    resumed_from: int | None = None
    skipped: bool = False
    #: where it ran (a Ray worker's node and process), for the logs
    worker: str | None = None


def _resolve(base: Path, value: str) -> str:
    """A manifest path relative to the manifest's folder; ``images:`` kept as a prefix."""
    prefix = "images:" if value.startswith("images:") else ""
    rest = value[len(prefix):]
    path = Path(rest).expanduser()
    return prefix + str(path if path.is_absolute() else base / path)


def _default_name(video: str) -> str:
    return Path(video.removeprefix("images:").rstrip("/")).stem or "video"


def load_manifest(path: str | Path, out_root: str | Path) -> list[VideoJob]:
    """Jobs from a manifest: JSON lines, or a JSON list / ``{"videos": [...]}``.

    Each entry is ``{"video": PATH, "prompts": PATH, "name": NAME}`` (``name``
    optional: the file's stem); relative paths are relative to the manifest.
    Video ``NAME`` is written to ``OUT/NAME/``; names must be unique.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} not found") from None
    entries: list[tuple[str, Any]] = []
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "videos" not in data:  # JSON lines of one line
            entries = [("line 1", data)]
        else:
            items = data.get("videos") if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise ManifestError(f'manifest {path}: expected a list of videos, {{"videos": [...]}} or JSON lines')
            entries = [(f"entry {i}", item) for i, item in enumerate(items)]
    except json.JSONDecodeError:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entries.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ManifestError(f"manifest {path}, line {n}: not valid JSON: {e}") from None
    if not entries:
        raise ManifestError(f"manifest {path} lists no videos")
    jobs = []
    for where, item in entries:
        where = f"manifest {path}, {where}"
        if not isinstance(item, dict):
            raise ManifestError(f"{where}: expected an object with video and prompts, got {type(item).__name__}")
        unknown = set(item) - _MANIFEST_FIELDS
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (allowed: name, prompts, video)")
        for key in ("video", "prompts"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ManifestError(f"{where}: {key} must be a path, got {item.get(key)!r}")
        video = _resolve(path.parent, item["video"])
        name = item.get("name", _default_name(video))
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ManifestError(f"{where}: name must be a file name (no '/', not starting with '.'), got {name!r}")
        jobs.append(VideoJob(video, _resolve(path.parent, item["prompts"]), name, str(Path(out_root) / name)))
    _check_unique(jobs, f"manifest {path}")
    return jobs


def find_videos(folder: str | Path, out_root: str | Path) -> list[VideoJob]:
    """Jobs from a folder of videos: each video file or folder of frames with ``NAME.json`` beside it.

    A video whose prompts file is missing is still a job: it fails with the
    prompts error ("prompts file ... not found") while the others run.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder of videos")
    jobs = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        is_video = entry.is_file() and entry.suffix.lower() in VIDEO_SUFFIXES
        is_frames = entry.is_dir() and any(f.suffix.lower() in FRAME_SUFFIXES for f in entry.iterdir())
        if is_video or is_frames:
            name = entry.stem if is_video else entry.name
            prompts = folder / f"{name}{PROMPTS_SUFFIX}"
            jobs.append(VideoJob(str(entry), str(prompts), name, str(Path(out_root) / name)))
    if not jobs:
        raise ManifestError(
            f"{folder} holds no videos: expected video files ({', '.join(VIDEO_SUFFIXES)}) or folders of frames, "
            f"each with its prompts file NAME{PROMPTS_SUFFIX} beside it"
        )
    _check_unique(jobs, str(folder))
    return jobs


def _check_unique(jobs: Sequence[VideoJob], where: str) -> None:
    seen: dict[str, str] = {}
    for job in jobs:
        if job.name in seen:
            raise ManifestError(
                f"{where}: videos {seen[job.name]} and {job.video} both write {job.name!r}: give them distinct names"
            )
        seen[job.name] = job.video


def describe_error(e: BaseException) -> str:
    """A failure as the summary shows it: the project's own message, else the type too."""
    return str(e) if isinstance(e, TrackerError) else f"{type(e).__name__}: {e}"


def annotate_job_video(
    job: VideoJob,
    options: AnnotateOptions,
    model: Callable[[], torch.nn.Module],
    *,
    resume: bool = False,
    on_frame: Callable[[int], None] | None = None,
) -> VideoOutcome:
    """Annotate one video of a job; its errors become a failed outcome (the job goes on).

    Interrupts (Ctrl-C) and a dying process are not caught: the caller (or Ray)
    sees them.
    """
    from tracker.cli import annotate_video

    t0 = time.perf_counter()
    try:
        stats = annotate_video(job, options, model, resume=resume, quiet=True, on_frame=on_frame)
    except Exception as e:  # any one video's failure is that video's, reported at the end
        logger.debug("%s failed", job.name, exc_info=True)
        return VideoOutcome(job.name, False, seconds=time.perf_counter() - t0, error=describe_error(e))
    return VideoOutcome(
        job.name, True, frames=stats.frames, seconds=stats.seconds, resumed_from=stats.resumed_from
    )


@dataclass
class JobProgress:
    """The whole job's progress: videos done / failed of the total, frames and frames/s."""

    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    frames: int = 0
    #: frames of the videos still running, as last reported
    running_frames: dict[str, int] = field(default_factory=dict)
    outcomes: list[VideoOutcome] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def running(self, name: str, frames: int) -> None:
        self.running_frames[name] = frames

    def finished(self, outcome: VideoOutcome) -> None:
        self.running_frames.pop(outcome.name, None)
        self.outcomes.append(outcome)
        if outcome.skipped:
            self.skipped += 1
        elif outcome.ok:
            self.done += 1
        else:
            self.failed += 1
        self.frames += outcome.frames

    def frames_per_s(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.frames + sum(self.running_frames.values())) / dt if dt > 0 else 0.0

    def line(self) -> str:
        finished = self.done + self.failed + self.skipped
        extra = f", {self.skipped} already done" if self.skipped else ""
        return (
            f"{finished}/{self.total} videos: {self.done} written, {self.failed} failed{extra}; "
            f"{self.frames + sum(self.running_frames.values())} frames, {self.frames_per_s():.2f} frames/s"
        )

    def failures(self) -> list[VideoOutcome]:
        return [o for o in self.outcomes if not o.ok]

    def summary(self) -> list[str]:
        """The end of job report: the totals, then one line per failed video."""
        lines = [f"annotated {self.line()} in {time.perf_counter() - self.t0:.1f} s"]
        for o in self.failures():
            lines.append(f"  {o.name}: {o.error}")
        return lines


def run_local(
    jobs: Iterable[VideoJob],
    options: AnnotateOptions,
    spec: ModelSpec,
    *,
    resume: bool = False,
    progress: JobProgress | None = None,
) -> list[VideoOutcome]:
    """The videos one after another in this process, the model built once (at the first video that needs it)."""
    jobs = list(jobs)
    progress = progress if progress is not None else JobProgress(len(jobs))
    built: list[torch.nn.Module] = []

    def model() -> torch.nn.Module:
        if not built:
            built.append(spec.build())
        return built[0]

    for job in jobs:
        if resume and job.is_finished():
            outcome = VideoOutcome(job.name, True, skipped=True)
        else:
            frames = 0

            def on_frame(_: int, name: str = job.name) -> None:
                nonlocal frames
                frames += 1
                progress.running(name, frames)

            outcome = annotate_job_video(job, options, model, resume=resume, on_frame=on_frame)
        progress.finished(outcome)
        logger.info("%s: %s — %s", job.name, _outcome_word(outcome), progress.line())
    return progress.outcomes


def _outcome_word(outcome: VideoOutcome) -> str:
    if outcome.skipped:
        return "already written"
    if not outcome.ok:
        return f"FAILED ({outcome.error})"
    resumed = f", resumed after frame {outcome.resumed_from}" if outcome.resumed_from is not None else ""
    return f"{outcome.frames} frames in {outcome.seconds:.1f} s{resumed}"


def jobs_from_args(args: argparse.Namespace) -> list[VideoJob]:
    """The job the command line names: ``--manifest FILE`` or a folder of videos."""
    if args.video_name:
        raise ManifestError('annotate: --video-name names one video; name each video of a manifest with "name"')
    if args.manifest:
        if args.video:
            raise ManifestError(f"annotate: give either a video or --manifest, not both (got {args.video} and --manifest)")
        return load_manifest(args.manifest, args.out)
    return find_videos(args.video, args.out)


def options_from_args(args: argparse.Namespace) -> AnnotateOptions:
    return AnnotateOptions(
        formats=tuple(dict.fromkeys(args.format or ["coco"])),
        save_state_every=args.save_state_every,
        model_name=args.model,
    )


def report(progress: JobProgress) -> int:
    """Log the summary; exit status 1 when any video failed, else 0."""
    for line in progress.summary():
        (logger.warning if progress.failed else logger.info)("%s", line)
    return 1 if progress.failed else 0


def cmd_annotate_many(args: argparse.Namespace) -> int:
    """``sam2-stream annotate FOLDER|--manifest FILE --out OUT``, one video after another here."""
    jobs = jobs_from_args(args)
    progress = JobProgress(len(jobs))
    logger.info("annotating %d videos one after another into %s", len(jobs), args.out)
    run_local(jobs, options_from_args(args), ModelSpec.from_args(args), resume=args.resume, progress=progress)
    return report(progress)


__all__ = [
    "AnnotateOptions",
    "JobProgress",
    "ManifestError",
    "ModelSpec",
    "VideoJob",
    "VideoOutcome",
    "annotate_job_video",
    "find_videos",
    "load_manifest",
    "run_local",
]
