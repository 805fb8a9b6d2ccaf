"""Ingest on the real-world files of ``../shared/`` (skipped when the folder is absent).

These are files other tools produced: rotation metadata, full-range BT.709,
10-bit H.264/HEVC, AV1, VP8/VP9, variable frame rate, extra audio/data/subtitle
streams, a damaged file, and an image folder. Expected counts are those in
``../shared/README.md``; colours are checked against an independent numpy
implementation of the BT.601/BT.709 equations, and rotation against ``ffmpeg``'s
own autorotate.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from tracker.ingest import EventKind, open_source, quarter_turns

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VIDEOS = SHARED / "videos"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not VIDEOS.is_dir(), reason="../shared/videos is absent (only in the project's workplace)"),
]


def video(name: str) -> Path:
    path = VIDEOS / name
    if not path.exists():
        pytest.skip(f"{name} is not in ../shared/videos")
    return path


def ffmpeg_first_frame_rgb(path: Path, h: int, w: int) -> np.ndarray:
    """The first frame as the ``ffmpeg`` CLI shows it (autorotate on), RGB."""
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True, timeout=60).stdout
    return np.frombuffer(out, np.uint8).reshape(h, w, 3)


def reference_rgb(frame: av.VideoFrame, bt709: bool | None = None, full_range: bool | None = None) -> np.ndarray:
    """YUV 4:2:0 -> RGB by the textbook equations (nearest chroma), independent of swscale.

    Matrix: BT.709 when the frame says so, BT.601 otherwise; range: full for
    ``yuvj*`` or a JPEG-range tag, limited otherwise; any bit depth. The two
    flags force the other choice, to show a test would catch it.
    """
    bits = frame.format.components[0].bits
    dtype = np.uint16 if bits > 8 else np.uint8

    def plane(i: int) -> np.ndarray:
        p = frame.planes[i]
        width = p.width
        return np.frombuffer(p, dtype).reshape(p.height, p.line_size // dtype().itemsize)[:, :width].astype(np.float64)

    y = plane(0)
    u = np.repeat(np.repeat(plane(1), 2, axis=0), 2, axis=1)[: frame.height, : frame.width]
    v = np.repeat(np.repeat(plane(2), 2, axis=0), 2, axis=1)[: frame.height, : frame.width]
    scale = 2 ** (bits - 8)
    y, u, v = y / scale, u / scale - 128, v / scale - 128
    if full_range is None:
        full_range = frame.format.name.startswith("yuvj") or frame.color_range == 2
    if bt709 is None:
        bt709 = frame.colorspace == 1
    if full_range:
        y, u, v = y / 255, u / 255, v / 255
    else:
        y, u, v = (y - 16) / 219, u / 224, v / 224
    kr, kb = (0.2126, 0.0722) if bt709 else (0.299, 0.114)
    r = y + 2 * (1 - kr) * v
    b = y + 2 * (1 - kb) * u
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.stack([r, g, b], axis=-1) * 255 + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("name", "upright_hw"), [
    ("decord__video_0.mov", (320, 568)),
    ("decord__video_90.mov", (568, 320)),
    ("decord__video_180.mov", (320, 568)),
    ("decord__video_270.mov", (568, 320)),
    ("moviepy__fire2.mp4", (720, 1280)),
])
def test_rotation_metadata_is_applied_like_a_player(name: str, upright_hw: tuple[int, int]) -> None:
    path = video(name)
    with open_source(str(path)) as source:
        assert source.size == upright_hw
        frame = next(source)
    assert frame.image_rgb.shape == (*upright_hw, 3) and frame.source_size == upright_hw
    with av.open(str(path)) as container:
        stored = next(container.decode(video=0))
        expected = np.rot90(stored.to_ndarray(format="rgb24"), quarter_turns(stored.rotation))
    np.testing.assert_array_equal(frame.image_rgb, expected)
    if shutil.which("ffmpeg"):
        reference = ffmpeg_first_frame_rgb(path, *upright_hw)
        assert np.abs(reference.astype(int) - frame.image_rgb.astype(int)).mean() < 0.5


@pytest.mark.parametrize("name", [
    "torchcodec__bt709_full_range.mp4",  # yuvj420p, BT.709
    "xmempp__chair.mp4",  # yuvj420p, untagged matrix
    "torchcodec__h264_10bits.mp4",  # yuv420p10le
    "torchcodec__h265_10bits.mp4",  # yuv420p10le, HEVC
])
def test_full_range_and_10_bit_convert_to_the_right_rgb(name: str) -> None:
    path = video(name)
    with av.open(str(path)) as container:
        stored = next(container.decode(video=0))
        reference = reference_rgb(stored)
        wrong_matrix = reference_rgb(stored, bt709=stored.colorspace != 1)
        wrong_range = reference_rgb(stored, full_range=not (stored.format.name.startswith("yuvj") or stored.color_range == 2))
    with open_source(str(path)) as source:
        ours = next(source).image_rgb
    # compare where the picture is flat, so chroma siting/interpolation choices do not count
    kernel = np.ones((7, 7), np.uint8)
    flat = (cv2.dilate(reference, kernel).astype(int) - cv2.erode(reference, kernel)).max(axis=2) <= 2
    assert flat.mean() > 0.2

    def error(other: np.ndarray) -> np.ndarray:
        return np.abs(ours.astype(int) - other.astype(int)).max(axis=2)[flat]

    # swscale's fixed-point arithmetic is within ~1 level of the exact equations
    assert error(reference).mean() < 2.0 and error(reference).max() <= 3
    # a wrong range is off by far more; where the two matrices disagree (saturated
    # colours), ours is the right one
    assert error(wrong_range).mean() > 8
    matrices_differ = np.abs(reference.astype(int) - wrong_matrix.astype(int)).max(axis=2)[flat] >= 6
    if matrices_differ.mean() > 0.01:
        assert error(reference)[matrices_differ].mean() < 2.0
        assert error(wrong_matrix)[matrices_differ].mean() > 6


@pytest.mark.parametrize(("name", "n_frames", "size_hw"), [
    ("torchcodec__av1_video.mkv", 125, (360, 640)),
    ("torchcodec__h265_video.mp4", 10, (128, 128)),
    ("moviepy__big_buck_bunny_432_433.webm", 24, (720, 1280)),  # VP8 + Vorbis
    ("moviepy__transparent.webm", 150, (200, 200)),  # VP9
    ("moviepy__no_duration.webm", 74, (720, 1280)),  # VP9, VFR, no duration
    ("moviepy__bitmap.mp4", 5, (1, 1)),  # 1x1 yuv444p
    ("decord__unordered.mov", 4, (50, 50)),
    ("decord__flipping_a_pancake.mkv", 310, (240, 426)),  # + Opus audio
    ("torchcodec__nasa_13013.mp4", 325, (180, 320)),  # two video, audio and subtitle streams
    ("sam2gallery__01_dog.mp4", 289, (720, 1280)),  # + audio and a data stream
])
def test_real_files_every_frame(name: str, n_frames: int, size_hw: tuple[int, int]) -> None:
    path = video(name)
    with open_source(str(path), resize=160) as source:  # small output: the test is about decoding
        assert source.size == size_hw
        frames = list(source)
        stats = source.stats
        events = source.events.snapshot()
    assert len(frames) == n_frames and [f.index for f in frames] == list(range(n_frames))
    assert all(f.source_size == size_hw and max(f.image_rgb.shape[:2]) <= 160 for f in frames)
    pts = [f.pts_s for f in frames]
    assert all(b > a for a, b in zip(pts, pts[1:]))
    assert stats.decode_errors == 0 and [e.kind for e in events] == [EventKind.ENDED]


def test_variable_frame_rate_timestamps_are_the_files() -> None:
    path = video("torchcodec__var_fps_video.mp4")
    with av.open(str(path)) as container:
        expected = [float(f.pts * f.time_base) for f in container.decode(video=0)]
    with open_source(str(path)) as source:
        pts = [f.pts_s for f in source]
    assert pts == expected and len(pts) == 300
    gaps = np.round(np.diff(pts), 4)
    assert len(set(gaps.tolist())) > 1  # really variable


def test_damaged_file_decodes_past_the_damage() -> None:
    """decord's corrupted.mp4: a naive decode loop stops at frame 28; we skip the bad packet and go on."""
    path = video("decord__corrupted.mp4")
    with open_source(str(path), resize=160) as source:
        frames = list(source)  # no exception
        stats = source.stats
        events = source.events.snapshot()
    assert len(frames) > 28 and [f.index for f in frames] == list(range(len(frames)))
    assert stats.decode_errors >= 1 and [e.kind for e in events] == [EventKind.ENDED]


def test_image_folder_matches_its_video() -> None:
    folder = SHARED / "vos" / "pumavos-chair" / "JPEGImages"
    if not folder.is_dir():
        pytest.skip("../shared/vos/pumavos-chair is absent")
    with open_source(str(folder)) as source:
        images = list(source)
    with open_source(str(folder.parent / "chair.mp4")) as source:
        decoded = list(source)
    assert len(images) == len(decoded) == 60
    assert all(f.image_rgb.shape == (480, 720, 3) for f in images)
    first = cv2.cvtColor(cv2.imread(str(folder / "frame_000000.jpg")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(images[0].image_rgb, first)
    for i in (0, 30, 59):  # same pictures, through JPEG and through H.264
        assert np.abs(images[i].image_rgb.astype(int) - decoded[i].image_rgb.astype(int)).mean() < 8
