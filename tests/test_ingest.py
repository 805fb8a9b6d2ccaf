"""Ingest without a network: source strings, allowlist, delivery policies, and real
encoded clips (made here with PyAV) decoded frame by frame and checked on their pixels.

Network sources are in ``test_ingest_network.py``; the real-world files of
``../shared/`` in ``test_ingest_shared.py``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.videogen import (
    background_error,
    colour_of,
    damage_middle,
    make_clip,
    pattern_rgb,
    read_index,
)
from tracker.errors import (
    FrameError,
    SourceError,
    SourceNotAllowedError,
    SourceNotFoundError,
    SourceOptionError,
    SourceUnsupportedError,
)
from tracker.ingest import (
    EventKind,
    EventLog,
    Frame,
    FrameBuffer,
    PushSource,
    SourcePolicy,
    open_source,
    parse_source,
    quarter_turns,
    redact,
)

pytestmark = pytest.mark.timeout(120)


def _frame(index: int) -> Frame:
    return Frame(index, None, time.time(), np.zeros((2, 2, 3), np.uint8), (2, 2))


def _has_encoder(name: str) -> bool:
    return name in av.codecs_available


# --------------------------------------------------------------------------- source strings


@pytest.mark.parametrize(
    ("uri", "kind", "scheme", "location", "mode", "reconnect"),
    [
        ("clip.mp4", "file", "file", "clip.mp4", "file", False),
        ("file:///data/clip.mp4", "file", "file", "/data/clip.mp4", "file", False),
        ("file:clips/a%20b.mp4", "file", "file", "clips/a%20b.mp4", "file", False),
        ("images:/data/frames", "images", "images", "/data/frames", "file", False),
        ("rtsp://u:p@10.0.0.5:554/stream", "rtsp", "rtsp", "rtsp://u:p@10.0.0.5:554/stream", "live", True),
        ("rtsps://cam.local/x", "rtsp", "rtsps", "rtsps://cam.local/x", "live", True),
        ("http://h/v.mp4", "http", "http", "http://h/v.mp4", "live", True),
        ("https://h/live/index.M3U8?token=1", "hls", "https", "https://h/live/index.M3U8?token=1", "live", True),
        ("udp://127.0.0.1:5000", "udp", "udp", "udp://127.0.0.1:5000", "live", True),
        ("udp://@:5000", "udp", "udp", "udp://@:5000", "live", True),
        ("rtp://127.0.0.1:5004", "rtp", "rtp", "rtp://127.0.0.1:5004", "live", True),
        ("rtmp://h/live/key", "rtmp", "rtmp", "rtmp://h/live/key", "live", True),
        ("/dev/video0", "v4l2", "v4l2", "/dev/video0", "live", True),
        ("v4l2:///dev/video2", "v4l2", "v4l2", "/dev/video2", "live", True),
        ("v4l2:1", "v4l2", "v4l2", "/dev/video1", "live", True),
        ("push:robot1", "push", "push", "robot1", "live", False),
    ],
)
def test_parse_source_kinds(uri: str, kind: str, scheme: str, location: str, mode: str, reconnect: bool) -> None:
    spec = parse_source(uri)
    if kind in ("file", "images"):  # a path is made absolute and resolved once: the path checked is the path opened
        location = str(Path(location).resolve())
    assert (spec.kind, spec.scheme, spec.location, spec.mode, spec.reconnect) == (kind, scheme, location, mode, reconnect)
    assert spec.rtsp_transport == ("tcp" if kind == "rtsp" else None)


def test_parse_source_directory_is_an_image_folder(tmp_path: Path) -> None:
    assert parse_source(str(tmp_path)).kind == "images"
    assert parse_source(f"file://{tmp_path}").kind == "images"


def test_parse_source_options_from_strings() -> None:
    """A CLI passes key=value strings; they mean the same as typed values."""
    spec = parse_source("rtsp://cam/s", mode="file", timeout_s="2.5", rtsp_transport="UDP", resize="640x360",
                        preprocess="clahe, denoise", reconnect="false", max_backoff_s=3, reconnect_attempts="4")
    assert (spec.mode, spec.timeout_s, spec.rtsp_transport, spec.resize_wh, spec.max_side) == ("file", 2.5, "udp", (640, 360), None)
    assert (spec.preprocess, spec.reconnect, spec.max_backoff_s, spec.reconnect_attempts) == (("clahe", "denoise"), False, 3.0, 4)
    assert parse_source("a.mp4", resize=1024).max_side == 1024
    assert parse_source("a.mp4", resize="512").max_side == 512
    assert parse_source("a.mp4", resize=(320, 240)).resize_wh == (320, 240)
    assert parse_source("a.mp4", realtime="1", mode="live").realtime is True
    tls = parse_source("rtsps://cam/s", ca_file="/etc/ssl/cam.pem")
    assert (tls.tls_verify, tls.ca_file) == (True, "/etc/ssl/cam.pem")
    assert parse_source("https://h/a.mp4").tls_verify is False
    cam = parse_source("/dev/video0", size="1280x720", fps=30, input_format="mjpeg")
    assert (cam.capture_size_wh, cam.fps, cam.input_format) == ((1280, 720), 30.0, "mjpeg")


@pytest.mark.parametrize(
    ("uri", "options", "error", "message"),
    [
        ("ftp://h/a.mp4", {}, SourceUnsupportedError,
         "unsupported source ftp://h/a.mp4: unknown scheme 'ftp:'; use a file path, a folder of JPEG/PNG frames, "
         "rtsp://, http(s)://, udp://, rtp://, rtmp://, /dev/videoN or push:NAME"),
        ("a.mp4", {"speed": 2}, SourceOptionError,
         "unknown source option 'speed' for a.mp4: use one of mode, timeout_s, rtsp_transport, resize, preprocess, "
         "reconnect, max_backoff_s, reconnect_attempts, realtime, buffer_frames, size, fps, input_format, "
         "autorotate, tls_verify, ca_file, av_options"),
        ("http://h/a.mp4", {"tls_verify": True}, SourceError,
         "tls_verify and ca_file apply to https://, rtsps:// and rtmps:// sources only, not to http://h/a.mp4"),
        ("a.mp4", {"mode": "fast"}, SourceOptionError, "mode must be 'live' or 'file' for a.mp4, not 'fast'"),
        ("a.mp4", {"rtsp_transport": "tcp"}, SourceError, "rtsp_transport applies to rtsp:// sources only, not to a.mp4"),
        ("rtsp://h/s", {"rtsp_transport": "sctp"}, SourceOptionError,
         "rtsp_transport must be one of tcp, udp, udp_multicast, http, https for rtsp://h/s, not 'sctp'"),
        ("a.mp4", {"resize": "big"}, SourceOptionError,
         "resize must be (width, height) or 'WxH' with integers in [1, 8192] for a.mp4, not 'big'"),
        ("a.mp4", {"preprocess": ["clahe", "sharpen"]}, SourceOptionError,
         "unknown preprocess step 'sharpen' for a.mp4: use any of clahe, denoise, denoise_nlm"),
        ("a.mp4", {"reconnect": True}, SourceError, "reconnect applies to network sources and cameras, not to a.mp4"),
        ("a.mp4", {"timeout_s": 0}, SourceOptionError, "timeout_s must be a number in (0, 3600] for a.mp4, not 0"),
        ("udp://127.0.0.1", {}, SourceUnsupportedError,
         "unsupported source udp://127.0.0.1: udp:// needs a port, e.g. udp://127.0.0.1:5000"),
        ("rtsp://u:secret@/s", {}, SourceUnsupportedError, "unsupported source rtsp://u:***@/s: the URL has no host"),
        ("push:", {}, SourceUnsupportedError,
         "push: needs a name of letters, digits, '_', '.', '-' (at most 64), e.g. push:robot1 (got 'push:')"),
        ("", {}, SourceError, "empty source: use a file path, a folder of JPEG/PNG frames, rtsp://, http(s)://, "
         "udp://, rtp://, rtmp://, /dev/videoN or push:NAME"),
    ],
)
def test_parse_source_errors(uri: str, options: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        parse_source(uri, **options)
    assert str(caught.value) == message
    assert type(caught.value) is error


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("rtsp://admin:hunter2@10.0.0.5:554/live", "rtsp://admin:***@10.0.0.5:554/live"),
        ("rtsp://admin:p@ss:w?rd#x@cam/live", "rtsp://admin:***@cam/live"),
        ("https://TOKEN123@example.org/v.m3u8", "https://***@example.org/v.m3u8"),
        ("http://h/v.m3u8?user=bob&password=pw&x=1", "http://h/v.m3u8?user=bob&password=***&x=1"),
        ("https://h/s.m3u8?token=abc#t", "https://h/s.m3u8?token=***#t"),
        ("http://h/path/with@sign.mp4", "http://h/path/with@sign.mp4"),
        ("/videos/user:pw@x.mp4", "/videos/user:pw@x.mp4"),
        ("rtsp://cam/live", "rtsp://cam/live"),
    ],
)
def test_redact_examples(uri: str, shown: str) -> None:
    assert redact(uri) == shown


_PASSWORDS = st.text(alphabet=st.characters(blacklist_characters="/", min_codepoint=33, max_codepoint=0x2FF),
                     min_size=4, max_size=24)


@settings(max_examples=300, deadline=None)
@given(password=_PASSWORDS, scheme=st.sampled_from(["rtsp", "rtsps", "http", "https", "rtmp"]),
       path=st.sampled_from(["/", "/live/stream", "/a.m3u8?x=1"]))
def test_redact_never_shows_the_password(password: str, scheme: str, path: str) -> None:
    uri = f"{scheme}://user:{password}@cam.example:554{path}"
    assert redact(uri) == f"{scheme}://user:***@cam.example:554{path}"


def test_spec_repr_and_display_hide_credentials() -> None:
    spec = parse_source("rtsp://admin:hunter2@cam/live")
    assert "hunter2" not in repr(spec) and "hunter2" not in spec.display
    assert spec.location == "rtsp://admin:hunter2@cam/live"  # the reader still needs it


# --------------------------------------------------------------------------- allowlist


def test_policy_schemes_hosts_devices_options() -> None:
    policy = SourcePolicy(schemes=frozenset({"rtsp", "https", "v4l2", "push"}),
                          hosts=("cam1.lan", "*.cams.example", "10.1.0.0/16"), devices=("/dev/video0",))
    for ok in ["rtsp://cam1.lan/s", "rtsp://u:p@CAM1.lan/s", "rtsp://a.cams.example/s", "rtsp://10.1.2.3/s",
               "https://x.cams.example/a.m3u8", "/dev/video0", "push:bot"]:
        policy.check(parse_source(ok))
    refusals = {
        "http://cam1.lan/s": "source http://cam1.lan/s not allowed: scheme 'http' is not allowed here "
                             "(allowed: https, push, rtsp, v4l2)",
        "rtsp://u:pw@evil.lan/s": "source rtsp://u:***@evil.lan/s not allowed: host 'evil.lan' is not allowed here",
        "rtsp://cams.example/s": "source rtsp://cams.example/s not allowed: host 'cams.example' is not allowed here",
        "rtsp://10.2.0.1/s": "source rtsp://10.2.0.1/s not allowed: host '10.2.0.1' is not allowed here",
        "/dev/video1": "source /dev/video1 not allowed: device /dev/video1 is not allowed here",
    }
    for uri, message in refusals.items():
        with pytest.raises(SourceNotAllowedError) as caught:
            policy.check(parse_source(uri))
        assert str(caught.value) == message
    with pytest.raises(SourceNotAllowedError, match=r"raw FFmpeg options \(av_options\) are not accepted here$"):
        policy.check(parse_source("rtsp://cam1.lan/s", av_options={"protocol_whitelist": "file"}))
    with pytest.raises(SourceNotAllowedError, match=r"ca_file \(a path on this server\) is not accepted here$"):
        policy.check(parse_source("https://x.cams.example/a.m3u8", ca_file="/etc/shadow"))


def test_policy_directories_refuse_dotdot_and_symlink_escapes(tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    (allowed / "sub").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "x.mp4").write_bytes(b"")
    (allowed / "sub" / "ok.mp4").write_bytes(b"")
    (allowed / "link.mp4").symlink_to(outside / "x.mp4")
    (allowed / "linkdir").symlink_to(outside)
    policy = SourcePolicy(schemes=frozenset({"file", "images"}), directories=(allowed,))
    policy.check(parse_source(str(allowed / "sub" / "ok.mp4")))
    policy.check(parse_source(str(allowed / "sub" / ".." / "sub" / "ok.mp4")))
    policy.check(parse_source(f"images:{allowed / 'sub'}"))
    for escape in [allowed / ".." / "secret" / "x.mp4", allowed / "link.mp4", allowed / "linkdir" / "x.mp4",
                   allowed / "linkdir"]:
        with pytest.raises(SourceNotAllowedError) as caught:
            policy.check(parse_source(str(escape)))
        assert str(caught.value) == f"source {escape} not allowed: the path is outside the allowed folders"


def test_open_source_with_policy_refuses_frame_files_linking_out(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "00000.png"), pattern_rgb(0, 32, 32))
    cv2.imwrite(str(tmp_path / "private.png"), pattern_rgb(1, 32, 32))
    (frames / "00001.png").symlink_to(tmp_path / "private.png")
    policy = SourcePolicy(schemes=frozenset({"images"}), directories=(frames,))
    message = f"source {frames} not allowed: a frame file links outside the allowed folders"
    with pytest.raises(SourceNotAllowedError) as caught:
        policy.check(parse_source(str(frames)))
    assert str(caught.value) == message
    with pytest.raises(SourceNotAllowedError) as caught:
        open_source(str(frames), policy=policy)
    assert str(caught.value) == message
    with pytest.raises(SourceNotAllowedError, match="scheme 'rtsp' is not allowed here"):
        open_source("rtsp://127.0.0.1:9/x", policy=policy)


# --------------------------------------------------------------------------- delivery (no I/O)


def test_frame_buffer_newest_replaces_and_counts_drops() -> None:
    buffer = FrameBuffer(capacity=8, keep_newest=True)
    for i in range(3):
        assert buffer.put(_frame(i))
    assert len(buffer) == 1
    assert buffer.get(0).index == 2
    assert buffer.get(0) is None  # nothing newer than the delivered frame
    stats = buffer.stats_snapshot()
    assert (stats.decoded, stats.delivered, stats.dropped) == (3, 1, 2)
    buffer.put(_frame(3))
    buffer.finish()
    assert buffer.get(None).index == 3  # frames decoded before the end are still delivered
    assert buffer.get(None) is None and buffer.done


def test_frame_buffer_every_frame_is_bounded_and_ordered() -> None:
    buffer = FrameBuffer(capacity=2, keep_newest=False)
    put_done = [threading.Event() for _ in range(5)]

    def produce() -> None:
        for i in range(5):
            buffer.put(_frame(i))
            put_done[i].set()
        buffer.finish()

    producer = threading.Thread(target=produce)
    producer.start()
    assert put_done[1].wait(5)
    assert not put_done[2].wait(0.2)  # full: the producer waits for the consumer
    got = [buffer.get(5).index for _ in range(5)]
    producer.join(5)
    assert got == [0, 1, 2, 3, 4] and buffer.peak_fill == 2
    assert buffer.stats_snapshot().dropped == 0


def test_frame_buffer_close_releases_a_blocked_producer() -> None:
    buffer = FrameBuffer(capacity=1, keep_newest=False)
    buffer.put(_frame(0))
    result: list[bool] = []
    producer = threading.Thread(target=lambda: result.append(buffer.put(_frame(1))))
    producer.start()
    buffer.close()
    producer.join(5)
    assert result == [False] and buffer.get(0) is None


def test_event_log_wait_and_drain() -> None:
    seen = []
    log = EventLog(maxlen=4, callback=seen.append)
    threading.Timer(0.05, log.emit, (EventKind.DROPPED, "gone", 7)).start()
    event = log.wait_for("dropped", timeout=5)
    assert event is not None and (event.kind, event.message, event.next_index, event.seq) == (EventKind.DROPPED, "gone", 7, 0)
    log.emit(EventKind.RECONNECTED, "back", 7, attempts=2)
    assert [e.kind for e in log.drain()] == [EventKind.DROPPED, EventKind.RECONNECTED]
    assert log.drain() == [] and len(seen) == 2
    assert log.wait_for("ended", timeout=0.01) is None


def test_quarter_turns_follow_ffmpeg_display_matrix_sign() -> None:
    assert [quarter_turns(r) for r in (0, 90, -90, 180, -180, 270, 89.6)] == [0, 1, 3, 2, 2, 3, 1]


# --------------------------------------------------------------------------- real encoded clips

CODEC_CASES = [
    # (file name, encoder, pixel format, size (h, w), colour tolerance)
    ("h264.mp4", "libx264", "yuv420p", (96, 128), 8),
    ("h264.mkv", "libx264", "yuv420p", (96, 128), 8),
    ("vp8.webm", "libvpx", "yuv420p", (96, 128), 8),
    ("vp9.webm", "libvpx-vp9", "yuv420p", (96, 128), 8),
    ("mpeg4.avi", "mpeg4", "yuv420p", (96, 128), 12),
    ("h264.ts", "libx264", "yuv420p", (96, 128), 8),
    ("hevc.mov", "libx265", "yuv420p", (96, 128), 8),
    ("av1.mkv", "libsvtav1", "yuv420p", (96, 128), 8),
    ("mjpeg.avi", "mjpeg", "yuvj420p", (96, 128), 8),
    ("h264_fullrange.mp4", "libx264", "yuvj420p", (96, 128), 8),
    ("h264_10bit.mp4", "libx264", "yuv420p10le", (96, 128), 8),
    ("hevc_10bit.mkv", "libx265", "yuv420p10le", (96, 128), 8),
    ("odd_vp9.webm", "libvpx-vp9", "yuv420p", (239, 321), 8),
    ("odd_h264_444.mp4", "libx264", "yuv444p", (239, 321), 8),
    ("odd_mpeg4.mp4", "mpeg4", "yuv420p", (239, 321), 12),
]


@pytest.mark.parametrize(("name", "codec", "pix_fmt", "size_hw", "tolerance"), CODEC_CASES,
                         ids=[c[0] for c in CODEC_CASES])
def test_file_mode_delivers_every_frame_in_order(tmp_path: Path, name: str, codec: str, pix_fmt: str,
                                                 size_hw: tuple[int, int], tolerance: float) -> None:
    if not _has_encoder(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder")
    clip = make_clip(tmp_path / name, codec, n_frames=24, size_hw=size_hw, pix_fmt=pix_fmt, gop=8)
    with open_source(str(clip.path)) as source:
        assert source.size == size_hw and source.fps == 25.0 and source.mode == "file"
        frames = list(source)
        stats = source.stats
        events = source.events.snapshot()
    assert [f.index for f in frames] == list(range(24))
    assert [read_index(f.image_rgb) for f in frames] == list(range(24))
    pts = np.array([f.pts_s for f in frames])
    np.testing.assert_allclose(pts - pts[0], clip.pts_s, atol=2e-3)
    for i, frame in enumerate(frames):
        assert frame.image_rgb.shape == (*size_hw, 3) and frame.image_rgb.dtype == np.uint8
        assert frame.image_rgb.flags.c_contiguous and frame.source_size == size_hw
        assert background_error(frame.image_rgb, i) <= tolerance, (i, colour_of(i))
    assert (stats.decoded, stats.delivered, stats.dropped, stats.decode_errors) == (24, 24, 0, 0)
    assert [e.kind for e in events] == [EventKind.ENDED]


def test_variable_frame_rate_keeps_source_timestamps(tmp_path: Path) -> None:
    times = [0.0, 0.040, 0.100, 0.133, 0.300, 0.310, 0.500, 0.900, 0.950, 1.700]
    clip = make_clip(tmp_path / "vfr.mp4", "libx264", n_frames=len(times), pts_s=times, gop=4)
    with open_source(str(clip.path)) as source:
        frames = list(source)
    assert [read_index(f.image_rgb) for f in frames] == list(range(len(times)))
    np.testing.assert_allclose([f.pts_s for f in frames], times, atol=1e-3)


@pytest.mark.parametrize("name", ["h264.mp4", "h264.ts", "mpeg4.avi", "h264.mkv"])
def test_damaged_middle_is_skipped_and_counted(tmp_path: Path, name: str) -> None:
    codec = "mpeg4" if name.endswith(".avi") else "libx264"
    clip = make_clip(tmp_path / name, codec, n_frames=60, gop=10)
    damage_middle(clip.path, fraction=0.5, length=max(200, clip.path.stat().st_size // 30))
    with open_source(str(clip.path)) as source:
        frames = list(source)  # must end cleanly, not raise
        stats = source.stats
        events = source.events.snapshot()
    assert [e.kind for e in events] == [EventKind.ENDED]
    assert [f.index for f in frames] == list(range(len(frames)))
    assert stats.corrupt + stats.decode_errors >= 1 or len(frames) < 60
    shown = [read_index(f.image_rgb) for f in frames]
    assert shown[:10] == list(range(10))  # before the damage: exact
    assert shown[-10:] == list(range(50, 60))  # after the next keyframe: exact again
    for frame in frames[:10] + frames[-10:]:
        assert background_error(frame.image_rgb, read_index(frame.image_rgb)) <= 12
    assert 30 <= len(frames) <= 60


def test_resize_on_decode_keeps_source_size(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", "libx264", n_frames=6, size_hw=(96, 128))
    with open_source(str(clip.path), resize=(64, 48)) as source:
        frames = list(source)
    assert all(f.image_rgb.shape == (48, 64, 3) and f.source_size == (96, 128) for f in frames)
    assert [read_index(f.image_rgb) for f in frames] == list(range(6))
    assert max(background_error(f.image_rgb, i) for i, f in enumerate(frames)) <= 8
    with open_source(str(clip.path), resize=64) as source:
        assert next(source).image_rgb.shape == (48, 64, 3)
    with open_source(str(clip.path), resize=4096) as source:  # a longest side never enlarges
        assert next(source).image_rgb.shape == (96, 128, 3)


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_display_rotation_is_applied(tmp_path: Path, rotation: int) -> None:
    clip = make_clip(tmp_path / "rot.mp4", "libx264", n_frames=4, size_hw=(96, 128), rotation=rotation)
    with open_source(str(clip.path), autorotate=False) as source:
        raw = [f.image_rgb for f in source]
    with open_source(str(clip.path)) as source:
        upright_hw = (128, 96) if rotation % 180 else (96, 128)
        assert source.size == upright_hw
        frames = list(source)
    for frame, stored in zip(frames, raw):
        assert frame.source_size == upright_hw
        np.testing.assert_array_equal(frame.image_rgb, np.rot90(stored, quarter_turns(rotation)))
    with open_source(str(clip.path), resize=(48, 64)) as source:  # (w, h) of the upright frame
        assert next(source).image_rgb.shape == (64, 48, 3)
    if shutil.which("ffmpeg"):  # the same picture a player shows: ffmpeg's autorotate
        h, w = upright_hw
        raw_ffmpeg = subprocess.run(["ffmpeg", "-v", "error", "-i", str(clip.path), "-frames:v", "1", "-f", "rawvideo",
                                     "-pix_fmt", "rgb24", "-"], capture_output=True, check=True, timeout=30).stdout
        reference = np.frombuffer(raw_ffmpeg, np.uint8).reshape(h, w, 3)
        assert np.abs(reference.astype(int) - frames[0].image_rgb.astype(int)).mean() < 1.0


def test_image_folder_in_sam2_order_with_a_broken_file(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    pictures = [pattern_rgb(i, 48, 64) for i in range(12)]
    for i, picture in enumerate(pictures):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    (folder / "5.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    with open_source(str(folder), fps=10) as source:
        assert source.size == (48, 64) and source.mode == "file"
        frames = list(source)
        stats = source.stats
    assert [f.index for f in frames] == [i for i in range(12) if i != 5]  # "10" sorts after "9"
    for frame in frames:
        np.testing.assert_array_equal(frame.image_rgb, pictures[frame.index])  # PNG: lossless
        assert frame.pts_s == pytest.approx(frame.index / 10)
    assert stats.decode_errors == 1


def test_image_folder_jpeg_with_resize(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i:05d}.jpg"), cv2.cvtColor(pattern_rgb(i, 96, 128), cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
    with open_source(f"images:{tmp_path}", resize=(64, 48)) as source:
        frames = list(source)
    assert [read_index(f.image_rgb) for f in frames] == [0, 1, 2]
    assert all(f.image_rgb.shape == (48, 64, 3) and f.source_size == (96, 128) for f in frames)
    assert all(f.pts_s is None for f in frames)


# --------------------------------------------------------------------------- errors a user can act on


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_errors_name_the_source_and_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceNotFoundError) as caught:
        open_source(str(missing))
    assert str(caught.value) == f"source not found: {missing} (no such file)"

    text = tmp_path / "notes.mp4"
    text.write_text("hello, not a video\n" * 50)
    with pytest.raises(SourceUnsupportedError) as caught:
        open_source(str(text))
    assert str(caught.value) == (f"cannot read {text}: not a video file FFmpeg can read "
                                 "(Invalid data found when processing input)")

    audio = _audio_only(tmp_path / "sound.m4a")
    with pytest.raises(SourceUnsupportedError) as caught:
        open_source(str(audio))
    assert str(caught.value) == f"cannot read {audio}: it has no video stream (streams: audio:aac)"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceUnsupportedError) as caught:
        open_source(str(empty))
    assert str(caught.value) == f"cannot read {empty}: the folder has no .jpg, .jpeg or .png frames"

    with pytest.raises(SourceNotFoundError) as caught:
        open_source(f"images:{tmp_path / 'gone'}")
    assert str(caught.value) == f"source not found: images:{tmp_path / 'gone'} (no such folder)"

    garbled = make_clip(tmp_path / "garbled.mp4", "libx264", n_frames=10).path
    data = bytearray(garbled.read_bytes())
    mdat = data.find(b"mdat") + 4  # every coded picture replaced by noise; the index (moov) stays valid
    end = mdat - 8 + int.from_bytes(data[mdat - 8:mdat - 4], "big")
    data[mdat:end] = np.random.default_rng(1).integers(0, 256, end - mdat, dtype=np.uint8).tobytes()
    garbled.write_bytes(bytes(data))
    with pytest.raises(SourceUnsupportedError) as caught:
        open_source(str(garbled))
    assert str(caught.value).startswith(f"cannot read {garbled}: none of its h264 video decodes (")

    with pytest.raises(SourceNotFoundError) as caught:
        open_source("/dev/video99")
    assert str(caught.value) == ("source not found: /dev/video99 (no such camera; list cameras with "
                                 "`v4l2-ctl --list-devices`)")


# --------------------------------------------------------------------------- delivery policies on real decoding


def test_file_mode_runs_ahead_in_a_bounded_queue(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", "libx264", n_frames=40)
    with open_source(str(clip.path), buffer_frames=3) as source:
        got = []
        for frame in source:
            time.sleep(0.003)  # a model slower than the decoder
            got.append(read_index(frame.image_rgb))
        assert source._buffer.peak_fill == 3  # ran ahead, but never further than allowed
    assert got == list(range(40))


def test_live_mode_gives_the_newest_frame_to_a_slow_consumer(tmp_path: Path) -> None:
    """A file in live mode decodes far faster than this consumer: it must see only the newest frames."""
    clip = make_clip(tmp_path / "fast.mp4", "libx264", n_frames=240, size_hw=(48, 64), gop=30)
    delivered = []
    drops_seen = []
    with open_source(str(clip.path), mode="live") as source:
        while True:
            decoded_before = source.stats.decoded
            frame = source.get_latest(timeout=10)
            if frame is None:
                break
            # the newest frame at the time of asking, or a newer one
            assert frame.index >= decoded_before - 1
            assert read_index(frame.image_rgb) == frame.index
            delivered.append(frame.index)
            drops_seen.append(source.stats.dropped)
            time.sleep(0.01)
        stats = source.stats
        assert source.ended and source._buffer.peak_fill == 1
    assert delivered == sorted(set(delivered)) and delivered[-1] == 239
    assert stats.dropped > 0 and drops_seen == sorted(drops_seen)
    assert stats.decoded == stats.delivered + stats.dropped == 240


def test_live_push_memory_stays_flat_under_a_slow_consumer() -> None:
    """300 pushed 720p frames (830 MB if queued) against a consumer taking ~1 in 10."""
    source = PushSource("bench")
    pictures = [np.full((720, 1280, 3), v, np.uint8) for v in (10, 200)]
    pushed = 0
    finished = threading.Event()

    def produce() -> None:
        nonlocal pushed
        for i in range(300):
            source.push(pictures[i % 2], pts_s=i / 30)
            pushed = i + 1
        source.end()
        finished.set()

    process = psutil.Process()
    rss_before = process.memory_info().rss
    producer = threading.Thread(target=produce)
    producer.start()
    peak_rss = rss_before
    got = []
    try:
        for frame in source:
            pushed_before = pushed
            got.append(frame.index)
            assert frame.index >= pushed_before - 2
            peak_rss = max(peak_rss, process.memory_info().rss)
            time.sleep(0.02)
    finally:
        producer.join(30)
        source.close()
    stats = source.stats
    assert finished.is_set() and got == sorted(set(got)) and got[-1] == 299
    assert stats.dropped > 100 and stats.decoded == 300 == stats.delivered + stats.dropped
    assert peak_rss - rss_before < 100 * 2**20


def test_realtime_paces_a_file_like_a_camera(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", "libx264", n_frames=12, fps=25)
    started = time.monotonic()
    with open_source(str(clip.path), realtime=True) as source:
        frames = list(source)
    elapsed = time.monotonic() - started
    assert len(frames) == 12 and elapsed >= 0.9 * 11 / 25
    gaps = np.diff([f.arrival_s for f in frames])
    assert np.median(gaps) == pytest.approx(0.04, abs=0.02)


def test_close_stops_the_decoder_thread(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", "libx264", n_frames=60)
    source = open_source(str(clip.path), buffer_frames=2)
    first = next(source)
    source.close()
    source.close()
    assert first.index == 0 and source.closed
    assert source._thread is not None and not source._thread.is_alive()
    assert list(source) == [] and source.get_latest(0) is None


# --------------------------------------------------------------------------- asyncio


def test_aiter_does_not_block_the_event_loop(tmp_path: Path) -> None:
    """Frames 200 ms apart: a consumer that blocked the loop while waiting would stall the heartbeat that long."""
    clip = make_clip(tmp_path / "c.mp4", "libx264", n_frames=5, fps=5)

    async def main() -> tuple[list[int], float]:
        ticks: list[float] = []
        stop = asyncio.Event()

        async def heartbeat() -> None:
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        beat = asyncio.create_task(heartbeat())
        got = []
        with open_source(str(clip.path), realtime=True) as source:
            async for frame in source.aiter():
                got.append(read_index(frame.image_rgb))
        stop.set()
        await beat
        return got, float(np.diff(ticks).max())

    got, worst_gap = asyncio.run(main())
    assert got == list(range(5))
    assert worst_gap < 0.15  # the loop kept running while frames were awaited


def test_aiter_raises_the_error_that_stopped_the_source() -> None:
    source = PushSource("a")

    async def consume() -> list[int]:
        got = []
        async for frame in source:
            got.append(frame.index)
            if frame.index == 1:
                source._fail(SourceError("camera on fire"))
        return got

    source.push(np.zeros((4, 4, 3), np.uint8))

    async def main() -> list[int]:
        task = asyncio.create_task(consume())
        await asyncio.sleep(0)
        source.push(np.zeros((4, 4, 3), np.uint8))
        return await task

    with pytest.raises(SourceError, match="camera on fire"):
        asyncio.run(main())


# --------------------------------------------------------------------------- push sources and preprocessing


def test_push_source_policy_and_errors() -> None:
    events = []
    source = open_source("push:robot1", on_event=events.append)
    assert isinstance(source, PushSource) and source.name == "robot1"
    picture = pattern_rgb(3, 32, 48)
    assert source.push(picture, pts_s=1.5)
    picture[:] = 0  # the caller may reuse its buffer
    frame = source.get_latest(1)
    assert frame is not None and (frame.index, frame.pts_s, frame.source_size) == (0, 1.5, (32, 48))
    assert read_index(frame.image_rgb) == 3
    with pytest.raises(FrameError) as caught:
        source.push(np.zeros((32, 48), np.uint8))
    assert str(caught.value) == ("push source robot1: image_rgb must be an H x W x 3 uint8 array, "
                                 "got shape (32, 48) dtype uint8")
    source.end()
    assert list(source) == [] and [e.kind for e in events] == [EventKind.ENDED]
    assert not source.push(picture)
    closed = PushSource("x")
    closed.close()
    assert not closed.push(picture)


def test_push_source_resizes_on_the_pushing_thread() -> None:
    with PushSource("r", resize=(64, 48)) as source:
        source.push(pattern_rgb(9, 96, 128))
        frame = source.get_latest(1)
    assert frame.image_rgb.shape == (48, 64, 3) and frame.source_size == (96, 128)
    assert read_index(frame.image_rgb) == 9


def test_preprocess_clahe_and_denoise_do_their_job() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:160]
    dim = (100 + 12 * np.sin(xx / 9.0) * np.cos(yy / 7.0))[..., None].repeat(3, axis=2)
    dim_rgb = np.clip(dim, 0, 255).astype(np.uint8)
    noisy_rgb = np.clip(128 + rng.normal(0, 20, (120, 160, 3)), 0, 255).astype(np.uint8)
    with PushSource("p", preprocess=["clahe"]) as source:
        source.push(dim_rgb)
        assert source.get_latest(1).image_rgb.std() > 2.0 * dim_rgb.std()
    with PushSource("p", preprocess="denoise") as source:
        source.push(noisy_rgb)
        assert source.get_latest(1).image_rgb.std() < 0.7 * noisy_rgb.std()


def test_a_crashing_reader_fails_visibly_without_leaking_credentials(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected exception in the decode thread ends the stream with a SourceError, password scrubbed."""
    from tracker.sources.base import ThreadedSource

    class Boom(ThreadedSource):
        def _run(self) -> None:
            raise OSError(f"[Errno 5] Input/output error: '{self.spec.uri}'")

    source = Boom(parse_source("rtsp://op:pw-999@127.0.0.1:9/cam"))
    source._start()
    with pytest.raises(SourceError) as caught:
        next(source)
    assert str(caught.value) == ("reading rtsp://op:***@127.0.0.1:9/cam failed: OSError: "
                                 "[Errno 5] Input/output error: 'rtsp://op:***@127.0.0.1:9/cam'")
    assert [e.kind for e in source.events] == [EventKind.FAILED]
    assert "pw-999" not in caplog.text and "rtsp://op:***@" in caplog.text


def test_a_failing_event_callback_does_not_stop_the_source(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", "libx264", n_frames=5)

    def broken(event: object) -> None:
        raise RuntimeError("consumer bug")

    with open_source(str(clip.path), on_event=broken) as source:
        assert len(list(source)) == 5
        assert [e.kind for e in source.events] == [EventKind.ENDED]


def test_ffmpeg_options_per_kind() -> None:
    """Timeouts in FFmpeg's units and names per protocol; latency flags only where live."""
    from tracker.sources.av_reader import ffmpeg_options

    rtsp = ffmpeg_options(parse_source("rtsp://cam/s", timeout_s=2.5, rtsp_transport="udp"))
    assert (rtsp["rtsp_transport"], rtsp["timeout"], rtsp["fflags"], rtsp["max_delay"]) == ("udp", "2500000", "nobuffer", "500000")
    rtmp = ffmpeg_options(parse_source("rtmp://h/live/k", timeout_s=3))
    assert rtmp["rw_timeout"] == "3000000" and "timeout" not in rtmp  # rtmp's "timeout" would make it listen
    http_file = ffmpeg_options(parse_source("https://h/a.mp4", mode="file", ca_file="/ca.pem"))
    assert (http_file["rw_timeout"], http_file["tls_verify"], http_file["ca_file"]) == ("10000000", "1", "/ca.pem")
    assert "fflags" not in http_file  # file mode keeps every packet
    udp = ffmpeg_options(parse_source("udp://@:5000", timeout_s=1))
    assert (udp["timeout"], udp["overrun_nonfatal"], udp["protocol_whitelist"]) == ("1000000", "1", "udp")
    cam = ffmpeg_options(parse_source("/dev/video0", size="640x480", fps=30, input_format="mjpeg"))
    assert (cam["video_size"], cam["framerate"], cam["input_format"], cam["fflags"]) == ("640x480", "30", "mjpeg", "nobuffer")
    assert ffmpeg_options(parse_source("a.mp4"))["protocol_whitelist"] == "file"
    assert ffmpeg_options(parse_source("https://h/x.m3u8"))["protocol_whitelist"] == "http,https,tcp,tls,crypto"
    assert ffmpeg_options(parse_source("rtsp://c/s", av_options={"timeout": "5"}))["timeout"] == "5"
