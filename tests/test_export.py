"""tracker.export: every format written from synthetic results and read back with
the format's usual reader (pycocotools, PIL, csv, PyAV), crash-and-resume runs
that must equal uninterrupted ones, and the factory's errors."""

from __future__ import annotations

import csv
import json
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from tracker.errors import ExportError, FrameError, MaskError, TrackerError
from tracker.export import (
    FORMATS,
    CocoWriter,
    ExportWriter,
    draw_overlay,
    make_writer,
    object_colour,
    read_coco,
    read_davis,
    read_mot,
    read_ytvis,
)
from tracker.masks import davis_palette, encode_label_png, mask_box_xywh, masks_to_label_map
from tracker.results import FrameResult, ObjectResult, mask_box_xyxy

pytestmark = pytest.mark.filterwarnings(
    # pycocotools' decode (the reference reader here) warns under NumPy 2
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

H, W = 239, 321  # odd on purpose: the overlay must pad, RLE is column-major
FRAME_IDXS = [0, 1, 2, 3, 4, 6, 7, 9]  # a gap, as when frames are skipped
OBJ_IDS = [1, 2, 7]
VIDEO = "clip"
JOURNALED = {
    "coco": ("annotations.json", "annotations.partial.jsonl"),
    "ytvis": ("instances.json", "instances.partial.jsonl"),
}


# --- synthetic results --------------------------------------------------------------


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random union of ellipses and a rectangle, with a hole: not a convex toy shape."""
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(2, max(3, w / 5)), rng.uniform(2, max(3, h / 5))
        mask |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    x0, y0 = rng.integers(0, w - 10), rng.integers(0, h - 10)
    mask[y0 : y0 + rng.integers(3, 40), x0 : x0 + rng.integers(3, 40)] = True
    hx, hy = rng.integers(0, w - 3), rng.integers(0, h - 3)
    mask[hy : hy + 3, hx : hx + 3] = False
    return mask


def make_results(h: int = H, w: int = W, frame_idxs: list[int] = FRAME_IDXS, seed: int = 0) -> list[FrameResult]:
    """Frames with objects 1, 2, 7; some absent, not visible, or on an empty frame."""
    rng = np.random.default_rng(seed)
    results = []
    for n, frame_idx in enumerate(frame_idxs):
        r = FrameResult(frame_idx=frame_idx, height=h, width=w, pts_s=frame_idx / 25, source_index=frame_idx)
        if n == 5:  # a frame on which nothing is tracked
            results.append(r)
            continue
        for obj_id in OBJ_IDS:
            if obj_id == 2 and n == 2:
                continue  # not in the results at all
            if obj_id == 7 and n in (3, 4):  # SAM 2 says not visible: empty mask, negative logit
                r.objects[obj_id] = ObjectResult(obj_id, np.zeros((h, w), dtype=bool), float(rng.uniform(-9, -0.1)))
                continue
            mask = _blob(rng, h, w)
            r.objects[obj_id] = ObjectResult(obj_id, mask, float(rng.uniform(0.1, 12)), box_xyxy=mask_box_xyxy(mask))
        results.append(r)
    return results


def expected_masks(results: list[FrameResult]) -> dict[int, dict[int, np.ndarray]]:
    return {r.frame_idx: {k: o.mask_hw for k, o in r.objects.items() if o.visible and o.mask_hw.any()} for r in results}


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def frames_rgb(n: int, h: int = H, w: int = W) -> list[np.ndarray]:
    """Frames to draw on: a gradient, shifted and brightened per frame so the order shows."""
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([(xx * 200 // w), (yy * 200 // h), np.full_like(xx, 40)], axis=-1)
    return [np.roll(base + 5 * i, 3 * i, axis=1).astype(np.uint8) for i in range(n)]


IMAGES = frames_rgb(len(FRAME_IDXS))


def write_all(fmt: str, out: Path, results: list[FrameResult], **kw: object) -> ExportWriter:
    writer = make_writer(fmt, out, video_name=VIDEO, height=H, width=W, fps=25.0, obj_ids=OBJ_IDS, **kw)
    for n, r in enumerate(results):
        assert writer.write(r, image_rgb=IMAGES[n]) is True  # the frame is used by the overlay only
    writer.close()
    return writer


def assert_same_masks(got: dict[int, dict[int, np.ndarray]], want: dict[int, dict[int, np.ndarray]]) -> None:
    assert sorted(got) == sorted(want)
    for frame_idx in want:
        assert sorted(got[frame_idx]) == sorted(want[frame_idx]), frame_idx
        for obj_id, mask in want[frame_idx].items():
            assert got[frame_idx][obj_id].dtype == bool
            np.testing.assert_array_equal(got[frame_idx][obj_id], mask, err_msg=f"frame {frame_idx} obj {obj_id}")


def output_bytes(fmt: str, out: Path) -> dict[str, bytes]:
    """Every file a finished export left, by relative path (for comparing runs)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def decode_mp4(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24").astype(np.float32) for f in container.decode(video=0)]


def assert_same_output(fmt: str, got_dir: Path, want_dir: Path) -> None:
    """Byte-identical files; for the overlay, the same frames up to encoder noise (libx264's
    threads can make the bitstream differ under CPU load)."""
    got, want = output_bytes(fmt, got_dir), output_bytes(fmt, want_dir)
    if fmt != "overlay":
        assert got == want
        return
    assert sorted(got) == sorted(want) == [f"{VIDEO}_overlay.mp4"]
    got_frames, want_frames = (
        decode_mp4(got_dir / f"{VIDEO}_overlay.mp4"),
        decode_mp4(want_dir / f"{VIDEO}_overlay.mp4"),
    )
    assert len(got_frames) == len(want_frames)
    for a, b in zip(got_frames, want_frames):
        assert np.abs(a - b).mean() < 1.5


@pytest.fixture(scope="module")
def results() -> list[FrameResult]:
    return make_results()


# --- COCO ---------------------------------------------------------------------------


def test_coco_round_trip_with_pycocotools(tmp_path: Path, results: list[FrameResult]) -> None:
    writer = write_all("coco", tmp_path, results, categories={1: "person", 7: "dog"})
    path = tmp_path / "annotations.json"
    assert writer.output_path == path
    assert not (tmp_path / "annotations.partial.jsonl").exists()
    data = json.loads(path.read_text())
    want = expected_masks(results)

    assert data["videos"] == [{"id": 1, "name": VIDEO, "width": W, "height": H, "fps": 25.0, "length": len(results)}]
    assert data["categories"] == [
        {"id": 1, "name": "person", "supercategory": "object"},
        {"id": 2, "name": "object", "supercategory": "object"},
        {"id": 3, "name": "dog", "supercategory": "object"},
    ]
    assert [im["frame_idx"] for im in data["images"]] == FRAME_IDXS
    assert [im["id"] for im in data["images"]] == [f + 1 for f in FRAME_IDXS]
    assert data["images"][1]["file_name"] == f"{VIDEO}/00001.jpg"
    assert data["images"][1]["pts_s"] == 1 / 25 and data["images"][1]["source_index"] == 1
    assert [a["id"] for a in data["annotations"]] == list(range(1, sum(map(len, want.values())) + 1))

    by_frame = {r.frame_idx: r for r in results}
    seen = set()
    for ann in data["annotations"]:
        frame_idx, obj_id = ann["image_id"] - 1, ann["obj_id"]
        assert ann["track_id"] == obj_id and ann["video_id"] == 1 and ann["iscrowd"] == 0
        assert ann["category_id"] == {1: 1, 2: 2, 7: 3}[obj_id]
        mask = want[frame_idx][obj_id]
        rle = ann["segmentation"]
        assert rle["size"] == [H, W] and isinstance(rle["counts"], str)
        decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
        assert ann["area"] == int(mask.sum())
        x0, y0, x1, y1 = by_frame[frame_idx].objects[obj_id].box_xyxy  # type: ignore[misc]
        assert ann["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
        logit = by_frame[frame_idx].objects[obj_id].score
        assert ann["score_logit"] == logit
        assert ann["score"] == pytest.approx(sigmoid(logit))
        seen.add((frame_idx, obj_id))
    assert seen == {(f, o) for f, objs in want.items() for o in objs}

    coco = COCO(str(path))  # pycocotools' own loader and annToMask
    for ann in coco.loadAnns(coco.getAnnIds()):
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), want[ann["image_id"] - 1][ann["obj_id"]])

    assert_same_masks(read_coco(path), want)


def test_coco_journal_grows_one_line_per_frame(tmp_path: Path, results: list[FrameResult]) -> None:
    writer = make_writer("coco", tmp_path, video_name=VIDEO, height=H, width=W, fps=25.0, obj_ids=OBJ_IDS)
    partial = tmp_path / "annotations.partial.jsonl"
    for n, r in enumerate(results[:3]):
        writer.write(r)
        lines = partial.read_bytes().split(b"\n")
        assert lines[-1] == b"" and len(lines) == n + 3  # header + frames, each line complete on disk
    assert writer.done_frames() == set(FRAME_IDXS[:3])
    assert not (tmp_path / "annotations.json").exists()
    writer.close()
    writer.close()  # idempotent
    assert sorted(read_coco(tmp_path / "annotations.json")) == FRAME_IDXS[:3]


# --- YouTube-VIS --------------------------------------------------------------------


def test_ytvis_round_trip_with_pycocotools(tmp_path: Path, results: list[FrameResult]) -> None:
    write_all("ytvis", tmp_path, results)
    path = tmp_path / "instances.json"
    assert not (tmp_path / "instances.partial.jsonl").exists()
    data = json.loads(path.read_text())
    want = expected_masks(results)

    (video,) = data["videos"]
    assert video["file_names"] == [f"{VIDEO}/{f:05d}.jpg" for f in FRAME_IDXS]
    assert (video["length"], video["width"], video["height"], video["id"]) == (len(FRAME_IDXS), W, H, 1)
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert [a["obj_id"] for a in data["annotations"]] == OBJ_IDS
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3]
    by_frame = {r.frame_idx: r for r in results}
    for ann in data["annotations"]:
        obj_id = ann["obj_id"]
        assert (ann["video_id"], ann["category_id"], ann["iscrowd"]) == (1, 1, 0)
        assert len(ann["segmentations"]) == len(ann["bboxes"]) == len(ann["areas"]) == len(FRAME_IDXS)
        probs = []
        for frame_idx, rle, bbox, area in zip(FRAME_IDXS, ann["segmentations"], ann["bboxes"], ann["areas"]):
            mask = want[frame_idx].get(obj_id)
            if mask is None:
                assert rle is None and bbox is None and area is None, (frame_idx, obj_id)
                continue
            decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), mask)
            assert bbox == mask_box_xywh(mask) and area == int(mask.sum())
            probs.append(sigmoid(by_frame[frame_idx].objects[obj_id].score))
        assert ann["score"] == pytest.approx(sum(probs) / len(probs))
    # obj 2 is missing from the results on the third frame, obj 7 invisible on the 4th and 5th
    assert data["annotations"][1]["segmentations"][2] is None
    assert data["annotations"][2]["segmentations"][3:5] == [None, None]
    assert all(a["segmentations"][5] is None for a in data["annotations"])  # the empty frame

    assert_same_masks(read_ytvis(path), want)


# --- DAVIS --------------------------------------------------------------------------


def test_davis_round_trip_with_pil(tmp_path: Path, results: list[FrameResult]) -> None:
    writer = write_all("davis", tmp_path, results)
    folder = tmp_path / VIDEO
    assert writer.output_path == folder
    assert sorted(p.name for p in folder.iterdir()) == [f"{f:05d}.png" for f in FRAME_IDXS]
    palette = davis_palette()
    for r in results:
        img = Image.open(folder / f"{r.frame_idx:05d}.png")
        assert img.mode == "P" and img.size == (W, H)
        entries = np.array(img.getpalette()).reshape(-1, 3)
        np.testing.assert_array_equal(entries[:256], palette)
        assert [tuple(entries[i]) for i in (0, 1, 2, 7)] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 128)]
        want_label = masks_to_label_map(expected_masks([r])[r.frame_idx], H, W)
        np.testing.assert_array_equal(np.array(img), want_label)  # exact indices; highest id wins overlaps
    label = np.array(Image.open(folder / "00003.png"))  # obj 7 not visible here
    assert set(np.unique(label)) <= {0, 1, 2} and (label == 1).any()
    assert not np.array(Image.open(folder / "00006.png")).any()  # the empty frame: all background

    want = {}
    for r in results:
        want[r.frame_idx] = {
            k: masks_to_label_map(expected_masks([r])[r.frame_idx], H, W) == k for k in expected_masks([r])[r.frame_idx]
        }
        want[r.frame_idx] = {k: m for k, m in want[r.frame_idx].items() if m.any()}
    assert_same_masks(read_davis(folder), want)


def test_davis_refuses_ids_outside_1_to_255(tmp_path: Path) -> None:
    msg = (
        "object id 256 cannot be stored in a DAVIS label PNG (pixel values 1..255); use object ids 1..255 or "
        "another export format"
    )
    with pytest.raises(MaskError) as e:
        make_writer("davis", tmp_path, video_name=VIDEO, height=H, width=W, obj_ids=[1, 256])
    assert str(e.value) == msg
    writer = make_writer("davis", tmp_path, video_name=VIDEO, height=4, width=4, obj_ids=[1])
    r = FrameResult(0, 4, 4, objects={0: ObjectResult(0, np.ones((4, 4), bool), 1.0)})
    with pytest.raises(MaskError) as e:
        writer.write(r)
    assert str(e.value) == msg.replace("256", "0")
    assert not list((tmp_path / VIDEO).iterdir())


# --- MOT ----------------------------------------------------------------------------


def test_mot_round_trip_with_csv(tmp_path: Path, results: list[FrameResult]) -> None:
    write_all("mot", tmp_path, results)
    path = tmp_path / f"{VIDEO}.txt"
    want = expected_masks(results)
    by_frame = {r.frame_idx: r for r in results}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == sum(map(len, want.values()))
    got = {}
    for row in rows:
        assert len(row) == 10 and row[7:] == ["-1", "-1", "-1"]
        frame_idx = int(row[0]) - 1  # MOT frames are 1-based
        obj_id = int(row[1])
        got[(frame_idx, obj_id)] = row
        x0, y0, x1, y1 = by_frame[frame_idx].objects[obj_id].box_xyxy  # type: ignore[misc]
        assert [int(v) for v in row[2:6]] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
        assert float(row[6]) == pytest.approx(sigmoid(by_frame[frame_idx].objects[obj_id].score), abs=1e-6)
    assert set(got) == {(f, o) for f, objs in want.items() for o in objs}
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)

    mot = read_mot(path)
    assert sorted(mot) == sorted(f for f, objs in want.items() if objs)
    for frame_idx, objs in mot.items():
        for obj_id, box in objs.items():
            assert list(box.box_xywh) == mask_box_xywh(want[frame_idx][obj_id])


# --- overlay ------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(H, W), (120, 161), (96, 128)])
def test_overlay_mp4_decodes_with_masks_in_object_colours(tmp_path: Path, h: int, w: int) -> None:
    results = make_results(h, w, frame_idxs=[0, 1, 2, 3, 4, 5], seed=3)
    images = frames_rgb(len(results), h, w)
    writer = make_writer("overlay", tmp_path, video_name=VIDEO, height=h, width=w, fps=30000 / 1001, obj_ids=OBJ_IDS)
    assert writer.needs_images
    for r, img in zip(results, images):
        writer.write(r, image_rgb=img)
    writer.close()
    path = tmp_path / f"{VIDEO}_overlay.mp4"
    assert writer.output_path == path and sorted(os.listdir(tmp_path)) == [path.name]

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == Fraction(30000, 1001)
        decoded = [f for f in container.decode(stream)]
    assert len(decoded) == len(results)
    assert decoded[0].format.name == "yuv420p"
    assert (decoded[0].width, decoded[0].height) == (w + w % 2, h + h % 2)
    drawn = [draw_overlay(img, r).astype(np.float32) for r, img in zip(results, images)]
    for n, (r, img, frame) in enumerate(zip(results, images, decoded)):
        rgb = frame.to_ndarray(format="rgb24").astype(np.float32)
        errors = [np.abs(rgb[:h, :w] - d).mean() for d in drawn]
        assert errors[n] < 8 and int(np.argmin(errors)) == n  # what was drawn, in order, up to H.264 loss
        for obj_id, obj in r.objects.items():
            if not obj.visible:
                continue
            # interior pixels (away from contours, labels and other objects)
            others = np.zeros((h, w), bool)
            for k, o in r.objects.items():
                if k != obj_id:
                    others |= o.mask_hw
            inner = obj.mask_hw & ~others
            inner[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
            if inner.sum() < 30:
                continue
            colour = np.array(object_colour(obj_id), np.float32)
            before = np.linalg.norm(img[inner].astype(np.float32).mean(0) - colour)
            after = np.linalg.norm(rgb[:h, :w][inner].mean(0) - colour)
            assert after < 0.65 * before, (r.frame_idx, obj_id, before, after)


def test_overlay_pads_odd_sizes_without_shifting(tmp_path: Path) -> None:
    mask = np.zeros((H, W), bool)
    mask[100:151, 201:262] = True  # odd edges: chroma subsampling must not move them
    r = FrameResult(0, H, W, objects={1: ObjectResult(1, mask, 5.0)})
    grey = np.full((H, W, 3), 128, np.uint8)
    grey[:, -1] = (20, 200, 20)  # last column and row distinct, to see the replicated padding
    grey[-1, :] = (20, 20, 200)
    writer = make_writer("overlay", tmp_path, video_name=VIDEO, height=H, width=W, fps=10.0)
    writer.write(r, image_rgb=grey)
    writer.close()
    with av.open(str(writer.output_path)) as container:
        (frame,) = list(container.decode(video=0))
    rgb = frame.to_ndarray(format="rgb24").astype(np.float32)
    assert rgb.shape == (H + 1, W + 1, 3)
    tint = np.linalg.norm(rgb[:H, :W] - 128, axis=-1)
    cols = tint[110:141].mean(axis=0)
    rows = tint[:, 210:251].mean(axis=1)
    assert (cols[203:260] > 40).all() and (cols[185:198] < 15).all() and (cols[265:280] < 15).all()
    assert (rows[102:149] > 40).all() and (rows[80:97] < 15).all() and (rows[154:170] < 15).all()
    # the outline peaks exactly on the mask's first and last rows / columns
    assert np.argmax(cols[190:230]) + 190 == 201 and np.argmax(cols[240:280]) + 240 == 261
    assert np.argmax(rows[90:125]) + 90 == 100 and np.argmax(rows[130:170]) + 130 == 150
    # the padding repeats the last column / row
    assert np.abs(rgb[50:150, W] - rgb[50:150, W - 1]).mean() < 12
    assert np.abs(rgb[H, 50:250] - rgb[H - 1, 50:250]).mean() < 12
    assert (rgb[50:150, W - 1, 1] - rgb[50:150, W - 1, 0] > 100).all()  # still green (chroma is subsampled)


def test_overlay_needs_the_frame_and_aborts_cleanly(tmp_path: Path) -> None:
    r = make_results(16, 16, frame_idxs=[0])[0]
    writer = make_writer("overlay", tmp_path, video_name=VIDEO, height=16, width=16, resume=True)
    with pytest.raises(FrameError) as e:
        writer.write(r)
    assert str(e.value) == "the overlay export draws on the frames: pass write(result, image_rgb=frame)"
    with pytest.raises(FrameError) as e:
        writer.write(r, image_rgb=np.zeros((16, 16), np.uint8))
    assert str(e.value) == "image_rgb must be a (16, 16, 3) uint8 RGB frame, got shape (16, 16) dtype uint8"
    assert writer.done_frames() == set()
    writer.abort()
    assert os.listdir(tmp_path) == []


# --- resume after a crash -----------------------------------------------------------


def _crash(writer: ExportWriter) -> None:
    """What a kill leaves: no close(), no abort(); the process's files just go away."""
    for name in ("_journal", "_file"):
        handle = getattr(writer, name, None)
        if handle is not None:
            handle.close()  # writers flush per frame, so this adds nothing a kill would not leave
            setattr(writer, name, None)


def _cut_mid_line(path: Path) -> None:
    """Truncate in the middle of the last line, as a kill during write() does."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    end = len(data) - 1
    with open(path, "r+b") as f:
        f.truncate(start + (end - start) // 2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_after_crash_equals_uninterrupted_run(tmp_path: Path, results: list[FrameResult], fmt: str) -> None:
    reference = tmp_path / "reference"
    write_all(fmt, reference, results)

    out = tmp_path / "resumed"
    k = 5
    writer = make_writer(fmt, out, video_name=VIDEO, height=H, width=W, fps=25.0, obj_ids=OBJ_IDS)
    for n, r in enumerate(results[:k]):
        writer.write(r, image_rgb=IMAGES[n])
    _crash(writer)
    # frames already on disk after the cut (the frame cut mid-line is lost)
    lost = FRAME_IDXS[k - 1]
    if fmt in JOURNALED:
        _cut_mid_line(out / JOURNALED[fmt][1])
    elif fmt == "mot":
        _cut_mid_line(out / f"{VIDEO}.txt")
    elif fmt == "davis":  # a kill between writing a PNG's temp file and renaming it
        (out / VIDEO / f"{lost:05d}.png").unlink()
        (out / VIDEO / f".{lost:05d}.png.tmp").write_bytes(encode_label_png(np.zeros((H, W), np.uint8))[:50])
    else:  # the overlay's spooled JPEG, likewise
        spool = out / f".{VIDEO}_overlay.frames"
        (spool / f"{lost:05d}.jpg").unlink()
        (spool / f".{lost:05d}.jpg.tmp").write_bytes(b"\xff\xd8\xff")
    want_done = set(FRAME_IDXS[: k - 1])
    if fmt == "mot":  # frames without visible objects leave no MOT rows
        want_done = {r.frame_idx for r in results[: k - 1] if any(o.visible for o in r.objects.values())}
    assert not (out / "annotations.json").exists() and not (out / "instances.json").exists()

    resumed = make_writer(fmt, out, video_name=VIDEO, height=H, width=W, fps=25.0, obj_ids=OBJ_IDS, resume=True)
    assert resumed.done_frames() == want_done
    written = [resumed.write(r, image_rgb=img) for r, img in zip(results, IMAGES)]  # every frame passes again
    assert written == [r.frame_idx not in want_done for r in results]
    resumed.close()
    assert_same_output(fmt, out, reference)


@pytest.mark.parametrize("fmt", FORMATS)
def test_any_write_order_gives_the_same_output(tmp_path: Path, results: list[FrameResult], fmt: str) -> None:
    """The annotator yields frames forward from the first prompt, then backward: order must not matter."""
    write_all(fmt, tmp_path / "in_order", results)
    order = [4, 5, 6, 7, 3, 2, 1, 0]
    writer = make_writer(fmt, tmp_path / "shuffled", video_name=VIDEO, height=H, width=W, fps=25.0, obj_ids=OBJ_IDS)
    for n in order:
        writer.write(results[n], image_rgb=IMAGES[n])
    writer.close()
    assert_same_output(fmt, tmp_path / "shuffled", tmp_path / "in_order")


@pytest.mark.parametrize("fmt", ["coco", "ytvis"])
def test_resume_with_only_a_half_header(tmp_path: Path, results: list[FrameResult], fmt: str) -> None:
    final, partial = JOURNALED[fmt]
    (tmp_path / partial).write_bytes(b'{"kind":"header","form')
    writer = make_writer(
        fmt, tmp_path / "", video_name=VIDEO, height=H, width=W, fps=25.0, obj_ids=OBJ_IDS, resume=True
    )
    assert writer.done_frames() == set()
    for r in results:
        writer.write(r)
    writer.close()
    write_all(fmt, tmp_path / "reference", results)
    assert (tmp_path / final).read_bytes() == (tmp_path / "reference" / final).read_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_fresh_open_discards_earlier_partial_output(tmp_path: Path, results: list[FrameResult], fmt: str) -> None:
    writer = make_writer(fmt, tmp_path / "run", video_name=VIDEO, height=H, width=W, fps=25.0, obj_ids=OBJ_IDS)
    for r, img in zip(make_results(seed=9), IMAGES[::-1]):
        writer.write(r, image_rgb=img)
    _crash(writer)
    writer = make_writer(fmt, tmp_path / "run", video_name=VIDEO, height=H, width=W, fps=25.0, obj_ids=OBJ_IDS)
    assert writer.done_frames() == set()
    for r, img in zip(results[:3], IMAGES):
        writer.write(r, image_rgb=img)
    writer.close()
    write_all(fmt, tmp_path / "reference", results[:3])
    assert_same_output(fmt, tmp_path / "run", tmp_path / "reference")


def test_resume_refuses_another_videos_journal(tmp_path: Path, results: list[FrameResult]) -> None:
    writer = make_writer("coco", tmp_path, video_name=VIDEO, height=H, width=W, obj_ids=OBJ_IDS)
    writer.write(results[0])
    _crash(writer)
    with pytest.raises(TrackerError) as e:
        make_writer("coco", tmp_path, video_name="other", height=240, width=320, resume=True)
    assert str(e.value) == (
        f"cannot resume {tmp_path / 'annotations.partial.jsonl'}: it holds a coco export of video 'clip' at 321x239 "
        "(WxH), not coco of 'other' at 320x240; use another output folder or start over without resume"
    )


@pytest.mark.parametrize("fmt", ["davis", "overlay"])
def test_resume_refuses_frames_of_another_size(tmp_path: Path, results: list[FrameResult], fmt: str) -> None:
    writer = make_writer(fmt, tmp_path, video_name=VIDEO, height=H, width=W, obj_ids=OBJ_IDS)
    writer.write(results[0], image_rgb=IMAGES[0])
    _crash(writer)
    with pytest.raises(TrackerError) as e:
        make_writer(fmt, tmp_path, video_name=VIDEO, height=240, width=320, resume=True)
    where, what = {"davis": (tmp_path / VIDEO, "PNGs"), "overlay": (tmp_path / f".{VIDEO}_overlay.frames", "frames")}[
        fmt
    ]
    assert str(e.value) == (
        f"cannot resume {where}: its {what} are 321x239 (WxH), the video is 320x240; use another output folder or "
        "start over without resume"
    )


def test_resume_refuses_a_damaged_journal(tmp_path: Path, results: list[FrameResult]) -> None:
    writer = make_writer("ytvis", tmp_path, video_name=VIDEO, height=H, width=W, obj_ids=OBJ_IDS)
    for r in results[:3]:
        writer.write(r)
    _crash(writer)
    partial = tmp_path / "instances.partial.jsonl"
    lines = partial.read_bytes().split(b"\n")
    lines[2] = lines[2][:10]  # damaged in the middle, not a crash's cut tail
    partial.write_bytes(b"\n".join(lines))
    with pytest.raises(TrackerError) as e:
        make_writer("ytvis", tmp_path, video_name=VIDEO, height=H, width=W, resume=True)
    assert str(e.value) == f"cannot resume {partial}: line 3 is not valid JSON; delete the file to start over"


def test_context_manager_aborts_on_error_and_leaves_the_journal(tmp_path: Path, results: list[FrameResult]) -> None:
    with pytest.raises(KeyboardInterrupt):
        with make_writer("coco", tmp_path, video_name=VIDEO, height=H, width=W, obj_ids=OBJ_IDS) as writer:
            writer.write(results[0])
            writer.write(results[1])
            raise KeyboardInterrupt
    assert not (tmp_path / "annotations.json").exists()
    resumed = make_writer("coco", tmp_path, video_name=VIDEO, height=H, width=W, obj_ids=OBJ_IDS, resume=True)
    assert resumed.done_frames() == set(FRAME_IDXS[:2])
    with resumed:
        for r in results:
            resumed.write(r)
    assert_same_masks(read_coco(tmp_path / "annotations.json"), expected_masks(results))


# --- factory and misuse -------------------------------------------------------------


def test_unknown_format_lists_the_valid_ones(tmp_path: Path) -> None:
    assert FORMATS == ("coco", "ytvis", "davis", "mot", "overlay")
    with pytest.raises(ExportError) as e:
        make_writer("png", tmp_path, video_name=VIDEO, height=H, width=W)
    assert str(e.value) == "unknown export format 'png'; use one of: coco, ytvis, davis, mot, overlay"
    assert list(tmp_path.iterdir()) == []


def test_writer_misuse_is_reported(tmp_path: Path, results: list[FrameResult]) -> None:
    writer = CocoWriter()
    with pytest.raises(TrackerError) as e:
        writer.write(results[0])
    assert str(e.value) == "the coco writer is not open; call open() first"
    with pytest.raises(ExportError) as e:
        writer.open(tmp_path, video_name="a/b", height=H, width=W)
    assert str(e.value) == "video_name must be a non-empty file name without path separators, got 'a/b'"
    writer.open(tmp_path, video_name=VIDEO, height=H, width=W)
    with pytest.raises(FrameError) as e:
        writer.write(FrameResult(0, 10, 20))
    assert str(e.value) == "frame 0 is 10x20 (HxW) but the export was opened for 239x321"
    bad = FrameResult(0, H, W, objects={1: ObjectResult(1, np.ones((10, 10), bool), 1.0)})
    with pytest.raises(MaskError) as e:
        writer.write(bad)
    assert str(e.value) == "frame 0: mask of object 1 has shape (10, 10), expected (239, 321)"
    assert writer.write(results[0]) is True
    assert writer.write(results[0]) is False  # already on disk
    writer.close()
    with pytest.raises(TrackerError) as e:
        writer.write(results[1])
    assert str(e.value) == "the coco writer is closed; open a new one to write more frames"
