"""Files, network streams and cameras, decoded by PyAV on a thread, with reconnects.

The first frame is decoded while opening, on the caller's thread: errors a user
can act on (unsupported codec, a stream that never produces a picture) surface
from ``open_source`` rather than later, and :attr:`VideoSource.size` is known
(rotation included) before the first frame is consumed.

Reconnecting (live network sources and cameras): after a drop the reader
reopens with exponential backoff (with jitter, capped at ``max_backoff_s``),
frame indices continue, and the consumer sees ``dropped`` then
``reconnected`` events. File mode never reconnects: reopening would replay
frames the consumer already has, so a drop ends it with an error instead.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator

import av
from av.video.stream import VideoStream

from tracker.errors import SourceConnectionError, SourceError, SourceNotAllowedError, SourceUnsupportedError
from tracker.sources.av_reader import OpenedStream, StreamInterrupted, iter_video_frames, open_container
from tracker.sources.base import Pacer, ThreadedSource
from tracker.sources.delivery import EventKind, SourceEvent
from tracker.sources.frame import FrameConverter, frame_pts_s, quarter_turns
from tracker.sources.spec import EOF_IS_DROP_KINDS, SourceSpec

log = logging.getLogger("tracker.ingest")

#: First wait before a reconnect attempt; doubles per failed attempt up to ``max_backoff_s``.
FIRST_BACKOFF_S = 0.25


class AVSource(ThreadedSource):
    """A PyAV-decoded source (see the module doc). Build it with ``open_source``."""

    def __init__(self, spec: SourceSpec, on_event: Callable[[SourceEvent], None] | None = None) -> None:
        super().__init__(spec, on_event)
        self._converter = FrameConverter(spec)
        opened = open_container(spec)
        container, stream = opened.container, opened.stream
        try:
            frames = iter_video_frames(container, stream, self._buffer.count)
            first = self._first_frame(frames)
            failed = self._buffer.stats_snapshot().decode_errors
            if first is None and failed:
                raise SourceUnsupportedError(
                    f"cannot read {spec.display}: none of its {stream.codec_context.name} video decodes "
                    f"({failed} packets failed)"
                )
        except BaseException:
            opened.close()
            raise
        self.fps = _stream_fps(stream)
        if first is not None:
            turns = quarter_turns(first.rotation) if spec.autorotate else 0
            self.size = (first.width, first.height) if turns % 2 else (first.height, first.width)
        else:
            self.size = (stream.codec_context.height, stream.codec_context.width)
        self._opened: OpenedStream = opened
        self._frames: Iterator[av.VideoFrame] = frames
        self._first: av.VideoFrame | None = first
        log.info("opened %s: %s %s, %s fps, %s mode", self.spec.display, stream.codec_context.name,
                 "x".join(map(str, reversed(self.size))), f"{self.fps:.3g}" if self.fps else "unknown", spec.mode)
        self._start()

    def _first_frame(self, frames: Iterator[av.VideoFrame]) -> av.VideoFrame | None:
        try:
            return next(frames, None)
        except StreamInterrupted as exc:
            if self.spec.is_network:
                raise SourceConnectionError(
                    f"cannot read {self.spec.display}: the stream stopped before its first frame ({exc.reason})"
                ) from None
            raise SourceUnsupportedError(f"cannot read {self.spec.display}: no frame decodes ({exc.reason})") from None

    def _run(self) -> None:
        spec = self.spec
        opened, frames = self._opened, self._frames
        pending, self._first = self._first, None
        reconnects = spec.reconnect and spec.mode == "live"
        try:
            while True:
                try:
                    reason = self._pump(frames, pending)
                except SourceError as exc:  # a URL the stream led to is outside its policy
                    self._fail(exc)
                    return
                pending = None
                opened.close()
                if self._stop.is_set():
                    return
                if reason is None and not (reconnects and spec.kind in EOF_IS_DROP_KINDS):
                    self._end()
                    return
                reason = reason or "the server ended the stream"
                if not reconnects:
                    self._fail(SourceConnectionError(f"{spec.display} dropped: {reason}"))
                    return
                log.warning("%s dropped (%s); reconnecting", spec.display, reason)
                self.events.emit(EventKind.DROPPED, f"{spec.display} dropped: {reason}", self._next_index)
                reopened = self._reconnect()
                if reopened is None:
                    return
                opened = reopened
                frames = iter_video_frames(opened.container, opened.stream, self._buffer.count)
        finally:
            opened.close()

    def _pump(self, frames: Iterator[av.VideoFrame], pending: av.VideoFrame | None) -> str | None:
        """Deliver frames until the data ends (None), reading fails (the reason) or we are stopped."""
        pacer = Pacer(self._stop, self.fps) if self.spec.realtime else None
        try:
            if pending is not None and not self._deliver(pending, pacer):
                return None
            for av_frame in frames:
                if not self._deliver(av_frame, pacer):
                    return None
        except StreamInterrupted as exc:
            return exc.reason
        return None

    def _deliver(self, av_frame: av.VideoFrame, pacer: Pacer | None) -> bool:
        if self._stop.is_set():
            return False
        if pacer is not None and not pacer.wait(frame_pts_s(av_frame)):
            return False
        try:
            frame = self._converter.from_av(av_frame, self._next_index, time.time())
        except (av.error.FFmpegError, ValueError) as exc:
            self._buffer.count(decode_errors=1)
            log.debug("%s: cannot convert a frame (%s)", self.spec.display, exc)
            return True
        self._next_index += 1
        return self._buffer.put(frame)

    def _reconnect(self) -> OpenedStream | None:
        """Reopen with backoff until it works, we are stopped (None) or attempts run out (None, FAILED)."""
        spec = self.spec
        delay = min(FIRST_BACKOFF_S, spec.max_backoff_s)
        attempts = 0
        last_error: SourceError | None = None
        while True:
            if spec.reconnect_attempts is not None and attempts >= spec.reconnect_attempts:
                self._fail(
                    SourceConnectionError(f"{spec.display} dropped and did not come back after {attempts} "
                                          f"reconnect attempts; last error: {last_error}"),
                    attempts,
                )
                return None
            if self._stop.wait(delay * random.uniform(0.8, 1.2)):
                return None
            attempts += 1
            try:
                reopened = open_container(spec)
            except SourceNotAllowedError as exc:  # the policy refuses where it leads now: no retry helps
                self._fail(exc, attempts)
                return None
            except SourceError as exc:
                last_error = exc
                log.info("reconnect attempt %d to %s failed: %s", attempts, spec.display, exc)
                delay = min(delay * 2.0, spec.max_backoff_s)
                continue
            self._buffer.count(reconnects=1)
            log.warning("%s reconnected after %d attempt(s)", spec.display, attempts)
            self.events.emit(EventKind.RECONNECTED, f"{spec.display} reconnected", self._next_index, attempts)
            return reopened


def _stream_fps(stream: VideoStream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None
