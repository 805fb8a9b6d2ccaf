"""Writers that stream per-frame tracking results to disk in common annotation formats.

What lives here: one :class:`ExportWriter` per format (COCO, YouTube-VIS, DAVIS
label PNGs, MOT Challenge CSV, an MP4 overlay for review), the
:func:`make_writer` factory the ``annotate`` command uses, and readers that load
each format back (``read_coco`` ...) for tests and users.
What does not: mask codecs (RLE, palettes, label maps live in
:mod:`tracker.masks` and are reused here), decoding videos, running the model.

Why streaming: a long video's masks do not fit in RAM, so every writer puts each
:class:`~tracker.results.FrameResult` on disk as it is produced and keeps only
small per-frame bookkeeping. Why resumable: annotating a long video takes hours,
and a crash or Ctrl-C must not cost the frames already done. Each writer can
reopen its own partial output with ``resume=True`` and reports the frames on
disk with :meth:`ExportWriter.done_frames`; writing one of those frames again is
skipped. A fresh (non-resume) open discards that writer's earlier partial output.

Layouts (``DIR`` is ``out_dir``, ``NAME`` the ``video_name``):

``coco``
    ``DIR/annotations.json`` on close; while running ``DIR/annotations.partial.jsonl``
    (a header line, then one line per frame, fsync'd per frame; removed on close).
``ytvis``
    ``DIR/instances.json`` on close; while running ``DIR/instances.partial.jsonl``.
``davis``
    ``DIR/NAME/00000.png``, ... one indexed PNG per frame (DAVIS palette, index =
    object id, 0 = background), each written atomically.
``mot``
    ``DIR/NAME.txt``: MOT Challenge rows ``frame,id,bb_left,bb_top,bb_width,bb_height,conf,-1,-1,-1``.
``overlay``
    ``DIR/NAME_overlay.mp4`` (H.264, yuv420p) on close; while running the drawn
    frames wait as JPEGs in ``DIR/.NAME_overlay.frames/`` (removed on close).

Which objects count on a frame: those SAM 2 calls visible (object score logit
> 0) with a non-empty mask; the others are absent from that frame's output.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, NamedTuple

import numpy as np

from tracker.errors import ExportError, FrameError, MaskError, TrackerError
from tracker.masks import (
    davis_palette,
    decode_label_png,
    decode_rle,
    encode_label_png,
    encode_rle,
    label_map_to_masks,
    mask_box_xywh,
    masks_to_label_map,
    polygons_to_mask,
)
from tracker.results import FrameResult

PathLike = str | os.PathLike[str]

#: Export formats in the order the CLI lists them.
FORMATS: tuple[str, ...] = ("coco", "ytvis", "davis", "mot", "overlay")

DEFAULT_CATEGORY = "object"

_FRAME_PNG = re.compile(r"^(\d{5,})\.png$")
_FRAME_JPG = re.compile(r"^(\d{5,})\.jpg$")


# --- small helpers ------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    """Probability from SAM 2's object-score logit (no overflow for large |x|)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every OS opens directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a killed process leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _frame_file_name(video_name: str, frame_idx: int) -> str:
    """The conventional frame image name (DAVIS / YouTube-VIS ``JPEGImages`` layout)."""
    return f"{video_name}/{frame_idx:05d}.jpg"


@dataclass(frozen=True)
class _Present:
    """One object as it is exported on one frame."""

    obj_id: int
    mask_hw: np.ndarray
    score: float  # SAM 2's object-score logit


def _present_objects(result: FrameResult) -> list[_Present]:
    """Visible objects with a non-empty mask, ascending ``obj_id``; checks mask shapes."""
    present = []
    for obj_id in sorted(result.objects):
        obj = result.objects[obj_id]
        mask = np.asarray(obj.mask_hw)
        if mask.shape != (result.height, result.width):
            raise MaskError(
                f"frame {result.frame_idx}: mask of object {obj_id} has shape {mask.shape}, "
                f"expected ({result.height}, {result.width})"
            )
        if mask.dtype != np.bool_:
            mask = mask > 0
        if obj.score > 0.0 and mask.any():
            present.append(_Present(int(obj_id), mask, float(obj.score)))
    return present


@dataclass
class _VideoMeta:
    video_name: str
    height: int
    width: int
    fps: float | None
    obj_ids: list[int]
    categories: dict[int, str] = field(default_factory=dict)

    def category_of(self, obj_id: int) -> str:
        return self.categories.get(obj_id, DEFAULT_CATEGORY)

    def category_table(self, obj_ids: Iterable[int]) -> tuple[list[dict[str, Any]], dict[int, int]]:
        """COCO ``categories`` (ids 1.. in order of first use by ascending obj_id) and obj_id -> category_id."""
        names: dict[str, int] = {}
        for obj_id in sorted(obj_ids):
            names.setdefault(self.category_of(obj_id), len(names) + 1)
        if not names:
            names[DEFAULT_CATEGORY] = 1
        table = [{"id": cid, "name": name, "supercategory": DEFAULT_CATEGORY} for name, cid in names.items()]
        return table, {obj_id: names[self.category_of(obj_id)] for obj_id in obj_ids}


# --- the interface ------------------------------------------------------------------


class ExportWriter(ABC):
    """Streams :class:`FrameResult` objects to one export format.

    Life cycle: :meth:`open` (or :func:`make_writer`, which opens), then
    :meth:`write` per processed frame in any order, then :meth:`close`, which
    finishes the output. Used as a context manager, an exception (Ctrl-C
    included) calls :meth:`abort` instead of :meth:`close`: files are released
    but not finished, so ``resume=True`` can continue them.
    """

    #: the ``--format`` name
    format: ClassVar[str]
    #: whether :meth:`write` needs ``image_rgb`` (the frame itself)
    needs_images: ClassVar[bool] = False

    def __init__(self) -> None:
        self._meta: _VideoMeta | None = None
        self._out_dir: Path | None = None
        self._done: set[int] = set()
        self._closed = False

    # -- public API

    def open(
        self,
        out_dir: PathLike,
        *,
        video_name: str,
        height: int,
        width: int,
        fps: float | None = None,
        obj_ids: Iterable[int] = (),
        categories: Mapping[int, str] | None = None,
        resume: bool = False,
    ) -> None:
        """Start (or with ``resume=True`` continue) this format's output under ``out_dir``.

        Args:
            out_dir: output folder, created if missing.
            video_name: the video's name in the output (file/folder names); no path separators.
            height, width: source resolution of every frame and mask.
            fps: frame rate, recorded in the metadata and used for the overlay video.
            obj_ids: the objects the run tracks (from the prompts); objects that show up
                later are added as they appear.
            categories: ``{obj_id: category name}``; objects not named are ``"object"``.
            resume: continue the output an interrupted run left (see :meth:`done_frames`);
                without it earlier partial output of this format is discarded.
        """
        if self._meta is not None:
            raise TrackerError(f"this {self.format} writer is already open; make a new one per video")
        if (
            not isinstance(video_name, str)
            or not video_name
            or video_name in (".", "..")
            or re.search(r"[/\\\x00]", video_name)
        ):
            raise ExportError(f"video_name must be a non-empty file name without path separators, got {video_name!r}")
        if int(height) <= 0 or int(width) <= 0:
            raise ExportError(f"height and width must be positive, got {height}x{width}")
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise ExportError(f"fps must be a positive number or None, got {fps!r}")
        ids = [int(i) for i in obj_ids]
        cats = {int(k): str(v) for k, v in (categories or {}).items()}
        self._check_obj_ids(ids)
        self._meta = _VideoMeta(video_name, int(height), int(width), None if fps is None else float(fps), ids, cats)
        self._out_dir = Path(out_dir)
        self._out_dir.mkdir(parents=True, exist_ok=True)
        self._done = set()
        try:
            self._open(resume)
        except BaseException:
            self._meta = None
            raise

    def write(self, result: FrameResult, *, image_rgb: np.ndarray | None = None) -> bool:
        """Put one frame's results on disk.

        Args:
            result: the frame's results; masks at the source ``height x width``.
            image_rgb: the frame, ``(H, W, 3)`` uint8 RGB; only formats with
                ``needs_images`` use it.

        Returns:
            True if written, False if skipped because the frame is already on disk
            (:meth:`done_frames`), which lets a resumed run pass every frame again.
        """
        meta = self._require_open()
        if (result.height, result.width) != (meta.height, meta.width):
            raise FrameError(
                f"frame {result.frame_idx} is {result.height}x{result.width} (HxW) but the export was opened "
                f"for {meta.height}x{meta.width}"
            )
        if result.frame_idx < 0:
            raise FrameError(f"frame_idx must be >= 0, got {result.frame_idx}")
        if result.frame_idx in self._done:
            return False
        self._check_obj_ids(result.objects)
        self._write(result, image_rgb)
        self._done.add(result.frame_idx)
        return True

    def close(self) -> None:
        """Finish the output (assemble JSON, finalise the video). Idempotent."""
        if self._meta is None or self._closed:
            return
        self._close()
        self._closed = True

    def abort(self) -> None:
        """Release files without finishing, leaving what is on disk for ``resume=True``."""
        if self._meta is None or self._closed:
            return
        self._abort()
        self._closed = True

    def done_frames(self) -> set[int]:
        """Frame indices on disk: left by an interrupted run (after ``resume=True``) plus those written since."""
        return set(self._done)

    @property
    @abstractmethod
    def output_path(self) -> Path:
        """The finished output (file or folder), for messages like "wrote ..."."""

    def __enter__(self) -> ExportWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- for subclasses

    def _require_open(self) -> _VideoMeta:
        if self._meta is None:
            raise TrackerError(f"the {self.format} writer is not open; call open() first")
        if self._closed:
            raise TrackerError(f"the {self.format} writer is closed; open a new one to write more frames")
        return self._meta

    def _check_obj_ids(self, obj_ids: Iterable[int]) -> None:
        """Formats with limits on object ids override this."""

    @abstractmethod
    def _open(self, resume: bool) -> None: ...

    @abstractmethod
    def _write(self, result: FrameResult, image_rgb: np.ndarray | None) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _abort(self) -> None: ...


# --- partial JSON lines: the crash-safe journal behind COCO and YouTube-VIS ------------


@dataclass
class _JournalIndex:
    """What a scan of a partial ``.jsonl`` found: small per-frame bookkeeping, no masks."""

    header: dict[str, Any] | None = None
    offsets: dict[int, int] = field(default_factory=dict)  # frame_idx -> byte offset of its line
    frame_info: dict[int, dict[str, Any]] = field(default_factory=dict)  # pts_s, source_index
    obj_ids: set[int] = field(default_factory=set)
    valid_end: int = 0  # bytes of complete lines


def _scan_journal(path: Path) -> _JournalIndex:
    """Index a journal; an unterminated last line (a crash mid-write) is left out.

    A complete line that is not valid JSON means the file was damaged some other
    way, and resuming would silently lose frames, so it is an error.
    """
    index = _JournalIndex()
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                raise TrackerError(
                    f"cannot resume {path}: line {lineno} is not valid JSON; delete the file to start over"
                ) from None
            if lineno == 1:
                if not isinstance(record, dict) or record.get("kind") != "header":
                    raise TrackerError(
                        f"cannot resume {path}: it does not start with an export header; delete the file to start over"
                    )
                index.header = record
            else:
                frame_idx = int(record["frame_idx"])
                index.offsets[frame_idx] = offset
                index.frame_info[frame_idx] = {"pts_s": record.get("pts_s"), "source_index": record.get("source_index")}
                index.obj_ids.update(int(o["obj_id"]) for o in record["objects"])
            offset += len(line)
    index.valid_end = offset
    return index


def _read_journal_frames(path: Path, index: _JournalIndex) -> Iterator[dict[str, Any]]:
    """The journal's frame records in ascending ``frame_idx`` (one line in memory at a time)."""
    with open(path, "rb") as f:
        for frame_idx in sorted(index.offsets):
            f.seek(index.offsets[frame_idx])
            yield json.loads(f.readline())


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class _JournalWriter(ExportWriter):
    """Appends one fsync'd JSON line per frame; :meth:`close` turns the journal into the final JSON."""

    final_name: ClassVar[str]
    partial_name: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self._journal: IO[bytes] | None = None

    @property
    def output_path(self) -> Path:
        assert self._out_dir is not None, "open() first"
        return self._out_dir / self.final_name

    @property
    def partial_path(self) -> Path:
        assert self._out_dir is not None, "open() first"
        return self._out_dir / self.partial_name

    def _open(self, resume: bool) -> None:
        meta = self._meta
        assert meta is not None
        path = self.partial_path
        keep = 0
        if resume and path.exists():
            index = _scan_journal(path)
            if index.header is not None:
                old = (
                    index.header.get("format"),
                    index.header.get("video_name"),
                    index.header.get("height"),
                    index.header.get("width"),
                )
                new = (self.format, meta.video_name, meta.height, meta.width)
                if old != new:
                    raise TrackerError(
                        f"cannot resume {path}: it holds a {old[0]} export of video {old[1]!r} at {old[3]}x{old[2]} "
                        f"(WxH), not {new[0]} of {new[1]!r} at {new[3]}x{new[2]}; use another output folder or "
                        "start over without resume"
                    )
                keep = index.valid_end
                self._done = set(index.offsets)
        with open(path, "ab") as f:
            f.truncate(keep)  # drops a half-written last line
        self._journal = open(path, "ab")
        if keep == 0:
            header = {
                "kind": "header",
                "format": self.format,
                "video_name": meta.video_name,
                "height": meta.height,
                "width": meta.width,
                "fps": meta.fps,
            }
            self._append(header)

    def _append(self, record: dict[str, Any]) -> None:
        assert self._journal is not None
        self._journal.write((_dumps(record) + "\n").encode("utf-8"))
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def _write(self, result: FrameResult, image_rgb: np.ndarray | None) -> None:
        objects = []
        for p in _present_objects(result):
            rle = encode_rle(p.mask_hw)
            objects.append(
                {
                    "obj_id": p.obj_id,
                    "score": p.score,
                    "area": int(p.mask_hw.sum()),
                    "bbox": mask_box_xywh(p.mask_hw),
                    "segmentation": rle,
                }
            )
        record = {
            "frame_idx": int(result.frame_idx),
            "pts_s": result.pts_s,
            "source_index": result.source_index,
            "objects": objects,
        }
        self._append(record)

    def _abort(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _close(self) -> None:
        self._abort()
        index = _scan_journal(self.partial_path)
        final = self.output_path
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            self._assemble(index, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        self.partial_path.unlink()

    @abstractmethod
    def _assemble(self, index: _JournalIndex, out: IO[str]) -> None:
        """Write the final JSON document for the frames in ``index`` to ``out``."""


class CocoWriter(_JournalWriter):
    """COCO instance annotations with RLE masks, one image per processed frame.

    ``images[i]``: ``id`` = ``frame_idx + 1``, ``file_name`` = ``NAME/<frame_idx:05d>.jpg``
    (the frames themselves are not written), ``video_id`` 1, ``frame_idx``, ``pts_s``,
    ``source_index``. ``annotations[j]``: ``segmentation`` (compressed RLE, as
    pycocotools reads it), ``area``, ``bbox`` (x, y, w, h), ``category_id``,
    ``iscrowd`` 0, ``score`` (sigmoid of the object score logit, COCO results'
    convention), ``score_logit``, and the object as ``track_id`` and ``obj_id``.
    ``videos`` has the one video. Ids are assigned on close in frame then object
    order, so a resumed export is identical to an uninterrupted one.
    """

    format = "coco"
    final_name = "annotations.json"
    partial_name = "annotations.partial.jsonl"

    def _assemble(self, index: _JournalIndex, out: IO[str]) -> None:
        meta = self._meta
        assert meta is not None
        obj_ids = sorted(set(meta.obj_ids) | index.obj_ids)
        categories, cat_of = meta.category_table(obj_ids)
        video = {
            "id": 1,
            "name": meta.video_name,
            "width": meta.width,
            "height": meta.height,
            "fps": meta.fps,
            "length": len(index.offsets),
        }
        info = {"description": f"sam2-stream coco export of {meta.video_name}"}
        out.write(f'{{"info":{_dumps(info)},"videos":{_dumps([video])},"categories":{_dumps(categories)},"images":[')
        for n, frame_idx in enumerate(sorted(index.offsets)):
            image = {
                "id": frame_idx + 1,
                "video_id": 1,
                "file_name": _frame_file_name(meta.video_name, frame_idx),
                "height": meta.height,
                "width": meta.width,
                "frame_idx": frame_idx,
                **index.frame_info[frame_idx],
            }
            out.write(("," if n else "") + _dumps(image))
        out.write('],"annotations":[')
        ann_id = 0
        for record in _read_journal_frames(self.partial_path, index):
            for obj in record["objects"]:
                ann_id += 1
                ann = {
                    "id": ann_id,
                    "image_id": record["frame_idx"] + 1,
                    "video_id": 1,
                    "category_id": cat_of[obj["obj_id"]],
                    "segmentation": obj["segmentation"],
                    "area": obj["area"],
                    "bbox": obj["bbox"],
                    "iscrowd": 0,
                    "score": _sigmoid(obj["score"]),
                    "score_logit": obj["score"],
                    "track_id": obj["obj_id"],
                    "obj_id": obj["obj_id"],
                }
                out.write(("," if ann_id > 1 else "") + _dumps(ann))
        out.write("]}")


class YtvisWriter(_JournalWriter):
    """YouTube-VIS 2019/2021 style: one annotation per object spanning the video.

    ``videos[0]``: ``id`` 1, ``name``, ``file_names`` (``NAME/<frame_idx:05d>.jpg`` for
    each written frame, ascending), ``length``, ``width``, ``height``, ``fps``.
    ``annotations[k]`` per object seen at least once: ``segmentations`` /
    ``bboxes`` / ``areas`` aligned with ``file_names`` (RLE / ``[x, y, w, h]`` /
    pixels, ``null`` where the object is absent), ``category_id``, ``video_id``
    1, ``iscrowd`` 0, ``height``, ``width``, ``score`` (mean sigmoid of the
    object score logit over the frames it is present on) and ``obj_id``.
    """

    format = "ytvis"
    final_name = "instances.json"
    partial_name = "instances.partial.jsonl"

    def _assemble(self, index: _JournalIndex, out: IO[str]) -> None:
        meta = self._meta
        assert meta is not None
        frames = sorted(index.offsets)
        obj_ids = sorted(index.obj_ids)
        categories, cat_of = meta.category_table(set(meta.obj_ids) | index.obj_ids)
        video = {
            "id": 1,
            "name": meta.video_name,
            "width": meta.width,
            "height": meta.height,
            "length": len(frames),
            "fps": meta.fps,
            "file_names": [_frame_file_name(meta.video_name, f) for f in frames],
        }
        info = {"description": f"sam2-stream ytvis export of {meta.video_name}"}
        out.write(
            f'{{"info":{_dumps(info)},"videos":{_dumps([video])},"categories":{_dumps(categories)},"annotations":['
        )
        # One pass over the journal; each object's RLEs go to its own spool file so
        # the masks of the whole video are never in memory at once.
        spools = {obj_id: tempfile.TemporaryFile("w+", encoding="utf-8") for obj_id in obj_ids}
        try:
            bboxes: dict[int, list[Any]] = {o: [] for o in obj_ids}
            areas: dict[int, list[Any]] = {o: [] for o in obj_ids}
            probs: dict[int, list[float]] = {o: [] for o in obj_ids}
            for n, record in enumerate(_read_journal_frames(self.partial_path, index)):
                by_id = {o["obj_id"]: o for o in record["objects"]}
                for obj_id in obj_ids:
                    obj = by_id.get(obj_id)
                    spools[obj_id].write(("," if n else "") + _dumps(obj["segmentation"] if obj else None))
                    bboxes[obj_id].append(obj["bbox"] if obj else None)
                    areas[obj_id].append(obj["area"] if obj else None)
                    if obj:
                        probs[obj_id].append(_sigmoid(obj["score"]))
            for k, obj_id in enumerate(obj_ids):
                head = {
                    "id": k + 1,
                    "video_id": 1,
                    "category_id": cat_of[obj_id],
                    "iscrowd": 0,
                    "height": meta.height,
                    "width": meta.width,
                    "score": sum(probs[obj_id]) / len(probs[obj_id]),
                    "obj_id": obj_id,
                    "bboxes": bboxes[obj_id],
                    "areas": areas[obj_id],
                }
                out.write(("," if k else "") + _dumps(head)[:-1] + ',"segmentations":[')
                spool = spools[obj_id]
                spool.seek(0)
                while chunk := spool.read(1 << 20):
                    out.write(chunk)
                out.write("]}")
        finally:
            for spool in spools.values():
                spool.close()
        out.write("]}")


# --- DAVIS label PNGs ---------------------------------------------------------------


class DavisWriter(ExportWriter):
    """One indexed PNG per frame, ``DIR/NAME/<frame_idx:05d>.png``, as DAVIS 2017 stores labels.

    Pixel value = object id (1..255), 0 = background, DAVIS palette for viewing.
    Where masks overlap, the highest object id wins (see
    :func:`tracker.masks.masks_to_label_map`). Each PNG is written to a hidden
    temp file and renamed, so the PNGs present are exactly the frames done.
    A fresh (non-resume) open deletes the ``<digits>.png`` files already in
    ``DIR/NAME`` so that no frame of an earlier run is mistaken for this one's.
    """

    format = "davis"

    @property
    def output_path(self) -> Path:
        assert self._out_dir is not None and self._meta is not None, "open() first"
        return self._out_dir / self._meta.video_name

    def _check_obj_ids(self, obj_ids: Iterable[int]) -> None:
        for obj_id in obj_ids:
            if not 1 <= obj_id <= 255:
                raise MaskError(
                    f"object id {obj_id} cannot be stored in a DAVIS label PNG (pixel values 1..255); "
                    "use object ids 1..255 or another export format"
                )

    def _open(self, resume: bool) -> None:
        meta = self._meta
        assert meta is not None
        folder = self.output_path
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.glob(".*.png.tmp"):  # left by a kill between write and rename
            path.unlink()
        existing = {int(m.group(1)): p for p in folder.iterdir() if (m := _FRAME_PNG.match(p.name))}
        if not resume:
            for path in existing.values():
                path.unlink()
            return
        if existing:
            sample = decode_label_png(existing[min(existing)].read_bytes())
            if sample.shape != (meta.height, meta.width):
                raise TrackerError(
                    f"cannot resume {folder}: its PNGs are {sample.shape[1]}x{sample.shape[0]} (WxH), the video is "
                    f"{meta.width}x{meta.height}; use another output folder or start over without resume"
                )
        self._done = set(existing)

    def _write(self, result: FrameResult, image_rgb: np.ndarray | None) -> None:
        masks = {p.obj_id: p.mask_hw for p in _present_objects(result)}
        label = masks_to_label_map(masks, result.height, result.width)
        _atomic_write_bytes(self.output_path / f"{result.frame_idx:05d}.png", encode_label_png(label))

    def _close(self) -> None:
        _fsync_dir(self.output_path)

    def _abort(self) -> None:
        pass


# --- MOT Challenge CSV --------------------------------------------------------------


class MotWriter(ExportWriter):
    """MOT Challenge tracking results, ``DIR/NAME.txt`` (the file name TrackEval expects).

    One row per visible object per frame:
    ``frame,id,bb_left,bb_top,bb_width,bb_height,conf,-1,-1,-1``. ``frame`` is
    **1-based** (``frame_idx + 1``), as in MOT Challenge; the box is the mask's
    tight box in 0-based pixel coordinates (COCO's convention: ``bb_left`` is the
    leftmost mask column, width counts whole pixels); ``conf`` is the sigmoid of
    SAM 2's object score logit. Rows of a frame are appended and flushed together
    in the order frames come (the annotator's backward pass comes last);
    :meth:`close` sorts the rows by frame (a stable sort: objects stay in id
    order), rewriting the file atomically.

    Frames without visible objects leave no rows, so :meth:`done_frames` cannot
    see them and a resumed run writes them again (which writes nothing).
    """

    format = "mot"

    def __init__(self) -> None:
        super().__init__()
        self._file: IO[str] | None = None

    @property
    def output_path(self) -> Path:
        assert self._out_dir is not None and self._meta is not None, "open() first"
        return self._out_dir / f"{self._meta.video_name}.txt"

    def _open(self, resume: bool) -> None:
        path = self.output_path
        keep = 0
        if resume and path.exists():
            data = path.read_bytes()
            lines = data.split(b"\n")
            tail_partial = lines[-1] != b""
            lines = lines[:-1]  # the partial last line, or the empty string after the final newline
            frames = []
            for lineno, line in enumerate(lines, start=1):
                fields = line.split(b",")
                try:
                    frames.append(int(float(fields[0])))
                    if len(fields) < 7:
                        raise ValueError
                except ValueError:
                    raise TrackerError(
                        f"cannot resume {path}: line {lineno} is not a MOT row; delete the file to start over"
                    ) from None
            if tail_partial and frames:
                # the crash hit mid-frame: the last complete rows may be only part of that frame
                last = frames[-1]
                while frames and frames[-1] == last:
                    frames.pop()
                    lines.pop()
            keep = sum(len(line) + 1 for line in lines)
            self._done = {f - 1 for f in frames}
        with open(path, "ab") as f:
            f.truncate(keep)
        self._file = open(path, "a", encoding="ascii", newline="")

    def _write(self, result: FrameResult, image_rgb: np.ndarray | None) -> None:
        assert self._file is not None
        rows = []
        for p in _present_objects(result):
            x, y, w, h = (int(v) for v in mask_box_xywh(p.mask_hw))
            rows.append(f"{result.frame_idx + 1},{p.obj_id},{x},{y},{w},{h},{_sigmoid(p.score):.6f},-1,-1,-1\n")
        if rows:
            self._file.write("".join(rows))
            self._file.flush()
            os.fsync(self._file.fileno())

    def _close(self) -> None:
        self._abort()
        path = self.output_path
        rows = path.read_bytes().splitlines(keepends=True)
        order = sorted(range(len(rows)), key=lambda i: (int(float(rows[i].split(b",", 1)[0])), i))
        if order != list(range(len(rows))):
            _atomic_write_bytes(path, b"".join(rows[i] for i in order))

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --- overlay video ------------------------------------------------------------------


def object_colour(obj_id: int) -> tuple[int, int, int]:
    """An object's RGB colour: its DAVIS palette entry (ids beyond 1..255 wrap around)."""
    return tuple(int(c) for c in davis_palette()[1 + (int(obj_id) - 1) % 255])  # type: ignore[return-value]


def draw_overlay(image_rgb: np.ndarray, result: FrameResult, alpha: float = 0.5) -> np.ndarray:
    """The frame with each visible object's mask blended in its colour, outlined and labelled with its id."""
    import cv2

    present = _present_objects(result)
    out = image_rgb.astype(np.float32)
    for p in present:
        colour = np.array(object_colour(p.obj_id), dtype=np.float32)
        out[p.mask_hw] = out[p.mask_hw] * (1.0 - alpha) + colour * alpha
    canvas = np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    for p in present:
        contours, _ = cv2.findContours(p.mask_hw.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, object_colour(p.obj_id), 1, cv2.LINE_AA)
    for p in present:
        x, y, _, _ = mask_box_xywh(p.mask_hw)
        org = (int(x), max(int(y) - 3, 10))
        for text_rgb, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):  # white on a black outline
            cv2.putText(canvas, str(p.obj_id), org, cv2.FONT_HERSHEY_SIMPLEX, 0.4, text_rgb, thickness, cv2.LINE_AA)
    return canvas


class OverlayWriter(ExportWriter):
    """An MP4 for eyeballing the tracking: ``DIR/NAME_overlay.mp4``, H.264 yuv420p.

    Needs the frames (``write(result, image_rgb=frame)``). Each drawn frame is
    spooled as a JPEG (quality 95) under ``DIR/.NAME_overlay.frames/`` and the
    video is encoded on close in ``frame_idx`` order at a constant ``fps`` (30
    when unknown): results may come in any order (the annotator's backward pass
    comes last), and a killed run resumes from the spooled frames. The spool
    needs disk, about 100-200 kB per 720p frame, and is deleted on close.

    H.264 in yuv420p needs even sizes, so odd widths/heights are padded by one
    replicated row/column at the right/bottom; no pixel is cropped or moved. The
    video is encoded to a hidden temp file and moved into place. A close
    without frames makes no file.
    """

    format = "overlay"
    needs_images = True

    def __init__(self, *, alpha: float = 0.5, crf: int = 20, jpeg_quality: int = 95) -> None:
        super().__init__()
        self.alpha = alpha
        self.crf = crf
        self.jpeg_quality = jpeg_quality

    @property
    def output_path(self) -> Path:
        assert self._out_dir is not None and self._meta is not None, "open() first"
        return self._out_dir / f"{self._meta.video_name}_overlay.mp4"

    @property
    def spool_path(self) -> Path:
        """The folder of drawn frames waiting to be encoded."""
        return self.output_path.with_name(f".{self.output_path.stem}.frames")

    def _open(self, resume: bool) -> None:
        import cv2

        meta = self._meta
        assert meta is not None
        spool = self.spool_path
        spool.mkdir(exist_ok=True)
        for path in spool.iterdir():
            m = _FRAME_JPG.match(path.name)
            if m and resume:
                self._done.add(int(m.group(1)))
            else:  # temp files of a killed write, or a fresh start
                path.unlink()
        if self._done:
            sample = cv2.imread(str(spool / f"{min(self._done):05d}.jpg"), cv2.IMREAD_COLOR)
            if sample is None or sample.shape[:2] != (meta.height, meta.width):
                found = "unreadable" if sample is None else f"{sample.shape[1]}x{sample.shape[0]} (WxH)"
                raise TrackerError(
                    f"cannot resume {spool}: its frames are {found}, the video is {meta.width}x{meta.height}; "
                    "use another output folder or start over without resume"
                )

    def _write(self, result: FrameResult, image_rgb: np.ndarray | None) -> None:
        import cv2

        meta = self._meta
        assert meta is not None
        if image_rgb is None:
            raise FrameError("the overlay export draws on the frames: pass write(result, image_rgb=frame)")
        image = np.asarray(image_rgb)
        if image.shape != (meta.height, meta.width, 3) or image.dtype != np.uint8:
            raise FrameError(
                f"image_rgb must be a ({meta.height}, {meta.width}, 3) uint8 RGB frame, got shape {image.shape} "
                f"dtype {image.dtype}"
            )
        canvas = draw_overlay(image, result, self.alpha)
        ok, jpeg = cv2.imencode(".jpg", canvas[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        assert ok, "OpenCV could not encode a JPEG"
        _atomic_write_bytes(self.spool_path / f"{result.frame_idx:05d}.jpg", jpeg.tobytes())

    def _close(self) -> None:
        import av
        import cv2

        meta = self._meta
        assert meta is not None
        spool = self.spool_path
        frames = sorted(self._done)
        if frames:
            rate = Fraction(meta.fps if meta.fps is not None else 30.0).limit_denominator(1001)
            tmp = self.output_path.with_name(f".{self.output_path.name}.tmp")
            pad_h, pad_w = meta.height % 2, meta.width % 2
            with av.open(str(tmp), mode="w", format="mp4") as container:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height = meta.width + pad_w, meta.height + pad_h
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(self.crf), "preset": "veryfast"}
                for n, frame_idx in enumerate(frames):
                    jpeg_path = spool / f"{frame_idx:05d}.jpg"
                    bgr = cv2.imread(str(jpeg_path), cv2.IMREAD_COLOR)
                    if bgr is None:
                        raise TrackerError(
                            f"cannot read the spooled overlay frame {jpeg_path}; delete {spool} and run again"
                        )
                    if pad_h or pad_w:
                        bgr = cv2.copyMakeBorder(bgr, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
                    rgb = np.ascontiguousarray(bgr[..., ::-1], dtype=np.uint8)
                    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                    frame.pts = n
                    frame.time_base = 1 / rate
                    container.mux(stream.encode(frame))
                container.mux(stream.encode(None))
            os.replace(tmp, self.output_path)
            _fsync_dir(self.output_path.parent)
        shutil.rmtree(spool)

    def _abort(self) -> None:
        if not self._done:
            shutil.rmtree(self.spool_path, ignore_errors=True)


# --- factory ------------------------------------------------------------------------

_WRITERS: dict[str, type[ExportWriter]] = {
    "coco": CocoWriter,
    "ytvis": YtvisWriter,
    "davis": DavisWriter,
    "mot": MotWriter,
    "overlay": OverlayWriter,
}


def make_writer(fmt: str, out_dir: PathLike, **open_kw: Any) -> ExportWriter:
    """A writer for ``fmt`` (one of :data:`FORMATS`), opened with ``open_kw`` (see :meth:`ExportWriter.open`)."""
    cls = _WRITERS.get(fmt)
    if cls is None:
        raise ExportError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    writer = cls()
    writer.open(out_dir, **open_kw)
    return writer


# --- readers ------------------------------------------------------------------------


def _segmentation_mask(seg: Any, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):  # polygons, from other tools' COCO files
        return polygons_to_mask(seg, h, w)
    return decode_rle(seg)


def read_coco(path: PathLike) -> dict[int, dict[int, np.ndarray]]:
    """Masks of a COCO file as ``{frame_idx: {obj_id: bool (H, W) mask}}``, every image a key.

    Frames are keyed by the image's ``frame_idx`` (this module's files) or else
    its ``id``; objects by ``obj_id``, else ``track_id``, else the annotation id.
    Loads every mask: meant for tests and short clips.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    frames: dict[int, dict[int, np.ndarray]] = {}
    image_frame: dict[int, tuple[int, int, int]] = {}
    for image in data["images"]:
        frame_idx = int(image.get("frame_idx", image["id"]))
        image_frame[image["id"]] = (frame_idx, int(image["height"]), int(image["width"]))
        frames[frame_idx] = {}
    for ann in data["annotations"]:
        frame_idx, h, w = image_frame[ann["image_id"]]
        obj_id = int(ann.get("obj_id", ann.get("track_id", ann["id"])))
        frames[frame_idx][obj_id] = _segmentation_mask(ann["segmentation"], h, w)
    return frames


def read_ytvis(path: PathLike, video_name: str | None = None) -> dict[int, dict[int, np.ndarray]]:
    """Masks of one video of a YouTube-VIS file as ``{frame_idx: {obj_id: mask}}``.

    Frames are keyed by the number in each ``file_names`` entry (``00012.jpg`` ->
    12), else by position; objects by ``obj_id``, else the annotation id. Pass
    ``video_name`` when the file holds several videos.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    videos = data["videos"]
    if video_name is not None:
        videos = [v for v in videos if v.get("name") == video_name]
        if not videos:
            raise ExportError(f"{path} has no video named {video_name!r}")
    elif len(videos) != 1:
        raise ExportError(f"{path} holds {len(videos)} videos; pass video_name to choose one")
    video = videos[0]
    keys = []
    for n, name in enumerate(video["file_names"]):
        stem = Path(name).stem
        keys.append(int(stem) if stem.isdigit() else n)
    frames: dict[int, dict[int, np.ndarray]] = {k: {} for k in keys}
    for ann in data["annotations"]:
        if ann["video_id"] != video["id"]:
            continue
        obj_id = int(ann.get("obj_id", ann["id"]))
        for key, seg in zip(keys, ann["segmentations"]):
            if seg is not None:
                frames[key][obj_id] = _segmentation_mask(seg, int(video["height"]), int(video["width"]))
    return frames


def read_davis(folder: PathLike) -> dict[int, dict[int, np.ndarray]]:
    """Masks of a folder of DAVIS label PNGs (``00000.png`` ...) as ``{frame_idx: {obj_id: mask}}``."""
    frames: dict[int, dict[int, np.ndarray]] = {}
    for path in sorted(Path(folder).iterdir()):
        m = _FRAME_PNG.match(path.name)
        if m:
            frames[int(m.group(1))] = label_map_to_masks(decode_label_png(path.read_bytes()))
    return frames


class MotBox(NamedTuple):
    """One MOT row's box (``bb_left, bb_top, bb_width, bb_height``) and ``conf``."""

    box_xywh: tuple[float, float, float, float]
    conf: float


def read_mot(path: PathLike) -> dict[int, dict[int, MotBox]]:
    """A MOT Challenge file as ``{frame_idx: {obj_id: MotBox}}``; ``frame_idx`` is 0-based (MOT's frame - 1)."""
    frames: dict[int, dict[int, MotBox]] = {}
    with open(path, newline="", encoding="ascii") as f:
        for row in csv.reader(f):
            if not row:
                continue
            frame_idx = int(float(row[0])) - 1
            box = (float(row[2]), float(row[3]), float(row[4]), float(row[5]))
            frames.setdefault(frame_idx, {})[int(float(row[1]))] = MotBox(box, float(row[6]))
    return frames


__all__ = [
    "DEFAULT_CATEGORY",
    "FORMATS",
    "CocoWriter",
    "DavisWriter",
    "ExportWriter",
    "MotBox",
    "MotWriter",
    "OverlayWriter",
    "YtvisWriter",
    "draw_overlay",
    "make_writer",
    "object_colour",
    "read_coco",
    "read_davis",
    "read_mot",
    "read_ytvis",
]
