"""WebRTC egress: a session's processed frames, as video, to a viewer.

:class:`SessionVideoTrack` sends the frames the model actually processed, so
a picture and its masks always belong together; with ``draw_masks=True`` the
masks are blended in server-side (``tracker.export.draw_overlay``), which
needs nothing from the viewer but a ``<video>`` element. Without it the
viewer draws masks from the WebSocket results; ``on_frame(pts, result)``
says which result each sent frame shows.

Newest frame only: results come from a :class:`~server.webrtc_tap.FrameTap`
into a :class:`~server.webrtc_slot.NewestSlot`, and aiortc's sender takes the
newest one each time it has encoded the previous, so a slow viewer or encoder
drops frames (``stats.frames_dropped``) instead of falling behind. Drawing
and the RGB to YUV conversion run on the track's own thread.

Timestamps are 90 kHz ticks of a monotonic clock at send time, strictly
increasing: the viewer's jitter buffer then plays each frame as it arrives.

:func:`create_viewer_answer` answers a viewer's offer with one track.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import av
import cv2
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from server.webrtc_signalling import answer_offer, parse_offer, peer_configuration
from server.webrtc_slot import NewestSlot
from server.webrtc_tap import TappedFrame, frame_tap
from tracker.export import draw_overlay
from tracker.results import FrameResult
from tracker.session import SessionEvent, TrackingSession

logger = logging.getLogger(__name__)

#: RTP's video clock.
VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_HZ)

_END_EVENTS = ("closed", "source_ended", "source_failed")


class PtsClock:
    """Strictly increasing 90 kHz timestamps from a monotonic clock, 0 at the first call."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start: float | None = None
        self._last = -1

    def next(self) -> int:
        now = self._clock()
        if self._start is None:
            self._start = now
        self._last = max(self._last + 1, round((now - self._start) * VIDEO_CLOCK_HZ))
        return self._last


@dataclass
class TrackStats:
    frames_in: int = 0  # processed frames offered to the track
    frames_sent: int = 0  # frames handed to the encoder
    frames_dropped: int = 0  # replaced by a newer frame before the encoder asked


class SessionVideoTrack(MediaStreamTrack):
    """A session's processed frames as a video track; create it on the event loop.

    Args:
        session: the ``TrackingSession`` to show.
        draw_masks: blend each visible object's mask in its colour
            (``tracker.export.object_colour``), outlined and labelled.
        alpha: mask opacity when drawing.
        on_frame: called on the event loop with (pts in 90 kHz ticks,
            FrameResult) for each frame sent, e.g. to tell a viewer that
            draws its own masks which result a frame shows.
    """

    kind = "video"

    def __init__(
        self,
        session: TrackingSession,
        *,
        draw_masks: bool = False,
        alpha: float = 0.5,
        on_frame: Callable[[int, FrameResult], None] | None = None,
    ) -> None:
        super().__init__()
        self.session = session
        self.draw_masks = draw_masks
        self.alpha = alpha
        self.stats = TrackStats()
        self._on_frame = on_frame
        self._loop = asyncio.get_running_loop()
        self._slot: NewestSlot[TappedFrame] = NewestSlot()
        self._clock = PtsClock()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"webrtc-view-{session.id}")
        self._tap = frame_tap(session)
        self._tap_id: int | None = self._tap.subscribe(self._on_tap)

    async def recv(self) -> av.VideoFrame:
        """The newest processed frame (waiting for one); MediaStreamError once the session's video is over."""
        if self.readyState != "live":
            raise MediaStreamError
        item = await self._slot.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        frame = await self._loop.run_in_executor(self._executor, self._render, item)
        frame.pts = self._clock.next()
        frame.time_base = VIDEO_TIME_BASE
        self.stats.frames_sent += 1
        self.stats.frames_dropped = self._slot.replaced
        if self._on_frame is not None:
            self._on_frame(frame.pts, item.result)
        return frame

    def stop(self) -> None:
        """Stop sending and let go of the session (idempotent)."""
        super().stop()
        if self._tap_id is not None:
            self._tap.unsubscribe(self._tap_id)
            self._tap_id = None
        self._slot.close()
        self._executor.shutdown(wait=False)

    def _on_tap(self, item: TappedFrame | SessionEvent) -> None:
        """Inference worker thread: hand over to the event loop, never block."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to send to
            self._loop.call_soon_threadsafe(self._deliver, item)

    def _deliver(self, item: TappedFrame | SessionEvent) -> None:
        if isinstance(item, TappedFrame):
            self.stats.frames_in += 1
            self._slot.put(item)
            self.stats.frames_dropped = self._slot.replaced
        elif item.kind in _END_EVENTS:
            self._slot.close()  # the frame waiting still goes out, then the track ends

    def _render(self, item: TappedFrame) -> av.VideoFrame:
        image_rgb = item.image_rgb
        if self.draw_masks and item.result.objects:
            image_rgb = draw_overlay(image_rgb, fit_result(item.result, image_rgb.shape[:2]), self.alpha)
        frame = av.VideoFrame.from_ndarray(image_rgb, format="rgb24")
        return frame.reformat(format="yuv420p")  # here, not on the encoder's thread


def fit_result(result: FrameResult, size_hw: tuple[int, int]) -> FrameResult:
    """``result`` with masks scaled (nearest) to ``size_hw``: for frames the source resized."""
    if (result.height, result.width) == tuple(size_hw):
        return result
    h, w = size_hw
    objects = {}
    for obj_id, obj in result.objects.items():
        mask = cv2.resize(obj.mask_hw.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        objects[obj_id] = replace(obj, mask_hw=mask, logits_hw=None, box_xyxy=None)
    return replace(result, height=h, width=w, objects=objects)


class WebRTCViewer:
    """A viewer's peer connection sending one track; made by :func:`create_viewer_answer`."""

    def __init__(self, pc: RTCPeerConnection, track: MediaStreamTrack, answer: dict[str, str]) -> None:
        self.pc = pc
        self.track = track
        self.answer = answer
        self._closing: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Hang up and stop the track (idempotent)."""
        self._close_soon()
        assert self._closing is not None
        await asyncio.shield(self._closing)

    def _close_soon(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        self.track.stop()
        await self.pc.close()


async def create_viewer_answer(
    offer: Mapping[str, Any],
    track: MediaStreamTrack,
    *,
    configuration: RTCConfiguration | None = None,
) -> WebRTCViewer:
    """Answer a viewer's offer (it must receive video) with ``track``.

    The connection closes itself when the track ends (session over) and the
    track stops when the connection fails or closes (viewer gone).

    Raises:
        WebRTCError: the offer is unusable; ``track`` is stopped.
    """
    try:
        description = parse_offer(offer, want="recv")
    except Exception:
        track.stop()
        raise
    pc = RTCPeerConnection(configuration or peer_configuration())
    try:
        answer = await answer_offer(pc, description, [track])
    except Exception:
        track.stop()
        await pc.close()
        raise
    viewer = WebRTCViewer(pc, track, answer)

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            viewer._close_soon()

    track.on("ended", viewer._close_soon)
    return viewer
