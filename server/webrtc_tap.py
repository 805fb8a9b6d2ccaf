"""Frame taps: a session's processed frames paired with their results.

A :class:`~tracker.results.FrameResult` carries no image, so a session's
subscribers cannot send the picture the masks belong to. :func:`frame_tap`
returns the one :class:`FrameTap` of a session, which hands its subscribers
:class:`TappedFrame` objects (the frame the model saw + its result) and the
session's events, on the inference worker thread.

It subscribes through the session's ``subscribe_frames`` (results with the
frame each was computed on) and ``subscribe`` (for events).

The tap subscribes to its session only while it has subscribers of its own,
so an unwatched session is still closed as idle.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tracker.results import FrameResult
from tracker.session import SessionEvent, TrackingSession, notify_all

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TappedFrame:
    """One processed frame: ``image_rgb`` (H x W x 3 uint8, as the model got it from
    the source, so resized when the source resizes) and the ``result`` computed on it
    (masks at the source size, ``result.height`` x ``result.width``)."""

    image_rgb: np.ndarray
    result: FrameResult


TapSubscriber = Callable[["TappedFrame | SessionEvent"], None]


class FrameTap:
    """Pairs a session's frames with its results; get it with :func:`frame_tap`."""

    def __init__(self, session: TrackingSession) -> None:
        self.session = session
        self._lock = threading.Lock()  # subscribers and kept frames
        self._attach_lock = threading.RLock()  # attaching to / detaching from the session
        self._subscribers: dict[int, TapSubscriber] = {}
        self._ids = itertools.count(1)
        self._session_subs: list[int] = []

    def subscribe(self, callback: TapSubscriber) -> int:
        """``callback`` gets every :class:`TappedFrame` and :class:`SessionEvent` (worker thread; must not block)."""
        with self._attach_lock:
            with self._lock:
                sub_id = next(self._ids)
                self._subscribers[sub_id] = callback
            if not self._session_subs:
                try:
                    self._attach()
                except Exception:  # e.g. SessionError: the session is closed
                    with self._lock:
                        del self._subscribers[sub_id]
                    raise
        return sub_id

    def unsubscribe(self, sub_id: int) -> None:
        with self._attach_lock:
            with self._lock:
                self._subscribers.pop(sub_id, None)
                empty = not self._subscribers
            if empty and self._session_subs:
                self._detach()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    # ------------------------------------------------------------ session side

    def _attach(self) -> None:
        session = self.session
        self._session_subs = [session.subscribe_frames(self._on_frame), session.subscribe(self._on_events_only)]

    def _detach(self) -> None:
        for sub_id in self._session_subs:
            self.session.unsubscribe(sub_id)
        self._session_subs = []

    def _on_events_only(self, item: FrameResult | SessionEvent) -> None:
        if isinstance(item, SessionEvent):  # results come with their frames through subscribe_frames
            self._on_event(item)

    def _on_frame(self, frame: Any, result: FrameResult) -> None:
        self._fan_out(TappedFrame(frame.image_rgb, result))

    def _on_event(self, event: SessionEvent) -> None:
        self._fan_out(event)
        if event.kind == "closed":
            with self._attach_lock:
                with self._lock:
                    self._subscribers.clear()
                if self._session_subs:
                    self._detach()

    def _fan_out(self, item: TappedFrame | SessionEvent) -> None:
        with self._lock:
            subs = list(self._subscribers.values())
        notify_all(subs, item, what=f"frame tap of session {self.session.id}")


_taps_lock = threading.Lock()


def frame_tap(session: TrackingSession) -> FrameTap:
    """The session's one :class:`FrameTap`, made on first use and kept with the session.

    One per session, so the frame hook is installed once however many
    viewers watch; it is removed while nobody is subscribed.
    """
    with _taps_lock:
        tap = session.__dict__.get("_frame_tap")
        if tap is None:
            tap = session._frame_tap = FrameTap(session)  # type: ignore[attr-defined]
        return tap
