"""Mask codecs: COCO RLE, PNG (binary and DAVIS palette label maps), COCO polygons.

What lives here: turning a boolean ``(H, W)`` mask (``mask_hw``) or a uint8 label
map (``label_hw``, 0 = background, k = object k) into bytes/JSON and back, plus
areas and boxes. Everything is pure (no files, no network) so exports, the
server protocol and tests share one implementation.
What does not: thresholding model logits (the predictor does; a numeric mask
given here is read as ``mask > 0``, which is SAM 2's logit threshold and also
right for 0/1 and 0/255 masks), writing files (``tracker.export``).

Exactness: RLE and PNG round-trip exactly. Polygons do not: COCO polygons cannot
hold holes (they are filled) and ``tolerance_px`` simplifies outlines; use RLE
where exact masks matter.

Malformed input raises :class:`tracker.errors.MaskError` (a ``ValueError``) saying what was expected.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from tracker.errors import MaskError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RLE(TypedDict):
    """COCO compressed RLE, JSON-serialisable: column-major run lengths of a (h, w) mask."""

    size: list[int]
    counts: str


# --- helpers ----------------------------------------------------------------------


def _as_mask_hw(mask_hw: Any, name: str = "mask_hw") -> np.ndarray:
    """A bool (H, W) array from bool, integer or float input (numeric: ``> 0``)."""
    arr = np.asarray(mask_hw)
    if arr.ndim != 2:
        raise MaskError(f"{name} must be a 2-D (H, W) mask, got an array of shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MaskError(f"{name} must be bool or numeric (read as > 0), got dtype {arr.dtype}")
    return arr > 0


def _counts_from_string(counts: str) -> np.ndarray:
    """Parse COCO's compressed counts string into int64 runs.

    Mirrors pycocotools' C ``rleFrString`` (5-bit little-endian groups, 0x20 =
    more groups follow, 0x10 in the last group = negative; from the fourth run on
    each value is a delta to the run two before), vectorised with NumPy. Done
    here rather than in pycocotools so :func:`decode_rle` can check the runs
    first: pycocotools reads uninitialised memory when they are shorter than the
    mask.
    """
    try:
        raw = counts.encode("ascii")
    except UnicodeEncodeError as e:
        raise MaskError(f"RLE counts string has an invalid character {counts[e.start]!r} at {e.start}") from None
    digits = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if digits.size == 0:
        return np.zeros(0, dtype=np.int64)
    bad = np.flatnonzero((digits < 0) | (digits >= 64))
    if bad.size:
        raise MaskError(f"RLE counts string has an invalid character {counts[bad[0]]!r} at {bad[0]}")
    more = (digits & 0x20) != 0
    if more[-1]:
        raise MaskError("RLE counts string ends in the middle of a number")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    n_digits = ends - starts + 1
    if n_digits.max() > 7:  # 35 bits: more than any run pycocotools (uint32) can hold
        raise MaskError("RLE counts string holds a number too large for a mask")
    position = np.arange(digits.size) - np.repeat(starts, n_digits)
    values = np.add.reduceat((digits & 0x1F) << (5 * position), starts)
    negative = (digits[ends] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * n_digits)), values)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _parse_rle(rle: Mapping[str, Any]) -> tuple[int, int, np.ndarray]:
    """Validate an RLE (compressed or uncompressed counts) and return ``(h, w, runs)``."""
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise MaskError("an RLE must be a dict with 'size' [h, w] and 'counts'")
    size = rle["size"]
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in size)
    ):
        raise MaskError(f"RLE 'size' must be [h, w] with non-negative integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, (bytes, bytearray)):
        counts = counts.decode("latin-1")  # one char per byte: non-ASCII bytes are then refused by position
    if isinstance(counts, str):
        runs = _counts_from_string(counts)
    elif isinstance(counts, Sequence) and all(isinstance(v, (int, np.integer)) for v in counts):
        runs = np.array([int(v) for v in counts], dtype=np.int64)
    else:
        raise MaskError("RLE 'counts' must be a COCO counts string or a list of run lengths")
    total = int(runs.sum())
    if (runs < 0).any() or total != h * w:
        raise MaskError(
            f"RLE runs do not cover the mask: they sum to {total} (or are negative) but size {h}x{w} "
            f"has {h * w} pixels"
        )
    return h, w, runs


def _checked_rle(rle: Mapping[str, Any]) -> dict[str, Any]:
    """A validated RLE in the form pycocotools' functions take (compressed bytes)."""
    h, w, runs = _parse_rle(rle)
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts.encode("ascii")}
    if isinstance(counts, (bytes, bytearray)):
        return {"size": [h, w], "counts": bytes(counts)}
    return mask_util.frPyObjects({"size": [h, w], "counts": runs.tolist()}, h, w)


def _runs_to_mask(h: int, w: int, runs: np.ndarray) -> np.ndarray:
    """Expand column-major runs (first run is background) to a bool (h, w) mask.

    Equivalent to ``pycocotools.mask.decode``, which under NumPy 2 warns on every
    call (its ``__array__`` lacks the ``copy`` keyword).
    """
    values = np.arange(len(runs)) % 2 == 1
    return np.ascontiguousarray(np.repeat(values, runs).reshape(w, h).T)


# --- COCO RLE ---------------------------------------------------------------------


def encode_rle(mask_hw: Any) -> RLE:
    """Encode a (H, W) mask as COCO compressed RLE with ``counts`` as a str (JSON-ready)."""
    mask = _as_mask_hw(mask_hw)
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE (compressed str/bytes counts, or uncompressed run list) to a bool (H, W) mask."""
    return _runs_to_mask(*_parse_rle(rle))


def rle_area(rle: Mapping[str, Any]) -> int:
    """Foreground pixel count of an RLE, without decoding it."""
    return int(mask_util.area(_checked_rle(rle)))


def rle_to_box_xywh(rle: Mapping[str, Any]) -> list[float]:
    """COCO box ``[x, y, w, h]`` of an RLE (pycocotools ``toBbox``; ``[0, 0, 0, 0]`` if empty)."""
    return [float(v) for v in mask_util.toBbox(_checked_rle(rle))]


def mask_box_xywh(mask_hw: Any) -> list[float]:
    """COCO box ``[x, y, w, h]`` of a mask, equal to ``rle_to_box_xywh(encode_rle(mask_hw))``."""
    mask = _as_mask_hw(mask_hw)
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def mask_box_xyxy(mask_hw: Any) -> tuple[int, int, int, int] | None:
    """Inclusive pixel box ``(x0, y0, x1, y1)`` of a mask, None when empty.

    Mirrors ``sam2.utils.misc.mask_to_box`` (max corner is the last foreground
    pixel), so a box prompt derived here matches one SAM 2 derives itself.
    """
    x, y, w, h = mask_box_xywh(mask_hw)
    if w == 0:
        return None
    return int(x), int(y), int(x + w - 1), int(y + h - 1)


# --- PNG ----------------------------------------------------------------------------


def _open_png(data: bytes) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:8]) != _PNG_SIGNATURE:
        raise MaskError("not a PNG image (the data does not start with the PNG signature)")
    try:
        image = Image.open(io.BytesIO(bytes(data)))
        image.load()
    except Exception as e:  # PIL raises several types for damaged files
        raise MaskError(f"cannot read the PNG image: {e}") from e
    return image


def encode_png(mask_hw: Any) -> bytes:
    """Encode a (H, W) mask as a 1-bit grayscale PNG (smallest lossless image form)."""
    mask = np.ascontiguousarray(_as_mask_hw(mask_hw))
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")  # bool arrays become mode "1"
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode a mask PNG to a bool (H, W) mask: any non-zero pixel is foreground.

    Accepts what mask tools write: 1-bit, 8/16-bit gray, palette (index != 0) and
    RGB/RGBA (any colour channel != 0; alpha is ignored).
    """
    image = _open_png(data)
    arr = np.asarray(image)
    if image.mode in ("RGB", "RGBA", "LA"):
        channels = arr[..., :3] if image.mode != "LA" else arr[..., :1]
        return np.any(channels != 0, axis=-1)
    if arr.ndim != 2:
        raise MaskError(f"unsupported PNG mode {image.mode!r} for a mask")
    return arr != 0


def davis_palette() -> np.ndarray:
    """The DAVIS 2017 palette, (256, 3) uint8: PASCAL VOC's bit-interleaved colormap.

    Index 0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), 4 (0, 0, 128), ...
    """
    idx = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((idx >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


def _palette_rgb(palette: str | Any) -> np.ndarray:
    if isinstance(palette, str):
        if palette != "davis":
            raise MaskError(f"unknown palette {palette!r}; use 'davis' or an (N, 3) array of RGB colours")
        return davis_palette()
    arr = np.asarray(palette)
    if arr.ndim == 1 and arr.size % 3 == 0:
        arr = arr.reshape(-1, 3)
    if arr.ndim != 2 or arr.shape[1] != 3 or not 1 <= arr.shape[0] <= 256:
        raise MaskError(f"a palette must be 1..256 RGB colours, shape (N, 3); got shape {arr.shape}")
    if arr.min() < 0 or arr.max() > 255:
        raise MaskError("palette colours must be in 0..255")
    return arr.astype(np.uint8)


def encode_label_png(label_hw: Any, palette: str | Any = "davis") -> bytes:
    """Encode a uint8 label map (0 background, k object k) as an indexed PNG.

    The DAVIS palette makes the file both exact (indices are the object ids) and
    viewable, and it is what VOS benchmarks and tools read.
    """
    label = np.asarray(label_hw)
    if label.ndim != 2:
        raise MaskError(f"label_hw must be a 2-D (H, W) label map, got an array of shape {label.shape}")
    if label.dtype != np.uint8:
        if not np.issubdtype(label.dtype, np.integer) or (label.size and (label.min() < 0 or label.max() > 255)):
            raise MaskError(f"label_hw must hold integer object ids 0..255, got dtype {label.dtype}")
        label = label.astype(np.uint8)
    rgb = _palette_rgb(palette)
    image = Image.fromarray(np.ascontiguousarray(label))
    image.putpalette(rgb.ravel().tolist())  # turns the "L" image into "P"
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """Decode an indexed (palette) PNG to its uint8 (H, W) label map.

    Gray PNGs give their values; RGB(A) PNGs are mapped back through the DAVIS
    palette (for label maps that were flattened to colour by another tool).
    """
    image = _open_png(data)
    if image.mode in ("P", "L"):
        return np.array(image, dtype=np.uint8)
    if image.mode == "1":
        return np.array(image, dtype=np.uint8)
    if image.mode in ("RGB", "RGBA"):
        rgb = np.asarray(image)[..., :3].astype(np.int64)
        keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        pal = davis_palette().astype(np.int64)
        pal_keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        order = np.argsort(pal_keys)
        pos = np.clip(np.searchsorted(pal_keys[order], keys), 0, 255)
        found = pal_keys[order][pos] == keys
        if not found.all():
            y, x = np.argwhere(~found)[0]
            raise MaskError(
                f"RGB label PNG has colour {tuple(int(v) for v in rgb[y, x])} at (x={x}, y={y}) that is not in "
                "the DAVIS palette; save label maps as indexed PNGs"
            )
        return order[pos].astype(np.uint8)
    raise MaskError(f"unsupported PNG mode {image.mode!r} for a label map; save it as an indexed (palette) PNG")


# --- label maps ---------------------------------------------------------------------


def masks_to_label_map(masks: Mapping[int, Any], h: int, w: int) -> np.ndarray:
    """Paint per-object masks into one uint8 (h, w) label map.

    Overlaps: objects are painted in ascending ``obj_id`` order, so where masks
    overlap the *highest* id wins. (Choosing by logit, as SAM 2's
    non-overlapping constraint does, needs logits, which this function does not
    get.)
    """
    label = np.zeros((h, w), dtype=np.uint8)
    for obj_id in sorted(masks):
        if not isinstance(obj_id, (int, np.integer)) or not 1 <= obj_id <= 255:
            raise MaskError(f"object id {obj_id!r} cannot be stored in a uint8 label map; use ids 1..255")
        mask = _as_mask_hw(masks[obj_id], name=f"mask of object {obj_id}")
        if mask.shape != (h, w):
            raise MaskError(f"mask of object {obj_id} has shape {mask.shape}, expected ({h}, {w})")
        label[mask] = obj_id
    return label


def label_map_to_masks(label_hw: Any) -> dict[int, np.ndarray]:
    """Split a label map into ``{obj_id: bool (H, W) mask}`` for each non-zero id present."""
    label = np.asarray(label_hw)
    if label.ndim != 2:
        raise MaskError(f"label_hw must be a 2-D (H, W) label map, got an array of shape {label.shape}")
    return {int(k): label == k for k in np.unique(label) if k != 0}


# --- polygons -----------------------------------------------------------------------

_POLY_UPSAMPLE = 2


def mask_to_polygons(mask_hw: Any, tolerance_px: float = 1.0) -> list[list[float]]:
    """Outer outlines of a mask as COCO polygons ``[[x0, y0, x1, y1, ...], ...]``.

    Coordinates are COCO's (pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``).
    Contours are traced on a 2x nearest-upsampled mask so that each outline runs
    a quarter pixel inside the pixel edges instead of through boundary pixel
    centres: ``polygons_to_mask`` then gives back every pixel of a hole-free
    mask when ``tolerance_px`` is 0, and single pixels and 1-px lines survive.
    ``tolerance_px`` is the ``cv2.approxPolyDP`` epsilon in original pixels.
    Holes are not kept (COCO polygons are filled).
    """
    mask = _as_mask_hw(mask_hw)
    if tolerance_px < 0:
        raise MaskError(f"tolerance_px must be >= 0, got {tolerance_px}")
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return []
    x0, y0 = int(cols[0]), int(rows[0])
    crop = mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1].astype(np.uint8)
    k = _POLY_UPSAMPLE
    big = np.repeat(np.repeat(crop, k, axis=0), k, axis=1)
    big = cv2.copyMakeBorder(big, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polygons: list[list[float]] = []
    for contour in contours:
        points = cv2.approxPolyDP(contour, tolerance_px * k, True) if tolerance_px > 0 else contour
        if len(points) < 3:
            points = contour  # a tiny blob: keep it rather than lose it
        if len(points) < 3:
            continue
        xy = (points.reshape(-1, 2).astype(np.float64) - 1 + 0.5) / k + (x0, y0)
        polygons.append(xy.ravel().tolist())
    return polygons


def polygons_to_mask(polygons: Sequence[Sequence[float]], h: int, w: int) -> np.ndarray:
    """Rasterise COCO polygons (union of all) to a bool (h, w) mask with pycocotools."""
    polys = [list(map(float, p)) for p in polygons]
    for i, p in enumerate(polys):
        if len(p) < 6 or len(p) % 2:
            raise MaskError(
                f"polygon {i} has {len(p)} coordinates; a polygon needs at least 3 points as [x0, y0, x1, y1, ...]"
            )
    if not polys:
        return np.zeros((h, w), dtype=bool)
    merged = mask_util.merge(mask_util.frPyObjects(polys, h, w))
    return decode_rle(merged)


__all__ = [
    "RLE",
    "davis_palette",
    "decode_label_png",
    "decode_png",
    "decode_rle",
    "encode_label_png",
    "encode_png",
    "encode_rle",
    "label_map_to_masks",
    "mask_box_xywh",
    "mask_box_xyxy",
    "mask_to_polygons",
    "masks_to_label_map",
    "polygons_to_mask",
    "rle_area",
    "rle_to_box_xywh",
]
