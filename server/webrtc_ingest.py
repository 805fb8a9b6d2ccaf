"""WebRTC ingest: a browser webcam or a robot publishes video as a session's source.

A :class:`WebRTCPublisher` answers one peer's offer and feeds the frames of
its video track into a :class:`~tracker.ingest.PushSource`, which the server
hands to ``SessionManager.open`` like any other live source::

    publisher = WebRTCPublisher("robot1")            # no I/O yet
    session = manager.open(publisher.source, name="robot1")
    try:
        answer = await publisher.accept(offer)       # {"sdp", "type": "answer"}
    except WebRTCError:
        manager.close(session.id, "bad offer")
        raise

Opening the session first means the session limit refuses a publisher before
any UDP port is taken, and a failed negotiation costs one ``close``. Closing
the session closes its source, and the publisher hangs up at its next frame
(``push`` returns False); ``await publisher.close()`` hangs up at once.

Frames never queue. aiortc decodes on its own thread into an unbounded
asyncio queue; a pump task drains it at once into a :class:`NewestSlot`, and
one converter thread per publisher takes the newest frame, converts it to RGB
and pushes it (the PushSource keeps the newest frame again for the model).
When the peer hangs up, its connection fails, no frame comes for
``frame_timeout_s``, or :meth:`WebRTCPublisher.close` is called, the push
source ends cleanly and the session reports ``source_ended``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import av
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from av.video.reformatter import VideoReformatter

from server.webrtc_signalling import WebRTCError, answer_offer, parse_offer, peer_configuration
from server.webrtc_slot import NewestSlot
from tracker.ingest import PushSource

logger = logging.getLogger(__name__)


@dataclass
class PublisherStats:
    frames_received: int = 0  # decoded frames taken off the track
    frames_pushed: int = 0  # converted and handed to the push source
    frames_skipped: int = 0  # replaced by a newer frame before conversion


class WebRTCPublisher:
    """One publishing peer connection feeding :attr:`source`; see the module docstring.

    Args:
        source: the push source to feed, or a name for a new one (``push:NAME``).
        configuration: aiortc settings; default :func:`peer_configuration` (no STUN/TURN).
        frame_timeout_s: end the source when no frame arrives for this long
            (a peer that vanished without hanging up); None waits forever.
        on_end: called on the event loop, once, with the reason the source ended.
    """

    def __init__(
        self,
        source: PushSource | str = "webrtc",
        *,
        configuration: RTCConfiguration | None = None,
        frame_timeout_s: float | None = 20.0,
        on_end: Callable[[str], None] | None = None,
    ) -> None:
        self.source = source if isinstance(source, PushSource) else PushSource(source)
        self.stats = PublisherStats()
        self.end_reason: str | None = None
        self._configuration = configuration or peer_configuration()
        self._frame_timeout_s = frame_timeout_s
        self._on_end = on_end
        self._pc: RTCPeerConnection | None = None
        self._video: MediaStreamTrack | None = None
        self._slot: NewestSlot[av.VideoFrame] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._convert_task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._first_frame_timer: asyncio.TimerHandle | None = None
        self._ended: asyncio.Event | None = None
        self._source_ended = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._reformatter = VideoReformatter()  # used by the converter thread only

    @property
    def pc(self) -> RTCPeerConnection | None:
        """The peer connection once :meth:`accept` ran (for stats; do not close it directly)."""
        return self._pc

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    async def accept(self, offer: Mapping[str, Any]) -> dict[str, str]:
        """Answer the peer's offer; frames flow into :attr:`source` once connected.

        Only the offer's first video track is used; audio and further video
        sections are answered ``inactive`` so the peer does not send them.

        Returns:
            The answer, ``{"sdp": ..., "type": "answer"}``, ICE candidates included.

        Raises:
            WebRTCError: the offer is unusable (see :func:`parse_offer`), or this
                publisher was already used; the source is ended in both cases.
        """
        if self._pc is not None or self.ended:
            raise WebRTCError("this WebRTCPublisher already answered an offer; make one per publishing peer")
        try:
            description = parse_offer(offer, want="send")
        except WebRTCError as e:
            self._finish(f"bad offer: {e}")
            raise
        loop = asyncio.get_running_loop()
        self._slot = NewestSlot()
        self._ended = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"webrtc-{self.source.name}")
        self._pc = pc = RTCPeerConnection(self._configuration)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_connection_state)
        self._convert_task = loop.create_task(self._convert_loop())
        try:
            answer = await answer_offer(pc, description)
        except WebRTCError as e:
            await self.close(f"bad offer: {e}")
            raise
        if self._video is None:  # parse_offer saw video, but aiortc made no track of it
            await self.close("the offer's video could not be received")
            raise WebRTCError("webrtc offer: no receivable video track; offer VP8 or H.264 video")
        if self._frame_timeout_s is not None:
            self._first_frame_timer = loop.call_later(self._frame_timeout_s, self._check_first_frame)
        return answer

    async def close(self, reason: str = "closed by the server") -> None:
        """Hang up and end the source (after the frame being converted); safe to call twice."""
        self._finish(reason)
        if self._first_frame_timer is not None:
            self._first_frame_timer.cancel()
        if self._pump_task is not None:
            self._pump_task.cancel()
        if self._pc is not None:
            # shielded: aiortc's close() is shared by every caller, and cancelling one would cancel all
            await asyncio.shield(self._pc.close())
        if self._convert_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._convert_task), 5.0)
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    async def wait_ended(self, timeout: float | None = None) -> str | None:
        """Wait until the source has ended; the reason, or None on timeout."""
        if self._ended is None:
            return self.end_reason
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)
        return self.end_reason if self._ended.is_set() else None

    # ------------------------------------------------------------ event loop side

    def _on_track(self, track: MediaStreamTrack) -> None:
        assert self._pc is not None
        if track.kind == "video" and self._video is None:
            self._video = track
            self._pump_task = asyncio.get_running_loop().create_task(self._pump(track))
            return
        for transceiver in self._pc.getTransceivers():  # not wanted: ask the peer not to send it
            if transceiver.receiver.track is track:
                transceiver.direction = "inactive"

    def _on_connection_state(self) -> None:
        assert self._pc is not None
        state = self._pc.connectionState
        logger.info("webrtc publisher %s: connection %s", self.source.name, state)
        if state == "failed":
            self._close_soon("the WebRTC connection failed")
        elif state == "closed":
            self._finish("the WebRTC connection closed")

    def _check_first_frame(self) -> None:
        if self.stats.frames_received == 0 and not self.ended:
            self._close_soon(f"no video arrived within {self._frame_timeout_s:g} s of the answer")

    def _close_soon(self, reason: str) -> None:
        """Close from a callback or from the pump/converter tasks, which close() must not await or cancel."""
        self._finish(reason)
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.close(reason))

    async def _pump(self, track: MediaStreamTrack) -> None:
        """Take every decoded frame off aiortc's queue at once; keep only the newest."""
        assert self._slot is not None
        reason = "the publisher stopped sending video"
        try:
            while True:
                if self.stats.frames_received == 0:
                    frame = await track.recv()  # the first frame waits for ICE + DTLS (see accept)
                else:
                    frame = await asyncio.wait_for(track.recv(), self._frame_timeout_s)
                self.stats.frames_received += 1
                if self._slot.put(frame):
                    self.stats.frames_skipped += 1
        except MediaStreamError:
            pass
        except asyncio.TimeoutError:
            reason = f"no video from the publisher for {self._frame_timeout_s:g} s"
        self._close_soon(reason)

    async def _convert_loop(self) -> None:
        assert self._slot is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        open_ = True
        while open_ and (frame := await self._slot.get()) is not None:
            try:
                open_ = await loop.run_in_executor(self._executor, self._push, frame)
            except Exception:  # one bad frame must not end the stream
                logger.exception("webrtc publisher %s: converting a frame failed", self.source.name)
                continue
            self.stats.frames_pushed += open_
        if not open_:
            self._close_soon("the session closed its source")
        self._end_source()

    def _finish(self, reason: str) -> None:
        """First reason wins; the converter ends the source after its last frame."""
        if self.end_reason is None:
            self.end_reason = reason
            logger.info("webrtc publisher %s: %s", self.source.name, reason)
        if self._slot is not None:
            self._slot.close()
        else:  # no converter yet: nothing in flight
            self._end_source()

    def _end_source(self) -> None:
        if self._source_ended:
            return
        self._source_ended = True
        self.source.end()
        if self._ended is not None:
            self._ended.set()
        if self._on_end is not None:
            try:
                self._on_end(self.end_reason or "ended")
            except Exception:
                logger.exception("webrtc publisher %s: on_end failed", self.source.name)

    # ------------------------------------------------------------ converter thread

    def _push(self, frame: av.VideoFrame) -> bool:
        image_rgb = self._reformatter.reformat(frame, format="rgb24").to_ndarray()
        pts_s = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
        return self.source.push(image_rgb, pts_s)


async def accept_publisher(
    offer: Mapping[str, Any],
    *,
    name: str = "webrtc",
    configuration: RTCConfiguration | None = None,
    frame_timeout_s: float | None = 20.0,
    on_end: Callable[[str], None] | None = None,
    **source_options: Any,
) -> tuple[WebRTCPublisher, dict[str, str]]:
    """A :class:`WebRTCPublisher` on a new ``push:NAME`` source, and its answer.

    ``source_options`` go to the push source (``resize=``, ``max_side=``,
    ``preprocess=``; see ``tracker.ingest.parse_source``).
    """
    publisher = WebRTCPublisher(
        PushSource(name, **source_options), configuration=configuration,
        frame_timeout_s=frame_timeout_s, on_end=on_end,
    )
    return publisher, await publisher.accept(offer)
