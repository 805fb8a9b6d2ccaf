"""Untrusted image bytes → RGB: every mode converted by the one path, EXIF
orientation honoured, bombs refused from the header, damaged bytes refused with
a typed error naming the field. Every file is made here with Pillow/OpenCV."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from tracker.errors import TrackerError
from tracker.image_input import ImageInputError, ImageLimits, decode_image, load_image, rgb_from_array, rgb_from_pil

RNG = np.random.default_rng(5)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def refused(data, code: str, limits: ImageLimits | None = None, field: str = "image") -> ImageInputError:
    with pytest.raises(ImageInputError) as err:
        decode_image(data, limits, field=field)
    assert err.value.code == code
    assert err.value.field == field
    assert isinstance(err.value, TrackerError) and isinstance(err.value, ValueError)
    return err.value


# ------------------------------------------------------------------ modes


def test_rgb_png_is_lossless_and_untouched():
    out = decode_image(save(Image.fromarray(RGB), "PNG"))
    assert (out.format, out.mode, out.exif_orientation, out.size_hw) == ("PNG", "RGB", 1, (24, 32))
    np.testing.assert_array_equal(out.image_rgb, RGB)
    assert out.image_rgb.dtype == np.uint8 and out.image_rgb.flags.c_contiguous


def test_16_bit_gray_png_keeps_the_high_byte():
    gray16 = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
    data = save(Image.fromarray(gray16), "PNG")
    out = decode_image(data)
    assert out.mode == "I;16"
    expected = (gray16 >> 8).astype(np.uint8)
    np.testing.assert_array_equal(out.image_rgb, np.repeat(expected[:, :, None], 3, axis=2))
    # what Image.convert("RGB") does instead: clipped to 255, a white image
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[gray16 >= 256] == 255).all()


def test_16_bit_rgb_png():
    rgb16 = RNG.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", rgb16[:, :, ::-1])  # OpenCV writes BGR
    assert ok
    out = decode_image(buf.tobytes())
    np.testing.assert_array_equal(out.image_rgb, (rgb16 >> 8).astype(np.uint8))


def test_cmyk_jpeg_is_converted_like_pillow():
    cmyk = Image.fromarray(RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8), mode="CMYK")
    data = save(cmyk, "JPEG", quality=95)
    out = decode_image(data)
    assert (out.format, out.mode) == ("JPEG", "CMYK")
    np.testing.assert_array_equal(out.image_rgb, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_palette_png_with_transparency_keeps_the_palette_colours():
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (12, 18), dtype=np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette.ravel().tolist())
    out = decode_image(save(image, "PNG", transparency=int(index[0, 0])))
    assert out.mode == "P"
    np.testing.assert_array_equal(out.image_rgb, palette[index])  # the transparent pixels too


def test_gray_la_and_1_bit_are_replicated():
    gray = RNG.integers(0, 256, (10, 14), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (10, 14), dtype=np.uint8)
    la = Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA")
    out = decode_image(save(la, "PNG"))
    assert out.mode == "LA"
    np.testing.assert_array_equal(out.image_rgb, np.repeat(gray[:, :, None], 3, axis=2))
    bits = gray > 127
    out = decode_image(save(Image.fromarray(bits), "PNG"))
    np.testing.assert_array_equal(out.image_rgb[:, :, 1], bits.astype(np.uint8) * 255)


def test_rgba_drops_alpha():
    rgba = RNG.integers(0, 256, (10, 14, 4), dtype=np.uint8)
    out = decode_image(save(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    np.testing.assert_array_equal(out.image_rgb, rgba[:, :, :3])


@pytest.mark.parametrize("orientation, rotate", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_honoured(orientation, rotate):
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:8, :8] = 255  # a white block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # pixels as stored
    out = decode_image(data)
    assert out.exif_orientation == orientation
    np.testing.assert_array_equal(out.image_rgb, np.rot90(raw, k=rotate))
    # 6: turned clockwise to stand upright, so the corner block is now top-right
    corners = {6: (slice(0, 8), slice(-8, None)), 8: (slice(-8, None), slice(0, 8)), 3: (slice(-8, None), slice(-8, None))}
    assert out.image_rgb[corners[orientation]].mean() > 200


def test_float_images_are_refused_naming_the_mode():
    data = save(Image.fromarray(RNG.random((8, 8), dtype=np.float32), mode="F"), "TIFF")
    err = refused(data, "unsupported_mode")
    assert str(err) == (
        "image has pixel mode 'F', which cannot be turned into RGB; use 8- or 16-bit gray, RGB(A), palette or CMYK"
    )


# ---------------------------------------------------------------- bad bytes


def test_random_bytes_and_other_formats_are_not_images():
    err = refused(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image", field="data")
    assert str(err) == "data is not an image in a supported format (JPEG, PNG, WEBP, BMP, GIF, TIFF), or its header is damaged"
    refused(save(Image.fromarray(RGB), "ICO"), "not_an_image")  # a format Pillow reads, but not allowed
    refused(save(Image.fromarray(RGB), "PNG"), "not_an_image", ImageLimits(formats=("JPEG",)))
    assert str(refused(b"", "empty")) == "image is empty (0 bytes)"
    assert str(refused("not bytes", "not_an_image")) == "image must be bytes, got str"


@pytest.mark.parametrize("fmt, header_cut", [("PNG", "corrupt"), ("JPEG", "not_an_image")])
def test_truncated_files_are_refused(fmt, header_cut):
    data = save(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    err = refused(data[: len(data) // 2], "corrupt")  # cut in the pixels
    assert str(err).startswith("image is truncated or damaged: ")
    refused(data[:20], header_cut)  # cut in the header: Pillow cannot tell a 20-byte JPEG from noise
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # the check relies on Pillow's default


def test_bomb_header_is_refused_before_decoding(monkeypatch):
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    err = refused(png_header(8000, 8000), "too_large")
    assert str(err) == "image is too large: 8000x8000 is 64000000 pixels, the limit is 50000000 pixels"
    err = refused(save(Image.fromarray(RGB), "PNG"), "too_large", ImageLimits(max_pixels=500))
    assert str(err) == "image is too large: 32x24 is 768 pixels, the limit is 500 pixels"
    assert decoded == []


def test_bomb_beyond_pillows_own_limit():
    err = refused(png_header(100_000, 100_000), "too_large")
    assert str(err) == "image is too large: 10000000000 pixels, the limit is 50000000 pixels"


def test_byte_limit():
    data = save(Image.fromarray(RGB), "PNG")
    err = refused(data, "too_many_bytes", ImageLimits(max_bytes=100))
    assert str(err) == f"image is {len(data)} bytes, the limit is 100 bytes"


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_pixels must be at least 1"):
        ImageLimits(max_pixels=0)
    with pytest.raises(ValueError, match="formats must be some of"):
        ImageLimits(formats=("EPS",))


# -------------------------------------------------------------------- files


def test_load_image(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(save(Image.fromarray(RGB), "PNG"))
    np.testing.assert_array_equal(load_image(path).image_rgb, RGB)
    with pytest.raises(ImageInputError) as err:
        load_image(tmp_path / "missing.png")
    assert (err.value.code, err.value.field) == ("not_found", "path")
    assert str(err.value) == f"path: {tmp_path / 'missing.png'} does not exist"
    with pytest.raises(ImageInputError) as err:
        load_image(tmp_path)
    assert err.value.code == "not_found"
    with pytest.raises(ImageInputError) as err:
        load_image(path, ImageLimits(max_bytes=10))
    assert err.value.code == "too_many_bytes"
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageInputError) as err:
        load_image(tmp_path / "empty.png")
    assert err.value.code == "empty"


# ------------------------------------------------------------------- arrays


def test_arrays_follow_the_same_rules_as_files():
    assert rgb_from_array(RGB) is RGB  # already RGB uint8: no copy
    gray16 = RNG.integers(0, 65536, (6, 7), dtype=np.uint16)
    np.testing.assert_array_equal(rgb_from_array(gray16), rgb_from_pil(Image.fromarray(gray16)))
    rgba = RNG.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    np.testing.assert_array_equal(rgb_from_array(rgba), rgba[:, :, :3])
    np.testing.assert_array_equal(rgb_from_array(RGB[:, :, :1]), np.repeat(RGB[:, :, :1], 3, axis=2))
    for bad, message in [
        (np.zeros((4, 4, 2), np.uint8), "image must be H x W, H x W x 3 or H x W x 4, got shape (4, 4, 2)"),
        (np.zeros((4, 4, 3), np.float32), "image must be uint8, uint16 or bool, got dtype float32"),
        (np.zeros((0, 4, 3), np.uint8), "image has no pixels (shape (0, 4, 3))"),
        ([[1, 2]], "image must be a numpy array, got list"),
    ]:
        with pytest.raises(ImageInputError) as err:
            rgb_from_array(bad)
        assert (err.value.code, str(err.value)) == ("bad_array", message)
