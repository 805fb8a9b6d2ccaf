"""Opening a source with PyAV and decoding it packet by packet, errors mapped.

Here live the FFmpeg specifics: which options each kind of source gets
(timeouts, transport, low-latency probing, a protocol whitelist; for
client-named file, HTTP and HLS sources no FFmpeg protocol at all, their opens
going through :mod:`tracker.sources.policed_io`), the decoder
threading per mode, the translation of PyAV exceptions into the project's
:mod:`tracker.errors` tree with a message naming the (redacted) source, and a
frame generator that survives damaged data.

Why decode packet by packet: a decode generator such as ``container.decode()``
that raises cannot be resumed, so one bad packet would end the whole clip. Here
each packet is decoded under its own ``try``; a failing packet is skipped and
counted, and the stream goes on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av
import av.error
from av.container import InputContainer
from av.video.stream import VideoStream

from tracker.errors import (
    SourceConnectionError,
    SourceError,
    SourceNotFoundError,
    SourceUnsupportedError,
)
from tracker.sources.policed_io import HLS_OPTIONS, NO_PROTOCOLS, POLICED_KINDS, PolicedOpener
from tracker.sources.spec import TLS_SCHEMES, SourceSpec

log = logging.getLogger("tracker.ingest")

#: Protocols FFmpeg may use per kind of source: a playlist or an RTSP server cannot
#: make the reader open ``file:`` or other URLs the caller did not ask for.
_PROTOCOL_WHITELIST = {
    "file": "file",
    "http": "http,https,tcp,tls",
    "hls": "http,https,tcp,tls,crypto",
    "rtsp": "rtsp,rtsps,rtp,srtp,udp,tcp,tls,http,https",
    "udp": "udp",
    "rtp": "rtp,udp",
    "rtmp": "rtmp,rtmps,tcp,tls",
}
#: Consecutive unreadable chunks after which a stream counts as broken, not just damaged.
MAX_READ_ERRORS = 32


class StreamInterrupted(Exception):
    """Reading stopped before the end: connection lost, read timeout, unreadable data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def ffmpeg_options(spec: SourceSpec) -> dict[str, str]:
    """Container/protocol options for ``av.open``: timeouts, transport, latency, whitelist.

    FFmpeg's own socket timeouts are in microseconds and are named differently
    per protocol (RTSP ``timeout``, HTTP/RTMP ``rw_timeout``, UDP ``timeout``);
    without them a silent server blocks a read forever. PyAV's
    ``timeout=(open_s, read_s)`` covers the rest.
    """
    micros = str(int(spec.timeout_s * 1_000_000))
    opts: dict[str, str] = {}
    if spec.kind in _PROTOCOL_WHITELIST:
        opts["protocol_whitelist"] = _PROTOCOL_WHITELIST[spec.kind]
    if spec.kind == "rtsp":
        opts["rtsp_transport"] = spec.rtsp_transport or "tcp"
        opts["timeout"] = micros
        if spec.mode == "live":
            opts["max_delay"] = "500000"  # RTP reorder wait (UDP): bounded latency
    elif spec.kind in ("http", "hls", "rtmp"):
        opts["rw_timeout"] = micros  # rtmp's own "timeout" means *listen*: never set it
    elif spec.kind in ("udp", "rtp"):
        opts["timeout"] = micros
        opts["overrun_nonfatal"] = "1"  # a burst the reader missed is a gap, not an error
        opts["fifo_size"] = "100000"  # in 188-byte units (~18 MB)
    elif spec.kind == "v4l2":
        if spec.capture_size_wh:
            opts["video_size"] = f"{spec.capture_size_wh[0]}x{spec.capture_size_wh[1]}"
        if spec.fps:
            opts["framerate"] = f"{spec.fps:g}"
        if spec.input_format:
            opts["input_format"] = spec.input_format
    if spec.scheme in TLS_SCHEMES and spec.tls_verify:
        opts["tls_verify"] = "1"
        if spec.ca_file:
            opts["ca_file"] = spec.ca_file
    if spec.mode == "live" and (spec.is_network or spec.kind == "v4l2"):
        # Start quickly and do not hold packets back: a live viewer wants frames now.
        opts["fflags"] = "nobuffer"
        opts["analyzeduration"] = "500000"
        opts["probesize"] = "500000"
    opts.update(spec.av_options)
    if is_policed(spec):
        opts["protocol_whitelist"] = NO_PROTOCOLS
        opts.update(HLS_OPTIONS)
    return opts


def is_policed(spec: SourceSpec) -> bool:
    """Whether every open FFmpeg makes for ``spec`` goes through its policy (:class:`PolicedOpener`)."""
    return spec.policy is not None and spec.kind in POLICED_KINDS


def ffmpeg_url(spec: SourceSpec) -> str:
    """What ``av.open`` gets: a file as ``file:`` + its canonical path, so no prefix of it reads as a protocol."""
    return f"file:{spec.location}" if spec.kind == "file" else spec.location


@dataclass
class OpenedStream:
    """An open container, its chosen video stream, and the policed opener behind it (if any)."""

    container: InputContainer
    stream: VideoStream
    opener: PolicedOpener | None = None

    def close(self) -> None:
        """Close the container and whatever its opener still holds (safe to call twice)."""
        try:
            self.container.close()
        finally:
            if self.opener is not None:
                self.opener.close()


def open_container(spec: SourceSpec) -> OpenedStream:
    """Open ``spec`` and pick its video stream, configured for the spec's mode.

    A spec with a policy (file, HTTP, HLS) is opened through a
    :class:`PolicedOpener`: the first URL and every nested one are checked
    against the policy before anything is opened.

    Raises a :class:`SourceError` subclass whose message names the source with
    credentials redacted (:class:`SourceNotAllowedError` when the source or a
    URL it leads to is outside its policy).
    """
    if spec.kind in ("file", "v4l2") and not os.path.exists(spec.location):
        raise _not_found(spec)
    kwargs: dict[str, object] = {"container_options": ffmpeg_options(spec), "timeout": (spec.timeout_s, spec.timeout_s)}
    if spec.kind == "v4l2":
        kwargs["format"] = "v4l2"
    opener = PolicedOpener(spec) if is_policed(spec) else None
    if opener is not None:
        kwargs["io_open"] = opener
    started = time.monotonic()
    try:
        container = av.open(ffmpeg_url(spec), "r", **kwargs)  # type: ignore[call-overload]
    except BaseException as exc:
        if opener is not None:
            opener.close()
        if isinstance(exc, av.error.FFmpegError):
            raise map_open_error(exc, spec, time.monotonic() - started) from None
        if isinstance(exc, OSError):  # not raised by FFmpeg itself (e.g. permissions checked by Python)
            raise SourceError(f"cannot open {spec.display}: {exc.strerror or exc}") from None
        raise
    opened = OpenedStream(container, None, opener)  # type: ignore[arg-type]
    try:
        opened.stream = _pick_video_stream(container, spec)
        configure_decoder(opened.stream, live=spec.mode == "live")
    except BaseException:
        opened.close()
        raise
    return opened


def _pick_video_stream(container: InputContainer, spec: SourceSpec) -> VideoStream:
    candidates = [
        s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)
    ]
    if not candidates:
        found = ", ".join(f"{s.type}:{s.codec_context.name if s.codec_context else '?'}" for s in container.streams)
        raise SourceUnsupportedError(f"cannot read {spec.display}: it has no video stream (streams: {found or 'none'})")
    stream = candidates[0]
    if stream.codec_context is None:
        raise SourceUnsupportedError(
            f"cannot read {spec.display}: no decoder for its video codec in this FFmpeg build"
        )
    for other in container.streams:
        if other is not stream:
            other.discard = av.stream.Discard.all  # the demuxer skips what we never decode
    return stream


def configure_decoder(stream: VideoStream, live: bool) -> None:
    """Threading per mode: frame threads for throughput, slice threads for latency.

    Frame threading keeps N frames in flight, i.e. N frames of delay: right for
    a file, wrong for a camera.
    """
    codec = stream.codec_context
    codec.thread_type = "SLICE" if live else "AUTO"
    codec.thread_count = 0


def iter_video_frames(
    container: InputContainer, stream: VideoStream, count: Callable[..., None]
) -> Iterator[av.VideoFrame]:
    """Decoded frames of ``stream`` in presentation order, until the end of the data.

    Damaged data is counted through ``count(corrupt=1)`` / ``count(decode_errors=1)``
    and skipped. Returns at a clean end; raises :class:`StreamInterrupted` when
    reading fails (lost connection, timeout) or keeps failing.
    """
    codec = stream.codec_context
    packets = container.demux(stream)
    read_errors = 0
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.EOFError:
            yield from _drain(codec, count)
            return
        except av.error.InvalidDataError as exc:
            count(decode_errors=1)
            read_errors += 1
            if read_errors > MAX_READ_ERRORS:
                raise StreamInterrupted(f"unreadable data ({exc.strerror})") from None
            packets = container.demux(stream)  # a fresh generator resumes at the current position
            continue
        except av.error.FFmpegError as exc:
            raise StreamInterrupted(_reason(exc)) from None
        read_errors = 0
        try:
            frames = codec.decode(packet)
        except av.error.FFmpegError as exc:
            count(decode_errors=1)
            log.debug("skipping a packet that does not decode (pts %s): %s", packet.pts, _reason(exc))
            continue
        if packet.is_corrupt or any(f.is_corrupt for f in frames):
            count(corrupt=1)
        yield from frames


def _drain(codec: av.VideoCodecContext, count: Callable[..., None]) -> Iterator[av.VideoFrame]:
    try:
        frames = codec.decode(None)
    except av.error.FFmpegError:
        count(decode_errors=1)
        return
    yield from frames


def _reason(exc: BaseException) -> str:
    """The error's text without the URL PyAV appends (it may hold credentials)."""
    if isinstance(exc, (av.error.ExitError, av.error.TimeoutError)):
        return "no data within the read timeout"  # ExitError: PyAV's timeout interrupted the read
    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    return type(exc).__name__


def _not_found(spec: SourceSpec) -> SourceNotFoundError:
    if spec.kind == "v4l2":
        return SourceNotFoundError(
            f"source not found: {spec.display} (no such camera; list cameras with `v4l2-ctl --list-devices`)"
        )
    return SourceNotFoundError(f"source not found: {spec.display} (no such file)")


def map_open_error(exc: av.error.FFmpegError, spec: SourceSpec, elapsed_s: float) -> SourceError:
    """The project's error for a failed ``av.open``, with a message saying what to do."""
    shown = spec.display
    reason = _reason(exc)
    if isinstance(exc, (av.error.HTTPUnauthorizedError, av.error.HTTPForbiddenError, av.error.PermissionError)):
        if spec.is_network:
            return SourceConnectionError(
                f"cannot connect to {shown}: authentication failed (check the user name and password in the URL)"
            )
        return SourceError(f"cannot read {shown}: permission denied")
    if isinstance(exc, av.error.FileNotFoundError):
        return _not_found(spec)
    if isinstance(exc, av.error.HTTPNotFoundError):
        return SourceNotFoundError(f"source not found: {shown} (the server answered 404 Not Found: check the path)")
    if isinstance(exc, (av.error.ProtocolNotFoundError, av.error.DemuxerNotFoundError)):
        return SourceUnsupportedError(f"cannot read {shown}: this FFmpeg build cannot open it ({reason})")
    if spec.is_network:
        timed_out = isinstance(exc, (av.error.TimeoutError, av.error.ExitError)) or (
            isinstance(exc, av.error.InvalidDataError) and elapsed_s >= 0.8 * spec.timeout_s
        )
        if timed_out:
            return SourceConnectionError(
                f"cannot connect to {shown}: no answer within {spec.timeout_s:g} s "
                "(check the host, the port and that the stream is running, or raise timeout_s)"
            )
        if isinstance(exc, av.error.ConnectionRefusedError):
            return SourceConnectionError(
                f"cannot connect to {shown}: connection refused (is the server running and the port right?)"
            )
        if isinstance(exc, av.error.InvalidDataError):
            return SourceUnsupportedError(f"cannot read {shown}: the server sent data FFmpeg cannot read ({reason})")
        if spec.tls_verify and spec.scheme in TLS_SCHEMES and isinstance(exc, av.error.OSError):
            return SourceConnectionError(
                f"cannot connect to {shown}: TLS failed, most likely the server's certificate did not verify "
                "(pass ca_file=PATH for a private CA, or tls_verify=False for a self-signed camera)"
            )
        return SourceConnectionError(f"cannot connect to {shown}: {reason}")
    if isinstance(exc, av.error.InvalidDataError):
        return SourceUnsupportedError(f"cannot read {shown}: not a video file FFmpeg can read ({reason})")
    return SourceError(f"cannot open {shown}: {reason}")
