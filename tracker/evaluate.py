"""J&F of annotation runs against ground-truth label maps: ``sam2-stream eval``.

Lives here: the two DAVIS measures (region similarity J, boundary accuracy F),
finding a run's outputs (``annotate``'s DAVIS PNGs or COCO file) and the ground
truth (DAVIS, YouTube-VOS or a plain folder of label PNGs), scoring several runs
side by side, the table, the JSON and the ``eval`` subcommand. Not here: reading
the export formats (:func:`tracker.export.read_davis` / :func:`~tracker.export.read_coco`),
running models.

The measures are those of the official DAVIS evaluation
(davisvideochallenge/davis2017-evaluation, ``davis2017/metrics.py``:
``db_eval_iou``, ``f_measure``, ``_seg2bmap``) and the protocol is that of
hkchengrex's ``vos-benchmark`` (the evaluator behind XMem's and Cutie's published
numbers), written again here and proven equal to both by ``tests/test_evaluate.py``:

- **J** = |P ∩ G| / |P ∪ G| over the pixels that are not void (label 255 in the
  ground truth, as DAVIS marks them), 1 when both masks are empty.
- **F**: each mask's boundary map (``seg2bmap``: a pixel whose right, lower or
  lower-right neighbour differs), each boundary dilated with a disk of radius
  ``ceil(0.008 x image diagonal)`` px; precision = predicted boundary pixels
  within the ground truth's dilated boundary / all predicted boundary pixels,
  recall the other way round; F = 2PR / (P + R). An empty boundary on one side
  only gives F = 0, on both sides F = 1.
- Scored frames: the frames that have ground truth, less the first and the last
  of each sequence (DAVIS's semi-supervised protocol: its ``evaluation.py``
  scores ``all_gt_masks[:, 1:-1]``, the first frame being the prompt;
  vos-benchmark the same), or all of them with ``all_frames``.
- Objects are named by their label: an object is scored on every scored frame
  from the first on which it is in the ground truth or in the prediction
  (vos-benchmark's rule, for objects that enter later as in YouTube-VOS);
  objects never in the ground truth are not reported.
- Per object the mean over its frames; per sequence the mean over its objects;
  a run's J and F are the means over all objects of all sequences (DAVIS's
  global J-Mean / F-Mean); J&F = (J + F) / 2.
- A run's masks are painted into one label map per frame before scoring
  (highest object id wins where masks overlap, as :class:`tracker.export.DavisWriter`
  does), so the COCO and the DAVIS outputs of one run score the same.

Why not ``vos-benchmark`` itself: ``pip install vos-benchmark`` (0.1.0) pulls
``opencv-python`` next to the ``opencv-python-headless`` this project uses (two
distributions writing the same ``cv2`` package) and scikit-image with SciPy
(~100 MB) for one ``disk()``; and its library entry point prints and calls
``exit(1)`` on bad input. The definitions above are a few lines of NumPy and
OpenCV.

Frames/s of a run: ``annotate`` writes ``OUT/NAME.run.json``
(:func:`write_run_summary`) next to its outputs; ``eval --fps`` gives it by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tracker.errors import TrackerError

log = logging.getLogger("tracker.evaluate")

PathLike = str | os.PathLike[str]

#: DAVIS's boundary tolerance, a fraction of the image diagonal (values >= 1 are pixels)
BOUND_TH = 0.008
#: the ground-truth label DAVIS uses for pixels that count for no one
VOID_LABEL = 255
#: ``OUT/<video name><RUN_SUMMARY_SUFFIX>``: what annotate says about a run's speed
RUN_SUMMARY_SUFFIX = ".run.json"
PRED_FORMATS = ("auto", "davis", "coco")

#: the file names DavisWriter writes (``00000.png`` ...)
_DAVIS_PNG = re.compile(r"^\d{5,}\.png$")
_TRAILING_NUMBER = re.compile(r"(\d+)$")


class EvalError(TrackerError, ValueError):
    """Ground truth or a run that cannot be scored (missing frames, sizes, layouts)."""


# --- the measures --------------------------------------------------------------------


def disk(radius: int) -> np.ndarray:
    """The ``(2r+1, 2r+1)`` uint8 disk ``x² + y² <= r²`` (``skimage.morphology.disk``, which DAVIS dilates with)."""
    r = int(radius)
    if r < 0:
        raise EvalError(f"disk radius must be >= 0, got {radius!r}")
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy <= r * r).astype(np.uint8)


def boundary_tolerance_px(shape_hw: Sequence[int], bound_th: float = BOUND_TH) -> int:
    """The dilation radius F uses: ``ceil(bound_th x diagonal)`` px, or ``bound_th`` itself when >= 1 (DAVIS's rule)."""
    if not (isinstance(bound_th, (int, float)) and math.isfinite(bound_th) and bound_th > 0):
        raise EvalError(f"bound_th must be a positive number, got {bound_th!r}")
    if bound_th >= 1:
        return int(math.ceil(bound_th))
    return int(np.ceil(bound_th * np.linalg.norm(np.asarray(shape_hw[:2], dtype=np.float64))))


def boundary_map(mask_hw: np.ndarray) -> np.ndarray:
    """A mask's one-pixel boundary, bool ``(H, W)``: DAVIS's ``seg2bmap`` at the mask's own size.

    A pixel is on the boundary when its right, lower or lower-right neighbour
    differs from it (the boundary lies half a pixel towards the origin); on the
    last row only the right neighbour counts, on the last column only the lower
    one, the bottom-right pixel never.
    """
    seg = np.asarray(mask_hw).astype(bool)
    if seg.ndim != 2:
        raise EvalError(f"a mask must be 2-D (H, W), got shape {seg.shape}")
    right = np.zeros_like(seg)
    below = np.zeros_like(seg)
    below_right = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    below[:-1, :] = seg[1:, :]
    below_right[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ right) | (seg ^ below) | (seg ^ below_right)
    bmap[-1, :] = seg[-1, :] ^ right[-1, :]
    bmap[:, -1] = seg[:, -1] ^ below[:, -1]
    bmap[-1, -1] = False
    return bmap


def _check_pair(pred_hw: np.ndarray, gt_hw: np.ndarray, void_hw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    pred = np.asarray(pred_hw).astype(bool)
    gt = np.asarray(gt_hw).astype(bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise EvalError(f"prediction and ground truth must be 2-D masks of one size, got {pred.shape} and {gt.shape}")
    void = None
    if void_hw is not None:
        void = np.asarray(void_hw).astype(bool)
        if void.shape != gt.shape:
            raise EvalError(f"the void mask is {void.shape}, the masks {gt.shape}")
        if not void.any():
            void = None
    return pred, gt, void


def region_similarity(pred_hw: np.ndarray, gt_hw: np.ndarray, void_hw: np.ndarray | None = None) -> float:
    """J: intersection over union of two masks outside the void pixels; 1 when both are empty (``db_eval_iou``)."""
    pred, gt, void = _check_pair(pred_hw, gt_hw, void_hw)
    if void is not None:
        pred, gt = pred & ~void, gt & ~void
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


def boundary_f(pred_hw: np.ndarray, gt_hw: np.ndarray, void_hw: np.ndarray | None = None, bound_th: float = BOUND_TH) -> float:
    """F: the boundary F-measure of two masks with DAVIS's tolerance (``f_measure``).

    Args:
        pred_hw, gt_hw: bool ``(H, W)`` masks.
        void_hw: pixels removed from both masks before their boundaries are taken.
        bound_th: tolerance as a fraction of the image diagonal, or pixels when >= 1.
    """
    pred, gt, void = _check_pair(pred_hw, gt_hw, void_hw)
    if void is not None:
        pred, gt = pred & ~void, gt & ~void
    pred_b = boundary_map(pred)
    gt_b = boundary_map(gt)
    n_pred = int(np.count_nonzero(pred_b))
    n_gt = int(np.count_nonzero(gt_b))
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0  # precision 1 and recall 0, or the other way round
    kernel = disk(boundary_tolerance_px(pred.shape, bound_th))
    pred_near = cv2.dilate(pred_b.astype(np.uint8), kernel).astype(bool)
    gt_near = cv2.dilate(gt_b.astype(np.uint8), kernel).astype(bool)
    precision = int(np.count_nonzero(pred_b & gt_near)) / n_pred
    recall = int(np.count_nonzero(gt_b & pred_near)) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# --- scores --------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


@dataclass(frozen=True)
class ObjectScore:
    """One object of one sequence: J and F averaged over the ``frames`` it was scored on (fractions in [0, 1])."""

    obj_id: int
    j: float
    f: float
    frames: int

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2


class _MeansOverObjects:
    """J, F and J&F as means over ``objects`` (DAVIS averages objects, not frames)."""

    objects: Sequence[ObjectScore]

    @property
    def j(self) -> float:
        return _mean([o.j for o in self.objects])

    @property
    def f(self) -> float:
        return _mean([o.f for o in self.objects])

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2


@dataclass(frozen=True)
class SequenceScore(_MeansOverObjects):
    """One sequence of one run: its objects and their means."""

    name: str
    objects: tuple[ObjectScore, ...]
    frames: int  # ground-truth frames scored


@dataclass(frozen=True)
class RunScore(_MeansOverObjects):
    """One run (one model's outputs) over the sequences scored; J and F are means over all their objects."""

    name: str
    path: str
    format: str
    sequences: tuple[SequenceScore, ...]
    model: str | None = None
    frames_per_s: float | None = None

    @property
    def objects(self) -> list[ObjectScore]:
        return [o for s in self.sequences for o in s.objects]


class SequenceScorer:
    """Per-object J and F of one sequence, fed one frame's label maps at a time.

    Mirrors ``vos_benchmark.evaluator.Evaluator.feed_frame``: each frame scores
    every object seen so far in the ground truth or the prediction, so an object
    entering later starts counting where it first shows up; :meth:`result`
    reports the objects the ground truth has. Holds floats only, never masks.
    """

    def __init__(self, name: str, *, bound_th: float = BOUND_TH) -> None:
        self.name = name
        self.bound_th = bound_th
        self._in_gt: set[int] = set()
        self._seen: set[int] = set()
        self._j: dict[int, list[float]] = {}
        self._f: dict[int, list[float]] = {}
        self.frames = 0

    def add_frame(self, pred_label_hw: np.ndarray, gt_label_hw: np.ndarray) -> None:
        """Score one frame: ``(H, W)`` integer label maps, 0 = background, ``VOID_LABEL`` in the ground truth = void."""
        pred = np.asarray(pred_label_hw)
        gt = np.asarray(gt_label_hw)
        if pred.shape != gt.shape or gt.ndim != 2:
            raise EvalError(f"label maps must be 2-D and of one size, got {pred.shape} and {gt.shape}")
        void = gt == VOID_LABEL
        gt_ids = {int(v) for v in np.unique(gt) if v != 0 and v != VOID_LABEL}
        pred_ids = {int(v) for v in np.unique(pred) if v != 0}
        self._in_gt |= gt_ids
        self._seen |= gt_ids | pred_ids
        for obj_id in sorted(self._seen):
            p, g = pred == obj_id, gt == obj_id
            self._j.setdefault(obj_id, []).append(region_similarity(p, g, void))
            self._f.setdefault(obj_id, []).append(boundary_f(p, g, void, self.bound_th))
        self.frames += 1

    def result(self) -> SequenceScore:
        objects = tuple(
            ObjectScore(obj_id, _mean(self._j[obj_id]), _mean(self._f[obj_id]), len(self._j[obj_id]))
            for obj_id in sorted(self._in_gt)
        )
        return SequenceScore(self.name, objects, self.frames)


# --- ground truth ----------------------------------------------------------------------


@dataclass(frozen=True)
class GroundTruthSequence:
    """One sequence's label PNGs by frame index (the index ``annotate`` gave that frame)."""

    name: str
    files: Mapping[int, Path]


def _label_pngs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file() and not p.name.startswith(".")]


def _frame_indices(name: str, pngs: Sequence[Path], frames_dir: Path | None) -> dict[int, Path]:
    """GT file → frame index: the position of the frame of the same name in ``frames_dir``, else the number in its name."""
    files: dict[int, Path] = {}
    if frames_dir is not None:
        from tracker.sources.images import list_image_files

        position = {p.stem: i for i, p in enumerate(list_image_files(frames_dir))}
        for png in pngs:
            if png.stem not in position:
                raise EvalError(
                    f"ground truth {png} has no frame named {png.stem}.* in {frames_dir}; pass --frames with the "
                    "folder of frames the run was given"
                )
            files[position[png.stem]] = png
        return dict(sorted(files.items()))
    for png in pngs:
        m = _TRAILING_NUMBER.search(png.stem)
        if m is None:
            raise EvalError(
                f"cannot tell which frame ground truth {png} is: its name ends in no frame number; pass --frames "
                "with the folder of frames the run was given (GT files are then matched to frames by name)"
            )
        idx = int(m.group(1))
        if idx in files:
            raise EvalError(f"ground truth of sequence {name!r}: {files[idx].name} and {png.name} are both frame {idx}")
        files[idx] = png
    return dict(sorted(files.items()))


def _sequence_frames_dir(frames_root: Path | None, name: str, single: bool) -> Path | None:
    if frames_root is None:
        return None
    candidates = [frames_root / name] + ([frames_root] if single else [])
    for folder in candidates:
        if folder.is_dir() and any(p.suffix.lower() in (".jpg", ".jpeg", ".png") for p in folder.iterdir()):
            return folder
    return None


def find_ground_truth(gt: PathLike, *, frames: PathLike | None = None) -> dict[str, GroundTruthSequence]:
    """The ground-truth sequences under ``gt``, by name.

    Layouts: a DAVIS root (``Annotations/480p/NAME/*.png``), a YouTube-VOS split
    (``Annotations/NAME/*.png``), a folder of sequence folders, or one folder of
    label PNGs (one sequence, named for the folder). A GT file is matched to the
    frame of the same name in the frames folder, which is ``frames`` when given,
    else the ``JPEGImages`` folder beside ``Annotations``: YouTube-VOS names
    every fifth frame (``00005.png`` is the second frame of its JPEGImages);
    without one the number in the file name is the frame index.
    """
    root = Path(gt)
    if not root.is_dir():
        raise EvalError(f"--gt {root}: no such folder; give a DAVIS root, a YouTube-VOS split or a folder of label PNGs")
    if (root / "Annotations" / "480p").is_dir():
        ann, auto_frames = root / "Annotations" / "480p", root / "JPEGImages" / "480p"
    elif (root / "Annotations").is_dir():
        ann, auto_frames = root / "Annotations", root / "JPEGImages"
    else:
        ann, auto_frames = root, None
    if frames is not None:
        frames_root: Path | None = Path(frames)
        if not frames_root.is_dir():
            raise EvalError(f"--frames {frames_root}: no such folder")
    else:
        frames_root = auto_frames if auto_frames is not None and auto_frames.is_dir() else None
    pngs = _label_pngs(ann)
    if pngs:
        name = root.name if root.name != "Annotations" else root.parent.resolve().name
        folders = {name: (pngs, _sequence_frames_dir(frames_root, name, single=True))}
    else:
        folders = {}
        for sub in sorted(p for p in ann.iterdir() if p.is_dir() and not p.name.startswith(".")):
            sub_pngs = _label_pngs(sub)
            if sub_pngs:
                folders[sub.name] = (sub_pngs, _sequence_frames_dir(frames_root, sub.name, single=False))
    if not folders:
        raise EvalError(f"--gt {root}: no label PNGs in {ann} or in its sub-folders")
    sequences = {}
    for name, (seq_pngs, frames_dir) in folders.items():
        if frames is not None and frames_dir is None:
            raise EvalError(f"--frames {frames}: no frames for sequence {name!r} there (nor in {Path(frames) / name})")
        log.debug("ground truth %s: %d frames, matched %s", name, len(seq_pngs), f"by name to {frames_dir}" if frames_dir else "by number")
        sequences[name] = GroundTruthSequence(name, _frame_indices(name, seq_pngs, frames_dir))
    return sequences


# --- runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """What ``annotate`` says about one video's run: model passes (forward + backward) and their wall time."""

    video: str
    frames: int
    seconds: float
    model: str | None = None

    @property
    def frames_per_s(self) -> float | None:
        return self.frames / self.seconds if self.seconds > 0 else None


def run_summary_path(out_dir: PathLike, video_name: str) -> Path:
    return Path(out_dir) / f"{video_name}{RUN_SUMMARY_SUFFIX}"


def write_run_summary(out_dir: PathLike, video_name: str, *, frames: int, seconds: float, model: str | None = None) -> Path:
    """Record a run's speed beside its outputs (``OUT/NAME.run.json``) for ``eval`` to report.

    Args:
        frames: frames the model processed (forward plus backward passes).
        seconds: wall time of those passes.
        model: the model's name as chosen (``--model``).
    """
    path = run_summary_path(out_dir, video_name)
    data = {"video": video_name, "model": model, "frames": int(frames), "seconds": float(seconds)}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_run_summary(path: PathLike) -> RunSummary | None:
    """A run summary, or None when there is none (an unreadable one is logged and ignored: speed is extra)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunSummary(str(data["video"]), int(data["frames"]), float(data["seconds"]), data.get("model"))
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring run summary %s: %s", path, e)
        return None


@dataclass(frozen=True)
class PredictedSequence:
    """One sequence of a run: a DAVIS folder of label PNGs or a COCO file."""

    name: str
    format: str  # "davis" | "coco"
    path: Path
    summary: RunSummary | None = None

    def masks(self) -> Mapping[int, dict[int, np.ndarray]]:
        """``{frame_idx: {obj_id: bool (H, W) mask}}``.

        DAVIS frames are decoded one at a time when asked for (as
        :func:`tracker.export.read_davis` decodes each), so a long clip costs one
        frame of memory; a COCO file is read whole by :func:`tracker.export.read_coco`.
        """
        if self.format == "davis":
            return _DavisFrames(self.path)
        from tracker.export import read_coco

        return read_coco(self.path)


class _DavisFrames(Mapping[int, dict[int, np.ndarray]]):
    """A DAVIS folder's frames by index, each label PNG decoded on access."""

    def __init__(self, folder: Path) -> None:
        self._files = {int(p.stem): p for p in folder.iterdir() if _DAVIS_PNG.match(p.name)}

    def __getitem__(self, frame_idx: int) -> dict[int, np.ndarray]:
        from tracker.masks import decode_label_png, label_map_to_masks

        return label_map_to_masks(decode_label_png(self._files[frame_idx].read_bytes()))

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._files))

    def __len__(self) -> int:
        return len(self._files)


@dataclass(frozen=True)
class Run:
    """The outputs of one run (one model), possibly several sequences."""

    name: str
    path: Path
    format: str
    sequences: Mapping[str, PredictedSequence] = field(default_factory=dict)

    @property
    def summaries(self) -> list[RunSummary | None]:
        return [s.summary for s in self.sequences.values()]


def _is_davis_folder(folder: Path) -> bool:
    return any(_DAVIS_PNG.match(p.name) for p in folder.iterdir())


def _coco_video_name(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        videos = data.get("videos") or []
        images = data["images"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EvalError(f"{path} is not a COCO annotations file: {e}") from None
    if not isinstance(images, list):
        raise EvalError(f"{path} is not a COCO annotations file: 'images' is not a list")
    if len(videos) > 1:
        raise EvalError(f"{path} holds {len(videos)} videos; eval reads one video per COCO file, as annotate writes")
    if videos and videos[0].get("name"):
        return str(videos[0]["name"])
    return path.parent.name


def find_run(path: PathLike, *, name: str | None = None, pred_format: str = "auto") -> Run:
    """The sequences of one run's outputs.

    ``path``: an ``annotate --out`` folder (``NAME/00000.png`` … for DAVIS,
    ``annotations.json`` for COCO), one DAVIS sequence folder, or a COCO file.
    ``pred_format`` ``auto`` takes DAVIS PNGs where there are any, else COCO.
    """
    if pred_format not in PRED_FORMATS:
        raise EvalError(f"format must be one of {', '.join(PRED_FORMATS)}, got {pred_format!r}")
    p = Path(path)
    run_name = name or (p.parent if p.is_file() else p).resolve().name
    davis: dict[str, Path] = {}
    coco: Path | None = None
    if p.is_file():
        coco = p
    elif p.is_dir():
        if _is_davis_folder(p):
            davis[p.name] = p
        else:
            for sub in sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith(".")):
                if _is_davis_folder(sub):
                    davis[sub.name] = sub
        if (p / "annotations.json").is_file():
            coco = p / "annotations.json"
    else:
        raise EvalError(f"run {run_name}: {p} does not exist; give an annotate output folder or a COCO file")
    fmt = pred_format if pred_format != "auto" else ("davis" if davis else "coco")
    if fmt == "davis" and not davis:
        raise EvalError(f"run {run_name}: no DAVIS label PNGs (NAME/00000.png ...) in {p}")
    if fmt == "coco" and coco is None:
        raise EvalError(f"run {run_name}: no annotate output in {p}: expected DAVIS label PNGs (NAME/00000.png ...) or annotations.json")
    sequences: dict[str, PredictedSequence] = {}
    if fmt == "davis":
        for seq, folder in davis.items():
            summary = read_run_summary(run_summary_path(folder.parent, seq))
            sequences[seq] = PredictedSequence(seq, "davis", folder, summary)
    else:
        assert coco is not None
        seq = _coco_video_name(coco)
        sequences[seq] = PredictedSequence(seq, "coco", coco, read_run_summary(run_summary_path(coco.parent, seq)))
    return Run(run_name, p, fmt, sequences)


# --- scoring -----------------------------------------------------------------------------


def score_sequence(
    gt: GroundTruthSequence,
    pred: PredictedSequence,
    *,
    run_name: str = "",
    all_frames: bool = False,
    bound_th: float = BOUND_TH,
) -> SequenceScore:
    """Score one predicted sequence against its ground truth (first and last GT frames skipped unless ``all_frames``)."""
    from tracker.masks import decode_label_png, masks_to_label_map

    where = f"run {run_name}, sequence {gt.name}" if run_name else f"sequence {gt.name}"
    frames = list(gt.files)
    if not all_frames:
        if len(frames) < 3:
            raise EvalError(
                f"{where}: {len(frames)} ground-truth frame(s); the first and the last are not scored (DAVIS's "
                "semi-supervised protocol), which leaves none: pass --all-frames"
            )
        frames = frames[1:-1]
    masks = pred.masks()
    scorer = SequenceScorer(gt.name, bound_th=bound_th)
    for frame_idx in frames:
        gt_path = gt.files[frame_idx]
        gt_label = decode_label_png(gt_path.read_bytes())
        if frame_idx not in masks:
            raise EvalError(f"{where}: {pred.path} has no frame {frame_idx} (ground truth {gt_path.name}); was the run complete?")
        h, w = gt_label.shape
        objects = masks[frame_idx]
        for obj_id, m in objects.items():
            if m.shape != (h, w):
                raise EvalError(
                    f"{where}, frame {frame_idx}: the run's mask of object {obj_id} is {m.shape[1]}x{m.shape[0]}, "
                    f"ground truth {gt_path.name} is {w}x{h}"
                )
        scorer.add_frame(masks_to_label_map(objects, h, w), gt_label)
    result = scorer.result()
    if not result.objects:
        raise EvalError(f"{where}: the ground truth has no object on the frames scored")
    return result


def _frames_per_s(summaries: Sequence[RunSummary | None]) -> float | None:
    if not summaries or any(s is None for s in summaries):
        return None
    seconds = sum(s.seconds for s in summaries if s is not None)
    return sum(s.frames for s in summaries if s is not None) / seconds if seconds > 0 else None


def _pair(run: Run, gt: Mapping[str, GroundTruthSequence]) -> list[tuple[GroundTruthSequence, PredictedSequence]]:
    if len(gt) == 1 and len(run.sequences) == 1:
        (g,), (p,) = gt.values(), run.sequences.values()
        if g.name != p.name:
            log.info("run %s: scoring its sequence %s against the ground truth %s", run.name, p.name, g.name)
        return [(g, p)]
    unknown = sorted(set(run.sequences) - set(gt))
    if unknown:
        raise EvalError(
            f"run {run.name}: sequence(s) {', '.join(unknown)} have no ground truth; the ground truth has "
            f"{', '.join(sorted(gt))}"
        )
    return [(gt[name], run.sequences[name]) for name in sorted(run.sequences)]


def evaluate(
    gt: Mapping[str, GroundTruthSequence],
    runs: Sequence[Run],
    *,
    all_frames: bool = False,
    bound_th: float = BOUND_TH,
    frames_per_s: Sequence[float | None] | None = None,
) -> list[RunScore]:
    """Score each run on the same sequences; ``frames_per_s`` (one per run) overrides the runs' summaries."""
    if not runs:
        raise EvalError("no run to score: give at least one annotate output")
    if frames_per_s is not None and len(frames_per_s) != len(runs):
        raise EvalError(f"--fps given {len(frames_per_s)} time(s) for {len(runs)} run(s): give it once per run, in order")
    pairs = [_pair(run, gt) for run in runs]
    names = [[g.name for g, _ in p] for p in pairs]
    for run, seqs in zip(runs, names):
        if seqs != names[0]:
            raise EvalError(
                f"run {run.name} has sequences {', '.join(seqs)}, run {runs[0].name} {', '.join(names[0])}: "
                "runs compared side by side must cover the same sequences"
            )
    not_run = sorted(set(gt) - set(names[0]))
    if not_run and len(gt) > 1:
        log.info("ground truth without a run, not scored: %s", ", ".join(not_run))
    scores = []
    for i, (run, run_pairs) in enumerate(zip(runs, pairs)):
        sequences = tuple(score_sequence(g, p, run_name=run.name, all_frames=all_frames, bound_th=bound_th) for g, p in run_pairs)
        summaries = [p.summary for _, p in run_pairs]
        models = sorted({s.model for s in summaries if s is not None and s.model})
        fps = frames_per_s[i] if frames_per_s is not None else _frames_per_s(summaries)
        scores.append(RunScore(run.name, str(run.path), run.format, sequences, ", ".join(models) or None, fps))
    return scores


# --- output ------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header)] + [line(r) for r in rows]


def format_table(scores: Sequence[RunScore]) -> str:
    """Per run, sequence and object J&F, J, F (percent), then one row per run: the comparison."""
    detail = []
    for run in scores:
        for seq in run.sequences:
            for o in seq.objects:
                detail.append([run.name, seq.name, str(o.obj_id), _pct(o.jf), _pct(o.j), _pct(o.f), str(o.frames)])
            detail.append([run.name, seq.name, "mean", _pct(seq.jf), _pct(seq.j), _pct(seq.f), str(seq.frames)])
    summary = [
        [
            run.name,
            run.model or "-",
            str(len(run.sequences)),
            str(len(run.objects)),
            _pct(run.jf),
            _pct(run.j),
            _pct(run.f),
            f"{run.frames_per_s:.2f}" if run.frames_per_s is not None else "-",
        ]
        for run in scores
    ]
    lines = _table(["run", "sequence", "object", "J&F", "J", "F", "frames"], detail, left=3)
    lines.append("")
    lines += _table(["run", "model", "sequences", "objects", "J&F", "J", "F", "frames/s"], summary, left=2)
    return "\n".join(lines) + "\n"


def scores_json(scores: Sequence[RunScore], *, gt: PathLike, all_frames: bool = False, bound_th: float = BOUND_TH) -> dict[str, Any]:
    """The scores as JSON (fractions in [0, 1]; the table prints percent)."""

    def measures(x: ObjectScore | SequenceScore | RunScore) -> dict[str, float]:
        return {"J&F": x.jf, "J": x.j, "F": x.f}

    return {
        "ground_truth": str(gt),
        "protocol": {"first_and_last_frames_scored": all_frames, "bound_th": bound_th, "void_label": VOID_LABEL},
        "runs": [
            {
                "name": run.name,
                "path": run.path,
                "format": run.format,
                "model": run.model,
                "frames_per_s": run.frames_per_s,
                **measures(run),
                "objects": len(run.objects),
                "sequences": [
                    {
                        "name": seq.name,
                        "frames": seq.frames,
                        **measures(seq),
                        "objects": [{"obj_id": o.obj_id, "frames": o.frames, **measures(o)} for o in seq.objects],
                    }
                    for seq in run.sequences
                ],
            }
            for run in scores
        ],
    }


# --- command line ----------------------------------------------------------------------


def _split_run_arg(text: str) -> tuple[str | None, str]:
    """``[NAME=]PATH``; a path that exists as written is a path even with ``=`` in it."""
    if "=" in text and not Path(text).exists():
        name, path = text.split("=", 1)
        if name and path:
            return name, path
    return None, text


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval`` on the ``sam2-stream`` subcommands (see :func:`tracker.cli.build_parser`)."""
    e = sub.add_parser(
        "eval",
        help="J&F of annotate outputs against ground-truth label maps; several runs side by side",
        description="Score annotate outputs (DAVIS PNGs or COCO) against ground-truth label maps with DAVIS's "
        "J (region similarity) and F (boundary accuracy), per object, per sequence and per run, with each run's "
        "frames/s where known.",
    )
    e.add_argument(
        "runs",
        nargs="*",
        metavar="[NAME=]RUN",
        help="an annotate --out folder (NAME/00000.png... or annotations.json), a DAVIS sequence folder or a COCO "
        "file; NAME= names the run in the table (default: the folder name)",
    )
    e.add_argument(
        "--gt",
        required=True,
        help="ground truth: a DAVIS root (Annotations/480p/NAME/*.png), a YouTube-VOS split (Annotations/NAME/*.png), "
        "a folder of sequence folders or one folder of label PNGs",
    )
    e.add_argument(
        "--frames",
        help="the frames the runs were given (a folder of frames, or of one folder per sequence): ground-truth files "
        "are matched to frames by name (default: JPEGImages beside the ground truth's Annotations, else the number "
        "in each file name is the frame index)",
    )
    e.add_argument("--format", dest="pred_format", choices=PRED_FORMATS, default="auto", help="which output of a run to score (auto: DAVIS PNGs, else COCO)")
    e.add_argument("--all-frames", action="store_true", help="score the first and last ground-truth frames too (DAVIS skips them)")
    e.add_argument("--fps", action="append", type=float, metavar="FPS", help="frames/s of each run, once per run in order (default: the NAME.run.json annotate writes)")
    e.add_argument("--json", metavar="PATH", help="also write the scores as JSON here")
    from tracker.evaluate_models import add_model_run_args

    add_model_run_args(e)
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """``sam2-stream eval``: the table on stdout, the JSON to ``--json``."""
    gt = find_ground_truth(args.gt, frames=args.frames)
    runs = []
    if getattr(args, "models", None):
        from tracker.evaluate_models import run_models

        runs.extend(run_models(args))
    elif not args.runs:
        raise EvalError("name the runs to score, or give --models with --video and --prompts to make them")
    for text in args.runs:
        name, path = _split_run_arg(text)
        runs.append(find_run(path, name=name, pred_format=args.pred_format))
    taken = [r.name for r in runs]
    if len(set(taken)) != len(taken):
        raise EvalError(f"two runs are named alike ({', '.join(taken)}); name them: NAME=RUN")
    scores = evaluate(gt, runs, all_frames=args.all_frames, frames_per_s=args.fps)
    sys.stdout.write(format_table(scores))
    sys.stdout.flush()
    if args.json:
        path = Path(args.json)
        path.write_text(json.dumps(scores_json(scores, gt=args.gt, all_frames=args.all_frames), indent=1) + "\n", encoding="utf-8")
        log.info("wrote %s", path)
    return 0


__all__ = [
    "BOUND_TH",
    "RUN_SUMMARY_SUFFIX",
    "VOID_LABEL",
    "EvalError",
    "GroundTruthSequence",
    "ObjectScore",
    "PredictedSequence",
    "Run",
    "RunScore",
    "RunSummary",
    "SequenceScore",
    "SequenceScorer",
    "add_eval_parser",
    "boundary_f",
    "boundary_map",
    "boundary_tolerance_px",
    "cmd_eval",
    "disk",
    "evaluate",
    "find_ground_truth",
    "find_run",
    "format_table",
    "read_run_summary",
    "region_similarity",
    "score_sequence",
    "scores_json",
    "write_run_summary",
]
