"""Untrusted image bytes (an upload, a file) → H x W x 3 uint8 RGB for image mode.

One conversion path for every way an image reaches the image segmenter (the
``segment`` CLI, :class:`tracker.segment.ImageSegmenter`, the server's image
uploads), so the same file always gives the same pixels and so the same
embedding:

- only the formats in :data:`IMAGE_FORMATS` are opened (Pillow's other plugins,
  e.g. EPS through Ghostscript, are never reached by untrusted bytes);
- the pixel count is checked from the header, before any pixel is decoded
  (decompression bombs: a 1 kB PNG can claim 10^10 pixels); Pillow's own bomb
  limit (``Image.MAX_IMAGE_PIXELS``, twice that is an error) still applies above ours;
- EXIF orientation is honoured (phones store portrait photos sideways), unlike
  video frames from image folders (``tracker.sources.images``), whose masks must
  stay in the stored orientation;
- every common mode becomes RGB: grayscale and 1-bit are replicated, palette images
  take their palette colours, CMYK / YCbCr go through Pillow's conversion,
  alpha is dropped (the colour channels are kept as stored, as
  ``Image.convert("RGB")`` does), 16-bit samples keep their high byte
  (``convert("RGB")`` would clip them to 255, a white image).

Nothing here knows about models, caches or sockets. Errors are
:class:`ImageInputError`, with a ``code`` for programs and the ``field`` at fault.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from tracker.errors import TrackerError

log = logging.getLogger(__name__)

#: Pillow format names opened for untrusted input ("JPEG" also opens phones'
#: multi-picture JPEGs, whose format then reads "MPO")
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

#: default pixel limit (width x height): an 8000 x 6000 (48 MP) photo passes
DEFAULT_MAX_PIXELS = 50_000_000
#: default size limit of the encoded bytes
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_BOMB_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


class ImageInputError(TrackerError, ValueError):
    """Image bytes, a file or an array that cannot be turned into an RGB image.

    Attributes:
        code: why, for programs: ``empty``, ``too_many_bytes``, ``not_found``,
            ``not_an_image``, ``too_large`` (pixel limit), ``corrupt`` (truncated
            or damaged pixel data), ``unsupported_mode``, ``bad_array``.
        field: the input at fault (``"image"`` unless the caller names it).
    """

    def __init__(self, code: str, message: str, *, field: str = "image") -> None:
        super().__init__(message)
        self.code = code
        self.field = field


@dataclass(frozen=True)
class ImageLimits:
    """What an untrusted image may be; a server takes these from its config."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    formats: tuple[str, ...] = IMAGE_FORMATS

    def __post_init__(self) -> None:
        if int(self.max_pixels) < 1:
            raise ValueError(f"max_pixels must be at least 1, got {self.max_pixels}")
        if int(self.max_bytes) < 1:
            raise ValueError(f"max_bytes must be at least 1, got {self.max_bytes}")
        unknown = [f for f in self.formats if f not in IMAGE_FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"formats must be some of {', '.join(IMAGE_FORMATS)}, got {list(self.formats)}")


@dataclass(frozen=True)
class DecodedImage:
    """An image as the segmenter takes it, and what it was before conversion."""

    image_rgb: np.ndarray  # H x W x 3 uint8, upright (EXIF orientation applied)
    format: str  # Pillow's format name, e.g. "PNG"
    mode: str  # the mode it was stored in, e.g. "I;16", "CMYK", "P"
    exif_orientation: int  # the EXIF orientation applied (1: none)

    @property
    def size_hw(self) -> tuple[int, int]:
        return int(self.image_rgb.shape[0]), int(self.image_rgb.shape[1])


def decode_image(data: bytes | bytearray | memoryview, limits: ImageLimits | None = None, *, field: str = "image") -> DecodedImage:
    """Decode untrusted image bytes (see the module doc for the rules)."""
    limits = limits or ImageLimits()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageInputError("not_an_image", f"{field} must be bytes, got {type(data).__name__}", field=field)
    size = memoryview(data).nbytes
    if size == 0:
        raise ImageInputError("empty", f"{field} is empty (0 bytes)", field=field)
    if size > limits.max_bytes:
        raise ImageInputError(
            "too_many_bytes", f"{field} is {size} bytes, the limit is {limits.max_bytes} bytes", field=field
        )
    return _decode(io.BytesIO(bytes(data)), limits, field)


def load_image(path: str | os.PathLike, limits: ImageLimits | None = None, *, field: str = "path") -> DecodedImage:
    """Read and decode an image file; the byte limit is checked before reading.

    Which paths may be read at all is the caller's policy (the server's source
    folders); this only reads.
    """
    limits = limits or ImageLimits()
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise ImageInputError("not_found", f"{field}: {p} is not a file", field=field)
        if size > limits.max_bytes:
            raise ImageInputError(
                "too_many_bytes", f"{field}: {p} is {size} bytes, the limit is {limits.max_bytes} bytes", field=field
            )
        data = p.read_bytes()
    except FileNotFoundError:
        raise ImageInputError("not_found", f"{field}: {p} does not exist", field=field) from None
    except OSError as e:
        raise ImageInputError("not_found", f"{field}: cannot read {p}: {e.strerror or e}", field=field) from None
    if not data:
        raise ImageInputError("empty", f"{field}: {p} is empty (0 bytes)", field=field)
    return _decode(io.BytesIO(data), limits, field)


def _decode(fp: io.BytesIO, limits: ImageLimits, field: str) -> DecodedImage:
    try:
        image = Image.open(fp, formats=list(limits.formats))
    except Image.DecompressionBombError as e:
        m = _BOMB_PIXELS_RE.search(str(e))
        pixels = f"{m.group(1)} pixels" if m else "more pixels than Pillow allows"
        raise ImageInputError(
            "too_large", f"{field} is too large: {pixels}, the limit is {limits.max_pixels} pixels", field=field
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageInputError(
            "not_an_image",
            f"{field} is not an image in a supported format ({', '.join(limits.formats)}), or its header is damaged",
            field=field,
        ) from None
    except Exception as e:  # PIL raises several types for damaged headers
        raise ImageInputError("corrupt", f"{field} is truncated or damaged: {e}", field=field) from None
    with image:
        w, h = image.size
        if w < 1 or h < 1:
            raise ImageInputError("corrupt", f"{field} has no pixels ({w}x{h})", field=field)
        if w * h > limits.max_pixels:
            raise ImageInputError(
                "too_large",
                f"{field} is too large: {w}x{h} is {w * h} pixels, the limit is {limits.max_pixels} pixels",
                field=field,
            )
        fmt, mode = str(image.format), str(image.mode)
        try:
            image.load()  # the first frame of an animation
        except Exception as e:  # truncated data: OSError, SyntaxError, zlib/struct errors...
            raise ImageInputError("corrupt", f"{field} is truncated or damaged: {e}", field=field) from None
        orientation = _orientation(image)
        upright = image
        if orientation != 1:
            try:
                upright = ImageOps.exif_transpose(image)
            except Exception as e:  # a damaged EXIF block: keep the stored orientation
                log.warning("%s: EXIF orientation %d not applied: %s", field, orientation, e)
                orientation = 1
        image_rgb = rgb_from_pil(upright, field=field)
    return DecodedImage(image_rgb=image_rgb, format=fmt, mode=mode, exif_orientation=orientation)


def _orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(0x0112, 1))
    except Exception:  # unreadable EXIF: as stored
        return 1
    return value if 1 <= value <= 8 else 1


#: modes Pillow converts to RGB itself (alpha dropped, palette looked up, CMYK/YCbCr converted);
#: not LAB (Pillow copies its channels as if they were RGB) nor float "F" (no range to scale from)
_PIL_RGB_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def rgb_from_pil(image: Image.Image, *, field: str = "image") -> np.ndarray:
    """H x W x 3 uint8 RGB from a decoded Pillow image of any common mode."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # "I" is 32-bit, but Pillow uses it for 16-bit gray PNG/TIFF samples too
        return rgb_from_array(np.asarray(image).astype(np.int64).clip(0, 65535).astype(np.uint16), field=field)
    if mode in _PIL_RGB_MODES:
        if mode == "PA" or (mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")  # palette transparency: colours kept, alpha dropped below
        return np.array(image.convert("RGB"))  # a writable copy (asarray would be read-only)
    raise ImageInputError(
        "unsupported_mode",
        f"{field} has pixel mode {mode!r}, which cannot be turned into RGB; use 8- or 16-bit gray, RGB(A), palette or CMYK",
        field=field,
    )


def rgb_from_array(array: Any, *, field: str = "image") -> np.ndarray:
    """H x W x 3 uint8 RGB from an array a program hands over (same rules as files).

    Takes H x W (gray), H x W x 1, H x W x 3 (RGB) or H x W x 4 (RGBA, alpha
    dropped), as bool, uint8 or uint16 (high byte kept). An H x W x 3 uint8
    array comes back as is (no copy).
    """
    if not isinstance(array, np.ndarray):
        raise ImageInputError("bad_array", f"{field} must be a numpy array, got {type(array).__name__}", field=field)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageInputError(
            "bad_array", f"{field} must be H x W, H x W x 3 or H x W x 4, got shape {tuple(array.shape)}", field=field
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageInputError("bad_array", f"{field} has no pixels (shape {tuple(array.shape)})", field=field)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageInputError("bad_array", f"{field} must be uint8, uint16 or bool, got dtype {array.dtype}", field=field)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)
