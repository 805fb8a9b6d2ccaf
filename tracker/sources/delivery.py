"""How frames cross from the decode thread to the consumer, and what it is told.

:class:`FrameBuffer` implements the two delivery policies with one lock:

* **newest** (live mode): one slot. A new frame replaces an undelivered one,
  which is counted as dropped, so the consumer always gets the newest frame
  and nothing ever queues up behind a slow model.
* **every** (file mode): a bounded FIFO. The decoder runs ahead by at most
  ``capacity`` frames and then waits, so the model never waits on decoding and
  memory stays bounded.

:class:`EventLog` tells the consumer about the stream itself (dropped,
reconnected, ended, failed) without putting events in the frame path.

No I/O here: the classes are plain thread-safe state, tested on their own.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tracker.errors import SourceError
from tracker.sources.frame import Frame

log = logging.getLogger("tracker.ingest")


@dataclass
class SourceStats:
    """Counters of one source (a snapshot when read from ``VideoSource.stats``).

    ``decoded``: frames out of the decoder (or pushed); ``delivered``: handed to
    the consumer; ``dropped``: replaced before delivery (live mode only);
    ``corrupt``: packets or frames the demuxer/decoder flagged as damaged (still
    decoded, with concealment); ``decode_errors``: packets that could not be
    read or decoded, frames that could not be converted, and unreadable images,
    all skipped; ``reconnects``: successful reconnects.
    """

    decoded: int = 0
    delivered: int = 0
    dropped: int = 0
    corrupt: int = 0
    decode_errors: int = 0
    reconnects: int = 0


class EventKind(str, enum.Enum):
    DROPPED = "dropped"  # the stream broke off (connection lost, silent server); a reconnect follows if enabled
    RECONNECTED = "reconnected"  # frames flow again; frame indices continue
    ENDED = "ended"  # clean end of the source (end of file, push source ended)
    FAILED = "failed"  # the source stopped on an error (reconnects exhausted or disabled)


@dataclass(frozen=True)
class SourceEvent:
    """Something that happened to the stream (not to one frame).

    ``seq`` numbers events of one source from 0; ``next_index`` is the index the
    next frame will carry, so a consumer can tell which frames came before.
    """

    seq: int
    kind: EventKind
    time_s: float
    message: str
    next_index: int
    attempts: int = 0  # reconnect attempts this outage took (RECONNECTED, FAILED)


class EventLog:
    """Thread-safe, bounded record of a source's events, with a way to wait for one.

    Consumers poll with :meth:`drain` (or iterate a snapshot) between frames,
    block in :meth:`wait_for`, or register a listener (:meth:`add_listener`)
    to hear of each event as it is emitted: a source that stopped delivering
    frames (dropped, reconnecting) gives a frame-driven consumer nothing to
    poll between. ``callback`` (if given) is the first listener. Listeners are
    called on the emitting (decode) thread, outside the log's lock, and must
    return quickly.
    """

    def __init__(self, maxlen: int = 256, callback: Callable[[SourceEvent], None] | None = None) -> None:
        self._events: collections.deque[SourceEvent] = collections.deque(maxlen=maxlen)
        self._cond = threading.Condition()
        self._seq = 0
        self._drained_seq = 0
        self._listeners: list[Callable[[SourceEvent], None]] = [callback] if callback is not None else []

    def emit(self, kind: EventKind, message: str, next_index: int, attempts: int = 0) -> SourceEvent:
        with self._cond:
            event = SourceEvent(self._seq, kind, time.time(), message, next_index, attempts)
            self._seq += 1
            self._events.append(event)
            self._cond.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a consumer's bug must not stop the decoder
                log.exception("on_event callback failed for %s", event.kind.value)
        return event

    def add_listener(self, listener: Callable[[SourceEvent], None]) -> None:
        """Call ``listener(event)`` for every event emitted from now on."""
        with self._cond:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[SourceEvent], None]) -> None:
        """Stop calling ``listener``; a listener not registered is ignored."""
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def snapshot(self) -> list[SourceEvent]:
        with self._cond:
            return list(self._events)

    def drain(self) -> list[SourceEvent]:
        """Events not returned by an earlier ``drain``, oldest first."""
        with self._cond:
            fresh = [e for e in self._events if e.seq >= self._drained_seq]
            self._drained_seq = self._seq
            return fresh

    def wait_for(self, kind: EventKind | str, timeout: float, after_seq: int = -1) -> SourceEvent | None:
        """The first event of ``kind`` with ``seq > after_seq``, waiting up to ``timeout`` s; None if none came."""
        kind = EventKind(kind)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self._events:
                    if event.kind is kind and event.seq > after_seq:
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def __iter__(self) -> Iterator[SourceEvent]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._cond:
            return len(self._events)


class FrameBuffer:
    """The hand-off between one producer thread and its consumers (see module doc).

    The producer calls :meth:`put` and finally :meth:`finish`; consumers call
    :meth:`get`. :meth:`close` (consumer side) makes ``put`` return False so the
    producer stops. ``stats`` is updated under the same lock, so a reader sees
    counters and buffer contents that agree.
    """

    def __init__(self, capacity: int, keep_newest: bool, stats: SourceStats | None = None) -> None:
        self.capacity = 1 if keep_newest else max(1, capacity)
        self.keep_newest = keep_newest
        self.stats = stats if stats is not None else SourceStats()
        self.peak_fill = 0  # most frames ever held at once (tests, benchmarks)
        self._frames: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._finished = False
        self._closed = False
        self._error: SourceError | None = None
        self._wakers: list[Callable[[], None]] = []

    def put(self, frame: Frame) -> bool:
        """Hand over a frame; False once the consumer closed the buffer (stop producing).

        Newest policy: never blocks; an undelivered frame is replaced and counted.
        Every policy: waits while the buffer is full.
        """
        with self._cond:
            if self._closed:
                return False
            if self.keep_newest:
                if self._frames:
                    self._frames.clear()
                    self.stats.dropped += 1
            else:
                while len(self._frames) >= self.capacity and not self._closed:
                    self._cond.wait()
            if self._closed:
                return False
            self._frames.append(frame)
            self.stats.decoded += 1
            self.peak_fill = max(self.peak_fill, len(self._frames))
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()
        return True

    def get(self, timeout: float | None = None) -> Frame | None:
        """The next frame, waiting up to ``timeout`` s (None: until one comes or the stream ends).

        Returns None on timeout or when nothing more will come (see :attr:`done`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._frames:
                if self._finished or self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame = self._frames.popleft()
            self.stats.delivered += 1
            self._cond.notify_all()
            return frame

    def finish(self, error: SourceError | None = None) -> None:
        """Producer side: no more frames will come; ``error`` is raised to consumers after the last one."""
        with self._cond:
            self._finished = True
            self._error = error
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def close(self) -> None:
        """Consumer side: stop; undelivered frames are discarded, a waiting producer is released."""
        with self._cond:
            self._closed = True
            self._frames.clear()
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    @property
    def done(self) -> bool:
        """True when no frame is waiting and none will come (finished or closed)."""
        with self._cond:
            return not self._frames and (self._finished or self._closed)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def error(self) -> SourceError | None:
        return self._error

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (on the producer's thread) after every put/finish/close: asyncio hooks in here."""
        with self._cond:
            self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        with self._cond:
            if wake in self._wakers:
                self._wakers.remove(wake)

    def count(self, **increments: int) -> None:
        """Add to counters of :attr:`stats` under the buffer's lock (e.g. ``count(corrupt=1)``)."""
        with self._cond:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def stats_snapshot(self) -> SourceStats:
        with self._cond:
            return dataclasses.replace(self.stats)
