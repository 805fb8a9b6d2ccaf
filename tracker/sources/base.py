"""The consumer's side of every source: :class:`VideoSource`.

A source is iterated (``for frame in source``), polled (``get_latest``) or
awaited (``async for frame in source.aiter()``); all three read one
:class:`~tracker.sources.delivery.FrameBuffer`, so the delivery policy (newest
frame in live mode, every frame in file mode) is the same whichever is used.
Subclasses only produce frames: a decode thread (:class:`ThreadedSource`) or
the caller's own thread (``PushSource``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TypeVar

from tracker.errors import SourceError
from tracker.sources.delivery import EventKind, EventLog, FrameBuffer, SourceEvent, SourceStats
from tracker.sources.frame import Frame
from tracker.sources.spec import SourceSpec

log = logging.getLogger("tracker.ingest")

_Source = TypeVar("_Source", bound="VideoSource")


class VideoSource:
    """Frames from one source; a context manager, an iterator and an async iterator.

    Live mode: iteration blocks until a frame newer than the last delivered one
    exists and returns the newest; older undelivered frames are dropped and
    counted. File mode: every frame, in order. Either way iteration stops at
    the end of the source and raises the :class:`SourceError` that stopped it,
    if any (after the frames decoded before it).

    Attributes:
        spec: what was opened.
        events: :class:`EventLog` of dropped / reconnected / ended / failed.
        fps: the stream's nominal frame rate, if it declares one.
        size: (height, width) of the upright frames before any resize, once known.
    """

    def __init__(self, spec: SourceSpec, on_event: Callable[[SourceEvent], None] | None = None) -> None:
        self.spec = spec
        self.events = EventLog(callback=on_event)
        self.fps: float | None = None
        self.size: tuple[int, int] | None = None
        self._buffer = FrameBuffer(spec.buffer_frames, keep_newest=spec.mode == "live")
        self._stop = threading.Event()
        self._next_index = 0  # index the next frame will carry

    @property
    def stats(self) -> SourceStats:
        """A consistent snapshot of the counters."""
        return self._buffer.stats_snapshot()

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def closed(self) -> bool:
        return self._buffer.closed

    @property
    def ended(self) -> bool:
        """True once every frame has been delivered and no more will come."""
        return self._buffer.done

    def get_latest(self, timeout: float | None = None) -> Frame | None:
        """The next frame under the mode's policy, waiting up to ``timeout`` s.

        Returns None when the wait timed out or the source is over (see
        :attr:`ended`); raises the error that stopped the source, if any.
        """
        frame = self._buffer.get(timeout)
        if frame is None:
            self._raise_if_failed()
        return frame

    def __iter__(self: _Source) -> _Source:
        return self

    def __next__(self) -> Frame:
        frame = self._buffer.get(None)
        if frame is None:
            self._raise_if_failed()
            raise StopIteration
        return frame

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self.aiter()

    async def aiter(self) -> AsyncIterator[Frame]:
        """Frames for asyncio code, without blocking the event loop.

        The producer thread wakes the loop through ``call_soon_threadsafe``; no
        executor thread is parked per consumer and nothing polls.
        """
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def waker() -> None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop is closed; nobody is waiting any more
                pass

        self._buffer.add_waker(waker)
        try:
            while True:
                wake.clear()
                frame = self._buffer.get(timeout=0)
                if frame is not None:
                    yield frame
                    continue
                if self._buffer.done:
                    self._raise_if_failed()
                    return
                await wake.wait()
        finally:
            self._buffer.remove_waker(waker)

    def close(self) -> None:
        """Stop producing and release the source; safe to call twice and from any thread."""
        self._stop.set()
        self._buffer.close()

    def __enter__(self: _Source) -> _Source:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.display} mode={self.spec.mode}>"

    def _raise_if_failed(self) -> None:
        error = self._buffer.error
        if error is not None and not self._buffer.closed:
            raise error

    def _end(self) -> None:
        """Producer side: clean end of the source.

        The event goes out before the buffer is finished, so a consumer whose
        iteration just stopped already finds ``ended`` in :attr:`events`.
        """
        stats = self.stats
        log.info("%s ended: %d frames decoded, %d dropped, %d corrupt, %d decode errors",
                 self.spec.display, stats.decoded, stats.dropped, stats.corrupt, stats.decode_errors)
        self.events.emit(EventKind.ENDED, f"{self.spec.display} ended", self._next_index)
        self._buffer.finish()

    def _fail(self, error: SourceError, attempts: int = 0) -> None:
        """Producer side: the source stopped on ``error``; consumers get it after the last frame."""
        log.error("%s", error)
        self.events.emit(EventKind.FAILED, str(error), self._next_index, attempts)
        self._buffer.finish(error)


class ThreadedSource(VideoSource):
    """A source whose frames come from its own daemon thread running :meth:`_run`."""

    _thread: threading.Thread | None = None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run_guarded, name=f"ingest-{self.spec.kind}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def _run_guarded(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a bug must end the stream visibly, not hang the consumer
            # PyAV puts the URL (with any password) in its messages: scrub it, and log
            # the traceback's frames without the message.
            message = str(exc).replace(self.spec.uri, self.spec.display)
            log.error("reading %s failed: %s: %s\n%s", self.spec.display, type(exc).__name__, message,
                      "".join(traceback.format_tb(exc.__traceback__)))
            self._fail(SourceError(f"reading {self.spec.display} failed: {type(exc).__name__}: {message}"))

    def close(self) -> None:
        """Stop the thread and wait for it (at most ``timeout_s`` + 2 s: a read may be blocked)."""
        super().close()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(self.spec.timeout_s + 2.0)
            if thread.is_alive():
                log.warning("%s: the reader thread is still blocked in a read; it will exit when the read times out",
                            self.spec.display)


class Pacer:
    """Releases frames at the pace their timestamps say: a file standing in for a camera.

    Re-anchors when timestamps jump back or far ahead (loops, restarts), so a
    timestamp glitch costs one frame period, not a long stall.
    """

    def __init__(self, stop: threading.Event, fps: float | None) -> None:
        self._stop = stop
        self._period_s = 1.0 / fps if fps else 1.0 / 30.0
        self._anchor: tuple[float, float] | None = None  # (monotonic time, pts_s)
        self._last_pts_s: float | None = None

    def wait(self, pts_s: float | None) -> bool:
        """Sleep until the frame stamped ``pts_s`` is due; False if stopped meanwhile."""
        if pts_s is None:
            pts_s = 0.0 if self._last_pts_s is None else self._last_pts_s + self._period_s
        now = time.monotonic()
        last = self._last_pts_s
        if self._anchor is None or last is None or pts_s < last or pts_s - last > 5.0:
            self._anchor = (now, pts_s)
        self._last_pts_s = pts_s
        delay = self._anchor[0] + (pts_s - self._anchor[1]) - now
        if delay > 0:
            return not self._stop.wait(delay)
        return not self._stop.is_set()
