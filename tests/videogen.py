"""Real encoded clips for the ingest tests, made with PyAV, and ways to recognise their frames.

Frame ``i`` of a generated clip is a solid background of :func:`colour_of` ``(i)``
with ``i`` written in binary as black/white cells along the top
(:func:`pattern_rgb`). After any codec, :func:`read_index` gets ``i`` back from
the picture and :func:`background_error` says how far the colour drifted, so a
test can check frame order, drops and colour conversion on the pixels
themselves, not only on counters.

Also: helpers to damage a file in the middle, and to find free local ports.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

#: Bits of the frame-index code; clips are at most 2**BITS frames long.
BITS = 8

#: Encoder options giving near-lossless flat colours at small sizes, per codec.
ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"preset": "ultrafast", "crf": "12"},
    "libx265": {"preset": "ultrafast", "crf": "12", "x265-params": "log-level=error"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8", "crf": "4", "b": "4M"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "12", "b": "0"},
    "libsvtav1": {"preset": "12", "crf": "20", "svtav1-params": "log-level=0"},
    "mpeg4": {"qscale": "2"},
    "mjpeg": {"qscale": "2"},
}


def colour_of(i: int) -> tuple[int, int, int]:
    """Background colour of frame ``i``: mid-range, distinct for neighbouring frames."""
    return (40 + (i * 53) % 170, 40 + (i * 97) % 170, 40 + (i * 151) % 170)


def _strip_geometry(h: int, w: int) -> tuple[int, int]:
    return max(4, h // 4), max(2, w // BITS)  # strip height, cell width


def pattern_rgb(i: int, h: int, w: int) -> np.ndarray:
    """H x W x 3 uint8 picture of frame ``i`` (see module doc)."""
    image = np.empty((h, w, 3), np.uint8)
    image[:] = colour_of(i)
    strip_h, cell_w = _strip_geometry(h, w)
    for bit in range(BITS):
        image[:strip_h, bit * cell_w:(bit + 1) * cell_w] = 255 if (i >> bit) & 1 else 0
    return image


def read_index(image_rgb: np.ndarray) -> int:
    """The index written by :func:`pattern_rgb` into an (upright, possibly resized) picture."""
    h, w = image_rgb.shape[:2]
    strip_h, cell_w = _strip_geometry(h, w)
    value = 0
    for bit in range(BITS):
        x0, x1 = bit * cell_w + cell_w // 4, (bit + 1) * cell_w - cell_w // 4
        y0, y1 = strip_h // 4, strip_h - strip_h // 4
        cell = image_rgb[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
        if cell.mean() > 128:
            value |= 1 << bit
    return value


def background_error(image_rgb: np.ndarray, i: int) -> float:
    """Largest per-channel difference between the picture's background and :func:`colour_of` ``(i)``."""
    h, w = image_rgb.shape[:2]
    strip_h, _ = _strip_geometry(h, w)
    region = image_rgb[strip_h + (h - strip_h) // 4: h - (h - strip_h) // 4, w // 4: w - w // 4]
    mean = region.reshape(-1, 3).mean(axis=0)
    return float(np.abs(mean - np.array(colour_of(i))).max())


@dataclass(frozen=True)
class Clip:
    """A generated clip and what a reader must find in it."""

    path: Path
    n_frames: int
    size_hw: tuple[int, int]  # as stored (before any rotation)
    pts_s: tuple[float, ...]  # presentation time of each frame, from the first
    fps: float


def make_clip(
    path: Path,
    codec: str = "libx264",
    n_frames: int = 24,
    size_hw: tuple[int, int] = (96, 128),
    fps: int = 25,
    pix_fmt: str = "yuv420p",
    gop: int | None = None,
    pts_s: list[float] | None = None,
    rotation: int | None = None,
    container_format: str | None = None,
    container_options: dict[str, str] | None = None,
) -> Clip:
    """Encode :func:`pattern_rgb` frames 0..n-1 with PyAV into ``path``.

    ``pts_s`` gives each frame's time (variable frame rate, millisecond
    timestamps); otherwise frames are ``1/fps`` apart. ``rotation`` sets the
    display matrix (degrees counter-clockwise, as ``frame.rotation`` reads it).
    """
    h, w = size_hw
    times = tuple(pts_s) if pts_s is not None else tuple(i / fps for i in range(n_frames))
    assert len(times) == n_frames and n_frames <= 2**BITS
    with av.open(str(path), "w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = dict(ENCODER_OPTIONS.get(codec, {}))
        if gop is not None:
            stream.codec_context.gop_size = gop
        time_base = Fraction(1, 1000) if pts_s is not None else Fraction(1, fps)
        stream.codec_context.time_base = time_base
        if pts_s is not None:
            stream.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(pattern_rgb(i, h, w), format="rgb24")
            frame.pts = round(times[i] / time_base)
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return Clip(path, n_frames, size_hw, tuple(t - times[0] for t in times), float(fps))


def damage_middle(path: Path, fraction: float = 0.5, length: int = 2000, seed: int = 0) -> None:
    """Overwrite ``length`` bytes at ``fraction`` of the file with noise (in place)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * fraction)
    noise = np.random.default_rng(seed).integers(0, 256, size=length, dtype=np.uint8).tobytes()
    data[start:start + length] = noise[: max(0, min(length, len(data) - start))]
    path.write_bytes(bytes(data))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that was free a moment ago (TCP or UDP)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
