"""The server's side of each WebSocket client and of each session's fan-out.

* :class:`ClientConnection`, one per WebSocket: a reader task answering
  requests in order (``open`` / ``webrtc_publish`` run beside it, a bounded
  number at once, so a slow source holds up nothing else), a sender task that
  writes, in this order, pending replies/events (a short queue; a client that
  never reads them is closed), then the newest frame of each subscribed
  session (a one-frame slot: a newer result replaces an unsent one and counts
  as dropped, so a slow client gets the newest frame, never a backlog, and
  never holds up anyone else), and a keepalive task. Every write is bounded in
  time (``send_timeout_s``) and so is every ping's round trip, however full the
  send buffer: a client that stops reading is closed and its slot freed;
* :class:`SessionHub`, one per session: subscribes to the session while it has
  clients, moves results from the worker thread to the event loop
  (``call_soon_threadsafe``), encodes each result once per mask format on a
  small thread pool and offers it to every subscriber.

Both reach the rest of the server (sessions, limits, metrics, the loop)
through :class:`server.app.TrackingServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from server.protocol import (
    AddBox,
    AddPoints,
    Close,
    EncodedFrame,
    ImageClose,
    ImageCloseReply,
    ImageOpen,
    ImageOpenReply,
    ImageSegment,
    ImageSegmentReply,
    ListReply,
    ListSessions,
    Open,
    OpenReply,
    Pause,
    PromptReply,
    ProtocolError,
    PublishReply,
    RemoveObject,
    RemoveReply,
    Reply,
    Reset,
    Resume,
    SessionDescription,
    SessionReply,
    Stats,
    StatsReply,
    Subscribe,
    SubscriptionStats,
    TokenBucket,
    Unsubscribe,
    ViewReply,
    WebRTCPublish,
    WebRTCView,
    encode,
    encode_binary_reply,
    encode_error,
    encode_event,
    encode_frame,
    error_from,
    image_mask_msg,
    message_type,
    object_msg,
    parse_request,
    stamp_sent,
)
from tracker.errors import (
    FrameNotAvailableError,
    PromptError,
    SourceError,
    SourceNotAllowedError,
    SourceOptionError,
    TrackerError,
)
from tracker.results import FrameResult, ObjectResult
from tracker.session import SessionError, SessionEvent, TrackingSession

if TYPE_CHECKING:
    from server.app import TrackingServer

logger = logging.getLogger("sam2-stream.server")

#: the error code of an engine exception in a reply, most specific first (docs/protocol.md)
_ERROR_CODES: tuple[tuple[type[TrackerError], str], ...] = (
    (SourceOptionError, "invalid_message"),  # a client's option outside its range: field options.NAME
    (SourceNotAllowedError, "not_allowed"),
    (SourceError, "source_error"),
    (FrameNotAvailableError, "frame_not_available"),
    (PromptError, "prompt_error"),
    (SessionError, "session_error"),
    (TrackerError, "error"),
)


#: requests served beside the reader (they wait for a source), bounded by ``max_opens_in_flight``
_OPENS = (Open, WebRTCPublish)


def _last(values: deque) -> float | None:
    try:
        return float(values[-1])
    except IndexError:
        return None


def _encode_all(
    result: FrameResult, session_id: str, formats: set[str], queue_s: float | None, model_s: float | None
) -> dict[str, EncodedFrame]:
    return {fmt: encode_frame(result, session_id, fmt, queue_s=queue_s, model_s=model_s) for fmt in formats}


class BinaryReply(bytes):
    """An encoded reply to send as a *binary* message (PNG masks after a JSON header)."""


def _segment_reply(req: ImageSegment, answer: Any) -> ImageSegmentReply | BinaryReply:
    """The reply to an ``image_segment``, masks encoded in the requested format
    (off the event loop: RLE / PNG / polygons of full-size masks take a while)."""
    payload: list[bytes] = []
    h, w = answer.image.size_hw
    reply = ImageSegmentReply(
        id=req.id,
        image_id=answer.image.image_id,
        answer=answer.image.answers,
        width=w,
        height=h,
        decode_s=answer.decode_s,
        embed_s=answer.embed_s,
        masks=[image_mask_msg(c.mask_hw, c.score, req.mask_format, payload) for c in answer.result.candidates],
    )
    if req.mask_format == "png":
        return BinaryReply(encode_binary_reply(reply, payload))
    return reply


@dataclass
class Subscription:
    """One client's subscription to one session, with its one-frame slot."""

    session_id: str
    mask_format: str
    slot: tuple[EncodedFrame, float | None, float | None] | None = None  # frame, arrival_s, processed_s
    frames_sent: int = 0
    frames_dropped: int = 0


class SessionHub:
    """The server's side of one session: its subscribed clients and the fan-out.

    The hub is subscribed to the session only while it has clients, so a
    session nobody watches is closed by the engine's idle timeout.
    """

    def __init__(self, server: TrackingServer, session: TrackingSession) -> None:
        self.server = server
        self.session = session
        self.clients: dict[ClientConnection, Subscription] = {}
        self.last_frame_idx: int | None = None
        self._tap_id: int | None = None
        self._pending: tuple[FrameResult, float | None, float | None] | None = None
        self._encoding = False

    def add(self, client: ClientConnection, mask_format: str) -> Subscription:
        sub = self.clients.get(client)
        if sub is not None:
            sub.mask_format = mask_format
            return sub
        if self._tap_id is None:
            self._tap_id = self.session.subscribe(self._tap)
        sub = Subscription(self.session.id, mask_format)
        self.clients[client] = sub
        return sub

    def remove(self, client: ClientConnection) -> None:
        self.clients.pop(client, None)
        if not self.clients and self._tap_id is not None:
            self.session.unsubscribe(self._tap_id)
            self._tap_id = None

    # ---------------------------------------------------------------- fan-out

    def _tap(self, item: FrameResult | SessionEvent) -> None:
        """Session subscriber; runs on the worker (frames) or any thread (events)."""
        timing = None
        if isinstance(item, FrameResult):
            times = self.session.stats.times  # this frame's entries are the newest
            timing = (_last(times.queue_wait), _last(times.encode), _last(times.track))
        try:
            self.server.loop.call_soon_threadsafe(self._on_item, item, timing)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass

    def _on_item(self, item: FrameResult | SessionEvent, timing: tuple | None) -> None:
        if isinstance(item, SessionEvent):
            data = encode_event(item)
            for client in list(self.clients):
                client.send_control(data)
            if item.kind == "closed":
                self.server.forget(self)
            return
        queue_s, encode_s, track_s = timing or (None, None, None)
        metrics = self.server.metrics
        metrics.observe("queue", queue_s)
        metrics.observe("encode", encode_s)
        metrics.observe("track", track_s)
        model_s = None if encode_s is None or track_s is None else encode_s + track_s
        self.last_frame_idx = item.frame_idx
        self._pending = (item, queue_s, model_s)
        if not self._encoding and self.clients:
            self._encoding = True
            self.server.spawn(self._encode_pending())

    async def _encode_pending(self) -> None:
        try:
            while self._pending is not None and self.clients:
                (result, queue_s, model_s), self._pending = self._pending, None
                formats = {sub.mask_format for sub in self.clients.values()}
                t0 = time.perf_counter()
                try:
                    encoded = await self.server.loop.run_in_executor(
                        self.server.encoder_pool, _encode_all, result, self.session.id, formats, queue_s, model_s
                    )
                except Exception:
                    logger.exception("session %s: encoding frame %d failed", self.session.id, result.frame_idx)
                    continue
                self.server.metrics.observe("serialize", time.perf_counter() - t0)
                for client, sub in list(self.clients.items()):
                    frame = encoded.get(sub.mask_format)
                    if frame is not None:
                        client.offer_frame(sub, frame, result.arrival_s, result.processed_s)
        finally:
            self._encoding = False


class ClientConnection:
    """One WebSocket client: requests in, replies/events/frames out (see module doc)."""

    def __init__(self, server: TrackingServer, ws: ServerConnection, client_id: int) -> None:
        self.server = server
        self.ws = ws
        self.id = client_id
        self.subs: dict[str, Subscription] = {}
        self.hubs: dict[str, SessionHub] = {}
        self.closed = False
        self.frames_sent = 0  # all subscriptions, past ones included
        self.frames_dropped = 0
        self.viewers: list[Any] = []  # server.webrtc.WebRTCViewer, closed with the connection
        self._control: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._rr = 0
        self._opens: set[asyncio.Task] = set()  # open / webrtc_publish requests being served
        self._dropping: asyncio.Task | None = None
        limits = server.config.limits
        self.prompt_bucket = TokenBucket(limits.prompts_per_s, limits.prompt_burst)
        self.open_bucket = TokenBucket(limits.opens_per_s, limits.open_burst)
        self._handlers: dict[type, Callable[[Any], Awaitable[Reply]]] = {
            Open: self._open,
            Subscribe: self._subscribe_req,
            Unsubscribe: self._unsubscribe,
            AddPoints: self._add_points,
            AddBox: self._add_box,
            RemoveObject: self._remove_object,
            Reset: self._reset,
            Pause: self._pause,
            Resume: self._resume,
            Close: self._close,
            ListSessions: self._list,
            Stats: self._stats,
            WebRTCPublish: self._webrtc_publish,
            WebRTCView: self._webrtc_view,
            ImageOpen: self._image_open,
            ImageSegment: self._image_segment,
            ImageClose: self._image_close,
        }
        self.image_bucket = TokenBucket(server.config.images.opens_per_s, server.config.images.open_burst)

    # ---------------------------------------------------------------- output

    def send_control(self, data: bytes) -> None:
        """Queue a reply or event (never dropped; a client that lets too many
        pile up is disconnected instead)."""
        if self.closed:
            return
        if len(self._control) >= self.server.config.limits.max_pending_messages:
            logger.warning("client %d: %d unread replies/events; closing it", self.id, len(self._control))
            self.drop(1008, "too many unread messages: read replies and events")
            return
        self._control.append(data)
        self._wake.set()

    def offer_frame(self, sub: Subscription, frame: EncodedFrame, arrival_s: float | None, processed_s: float | None) -> None:
        """Put the newest frame in the subscription's slot, replacing an unsent one."""
        if self.closed:
            return
        if sub.slot is not None:
            sub.frames_dropped += 1
            self.frames_dropped += 1
            self.server.metrics.client_frames_dropped.inc()
        sub.slot = (frame, arrival_s, processed_s)
        self._wake.set()

    def _next_ready(self) -> Subscription | None:
        subs = list(self.subs.values())
        for k in range(len(subs)):
            sub = subs[(self._rr + k) % len(subs)]
            if sub.slot is not None:
                self._rr = (self._rr + k + 1) % len(subs)
                return sub
        return None

    def drop(self, code: int, reason: str) -> None:
        """Close the connection with ``code`` and ``reason`` and make sure it ends.

        The close frame queues behind whatever the send buffer holds, so a
        client that stopped reading never sees it; after the close timeout
        the transport is aborted, which ends the connection (and frees its
        slot) whatever the client does.
        """
        self.closed = True
        if self._dropping is None:
            self._dropping = self.server.spawn(self._close_or_abort(code, reason))

    async def _close_or_abort(self, code: int, reason: str) -> None:
        grace = self.server.config.server.close_timeout_s
        try:
            await asyncio.wait_for(self.ws.close(code, reason), grace)
        except (asyncio.TimeoutError, ConnectionClosed, OSError):
            pass
        finally:
            if self.ws.state is not State.CLOSED:
                logger.info("client %d: no close handshake within %g s; connection aborted", self.id, grace)
                self.ws.transport.abort()

    async def _write(self, data: bytes, text: bool) -> None:
        """One message; :meth:`drop` the client when it takes none of it within
        ``send_timeout_s`` (the send then ends with the connection).

        A timer rather than ``wait_for``: the send is not cancelled half-way
        (websockets advises against it) and costs no task when it does not wait.
        """
        timer = self.server.loop.call_later(self.server.config.server.send_timeout_s, self._send_timed_out)
        try:
            await self.ws.send(data, text=text)
        finally:
            timer.cancel()

    def _send_timed_out(self) -> None:
        timeout = self.server.config.server.send_timeout_s
        logger.warning("client %d: its socket took no data for %g s; closing it", self.id, timeout)
        self.drop(1008, f"not reading: the send buffer did not drain within {timeout:g} s")

    async def _keepalive(self) -> None:
        """Ping every ``ping_interval_s``; close a client whose pong does not come
        within ``ping_timeout_s`` of starting to send the ping.

        websockets' own keepalive starts its pong timer only once the ping is
        written, and writing waits for a full send buffer to drain: behind a
        client that stopped reading it waited for ever. Here the timer covers
        the write too.
        """
        cfg = self.server.config.server
        interval, timeout = cfg.ping_interval_s, cfg.ping_timeout_s
        if interval is None:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                if timeout is None:
                    await self.ws.ping()
                    continue
                await asyncio.wait_for(self._ping(), timeout)
            except asyncio.TimeoutError:
                logger.warning("client %d: no pong within %g s; closing it", self.id, timeout)
                self.drop(1011, "keepalive ping timeout")
                return
            except ConnectionClosed:
                return

    async def _ping(self) -> None:
        pong = await self.ws.ping()
        await pong

    async def _send_loop(self) -> None:
        metrics = self.server.metrics
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while True:
                    if self.closed:
                        return
                    if self._control:
                        data = self._control.popleft()
                        await self._write(data, not isinstance(data, BinaryReply))
                        continue
                    sub = self._next_ready()
                    if sub is None:
                        break
                    assert sub.slot is not None
                    (frame, arrival_s, processed_s), sub.slot = sub.slot, None
                    now = time.time()
                    await self._write(stamp_sent(frame, now), not frame.binary)
                    sub.frames_sent += 1
                    self.frames_sent += 1
                    metrics.frames_sent.inc()
                    if processed_s is not None:
                        metrics.observe("deliver", now - processed_s)
                    if arrival_s is not None:
                        metrics.observe("total", now - arrival_s)
        except ConnectionClosed:
            pass

    # ---------------------------------------------------------------- input

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        keepalive = asyncio.create_task(self._keepalive())
        self.send_control(encode(self.server.hello(self.id)))
        try:
            async for message in self.ws:
                await self.handle(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            for hub in list(self.hubs.values()):
                hub.remove(self)
            self.hubs.clear()
            for task in (sender, keepalive):
                task.cancel()
            await asyncio.gather(sender, keepalive, return_exceptions=True)
            if self.server.images is not None:
                self.server.images.close_client(self.id)
            for viewer in self.viewers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(viewer.close(), 5)
            await self._settle_opens()

    async def _settle_opens(self) -> None:
        """Wait for this connection's opens in flight to finish (unless the server stops).

        Their threads cannot be interrupted, so the connection keeps its
        client slot until they end: the open pool, sized for every slot's
        opens, then always has a thread for another client's open.
        """
        while self._opens and not self.server.closing:
            await asyncio.wait(self._opens, timeout=0.5)

    async def handle(self, message: str | bytes) -> None:
        """Answer one message with a reply or an error; never raises.

        ``open`` and ``webrtc_publish`` are answered from a task of their own
        (at most ``max_opens_in_flight`` per connection), the others in order.
        """
        metrics = self.server.metrics
        limit = self.server.config.server.max_message_bytes
        if len(message) > limit and message_type(message) != "image_open":
            # the socket takes messages this big for image_open only
            self.drop(1009, f"message of {len(message)} bytes; the limit is {limit} bytes (image_open excepted)")
            return
        try:
            request = parse_request(message)
        except ProtocolError as exc:
            metrics.errors.labels(exc.code).inc()
            self.send_control(error_from(exc))
            return
        if isinstance(request, _OPENS):
            limit = self.server.config.limits.max_opens_in_flight
            if len(self._opens) >= limit:
                metrics.errors.labels("limit_exceeded").inc()
                self.send_control(
                    encode_error(
                        request.id,
                        "limit_exceeded",
                        f"this connection already has {len(self._opens)} opens in flight (the limit, "
                        "max_opens_in_flight); wait for their replies",
                    )
                )
                return
            task = asyncio.create_task(self._serve(request))
            self._opens.add(task)
            task.add_done_callback(self._opens.discard)
            return
        await self._serve(request)

    async def _serve(self, request: Any) -> None:
        """Run one parsed request's handler and send its reply or error; never raises."""
        metrics = self.server.metrics
        kind = type(request).__struct_config__.tag  # type: ignore[attr-defined]
        metrics.requests.labels(kind).inc()
        code, text, field = "internal", "", None
        try:
            if self.server.closing:
                raise ProtocolError("shutting_down", "the server is shutting down")
            reply = await self._handlers[type(request)](request)
        except ProtocolError as exc:
            code, text, field = exc.code, exc.message, exc.field
        except TrackerError as exc:
            code = next(c for kind_of, c in _ERROR_CODES if isinstance(exc, kind_of))
            text = str(exc)
            if isinstance(exc, SourceOptionError):
                field = f"options.{exc.option}"
        except TimeoutError:
            code, text = "timeout", f"the {kind} request did not finish in {self.server.config.limits.prompt_timeout_s:g} s"
        except Exception:
            logger.exception("client %d: %s request failed", self.id, kind)
            code, text = "internal", f"internal error while serving {kind}; the server logged it"
        else:
            self.send_control(reply if isinstance(reply, BinaryReply) else encode(reply))
            return
        metrics.errors.labels(code).inc()
        self.send_control(encode_error(request.id, code, text, field))

    # ---------------------------------------------------------------- requests

    def _hub(self, session_id: str) -> SessionHub:
        hub = self.server.hub_by_id(session_id)
        if hub is None:
            raise ProtocolError(
                "unknown_session", f"unknown session {session_id!r}; list_sessions shows the open ones", field="session_id"
            )
        return hub

    def _subscribe(self, hub: SessionHub, mask_format: str) -> None:
        try:
            sub = hub.add(self, mask_format)
        except SessionError as exc:
            raise ProtocolError("unknown_session", str(exc), field="session_id") from None
        self.subs[hub.session.id] = sub
        self.hubs[hub.session.id] = hub

    async def _open(self, req: Open) -> OpenReply:
        if not self.open_bucket.take():
            raise ProtocolError(
                "rate_limited",
                f"more than {self.server.config.limits.opens_per_s:g} opens per second; "
                f"retry in {self.open_bucket.wait_s():.2f} s",
            )
        tracking = req.tracking.chosen() if req.tracking is not None else None
        session, created = await self.server.open_session(req.source, req.options, req.model, tracking)
        hub = self.server.hub(session)
        if self.closed:  # the client left while its source opened: nobody asked for this session now
            if created and not hub.clients:
                await self.server.close_session(session.id, f"client {self.id} left while it opened")
            raise ProtocolError("shutting_down", "the connection closed while the source opened")
        if req.subscribe:
            self._subscribe(hub, req.mask_format)
        return OpenReply(
            id=req.id,
            session=self.server.session_info(session),
            created=created,
            subscribed=req.subscribe,
            mask_format=req.mask_format,
        )

    async def _subscribe_req(self, req: Subscribe) -> SessionReply:
        hub = self._hub(req.session_id)
        self._subscribe(hub, req.mask_format)
        return SessionReply(id=req.id, session_id=hub.session.id, state=hub.session.state)

    async def _unsubscribe(self, req: Unsubscribe) -> SessionReply:
        hub = self.hubs.pop(req.session_id, None)
        self.subs.pop(req.session_id, None)
        if hub is None:
            raise ProtocolError(
                "not_subscribed", f"this connection is not subscribed to session {req.session_id!r}", field="session_id"
            )
        hub.remove(self)
        return SessionReply(id=req.id, session_id=hub.session.id, state=hub.session.state)

    async def _prompt(self, req: AddPoints | AddBox, **prompt: Any) -> PromptReply:
        hub = self._hub(req.session_id)
        if not self.prompt_bucket.take():
            raise ProtocolError(
                "rate_limited",
                f"more than {self.server.config.limits.prompts_per_s:g} prompts per second; "
                f"retry in {self.prompt_bucket.wait_s():.2f} s",
            )
        session = hub.session
        frame_idx = req.frame_idx if req.frame_idx is not None else hub.last_frame_idx
        try:
            # a new object's id is picked by the session, counting prompts still in flight
            future = session.add_prompt(req.obj_id, frame_idx=frame_idx, **prompt)
        except SessionError as exc:
            code = "unknown_session" if session.state == "closed" else "limit_exceeded"
            raise ProtocolError(code, str(exc), field="session_id" if code == "unknown_session" else "obj_id") from None
        result: ObjectResult = await self.server.wait(future)
        sub = self.subs.get(session.id)
        fmt = "none" if sub is not None and sub.mask_format == "none" else "rle"
        return PromptReply(
            id=req.id, session_id=session.id, obj_id=result.obj_id, frame_idx=frame_idx, object=object_msg(result, fmt)
        )

    async def _add_points(self, req: AddPoints) -> PromptReply:
        return await self._prompt(
            req,
            points_xy=[list(p) for p in req.points_xy],
            labels=list(req.labels),
            clear_old_points=req.clear_old_points,
        )

    async def _add_box(self, req: AddBox) -> PromptReply:
        return await self._prompt(
            req,
            box_xyxy=list(req.box_xyxy),
            points_xy=None if req.points_xy is None else [list(p) for p in req.points_xy],
            labels=None if req.labels is None else list(req.labels),
        )

    async def _remove_object(self, req: RemoveObject) -> RemoveReply:
        hub = self._hub(req.session_id)
        await self.server.wait(hub.session.remove_object(req.obj_id))
        return RemoveReply(id=req.id, session_id=hub.session.id, obj_id=req.obj_id, objects=hub.session.predictor.obj_ids)

    async def _reset(self, req: Reset) -> SessionReply:
        hub = self._hub(req.session_id)
        await self.server.wait(hub.session.reset())
        return SessionReply(id=req.id, session_id=hub.session.id, state=hub.session.state)

    async def _pause(self, req: Pause) -> SessionReply:
        hub = self._hub(req.session_id)
        hub.session.pause()
        return SessionReply(id=req.id, session_id=hub.session.id, state=hub.session.state)

    async def _resume(self, req: Resume) -> SessionReply:
        hub = self._hub(req.session_id)
        hub.session.resume()
        return SessionReply(id=req.id, session_id=hub.session.id, state=hub.session.state)

    async def _close(self, req: Close) -> SessionReply:
        hub = self._hub(req.session_id)
        await self.server.close_session(hub.session.id, f"closed by client {self.id}")
        return SessionReply(id=req.id, session_id=hub.session.id, state="closed")

    async def _webrtc_publish(self, req: WebRTCPublish) -> PublishReply:
        if not self.server.config.webrtc.publish:
            raise ProtocolError("not_allowed", "this server takes no WebRTC video ([webrtc] publish = false)")
        if not self.open_bucket.take():
            raise ProtocolError(
                "rate_limited",
                f"more than {self.server.config.limits.opens_per_s:g} opens per second; "
                f"retry in {self.open_bucket.wait_s():.2f} s",
            )
        session, answer = await self.server.open_webrtc_session(req.name, {"sdp": req.offer.sdp, "type": req.offer.type})
        if self.closed:  # nobody will send the publisher's video any more
            await self.server.close_session(session.id, f"client {self.id} left while it published")
            raise ProtocolError("shutting_down", "the connection closed while the publisher was set up")
        return PublishReply(
            id=req.id, session=self.server.session_info(session), answer=SessionDescription(**answer)
        )

    async def _webrtc_view(self, req: WebRTCView) -> ViewReply:
        if not self.server.config.webrtc.view:
            raise ProtocolError("not_allowed", "this server sends no WebRTC video ([webrtc] view = false)")
        hub = self._hub(req.session_id)
        if self.server.cluster:
            raise ProtocolError(
                "not_supported",
                f"session {hub.session.id} runs on a Ray session host and its video stays there; "
                "receive its masks over the WebSocket instead",
            )
        webrtc = self.server.webrtc_module()
        offer = {"sdp": req.offer.sdp, "type": req.offer.type}
        try:
            webrtc.parse_offer(offer, want="recv")  # before making a track for it
            track = webrtc.SessionVideoTrack(hub.session, draw_masks=req.draw_masks)
            viewer = await webrtc.create_viewer_answer(offer, track, configuration=self.server.peer_configuration())
        except webrtc.WebRTCError as exc:
            raise ProtocolError("webrtc_error", str(exc), field="offer") from None
        if self.closed:
            await viewer.close()
            raise ProtocolError("shutting_down", "the connection closed while the viewer was set up")
        self.viewers.append(viewer)
        return ViewReply(id=req.id, session_id=hub.session.id, answer=SessionDescription(**viewer.answer))

    # ---------------------------------------------------------------- image mode

    def _images(self) -> Any:
        if self.server.images is None:
            raise ProtocolError("not_supported", "this server does not serve image mode ([images] enabled = false)")
        return self.server.images

    async def _image_open(self, req: ImageOpen) -> ImageOpenReply:
        images = self._images()
        if not self.image_bucket.take():
            raise ProtocolError(
                "rate_limited",
                f"more than {self.server.config.images.opens_per_s:g} image opens per second; "
                f"retry in {self.image_bucket.wait_s():.2f} s",
            )
        opened = await images.open(self.id, data=req.data, name=req.name)
        if self.closed:
            images.close_client(self.id)
        h, w = opened.image.size_hw
        d = opened.decoded
        return ImageOpenReply(
            id=req.id,
            image_id=opened.image.image_id,
            width=w,
            height=h,
            embed_s=opened.embed_s,
            cached=opened.cached,
            format=d.format,
            mode=d.mode,
            exif_orientation=d.exif_orientation,
        )

    async def _image_segment(self, req: ImageSegment) -> Any:
        images = self._images()
        if not self.prompt_bucket.take():
            raise ProtocolError(
                "rate_limited",
                f"more than {self.server.config.limits.prompts_per_s:g} prompts per second; "
                f"retry in {self.prompt_bucket.wait_s():.2f} s",
            )
        answer = await images.segment(
            self.id,
            req.image_id,
            points_xy=None if req.points_xy is None else [list(p) for p in req.points_xy],
            labels=None if req.labels is None else list(req.labels),
            box_xyxy=None if req.box_xyxy is None else list(req.box_xyxy),
            multimask=req.multimask,
            previous=req.previous,
        )
        return await self.server.loop.run_in_executor(self.server.encoder_pool, _segment_reply, req, answer)

    async def _image_close(self, req: ImageClose) -> ImageCloseReply:
        self._images().close(self.id, req.image_id)
        return ImageCloseReply(id=req.id, image_id=req.image_id)

    async def _list(self, req: ListSessions) -> ListReply:
        return ListReply(id=req.id, sessions=[self.server.session_info(s) for s in self.server.manager.list()])

    async def _stats(self, req: Stats) -> StatsReply:
        server = self.server
        sessions = server.manager.list()
        if req.session_id is not None:
            sessions = [self._hub(req.session_id).session]
        return StatsReply(
            id=req.id,
            server=server.server_stats(),
            sessions=[server.session_stats(s) for s in sessions],
            client=[
                SubscriptionStats(
                    session_id=sid, mask_format=s.mask_format, frames_sent=s.frames_sent, frames_dropped=s.frames_dropped
                )
                for sid, s in self.subs.items()
            ],
            images=server.images_stats(),
        )
