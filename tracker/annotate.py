"""Offline annotation: prompts on any frames of a video → masks on every frame.

The annotator's job, as Meta's ``SAM2VideoPredictor`` does it (all prompts given
first, each a conditioning frame; propagate forward, then backward to frame 0)
but memory-safe on long videos:

* frames are decoded on the fly (the ingest layer's file mode decodes ahead on a
  thread) and resized to the model's size a few frames ahead on another, so the
  model's thread only runs the model; only frames before the last object's
  first prompt are kept, at the model's size, in a disk-backed array, for the
  backward pass;
* the per-object state is the streaming predictor's bounded state;
* results go to the caller frame by frame (an iterator), typically straight to
  the export writers (``tracker.export``);
* the state is checkpointed every few frames, so ``resume=True`` continues a
  killed run exactly where its last checkpoint left it.

Each object is propagated forward from its first prompt and backward from it to
frame 0. For objects sharing their first prompted frame this is exactly Meta's
``propagate_in_video`` then ``propagate_in_video(reverse=True)``; objects first
prompted on different frames are tracked independently (SAM 2.1 tracks objects
independently anyway), never on frames before their first prompt in the
forward pass.

A clip shorter than SAM 2's object-pointer window (16 frames) is tracked with
its exact length, as Meta's predictor does (it scales the pointers' temporal
encoding by ``min(num_frames, 16)``): an image folder's length is its file
count, a file's the count of frames decoded in the prompt pass, which reads up
to 16 frames (a header's count may be wrong, e.g. in a truncated file).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from tracker.errors import MaskError, PromptError, SourceError, TrackerError
from tracker.families import make_predictor, obj_ptr_window
from tracker.predictor import PreparedFrame
from tracker.predictor_api import Predictor
from tracker.probe import SourceProbe
from tracker.prompts import check_prompt
from tracker.results import FrameResult, ObjectResult

logger = logging.getLogger(__name__)

STATE_FILE = "annotate_state.pt"

#: frames prepared ahead of the model (each S x S x 3 bytes, pinned on CUDA)
READ_AHEAD_FRAMES = 4

_T = TypeVar("_T")


@dataclass
class Prompt:
    """One prompt of the prompts file: an object on a frame, by points, box or mask."""

    obj_id: int
    frame_idx: int
    points_xy: list[list[float]] | None = None
    labels: list[int] | None = None
    box_xyxy: list[float] | None = None
    mask_path: Path | None = None
    #: take the pixels of this index from a palette/gray label map (DAVIS,
    #: YouTube-VOS annotations hold every object in one PNG); None: any non-zero
    mask_index: int | None = None


def load_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read a prompts file (see ``samples/prompts.json`` and the README).

    ``{"prompts": [{"obj_id": 1, "frame": 0, "points": [[x, y]], "labels": [1]},
    {"obj_id": 2, "frame": 12, "box": [x0, y0, x1, y1]}, {"obj_id": 3, "frame": 0,
    "mask": "masks/obj3.png"}, {"obj_id": 4, "frame": 0, "mask": "00000.png",
    "mask_index": 4}]}``; a bare list works too. Mask paths are relative to the
    prompts file; ``mask_index`` picks one object out of a label map (a DAVIS or
    YouTube-VOS annotation PNG), else every non-zero pixel is the object.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PromptError(f"prompts file {path} not found") from None
    except json.JSONDecodeError as e:
        raise PromptError(f"prompts file {path} is not valid JSON: {e}") from None
    items = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise PromptError(f"prompts file {path} has no prompts: expected {{\"prompts\": [...]}} with at least one entry")
    prompts = []
    for i, item in enumerate(items):
        where = f"prompts file {path}, prompt {i}"
        if not isinstance(item, dict):
            raise PromptError(f"{where}: expected an object, got {type(item).__name__}")
        unknown = set(item) - {"obj_id", "frame", "points", "labels", "box", "mask", "mask_index"}
        if unknown:
            raise PromptError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            obj_id, frame = item["obj_id"], item.get("frame", 0)
        except KeyError:
            raise PromptError(f"{where}: missing obj_id") from None
        if not isinstance(obj_id, int) or isinstance(obj_id, bool) or obj_id < 1:
            raise PromptError(f"{where}: obj_id must be a positive integer, got {obj_id!r}")
        if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
            raise PromptError(f"{where}: frame must be a non-negative integer, got {frame!r}")
        points, labels = item.get("points"), item.get("labels")
        if points is not None and labels is None:
            labels = [1] * len(points)
        mask, mask_index = item.get("mask"), item.get("mask_index")
        if points is None and item.get("box") is None and mask is None:
            raise PromptError(f"{where}: needs points, a box or a mask")
        if mask_index is not None and (
            mask is None or not isinstance(mask_index, int) or isinstance(mask_index, bool) or not 1 <= mask_index <= 255
        ):
            raise PromptError(f"{where}: mask_index must be an integer 1-255 next to a mask, got {mask_index!r}")
        prompts.append(
            Prompt(
                obj_id=obj_id,
                frame_idx=frame,
                points_xy=points,
                labels=labels,
                box_xyxy=item.get("box"),
                mask_path=(path.parent / mask) if mask is not None else None,
                mask_index=mask_index,
            )
        )
    return prompts


def _read_mask(path: Path, size_hw: tuple[int, int], index: int | None = None) -> np.ndarray:
    from tracker.masks import decode_label_png, decode_png

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptError(f"mask file {path} not found") from None
    try:
        mask = decode_png(data) if index is None else decode_label_png(data) == index
    except MaskError as e:
        raise PromptError(f"mask {path}: {e}") from None
    if mask.shape != size_hw:
        raise PromptError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but the video is {size_hw[1]}x{size_hw[0]}")
    if index is not None and not mask.any():
        raise PromptError(f"mask {path} has no pixels of index {index}")
    return mask


@dataclass
class AnnotateStats:
    frames: int = 0
    forward_frames: int = 0
    backward_frames: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None
    #: frames the forward pass decoded: the video's real length (None when a
    #: resumed run starts in the backward pass); a header may have said otherwise
    video_frames: int | None = None


@dataclass
class _Plan:
    prompts_by_frame: dict[int, list[Prompt]]
    first_frame: dict[int, int]  # obj_id -> first prompted frame
    keep_until: int  # frames [0, keep_until) are kept for the backward pass
    obj_ids: list[int] = field(default_factory=list)


def _plan(prompts: Sequence[Prompt]) -> _Plan:
    by_frame: dict[int, list[Prompt]] = {}
    first: dict[int, int] = {}
    for p in prompts:
        by_frame.setdefault(p.frame_idx, []).append(p)
        first[p.obj_id] = min(first.get(p.obj_id, p.frame_idx), p.frame_idx)
    return _Plan(dict(sorted(by_frame.items())), first, max(first.values()), sorted(first))


class _FrameStore:
    """Frames at model size kept on disk for the backward pass (np.memmap)."""

    def __init__(self, count: int, size: int, folder: Path) -> None:
        self.count = count
        self.path = folder / "backward_frames.u8"
        self.meta: dict[int, tuple[tuple[int, int], float | None]] = {}
        self.array = (
            np.memmap(self.path, dtype=np.uint8, mode="w+", shape=(count, size, size, 3)) if count > 0 else None
        )

    def put(self, idx: int, image: np.ndarray, source_hw: tuple[int, int], pts_s: float | None) -> None:
        if self.array is not None and idx < self.count:
            self.array[idx] = image
            self.meta[idx] = (source_hw, pts_s)

    def get(self, idx: int) -> tuple[np.ndarray, tuple[int, int], float | None]:
        """The frame as a view into the store (``prepare_frame`` copies it)."""
        assert self.array is not None
        source_hw, pts_s = self.meta[idx]
        return self.array[idx], source_hw, pts_s

    def close(self) -> None:
        self.array = None
        self.path.unlink(missing_ok=True)


def check_prompts(prompts: Sequence[Prompt], probe: SourceProbe) -> None:
    """Check the prompts against what the video says about itself, before any model work.

    A prompt on a frame past the end (where the container or folder gives the
    length), a point or box outside the frame, a mask of another size (where
    the size is known): each is a PromptError naming the prompt. :func:`annotate`
    checks again against the decoded frames, since a header can be wrong.
    """
    if not prompts:
        raise PromptError("no prompts given: add at least one point, box or mask")
    plan = _plan(prompts)
    for f in plan.prompts_by_frame:
        probe.check_frame(f)
    size_hw = probe.size_hw
    if size_hw is not None:
        _validate_prompts(plan, lambda f: size_hw)


def _frame_count_hint(video: str) -> int | None:
    """Frames in an image folder (known exactly); None for containers."""
    p = Path(video.removeprefix("images:"))
    if p.is_dir():
        exts = {".jpg", ".jpeg", ".png"}
        return sum(1 for f in p.iterdir() if f.suffix.lower() in exts)
    return None


def annotate(
    video: str,
    prompts: Sequence[Prompt],
    *,
    model: torch.nn.Module,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 50,
    skip_frames: set[int] | None = None,
    stats: AnnotateStats | None = None,
    batch_objects: bool = True,
) -> Iterator[FrameResult]:
    """Propagate ``prompts`` through ``video``; yield one FrameResult per frame.

    Frames come forward from the earliest first prompt to the end, then the
    frames before the last object's first prompt in decreasing order. Every
    frame is yielded exactly once, with every object that has a mask there.

    Args:
        work_dir: where the resume state and the backward-pass frame store live
            (default: a temporary folder; give one for ``resume``). Made once
            the prompts fit their frames; removed when it ends up empty (a
            finished run, or one stopped before its first state checkpoint).
        resume: continue from ``work_dir``'s last state checkpoint.
        skip_frames: frames already on disk (from the writers): computed when the
            tracking needs them, but not yielded again.
    """
    if not prompts:
        raise PromptError("no prompts given: add at least one point, box or mask")
    stats = stats if stats is not None else AnnotateStats()
    skip = skip_frames or set()
    plan = _plan(prompts)
    t0 = time.perf_counter()

    from tracker.ingest import open_source

    predictor = make_predictor(
        model,
        offline=True,
        max_prompt_frames=2,
        max_cond_frames=max(2, len(plan.prompts_by_frame) + 1),
        keep_for_reverse=True,
        batch_objects=batch_objects,
    )

    # pass 1: the prompted frames, and the length of a video shorter than the
    # object-pointer window (Meta's window is min(num_frames, 16) frames: a short
    # clip's results depend on its exact length, which only decoding tells)
    window = obj_ptr_window(model)
    prompt_frames, count = _read_frames(
        open_source, video, set(plan.prompts_by_frame), upto=max(max(plan.prompts_by_frame) + 1, window)
    )
    missing = sorted(set(plan.prompts_by_frame) - set(prompt_frames))
    if missing:
        raise PromptError(f"prompt on frame {missing[0]} but {video} has only {count} frames")
    hint = _frame_count_hint(video)
    if hint is not None:
        predictor.num_frames = hint  # a folder: its files, as Meta's loader counts them
    elif count is not None:
        predictor.num_frames = count
    masks = _validate_prompts(plan, lambda f: prompt_frames[f][1])

    # the work folder only once the prompts fit: a refused run leaves nothing behind
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sam2-annotate-")
        work_dir = tmp.name
    work = Path(work_dir)
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE_FILE

    store: _FrameStore | None = None
    finished = False
    try:
        saved = _load_state(state_path, predictor.device) if resume else None
        partial: dict[int, dict[int, ObjectResult]] = {}
        if saved is not None:
            predictor.load_state_dict(saved["predictor"])
            phase, done_upto = saved["phase"], saved["frame_idx"]
            partial = saved["partial"]
            stats.resumed_from = done_upto
            logger.info("resuming %s pass after frame %d", phase, done_upto)
        else:
            phase, done_upto = "forward", -1
            for f, frame_prompts in plan.prompts_by_frame.items():
                image, source_hw, pts_s = prompt_frames[f]
                predictor.encode(f, image, source_size=source_hw, pts_s=pts_s, source_index=f)
                for p in _merge(frame_prompts):
                    predictor.add_prompt(
                        p.obj_id,
                        points_xy=p.points_xy,
                        labels=p.labels,
                        box_xyxy=p.box_xyxy,
                        mask_hw=masks.get((p.obj_id, f)),
                        frame_idx=f,
                    )
                predictor.finalize_prompts()
        del prompt_frames

        store = _FrameStore(plan.keep_until, predictor.image_size, work)
        start = min(plan.first_frame.values())
        if phase == "forward":
            def wanted(idx: int) -> bool:  # kept for the backward pass, or tracked now
                return idx < plan.keep_until or (idx >= start and idx > done_upto)

            with closing(_on_thread(_read_ahead(open_source, video, predictor, wanted))) as frames:
                for ahead in frames:
                    idx = ahead.idx
                    stats.video_frames = idx + 1
                    if ahead.frame is None:
                        continue
                    store.put(idx, ahead.frame.image, ahead.frame.source_size, ahead.pts_s)
                    if idx < start or idx <= done_upto:
                        continue
                    if idx not in predictor.prompt_frames:  # a prompted frame encoded in pass 1 may still be held
                        predictor.encode(idx, ahead.frame, pts_s=ahead.pts_s, source_index=ahead.source_index)
                    active = [o for o in plan.obj_ids if plan.first_frame[o] <= idx]
                    result = predictor.propagate(idx, obj_ids=active)
                    stats.forward_frames += 1
                    if idx < plan.keep_until:
                        partial[idx] = _compact(result.objects)  # completed by the backward pass
                    elif idx not in skip:
                        stats.frames += 1
                        yield result
                    if checkpoint_every and (idx + 1) % checkpoint_every == 0:
                        _save_state(state_path, predictor, "forward", idx, partial)
            phase, done_upto = "backward", plan.keep_until
        else:
            # the backward pass needs the kept frames again: decode up to keep_until
            kept = _read_ahead(open_source, video, predictor, lambda i: i < plan.keep_until)
            with closing(_on_thread(kept)) as frames:
                for ahead in frames:
                    if ahead.idx >= plan.keep_until:
                        break
                    store.put(ahead.idx, ahead.frame.image, ahead.frame.source_size, ahead.pts_s)

        backward = range(min(done_upto, plan.keep_until) - 1, -1, -1)
        with closing(_on_thread(_stored_frames(store, predictor, backward))) as frames:
            for idx, frame, pts_s in frames:
                active = [o for o in plan.obj_ids if plan.first_frame[o] > idx]
                predictor.encode(idx, frame, pts_s=pts_s, source_index=idx)
                result = predictor.propagate(idx, reverse=True, obj_ids=active)
                stats.backward_frames += 1
                result.objects.update(_expand(partial.pop(idx, {})))
                result.objects = dict(sorted(result.objects.items()))
                if idx not in skip:
                    stats.frames += 1
                    yield result
                if checkpoint_every and idx % checkpoint_every == 0:
                    _save_state(state_path, predictor, "backward", idx, partial)
        state_path.unlink(missing_ok=True)
        finished = True
    finally:
        if store is not None:
            store.close()
        stats.seconds = time.perf_counter() - t0
        if tmp is not None:
            tmp.cleanup()
        elif (created or finished) and work.is_dir() and not any(work.iterdir()):
            work.rmdir()  # nothing to resume from: no empty folder left behind


def _compact(objects: dict[int, ObjectResult]) -> dict[int, dict[str, Any]]:
    """Forward results waiting for the backward pass, kept as RLE (small)."""
    from tracker.masks import encode_rle

    return {
        k: {"rle": encode_rle(r.mask_hw), "score": r.score, "box_xyxy": r.box_xyxy, "is_prompted": r.is_prompted}
        for k, r in objects.items()
    }


def _expand(objects: dict[int, dict[str, Any]]) -> dict[int, ObjectResult]:
    from tracker.masks import decode_rle

    return {
        k: ObjectResult(
            obj_id=k, mask_hw=decode_rle(r["rle"]), score=r["score"], box_xyxy=r["box_xyxy"], is_prompted=r["is_prompted"]
        )
        for k, r in objects.items()
    }


def _merge(prompts: list[Prompt]) -> list[Prompt]:
    """Points and a box for the same object on the same frame make one prompt."""
    merged: dict[tuple[int, bool], Prompt] = {}
    for p in prompts:
        if p.mask_path is not None:
            merged[(p.obj_id, True)] = p
            continue
        m = merged.setdefault((p.obj_id, False), Prompt(p.obj_id, p.frame_idx))
        if p.points_xy:
            m.points_xy = (m.points_xy or []) + [list(map(float, xy)) for xy in p.points_xy]
            m.labels = (m.labels or []) + list(p.labels or [])
        if p.box_xyxy is not None:
            m.box_xyxy = p.box_xyxy
    return list(merged.values())


def _read_frames(
    open_source: Any, video: str, wanted: set[int], upto: int
) -> tuple[dict[int, tuple[np.ndarray, tuple[int, int], float | None]], int | None]:
    """The ``wanted`` frames, decoding at most frames ``0 .. upto-1``.

    Returns them and the video's frame count when it ended within those
    frames (None: it has at least ``upto``).
    """
    out = {}
    with open_source(video, mode="file") as source:
        n = 0
        for idx, frame in enumerate(source):
            if idx in wanted:
                out[idx] = (frame.image_rgb, frame.source_size, frame.pts_s)
            n = idx + 1
            if n >= upto:
                return out, None
    return out, n


@dataclass
class _Ahead:
    """One decoded frame, with its model-size copy when the annotator needs it."""

    idx: int
    frame: PreparedFrame | None
    pts_s: float | None
    source_index: int


def _read_ahead(
    open_source: Any, video: str, predictor: Predictor, wanted: Callable[[int], bool]
) -> Iterator[_Ahead]:
    """Decode ``video`` and resize the ``wanted`` frames (run by :func:`_on_thread`).

    The source decodes on its own thread; resizing here too (a 1080p frame to
    the model's size costs about as much as decoding it) leaves the model's
    thread nothing to do but inference.
    """
    with open_source(video, mode="file") as source:
        for idx, frame in enumerate(source):
            prepared = predictor.prepare_frame(frame.image_rgb, frame.source_size) if wanted(idx) else None
            yield _Ahead(idx, prepared, frame.pts_s, frame.index)


def _stored_frames(
    store: _FrameStore, predictor: Predictor, order: range
) -> Iterator[tuple[int, PreparedFrame, float | None]]:
    """The backward pass's frames, read back from the frame store in ``order``."""
    for idx in order:
        image, source_hw, pts_s = store.get(idx)
        yield idx, predictor.prepare_frame(image, source_hw), pts_s


def _on_thread(items: Iterator[_T], depth: int = READ_AHEAD_FRAMES) -> Iterator[_T]:
    """Run ``items`` on a reader thread, at most ``depth`` items ahead of the consumer.

    Errors raised by ``items`` reach the consumer after the items before them.
    When the consumer stops early (break, an error, Ctrl-C), the reader is
    closed (its ``with`` blocks exit, the video is released) before this returns.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not offer(item):
                    break
            else:
                offer(end)
        except BaseException as e:  # handed to the consumer, raised there
            offer(e)
        finally:
            items.close()

    reader = threading.Thread(target=run, name="annotate-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


def _validate_prompts(plan: _Plan, size_of: Callable[[int], tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """Check every prompt against its frame's (height, width) before any model work; load masks."""
    masks = {}
    for f, prompts in plan.prompts_by_frame.items():
        size_hw = size_of(f)
        for p in _merge(prompts):
            mask = _read_mask(p.mask_path, size_hw, p.mask_index) if p.mask_path is not None else None
            try:
                check_prompt(size_hw, p.points_xy, p.labels, p.box_xyxy, mask)
            except PromptError as e:
                raise PromptError(f"prompt for object {p.obj_id} on frame {f}: {e}") from None
            if mask is not None:
                masks[(p.obj_id, f)] = mask
    return masks


def _save_state(path: Path, predictor: Predictor, phase: str, frame_idx: int, partial: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"phase": phase, "frame_idx": frame_idx, "predictor": predictor.state_dict(), "partial": partial}, tmp
    )
    os.replace(tmp, path)


def _load_state(path: Path, device: torch.device) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a state file from a crash mid-write is replaced atomically, so this is rare
        raise TrackerError(f"cannot read the resume state {path}: {e}; delete it to start over") from e


__all__ = ["AnnotateStats", "Prompt", "annotate", "check_prompts", "load_prompts"]
