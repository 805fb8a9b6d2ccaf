"""tracker.masks: round trips for every codec, agreement with pycocotools, real masks.

The real ground-truth masks under ``../shared/vos`` (PUMaVOS chair, Cutie's judo
and bike) are used when present; those tests skip cleanly in a user's clone.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from pycocotools import mask as mask_util

from tracker.errors import MaskError
from tracker.masks import (
    davis_palette,
    decode_label_png,
    decode_png,
    decode_rle,
    encode_label_png,
    encode_png,
    encode_rle,
    label_map_to_masks,
    mask_box_xywh,
    mask_box_xyxy,
    mask_to_polygons,
    masks_to_label_map,
    polygons_to_mask,
    rle_area,
    rle_to_box_xywh,
)

pytestmark = pytest.mark.filterwarnings(
    # pycocotools' own decode (used here only as the reference) warns under NumPy 2
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOS = SHARED / "vos"


def _random_mask(h: int, w: int, p: float = 0.5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)) < p


def _disk(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


CASES = {
    "random": _random_mask(48, 64),
    "sparse": _random_mask(60, 50, p=0.02, seed=1),
    "empty": np.zeros((30, 40), bool),
    "full": np.ones((30, 40), bool),
    "1x1-on": np.ones((1, 1), bool),
    "1x1-off": np.zeros((1, 1), bool),
    "odd-321x239": _random_mask(321, 239, seed=2),
    "disk": _disk(321, 239, 120, 160, 70),
    "transposed": _random_mask(40, 70, seed=3).T,  # Fortran order in memory
    "strided": _random_mask(90, 120, seed=4)[::3, 1::2],  # non-contiguous view
}


# --- RLE ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_rle_round_trip(name: str) -> None:
    mask = CASES[name]
    rle = encode_rle(mask)
    assert rle["size"] == [mask.shape[0], mask.shape[1]]
    assert isinstance(rle["counts"], str)
    assert json.loads(json.dumps(rle)) == rle  # JSON-serialisable as is
    decoded = decode_rle(rle)
    assert decoded.dtype == np.bool_ and decoded.flags.c_contiguous
    assert np.array_equal(decoded, mask)


@pytest.mark.parametrize("name", CASES)
def test_rle_agrees_with_pycocotools(name: str) -> None:
    mask = CASES[name]
    rle = encode_rle(mask)
    theirs = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle["counts"].encode("ascii") == theirs["counts"]
    assert np.array_equal(mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    assert rle_area(rle) == int(mask_util.area(theirs)) == int(mask.sum())
    assert rle_to_box_xywh(rle) == [float(v) for v in mask_util.toBbox(theirs)]
    assert mask_box_xywh(mask) == rle_to_box_xywh(rle)


def test_rle_accepts_bytes_and_uncompressed_counts() -> None:
    mask = CASES["random"]
    rle = encode_rle(mask)
    assert np.array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    column_major = mask.T.ravel()
    runs, value, n = [], False, 0
    for v in column_major:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(decode_rle({"size": list(mask.shape), "counts": runs}), mask)


def test_numeric_masks_are_read_as_positive() -> None:
    logits = np.array([[-3.0, 0.0, 0.5], [2.0, -0.1, 10.0]], dtype=np.float32)
    assert np.array_equal(decode_rle(encode_rle(logits)), logits > 0)
    assert np.array_equal(decode_rle(encode_rle((logits > 0).astype(np.uint8) * 255)), logits > 0)


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ({"size": [2, 2], "counts": "1"}, "RLE runs do not cover the mask: they sum to 1 (or are negative) but size 2x2 has 4 pixels"),
        ({"size": [2, 2], "counts": "0ZZZZZZ5"}, "RLE runs do not cover the mask"),
        ({"size": [2, 2], "counts": "0\x7f"}, "RLE counts string has an invalid character '\\x7f' at 1"),
        ({"size": [2, 2], "counts": "0b"}, "RLE counts string ends in the middle of a number"),
        ({"size": [2, 2], "counts": "0\u00e94"}, "RLE counts string has an invalid character '\u00e9' at 1"),
        ({"size": [2, 2], "counts": b"0\xff4"}, "RLE counts string has an invalid character '\u00ff' at 1"),
        ({"size": [2, 2], "counts": "0ZZZZZZZZ5"}, "RLE counts string holds a number too large for a mask"),
        ({"size": [2, -2], "counts": "0"}, "RLE 'size' must be [h, w] with non-negative integers, got [2, -2]"),
        ({"counts": "04"}, "an RLE must be a dict with 'size' [h, w] and 'counts'"),
        ({"size": [2, 2], "counts": 4}, "RLE 'counts' must be a COCO counts string or a list of run lengths"),
        ({"size": [2, 2], "counts": [1, -1, 4]}, "RLE runs do not cover the mask"),
    ],
)
def test_malformed_rle_is_refused(rle: dict, message: str) -> None:
    """pycocotools would read past (or short of) its buffer on these; we refuse first."""
    with pytest.raises(MaskError) as e:
        decode_rle(rle)
    assert str(e.value).startswith(message)


def test_masks_must_be_2d() -> None:
    with pytest.raises(MaskError) as e:
        encode_rle(np.zeros((1, 4, 4), bool))
    assert str(e.value) == "mask_hw must be a 2-D (H, W) mask, got an array of shape (1, 4, 4)"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)))
def test_rle_round_trip_property(mask: np.ndarray) -> None:
    rle = encode_rle(mask)
    assert np.array_equal(decode_rle(rle), mask)
    assert rle_area(rle) == int(mask.sum())
    assert mask_box_xywh(mask) == rle_to_box_xywh(rle)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(1, 30),
    st.lists(st.tuples(st.integers(0, 29), st.integers(0, 29), st.integers(1, 8), st.integers(1, 8)), max_size=4),
)
def test_png_and_box_properties(h: int, w: int, rects: list[tuple[int, int, int, int]]) -> None:
    mask = np.zeros((h, w), bool)
    for x, y, rw, rh in rects:
        mask[y : y + rh, x : x + rw] = True
    assert np.array_equal(decode_png(encode_png(mask)), mask)
    box = mask_box_xyxy(mask)
    if not mask.any():
        assert box is None
    else:
        assert box is not None
        x0, y0, x1, y1 = box
        assert mask[y0 : y1 + 1, x0 : x1 + 1].sum() == mask.sum()
        assert mask[:, x0].any() and mask[:, x1].any() and mask[y0].any() and mask[y1].any()


# --- PNG ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_png_round_trip(name: str) -> None:
    mask = CASES[name]
    data = encode_png(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    assert image.mode == "1" and image.size == (mask.shape[1], mask.shape[0])
    assert np.array_equal(decode_png(data), mask)


def test_decode_png_reads_other_mask_styles() -> None:
    mask = CASES["disk"]
    for array, mode in [
        (mask.astype(np.uint8) * 255, "L"),
        (np.stack([mask.astype(np.uint8) * 255] * 3, axis=-1), "RGB"),
        (np.dstack([np.stack([mask.astype(np.uint8) * 255] * 3, -1), np.full(mask.shape, 255, np.uint8)]), "RGBA"),
    ]:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
        assert np.array_equal(decode_png(buf.getvalue()), mask), mode
    assert np.array_equal(decode_png(encode_label_png(mask.astype(np.uint8) * 3)), mask)


def test_decode_png_refuses_other_data() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="JPEG")
    with pytest.raises(MaskError) as e:
        decode_png(buf.getvalue())
    assert str(e.value) == "not a PNG image (the data does not start with the PNG signature)"
    with pytest.raises(MaskError, match="^cannot read the PNG image: "):
        decode_png(encode_png(CASES["random"])[:40])


def test_davis_palette() -> None:
    palette = davis_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:9].tolist() == [
        [0, 0, 0],
        [128, 0, 0],
        [0, 128, 0],
        [128, 128, 0],
        [0, 0, 128],
        [128, 0, 128],
        [0, 128, 128],
        [128, 128, 128],
        [64, 0, 0],
    ]
    assert palette[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in palette.tolist()}) == 256


@pytest.mark.parametrize("shape", [(1, 1), (321, 239), (48, 64)])
def test_label_png_round_trip_and_pil_view(shape: tuple[int, int]) -> None:
    label = np.random.default_rng(5).integers(0, 256, size=shape, dtype=np.uint8)
    data = encode_label_png(label)
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P"
    assert np.array_equal(np.array(image), label)  # exact indices for any reader
    assert np.array_equal(np.asarray(image.getpalette()).reshape(-1, 3)[:256], davis_palette())
    assert np.array_equal(decode_label_png(data), label)
    # a tool that flattened the label map to colour can still be read back
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    assert np.array_equal(decode_label_png(buf.getvalue()), label)


def test_label_png_custom_palette_and_errors() -> None:
    label = np.array([[0, 1], [2, 1]], dtype=np.int64)
    data = encode_label_png(label, palette=[(0, 0, 0), (255, 255, 255), (10, 20, 30)])
    assert np.asarray(Image.open(io.BytesIO(data)).getpalette()).reshape(-1, 3)[:3].tolist() == [
        [0, 0, 0],
        [255, 255, 255],
        [10, 20, 30],
    ]
    assert np.array_equal(decode_label_png(data), label)
    with pytest.raises(MaskError) as e:
        encode_label_png(label, palette="voc2012")
    assert str(e.value) == "unknown palette 'voc2012'; use 'davis' or an (N, 3) array of RGB colours"
    with pytest.raises(MaskError) as e:
        encode_label_png(np.array([[0, 300]]))
    assert str(e.value) == "label_hw must hold integer object ids 0..255, got dtype int64"
    buf = io.BytesIO()
    Image.fromarray(np.full((2, 3, 3), 7, np.uint8)).save(buf, format="PNG")
    with pytest.raises(MaskError) as e:
        decode_label_png(buf.getvalue())
    assert str(e.value) == (
        "RGB label PNG has colour (7, 7, 7) at (x=0, y=0) that is not in the DAVIS palette; "
        "save label maps as indexed PNGs"
    )


# --- label maps ---------------------------------------------------------------------


def test_masks_to_label_map_later_ids_overwrite() -> None:
    a = np.zeros((4, 5), bool)
    a[:, :3] = True
    b = np.zeros((4, 5), bool)
    b[:, 2:] = True
    label = masks_to_label_map({7: b, 2: a}, 4, 5)
    assert label.dtype == np.uint8
    assert label.tolist() == [[2, 2, 7, 7, 7]] * 4  # column 2 overlaps: id 7 > 2 wins
    masks = label_map_to_masks(label)
    assert sorted(masks) == [2, 7]
    assert np.array_equal(masks[7], b) and np.array_equal(masks[2], a & ~b)
    assert masks_to_label_map({}, 2, 3).tolist() == [[0, 0, 0]] * 2


def test_masks_to_label_map_errors() -> None:
    with pytest.raises(MaskError) as e:
        masks_to_label_map({0: np.ones((2, 2), bool)}, 2, 2)
    assert str(e.value) == "object id 0 cannot be stored in a uint8 label map; use ids 1..255"
    with pytest.raises(MaskError) as e:
        masks_to_label_map({3: np.ones((2, 3), bool)}, 2, 2)
    assert str(e.value) == "mask of object 3 has shape (2, 3), expected (2, 2)"


# --- polygons -----------------------------------------------------------------------


def test_polygon_round_trip_filled_circle() -> None:
    mask = _disk(200, 300, 150.5, 90.0, 60)
    polygons = mask_to_polygons(mask, tolerance_px=1.0)
    assert len(polygons) == 1 and len(polygons[0]) % 2 == 0 and len(polygons[0]) >= 6
    assert json.loads(json.dumps(polygons)) == polygons
    assert _iou(polygons_to_mask(polygons, 200, 300), mask) > 0.97
    exact = mask_to_polygons(mask, tolerance_px=0)
    assert np.array_equal(polygons_to_mask(exact, 200, 300), mask)


def test_polygons_keep_small_parts_and_fill_holes() -> None:
    mask = np.zeros((40, 50), bool)
    mask[5, 5] = True  # single pixel
    mask[20, 3:30] = True  # 1-px line
    mask[25:38, 30:48] = True
    mask[28:32, 35:40] = False  # a hole
    polygons = mask_to_polygons(mask, tolerance_px=1.0)
    assert len(polygons) == 3
    back = polygons_to_mask(polygons, 40, 50)
    filled = mask.copy()
    filled[28:32, 35:40] = True
    assert np.array_equal(back, filled)
    assert mask_to_polygons(np.zeros((3, 3), bool)) == []
    assert not polygons_to_mask([], 3, 3).any()
    full = np.ones((7, 9), bool)
    assert np.array_equal(polygons_to_mask(mask_to_polygons(full), 7, 9), full)


def test_polygon_errors() -> None:
    with pytest.raises(MaskError) as e:
        polygons_to_mask([[1.0, 2.0, 3.0, 4.0]], 5, 5)
    assert str(e.value) == "polygon 0 has 4 coordinates; a polygon needs at least 3 points as [x0, y0, x1, y1, ...]"


def test_polygons_fit_random_blobs() -> None:
    import cv2

    rng = np.random.default_rng(6)
    for seed in range(3):
        noise = cv2.GaussianBlur(rng.random((120, 160)), (0, 0), 5)
        mask = noise > np.quantile(noise, 0.6)
        polygons = mask_to_polygons(mask, tolerance_px=0.5)
        filled = polygons_to_mask(polygons, 120, 160)
        assert _iou(filled, _fill_holes(mask)) > 0.97, seed
        assert np.array_equal(polygons_to_mask(mask_to_polygons(mask, tolerance_px=0), 120, 160), _fill_holes(mask))


# --- real ground truth from ../shared ---------------------------------------------


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled: what COCO polygons can represent."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled.astype(bool)


def _shared_pngs() -> list[Path]:
    files = sorted((VOS / "pumavos-chair" / "Annotations").glob("*.png"))
    files += sorted((VOS / "cutie-judo" / "masks").glob("**/*.png"))
    return files


@pytest.mark.shared
def test_real_annotations_round_trip() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (real VOS masks live there)")
    files = _shared_pngs()
    if not files:
        pytest.skip(f"no VOS annotations under {VOS}")
    assert any("pumavos-chair" in str(f) for f in files) and any("cutie-judo" in str(f) for f in files)
    for f in files:
        data = f.read_bytes()
        image = Image.open(f)
        assert image.mode == "P", f
        label = np.array(image)
        assert np.array_equal(decode_label_png(data), label), f
        assert np.array_equal(decode_label_png(encode_label_png(label)), label), f
        assert np.array_equal(decode_png(data), label != 0), f
        for obj_id, mask in label_map_to_masks(label).items():
            assert obj_id >= 1
            rle = encode_rle(mask)
            assert np.array_equal(decode_rle(json.loads(json.dumps(rle))), mask), f
            assert rle_area(rle) == int(mask.sum())
            assert rle_to_box_xywh(rle) == mask_box_xywh(mask)
            assert np.array_equal(decode_png(encode_png(mask)), mask), f
            filled = _fill_holes(mask)
            exact = polygons_to_mask(mask_to_polygons(mask, tolerance_px=0), *mask.shape)
            assert np.array_equal(exact, filled), f
            assert _iou(polygons_to_mask(mask_to_polygons(mask), *mask.shape), filled) > 0.9, f
        assert np.array_equal(masks_to_label_map(label_map_to_masks(label), *label.shape), label), f


@pytest.mark.shared
def test_real_annotations_use_the_davis_palette() -> None:
    chair = sorted((VOS / "pumavos-chair" / "Annotations").glob("*.png"))
    if not chair:
        pytest.skip(f"{VOS / 'pumavos-chair'} is absent")
    palette = np.asarray(Image.open(chair[0]).getpalette()).reshape(-1, 3)
    assert np.array_equal(palette, davis_palette())
    assert set(np.unique(np.array(Image.open(chair[0])))) <= {0, 1}  # object id 1
