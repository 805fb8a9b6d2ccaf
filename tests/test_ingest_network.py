"""Network sources against real servers on 127.0.0.1, started and killed by these tests.

* RTSP: GStreamer's RTSP server (Debian: ``gir1.2-gst-rtsp-server-1.0``,
  ``python3-gi``, ``gstreamer1.0-plugins-ugly`` for x264) run by
  ``tests/servers/rtsp_server.py`` under the system Python.
* HTTP progressive and HLS: ``tests/servers/http_server.py`` on a thread.
* UDP and RTP MPEG-TS, RTMP: the ``ffmpeg`` CLI (Debian: ``ffmpeg``) as a live sender.

Every wait is bounded and event-driven where an event exists (``READY`` lines,
:meth:`EventLog.wait_for`); a test whose server software is missing is skipped
with the package to install.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.servers.http_server import serve_directory
from tests.servers.processes import FfmpegSender, RtspServer, ffmpeg_available, gstreamer_rtsp_available
from tests.videogen import background_error, free_port, make_clip, read_index
from tracker.errors import SourceConnectionError, SourceNotFoundError
from tracker.ingest import EventKind, Frame, VideoSource, open_source

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

RTSP_RGB = (200, 40, 60)
SENDER_RGB = (48, 80, 208)

needs_gstreamer = pytest.mark.skipif(
    not gstreamer_rtsp_available(),
    reason="GStreamer RTSP server missing: apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi "
           "gstreamer1.0-plugins-ugly (or run scripts/setup.sh)",
)
needs_ffmpeg = pytest.mark.skipif(not ffmpeg_available(), reason="ffmpeg CLI missing: apt-get install ffmpeg")


def take(source: VideoSource, n: int, timeout_s: float = 10.0, min_index: int = 0) -> list[Frame]:
    """``n`` frames with ``index >= min_index`` from a live source, each awaited at most ``timeout_s``.

    ``min_index`` skips a frame decoded before an outage that is still waiting
    in the newest-frame slot (its PTS belongs to the server's previous run).
    """
    frames: list[Frame] = []
    for _ in range(n + 1):
        while len(frames) < n:
            frame = source.get_latest(timeout_s)
            assert frame is not None, f"no frame within {timeout_s} s; events: {source.events.snapshot()}"
            if frame.index >= min_index:
                frames.append(frame)
            else:
                break
    assert len(frames) == n, "more than one stale frame"
    return frames


def colour_error(frame: Frame, rgb: tuple[int, int, int]) -> float:
    h, w = frame.image_rgb.shape[:2]
    centre = frame.image_rgb[h // 4: 3 * h // 4, w // 4: 3 * w // 4].reshape(-1, 3).mean(axis=0)
    return float(np.abs(centre - np.array(rgb)).max())


def assert_increasing(frames: list[Frame]) -> None:
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices)), indices
    pts = [f.pts_s for f in frames]
    assert all(b > a for a, b in zip(pts, pts[1:])), pts


# --------------------------------------------------------------------------- RTSP


@pytest.fixture(scope="module")
def rtsp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RtspServer]:
    if not gstreamer_rtsp_available():
        pytest.skip("GStreamer RTSP server missing: apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi")
    server = RtspServer(tmp_path_factory.mktemp("rtsp"), rgb=RTSP_RGB).start()
    try:
        yield server
    finally:
        server.stop()


@needs_gstreamer
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_live_frames(rtsp_server: RtspServer, transport: str) -> None:
    with open_source(rtsp_server.url(), rtsp_transport=transport, timeout_s=5) as source:
        assert source.size == (240, 320) and source.mode == "live" and source.spec.rtsp_transport == transport
        frames = take(source, 10)
        stats = source.stats
    assert_increasing(frames)
    assert all(colour_error(f, RTSP_RGB) <= 8 for f in frames)
    assert all(f.image_rgb.shape == (240, 320, 3) for f in frames)
    assert abs(time.time() - frames[-1].arrival_s) < 5
    assert stats.delivered == 10 and stats.decode_errors == 0 and stats.reconnects == 0


@needs_gstreamer
def test_rtsp_async_iteration_with_resize(rtsp_server: RtspServer) -> None:
    async def main() -> list[Frame]:
        got = []
        with open_source(rtsp_server.url(), resize=160, timeout_s=5) as source:
            async for frame in source.aiter():
                got.append(frame)
                if len(got) == 5:
                    break
        return got

    frames = asyncio.run(main())
    assert_increasing(frames)
    assert all(f.image_rgb.shape == (120, 160, 3) and f.source_size == (240, 320) for f in frames)


@needs_gstreamer
def test_rtsp_unknown_path_is_not_found(rtsp_server: RtspServer) -> None:
    url = f"rtsp://127.0.0.1:{rtsp_server.port}/nothing-here"
    with pytest.raises(SourceNotFoundError) as caught:
        open_source(url, timeout_s=5)
    assert str(caught.value) == f"source not found: {url} (the server answered 404 Not Found: check the path)"


@needs_gstreamer
def test_rtsp_close_is_prompt(rtsp_server: RtspServer) -> None:
    source = open_source(rtsp_server.url(), timeout_s=5)
    take(source, 2)
    started = time.monotonic()
    source.close()
    assert time.monotonic() - started < 3.0
    assert source._thread is not None and not source._thread.is_alive()


@needs_gstreamer
def test_rtsp_authentication(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = RtspServer(tmp_path, user="alice", password="s3cret-pw", rgb=RTSP_RGB).start()
    try:
        with pytest.raises(SourceConnectionError) as caught:
            open_source(server.url("alice", "wrong-pw"), timeout_s=5)
        assert str(caught.value) == (f"cannot connect to rtsp://alice:***@127.0.0.1:{server.port}/cam: "
                                     "authentication failed (check the user name and password in the URL)")
        with open_source(server.url("alice", "s3cret-pw"), timeout_s=5) as source:
            assert colour_error(take(source, 3)[-1], RTSP_RGB) <= 8
    finally:
        server.stop()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "wrong-pw" not in logged and "s3cret-pw" not in logged and "alice:***@" in logged


@needs_gstreamer
def test_rtsp_server_killed_and_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The camera dies mid-stream and comes back on the same port: frames keep coming, indices go on."""
    caplog.set_level(logging.INFO)
    server = RtspServer(tmp_path, user="op", password="pw-123", rgb=RTSP_RGB).start()
    try:
        with open_source(server.url("op", "pw-123"), timeout_s=2, max_backoff_s=0.5) as source:
            before = take(source, 5)
            server.kill()
            dropped = source.events.wait_for(EventKind.DROPPED, timeout=10)
            assert dropped is not None
            server.start()  # same port: it was bound by the first run
            back = source.events.wait_for(EventKind.RECONNECTED, timeout=30, after_seq=dropped.seq)
            assert back is not None, source.events.snapshot()
            after = take(source, 5, min_index=back.next_index)
            stats = source.stats
            messages = [e.message for e in source.events]
    finally:
        server.stop()
    assert_increasing(before)
    assert_increasing(after)
    assert after[0].index > before[-1].index and after[0].index >= back.next_index
    assert all(colour_error(f, RTSP_RGB) <= 8 for f in after)
    assert stats.reconnects == 1 and back.attempts >= 1
    shown = f"rtsp://op:***@127.0.0.1:{server.port}/cam"
    assert messages[:2] == [f"{shown} dropped: the server ended the stream", f"{shown} reconnected"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "pw-123" not in logged and shown in logged


@needs_gstreamer
def test_rtsp_server_gone_with_reconnect_off_is_an_end(tmp_path: Path) -> None:
    """Without reconnects the server going away is the end of the stream, as a BYE would be."""
    server = RtspServer(tmp_path, rgb=RTSP_RGB).start()
    try:
        with open_source(server.url(), timeout_s=2, reconnect=False) as source:
            take(source, 2)
            server.kill()
            ended = source.events.wait_for(EventKind.ENDED, timeout=10)
            assert ended is not None, source.events.snapshot()
            assert len(list(source)) <= 1  # at most the frame still in the slot; no error
    finally:
        server.stop()


@needs_gstreamer
def test_rtsp_server_gone_for_good_fails_after_the_attempts(tmp_path: Path) -> None:
    server = RtspServer(tmp_path, rgb=RTSP_RGB).start()
    try:
        source = open_source(server.url(), timeout_s=2, reconnect_attempts=2, max_backoff_s=0.2)
        take(source, 2)
        server.kill()
        failed = source.events.wait_for(EventKind.FAILED, timeout=20)
        assert failed is not None, source.events.snapshot()
        with pytest.raises(SourceConnectionError) as caught:
            for _ in range(10):  # at most the stale frame, then the error
                source.get_latest(5)
        source.close()
    finally:
        server.stop()
    shown = server.url()
    assert str(caught.value) == (f"{shown} dropped and did not come back after 2 reconnect attempts; last error: "
                                 f"cannot connect to {shown}: connection refused (is the server running and the port right?)")
    assert failed.attempts == 2 and [e.kind for e in source.events] == [EventKind.DROPPED, EventKind.FAILED]


def test_connection_refused_is_reported_at_once() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(SourceConnectionError) as caught:
        open_source(f"rtsp://127.0.0.1:{port}/cam", timeout_s=5)
    assert str(caught.value) == (f"cannot connect to rtsp://127.0.0.1:{port}/cam: connection refused "
                                 "(is the server running and the port right?)")
    assert time.monotonic() - started < 3.0


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung camera)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()
    accepted = []

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_silent_server_times_out(silent_server: int, scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{silent_server}/stream"
    started = time.monotonic()
    with pytest.raises(SourceConnectionError) as caught:
        open_source(url, timeout_s=1)
    elapsed = time.monotonic() - started
    assert str(caught.value) == (f"cannot connect to {url}: no answer within 1 s "
                                 "(check the host, the port and that the stream is running, or raise timeout_s)")
    assert 0.8 <= elapsed < 5.0


# --------------------------------------------------------------------------- HTTP and HLS


@pytest.fixture(scope="module")
def http_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("site")
    make_clip(root / "clip.mp4", "libx264", n_frames=30, gop=10)
    (root / "private").mkdir()
    make_clip(root / "private" / "clip.mp4", "libx264", n_frames=5)
    (root / "hls").mkdir()
    make_clip(root / "hls" / "index.m3u8", "libx264", n_frames=50, gop=12, container_format="hls",
              container_options={"hls_time": "0.5", "hls_list_size": "0", "hls_playlist_type": "vod",
                                 "hls_segment_filename": str(root / "hls" / "seg%03d.ts")})
    assert len(list((root / "hls").glob("seg*.ts"))) >= 3
    with serve_directory(root, user="bob", password="hunter2") as base_url:
        yield base_url


def test_http_progressive_file_mode_every_frame(http_site: str) -> None:
    with open_source(f"{http_site}/clip.mp4", mode="file", timeout_s=5) as source:
        frames = list(source)
    assert [read_index(f.image_rgb) for f in frames] == list(range(30))
    assert max(background_error(f.image_rgb, i) for i, f in enumerate(frames)) <= 8
    np.testing.assert_allclose([f.pts_s for f in frames], np.arange(30) / 25, atol=1e-3)


def test_http_progressive_live_mode_ends_at_end_of_file(http_site: str) -> None:
    with open_source(f"{http_site}/clip.mp4", timeout_s=5) as source:
        assert source.mode == "live"
        frames = list(source)
        assert source.events.wait_for(EventKind.ENDED, timeout=5) is not None
    # live mode drops what it cannot deliver (and fflags=nobuffer what arrived while probing),
    # but the newest frame at the end is the clip's last one
    assert frames and read_index(frames[-1].image_rgb) == 29


def test_hls_playlist_every_frame_in_order(http_site: str) -> None:
    with open_source(f"{http_site}/hls/index.m3u8", mode="file", timeout_s=5) as source:
        assert source.spec.kind == "hls"
        frames = list(source)
    assert [read_index(f.image_rgb) for f in frames] == list(range(50))
    pts = np.array([f.pts_s for f in frames])
    np.testing.assert_allclose(pts - pts[0], np.arange(50) / 25, atol=2e-3)


def test_http_authentication_and_not_found(http_site: str) -> None:
    host = http_site.removeprefix("http://")
    with pytest.raises(SourceConnectionError) as caught:
        open_source(f"http://bob:nope@{host}/private/clip.mp4", timeout_s=5)
    assert str(caught.value) == (f"cannot connect to http://bob:***@{host}/private/clip.mp4: authentication failed "
                                 "(check the user name and password in the URL)")
    with open_source(f"http://bob:hunter2@{host}/private/clip.mp4", mode="file", timeout_s=5) as source:
        assert [read_index(f.image_rgb) for f in source] == list(range(5))
    with pytest.raises(SourceNotFoundError) as caught:
        open_source(f"{http_site}/missing.mp4", timeout_s=5)
    assert str(caught.value) == (f"source not found: {http_site}/missing.mp4 "
                                 "(the server answered 404 Not Found: check the path)")


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI missing: apt-get install openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_https_with_a_self_signed_certificate(tmp_path: Path, self_signed: tuple[str, str]) -> None:
    cert, key = self_signed
    make_clip(tmp_path / "clip.mp4", "libx264", n_frames=6)
    with serve_directory(tmp_path, certfile=cert, keyfile=key) as base_url:
        url = f"{base_url}/clip.mp4"
        with open_source(url, mode="file", timeout_s=5) as source:  # FFmpeg's default: not verified
            assert [read_index(f.image_rgb) for f in source] == list(range(6))
        with pytest.raises(SourceConnectionError) as caught:
            open_source(url, mode="file", timeout_s=5, tls_verify=True)
        assert str(caught.value) == (
            f"cannot connect to {url}: TLS failed, most likely the server's certificate did not verify "
            "(pass ca_file=PATH for a private CA, or tls_verify=False for a self-signed camera)")
        with open_source(url, mode="file", timeout_s=5, ca_file=cert) as source:
            assert [read_index(f.image_rgb) for f in source] == list(range(6))


# --------------------------------------------------------------------------- UDP / RTP MPEG-TS, RTMP


@needs_ffmpeg
def test_udp_mpegts_sender_stops_and_comes_back(tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    sender = FfmpegSender(["-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"], tmp_path, rgb=SENDER_RGB)
    sender.start()
    try:
        with open_source(f"udp://127.0.0.1:{port}", timeout_s=1.5, max_backoff_s=0.5) as source:
            assert source.size == (120, 160)
            before = take(source, 5)
            sender.stop()  # silence: only the read timeout can notice
            dropped = source.events.wait_for(EventKind.DROPPED, timeout=10)
            assert dropped is not None
            assert dropped.message == f"udp://127.0.0.1:{port} dropped: no data within the read timeout"
            sender.start()
            back = source.events.wait_for(EventKind.RECONNECTED, timeout=30)
            assert back is not None, source.events.snapshot()
            after = take(source, 5, min_index=back.next_index)
    finally:
        sender.stop()
    assert_increasing(before)
    assert_increasing(after)
    assert after[0].index > before[-1].index
    assert all(colour_error(f, SENDER_RGB) <= 8 for f in before + after)


@needs_ffmpeg
def test_rtp_mpegts(tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    sender = FfmpegSender(["-f", "rtp_mpegts", f"rtp://127.0.0.1:{port}"], tmp_path, rgb=SENDER_RGB).start()
    try:
        with open_source(f"rtp://127.0.0.1:{port}", timeout_s=3) as source:
            frames = take(source, 5)
    finally:
        sender.stop()
    assert_increasing(frames)
    assert all(colour_error(f, SENDER_RGB) <= 8 for f in frames)


@needs_ffmpeg
def test_rtmp_from_an_ffmpeg_server(tmp_path: Path) -> None:
    port = free_port()
    url = f"rtmp://127.0.0.1:{port}/live/test"
    sender = FfmpegSender(["-f", "flv", "-listen", "1", url], tmp_path, rgb=SENDER_RGB).start()
    try:
        source = None
        for _ in range(100):  # bounded: ffmpeg prints nothing when it starts listening
            try:
                source = open_source(url, timeout_s=3)
                break
            except SourceConnectionError:
                time.sleep(0.05)
        assert source is not None, "the RTMP server never accepted a connection"
        with source:
            frames = take(source, 5)
    finally:
        sender.stop()
    assert_increasing(frames)
    assert all(colour_error(f, SENDER_RGB) <= 8 for f in frames)
