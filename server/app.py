"""The live service: a ``websockets`` asyncio server in front of the tracking sessions.

I/O only. Messages are parsed and encoded by :mod:`server.protocol`; tracking
is :mod:`tracker.session` (one :class:`~tracker.session.InferenceWorker`
thread runs the model for every session). What this module adds:

* one :class:`ClientConnection` per WebSocket: a reader task answering
  requests in order, and a sender task that writes, in this order, pending
  replies/events (a short queue; a client that never reads them is closed),
  then the newest frame of each subscribed session (a one-frame slot: a newer
  result replaces an unsent one and counts as dropped, so a slow client gets
  the newest frame, never a backlog, and never holds up anyone else);
* one :class:`SessionHub` per session: subscribes to the session while it has
  clients, moves results from the worker thread to the event loop
  (``call_soon_threadsafe``), encodes each result once per mask format on a
  small thread pool and offers it to every subscriber;
* HTTP on the same port, answered during the WebSocket handshake:
  ``/healthz``, ``/metrics`` (Prometheus), and :attr:`TrackingServer.routes`,
  the hook where the operator page (static files) plugs in;
* auth (bearer token in ``Authorization`` or ``?token=``, required unless
  bound to loopback), an Origin allowlist, TLS, message size limits without
  compression (a compressed message can expand enormously), keepalive pings,
  and a graceful stop that closes sessions before connections.

:class:`ServerThread` runs a server on its own loop thread for tests,
benchmarks and programs that are not asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import importlib
import importlib.util
import logging
import re
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs

import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from server.config import ServerConfig, SourceCatalog
from server.metrics import CONTENT_TYPE, ClientSample, ServerMetrics, SessionSample, Snapshot
from server.protocol import (
    MASK_FORMATS,
    PROTOCOL_VERSION,
    SERVER_NAME,
    AddBox,
    AddPoints,
    AnyRequest,
    Close,
    EncodedFrame,
    Hello,
    LatencyInfo,
    LimitsInfo,
    ListReply,
    ListSessions,
    ModelInfo,
    Open,
    OpenReply,
    Pause,
    PromptReply,
    ProtocolError,
    RemoveObject,
    RemoveReply,
    Reply,
    Reset,
    Resume,
    ServerStats,
    SessionInfo,
    SessionReply,
    SessionStatsInfo,
    Stats,
    StatsReply,
    Subscribe,
    SubscriptionStats,
    TokenBucket,
    Unsubscribe,
    PublishReply,
    SessionDescription,
    ViewReply,
    WebRTCPublish,
    WebRTCView,
    encode,
    encode_error,
    encode_event,
    encode_frame,
    error_from,
    object_msg,
    parse_request,
    stamp_sent,
)
from tracker.errors import FrameNotAvailableError, PromptError, SourceError, SourceNotAllowedError, TrackerError
from tracker.results import FrameResult, ObjectResult
from tracker.session import InferenceWorker, SessionError, SessionEvent, SessionLimits, SessionManager, TrackingSession

logger = logging.getLogger("sam2-stream.server")

#: a ``routes`` handler: answers a plain HTTP GET during the handshake
RouteHandler = Callable[[ServerConnection, Request], "Response | None"]

WEBSOCKET_PATHS = ("/", "/ws")
#: what a client's ``open`` treats as a source name rather than a URI or path
_BARE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def server_version() -> str:
    try:
        from importlib.metadata import version

        return version("sam2-stream")
    except Exception:  # running from a checkout that is not installed
        return "0.1.0"


def _last(values: deque) -> float | None:
    try:
        return float(values[-1])
    except IndexError:
        return None


def _percentiles(values: deque) -> tuple[float | None, float | None]:
    data = sorted(list(values))
    if not data:
        return None, None
    return statistics.median(data), data[min(len(data) - 1, int(round(0.99 * (len(data) - 1))))]


def _encode_all(
    result: FrameResult, session_id: str, formats: set[str], queue_s: float | None, model_s: float | None
) -> dict[str, EncodedFrame]:
    return {fmt: encode_frame(result, session_id, fmt, queue_s=queue_s, model_s=model_s) for fmt in formats}


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
        }

    # ---------------------------------------------------------------- output

    def send_control(self, data: bytes) -> None:
        """Queue a reply or event (never dropped; a client that lets too many
        pile up is disconnected instead)."""
        if self.closed:
            return
        if len(self._control) >= self.server.config.limits.max_pending_messages:
            logger.warning("client %d: %d unread replies/events; closing it", self.id, len(self._control))
            self.closed = True
            self.server.spawn(self.ws.close(1008, "too many unread messages: read replies and events"))
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

    async def _send_loop(self) -> None:
        metrics = self.server.metrics
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while True:
                    if self._control:
                        await self.ws.send(self._control.popleft(), text=True)
                        continue
                    sub = self._next_ready()
                    if sub is None:
                        break
                    assert sub.slot is not None
                    (frame, arrival_s, processed_s), sub.slot = sub.slot, None
                    now = time.time()
                    await self.ws.send(stamp_sent(frame, now), text=not frame.binary)
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
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            for viewer in self.viewers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(viewer.close(), 5)

    async def handle(self, message: str | bytes) -> None:
        """Answer one message with a reply or an error; never raises."""
        metrics = self.server.metrics
        try:
            request = parse_request(message)
        except ProtocolError as exc:
            metrics.errors.labels(exc.code).inc()
            self.send_control(error_from(exc))
            return
        kind = type(request).__struct_config__.tag  # type: ignore[attr-defined]
        metrics.requests.labels(kind).inc()
        code, text, field = "internal", "", None
        try:
            if self.server.closing:
                raise ProtocolError("shutting_down", "the server is shutting down")
            reply = await self._handlers[type(request)](request)
        except ProtocolError as exc:
            code, text, field = exc.code, exc.message, exc.field
        except SourceNotAllowedError as exc:
            code, text = "not_allowed", str(exc)
        except SourceError as exc:
            code, text = "source_error", str(exc)
        except FrameNotAvailableError as exc:
            code, text = "frame_not_available", str(exc)
        except PromptError as exc:
            code, text = "prompt_error", str(exc)
        except SessionError as exc:
            code, text = "session_error", str(exc)
        except TrackerError as exc:
            code, text = "error", str(exc)
        except TimeoutError:
            code, text = "timeout", f"the {kind} request did not finish in {self.server.config.limits.prompt_timeout_s:g} s"
        except Exception:
            logger.exception("client %d: %s request failed", self.id, kind)
            code, text = "internal", f"internal error while serving {kind}; the server logged it"
        else:
            self.send_control(encode(reply))
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
        session, created = await self.server.open_session(req.source, req.options)
        hub = self.server.hub(session)
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
        return PublishReply(
            id=req.id, session=self.server.session_info(session), answer=SessionDescription(**answer)
        )

    async def _webrtc_view(self, req: WebRTCView) -> ViewReply:
        if not self.server.config.webrtc.view:
            raise ProtocolError("not_allowed", "this server sends no WebRTC video ([webrtc] view = false)")
        hub = self._hub(req.session_id)
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
        )


class TrackingServer:
    """The WebSocket server with its sessions; see the module docstring.

    Args:
        config: the server's configuration (``server.config.load_config``).
        model: a SAM 2 model from ``tracker.model.build_model``; the server's
            one inference worker runs it for every session.
        model_name: shown to clients in ``hello`` (default: ``config.model.name``).
        routes: extra plain-HTTP GET paths answered during the handshake:
            the operator page plugs in here. A key ending in ``/`` serves
            everything under it (``"/"`` only itself); ``"/"`` may serve a
            page, since WebSocket upgrades to ``/`` still reach the protocol. A route decides on
            its own whether it needs the token (``TrackingServer.authorized``).

    Use ``async with TrackingServer(...) as server:`` or ``start()`` /
    ``stop()``; :class:`ServerThread` runs it from synchronous code.
    """

    def __init__(
        self,
        config: ServerConfig,
        model: torch.nn.Module,
        *,
        model_name: str | None = None,
        routes: dict[str, RouteHandler] | None = None,
    ) -> None:
        config.check()
        self.config = config
        self.model = model
        self.model_name = model_name or config.model.name
        self.routes: dict[str, RouteHandler] = dict(routes or {})
        self.catalog = SourceCatalog(config)
        self.metrics = ServerMetrics(self.snapshot)
        self.clients: set[ClientConnection] = set()
        self.hubs: dict[str, SessionHub] = {}
        self.closing = False
        self.port: int | None = None
        self.started_s = time.time()
        self._token = config.token()
        self._require_token = config.requires_token()
        self._ssl = config.ssl_context()
        self._named: dict[str, str] = {}  # configured name -> session id
        self._publishers: dict[str, Any] = {}  # session id -> server.webrtc.WebRTCPublisher feeding it
        self._webrtc: ModuleType | None = None
        self._has_aiortc: bool | None = None
        self._open_locks: dict[str, asyncio.Lock] = {}
        self._client_ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._ws: Server | None = None
        self.loop: asyncio.AbstractEventLoop
        self.worker: InferenceWorker
        self.manager: SessionManager
        self.encoder_pool: ThreadPoolExecutor
        self._blocking_pool: ThreadPoolExecutor

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        host = self.config.server.host
        host = f"[{host}]" if ":" in host else host
        return f"{'wss' if self._ssl else 'ws'}://{host}:{self.port}/"

    async def start(self) -> None:
        """Start the worker and listen; returns once clients can connect."""
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        self.worker = InferenceWorker(self.model, max_batch=cfg.model.max_batch)
        self.manager = SessionManager(
            self.worker,
            max_sessions=cfg.limits.max_sessions,
            limits=SessionLimits(
                max_objects=cfg.limits.max_objects,
                lost_after_frames=cfg.limits.lost_after_frames,
                idle_timeout_s=cfg.limits.idle_timeout_s,
            ),
            predictor_options={"return_logits": False},
        )
        self.encoder_pool = ThreadPoolExecutor(2, thread_name_prefix="sam2-stream-encode")
        self._blocking_pool = ThreadPoolExecutor(4, thread_name_prefix="sam2-stream-io")
        s = cfg.server
        origins: list[str | None] | None = [*s.allow_origins, None] if s.allow_origins else None
        try:
            self._ws = await serve(
                self._handle_connection,
                s.host,
                s.port,
                origins=origins,  # type: ignore[arg-type]
                compression=None,
                max_size=s.max_message_bytes,
                max_queue=16,
                write_limit=s.write_limit_bytes,
                ping_interval=s.ping_interval_s,
                ping_timeout=s.ping_timeout_s,
                close_timeout=5,
                process_request=self._process_request,
                server_header=f"{SERVER_NAME}/{server_version()}",
                ssl=self._ssl,
                logger=logging.getLogger("sam2-stream.websockets"),
            )
        except BaseException:
            self.worker.stop()
            raise
        self.port = self._ws.sockets[0].getsockname()[1]
        self.started_s = time.time()
        self.spawn(self._housekeeping())
        logger.info(
            "listening on %s (token %s, origins %s, TLS %s); model %s at %d px on %s; sources: %s",
            self.url,
            "required" if self._require_token else "not required (loopback)",
            ", ".join(s.allow_origins) if s.allow_origins else "any",
            "on" if self._ssl else "off",
            self.model_name,
            int(self.model.image_size),
            self.worker.device,
            ", ".join(self.catalog.names) or "none configured",
        )

    async def stop(self) -> None:
        """Graceful stop: refuse new requests, close every session (subscribers
        get a ``closed`` event), close connections (1001), stop the worker."""
        if self.closing:
            return
        self.closing = True
        sessions = self.manager.list()
        logger.info("shutting down: closing %d session(s), %d client(s)", len(sessions), len(self.clients))
        await self.run_blocking(self.manager.close_all)
        for publisher in list(self._publishers.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.close("server shutting down"), 5)
        self._publishers.clear()
        deadline = time.monotonic() + 1.0
        while any(c._control for c in self.clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.run_blocking(self.worker.stop)
        if self._webrtc is not None and self.config.webrtc.ice_host_addresses:
            self._webrtc.set_ice_host_addresses(None)  # process-wide: leave it as found
        self._blocking_pool.shutdown(wait=False)
        self.encoder_pool.shutdown(wait=False)
        logger.info("stopped")

    async def __aenter__(self) -> TrackingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_forever(self, stop: asyncio.Event) -> None:
        """Start, serve until ``stop`` is set, stop gracefully."""
        async with self:
            await stop.wait()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        """A background task the server keeps a reference to (and cancels on stop)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call (opening a source, closing a session) off the loop."""
        return await self.loop.run_in_executor(self._blocking_pool, fn, *args)

    async def wait(self, future: Future) -> Any:
        """Await a worker future, bounded by ``prompt_timeout_s``."""
        return await asyncio.wait_for(asyncio.wrap_future(future), self.config.limits.prompt_timeout_s)

    async def _housekeeping(self) -> None:
        """Close sessions nobody watches; log a status line now and then."""
        limits, every = self.config.limits, self.config.server.log_every_s
        interval = max(0.2, min(5.0, limits.idle_timeout_s / 4))
        last_log, last_processed = time.monotonic(), 0
        while True:
            await asyncio.sleep(interval)
            try:
                for session_id in await self.run_blocking(self.manager.reap_idle):
                    logger.info("session %s closed: no subscriber for %g s", session_id, limits.idle_timeout_s)
                for session_id in [sid for sid, hub in self.hubs.items() if hub.session.state == "closed"]:
                    self.forget(self.hubs[session_id])
                now = time.monotonic()
                sessions = self.manager.list()
                if every and sessions and now - last_log >= every:
                    processed = sum(s.stats.frames_processed for s in sessions)
                    logger.info(
                        "%d session(s), %d client(s), %.1f frames/s processed, %d frames dropped for slow clients",
                        len(sessions),
                        len(self.clients),
                        (processed - last_processed) / (now - last_log),
                        sum(c.frames_dropped for c in self.clients),
                    )
                    last_log, last_processed = now, processed
            except Exception:
                logger.exception("housekeeping failed")

    # ---------------------------------------------------------------- sessions

    async def open_session(self, source: str, options: dict[str, Any] | None) -> tuple[TrackingSession, bool]:
        """A configured name's session (opened on first use), or a new session on
        a URI the policy allows. Returns the session and whether it was created."""
        if source in self.config.sources:
            if options:
                raise ProtocolError(
                    "invalid_message",
                    f"options apply to source URIs only; the server's config sets the options of {source!r}",
                    field="options",
                )
            lock = self._open_locks.setdefault(source, asyncio.Lock())
            async with lock:
                session_id = self._named.get(source)
                hub = self.hubs.get(session_id) if session_id else None
                if hub is not None and hub.session.state != "closed":
                    return hub.session, False
                self._check_session_limit()
                opened = await self.run_blocking(self.catalog.open_named, source)
                session = self.manager.open(opened, name=source)
                self._named[source] = session.id
                self.hub(session)
                return session, True
        if _BARE_NAME_RE.match(source):
            names = ", ".join(self.catalog.names) or "none"
            raise ProtocolError(
                "unknown_source",
                f"no source named {source!r} on this server (configured: {names}); "
                "a file needs an absolute path or a file: URI, and the server's policy must allow it",
                field="source",
            )
        self._check_session_limit()
        opened = await self.run_blocking(self.catalog.open_uri, source, options)
        session = self.manager.open(opened, name=opened.spec.display)
        self.hub(session)
        return session, True

    def webrtc_module(self) -> ModuleType:
        """``server.webrtc``, imported on first use (aiortc is large).

        Raises:
            ProtocolError: ``not_supported`` when aiortc is not installed.
        """
        if self._webrtc is None:
            try:
                self._webrtc = importlib.import_module("server.webrtc")
            except ImportError as exc:
                raise ProtocolError(
                    "not_supported", f"this server has no WebRTC ({exc}); receive frames over the WebSocket instead"
                ) from None
            addresses = self.config.webrtc.ice_host_addresses
            if addresses:
                self._webrtc.set_ice_host_addresses(addresses)
        return self._webrtc

    def peer_configuration(self) -> Any:
        return self.webrtc_module().peer_configuration(self.config.webrtc.ice_servers)

    async def open_webrtc_session(self, name: str, offer: dict[str, str]) -> tuple[TrackingSession, dict[str, str]]:
        """A new session on the video a peer publishes; returns it and the WebRTC answer.
        The peer connection closes with the session."""
        webrtc = self.webrtc_module()
        try:  # refuse a bad offer before any session or peer connection exists
            webrtc.parse_offer(offer, want="send")
        except webrtc.WebRTCError as exc:
            raise ProtocolError("webrtc_error", str(exc), field="offer") from None
        self._check_session_limit()
        publisher = webrtc.WebRTCPublisher(
            name, configuration=self.peer_configuration(), frame_timeout_s=self.config.webrtc.frame_timeout_s
        )
        session = self.manager.open(publisher.source, name=f"webrtc:{name}")
        self.hub(session)
        try:
            answer = await publisher.accept(offer)
        except BaseException as exc:
            await publisher.close("the offer was refused")
            await self.close_session(session.id, "the WebRTC offer was refused")
            if isinstance(exc, webrtc.WebRTCError):
                raise ProtocolError("webrtc_error", str(exc), field="offer") from None
            raise
        self._publishers[session.id] = publisher
        logger.info("session %s: WebRTC video from %r", session.id, name)
        return session, answer

    def _check_session_limit(self) -> None:
        """Refuse before opening a source (a camera connection) that would be closed at once."""
        limit = self.manager.max_sessions
        if len(self.manager.list()) >= limit:
            raise ProtocolError(
                "limit_exceeded", f"the server already runs {limit} sessions (the limit); close one or subscribe to one"
            )

    async def close_session(self, session_id: str, reason: str) -> None:
        await self.run_blocking(self.manager.close, session_id, reason)

    def hub(self, session: TrackingSession) -> SessionHub:
        hub = self.hubs.get(session.id)
        if hub is None:
            hub = self.hubs[session.id] = SessionHub(self, session)
        return hub

    def hub_by_id(self, session_id: str) -> SessionHub | None:
        hub = self.hubs.get(session_id)
        if hub is None or hub.session.state == "closed":
            return None
        return hub

    def forget(self, hub: SessionHub) -> None:
        """Drop a closed session's hub and every subscription to it."""
        if self.hubs.get(hub.session.id) is hub:
            del self.hubs[hub.session.id]
        for client in list(hub.clients):
            client.subs.pop(hub.session.id, None)
            client.hubs.pop(hub.session.id, None)
        hub.clients.clear()
        for name, sid in list(self._named.items()):
            if sid == hub.session.id:
                del self._named[name]
        publisher = self._publishers.pop(hub.session.id, None)
        if publisher is not None:
            self.spawn(publisher.close("the session closed"))

    # ---------------------------------------------------------------- reports

    def hello(self, client_id: int) -> Hello:
        limits = self.config.limits
        return Hello(
            protocol_version=PROTOCOL_VERSION,
            server=SERVER_NAME,
            server_version=server_version(),
            client_id=client_id,
            model=ModelInfo(name=self.model_name, image_size=int(self.model.image_size), device=str(self.worker.device)),
            mask_formats=list(MASK_FORMATS),
            sources=self.catalog.names,
            features=self.features(),
            limits=LimitsInfo(
                max_sessions=limits.max_sessions,
                max_objects=limits.max_objects,
                prompts_per_s=limits.prompts_per_s,
                max_message_bytes=self.config.server.max_message_bytes,
                lost_after_frames=limits.lost_after_frames,
                idle_timeout_s=limits.idle_timeout_s,
            ),
        )

    def features(self) -> list[str]:
        """Optional requests served here: the WebRTC ones when aiortc is installed and allowed."""
        if self._has_aiortc is None:
            self._has_aiortc = importlib.util.find_spec("aiortc") is not None
        if not self._has_aiortc:
            return []
        w = self.config.webrtc
        return [name for name, on in (("webrtc_publish", w.publish), ("webrtc_view", w.view)) if on]

    def session_info(self, session: TrackingSession) -> SessionInfo:
        info = session.info()
        hub = self.hubs.get(session.id)
        size = getattr(session.source, "size", None)
        return SessionInfo(
            session_id=session.id,
            name=session.name,
            source=str(info["source"]),
            state=session.state,
            objects=list(info["objects"]),
            subscribers=len(hub.clients) if hub else 0,
            frames_processed=session.stats.frames_processed,
            frames_dropped=session.stats.frames_dropped,
            newest_frame_idx=hub.last_frame_idx if hub and hub.last_frame_idx is not None else info["newest_frame_idx"],
            width=None if size is None else int(size[1]),
            height=None if size is None else int(size[0]),
            fps=getattr(session.source, "fps", None),
        )

    def session_stats(self, session: TrackingSession) -> SessionStatsInfo:
        st = session.stats
        q50, q99 = _percentiles(st.times.queue_wait)
        e50, e99 = _percentiles(st.times.encode)
        t50, t99 = _percentiles(st.times.track)
        hub = self.hubs.get(session.id)
        return SessionStatsInfo(
            session_id=session.id,
            name=session.name,
            state=session.state,
            frames_in=st.frames_in,
            frames_processed=st.frames_processed,
            frames_dropped=st.frames_dropped,
            source_frames_dropped=int(session.source.stats.dropped),
            step_errors=st.step_errors,
            prompts=st.prompts,
            objects=len(session.predictor.obj_ids),
            subscribers=len(hub.clients) if hub else 0,
            latency=LatencyInfo(
                queue_p50=q50, queue_p99=q99, encode_p50=e50, encode_p99=e99, track_p50=t50, track_p99=t99
            ),
        )

    def server_stats(self) -> ServerStats:
        return ServerStats(
            uptime_s=time.time() - self.started_s,
            sessions=len(self.manager.list()),
            clients=len(self.clients),
            worker_steps=self.worker.steps,
            worker_batched_frames=self.worker.batched_frames,
        )

    def snapshot(self) -> Snapshot:
        """What ``/metrics`` reports about the live objects."""
        if not hasattr(self, "manager"):
            return Snapshot()
        sessions = []
        for s in self.manager.list():
            hub = self.hubs.get(s.id)
            sessions.append(
                SessionSample(
                    session_id=s.id,
                    name=s.name,
                    frames_in=s.stats.frames_in,
                    frames_processed=s.stats.frames_processed,
                    frames_dropped=s.stats.frames_dropped,
                    source_dropped=int(s.source.stats.dropped),
                    step_errors=s.stats.step_errors,
                    objects=len(s.predictor.obj_ids),
                    subscribers=len(hub.clients) if hub else 0,
                )
            )
        clients = [ClientSample(c.id, c.frames_sent, c.frames_dropped) for c in list(self.clients)]
        return Snapshot(sessions, clients, self.worker.steps, self.worker.batched_frames)

    # ---------------------------------------------------------------- HTTP and connections

    def authorized(self, request: Request) -> bool:
        """Whether ``request`` carries the token (or none is required)."""
        if not self._require_token:
            return True
        expected = (self._token or "").encode()
        if not expected:
            return False
        given: str | None = None
        header = request.headers.get("Authorization")
        if header and header[:7].lower() == "bearer ":
            given = header[7:].strip()
        else:
            _, _, query = request.path.partition("?")
            values = parse_qs(query).get("token")
            given = values[0] if values else None
        return given is not None and hmac.compare_digest(given.encode(), expected)

    def _respond(self, connection: ServerConnection, status: int, text: str, content_type: str | None = None) -> Response:
        response = connection.respond(status, text)
        if content_type:
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = content_type
        return response

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/healthz":
            body = {"status": "stopping" if self.closing else "ok", "protocol_version": PROTOCOL_VERSION}
            if hasattr(self, "manager"):
                body.update(sessions=len(self.manager.list()), clients=len(self.clients))
            return self._respond(connection, 503 if self.closing else 200, json.dumps(body) + "\n", "application/json")
        if path == "/metrics":
            if not self.authorized(request):
                return self._unauthorized(connection)
            return self._respond(connection, 200, self.metrics.render().decode(), CONTENT_TYPE)
        if "websocket" not in request.headers.get("Upgrade", "").lower():  # plain HTTP: a page, a file
            route = self._route(path)
            if route is not None:
                return route(connection, request)
        if path not in WEBSOCKET_PATHS:
            return self._respond(connection, 404, f"no such path {path!r}; WebSocket: /, HTTP: /healthz, /metrics\n")
        if self.closing:
            return self._respond(connection, 503, "the server is shutting down\n")
        if not self.authorized(request):
            return self._unauthorized(connection)
        if len(self.clients) >= self.config.server.max_clients:
            return self._respond(connection, 503, f"too many clients (limit {self.config.server.max_clients})\n")
        return None

    def _route(self, path: str) -> RouteHandler | None:
        """The handler for ``path``: an exact key of :attr:`routes`, else the
        longest key ending in ``/`` that ``path`` starts with (a folder; ``/``
        itself only matches ``/``)."""
        route = self.routes.get(path)
        if route is not None:
            return route
        prefixes = [p for p in self.routes if p != "/" and p.endswith("/") and path.startswith(p)]
        return self.routes[max(prefixes, key=len)] if prefixes else None

    def _unauthorized(self, connection: ServerConnection) -> Response:
        logger.info("refused %s: missing or wrong token", connection.remote_address)
        response = self._respond(
            connection, 401, "a bearer token is required: send 'Authorization: Bearer TOKEN' or ?token=TOKEN\n"
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="sam2-stream"'
        return response

    async def _handle_connection(self, ws: ServerConnection) -> None:
        client = ClientConnection(self, ws, next(self._client_ids))
        sndbuf = self.config.server.send_buffer_bytes
        sock = ws.transport.get_extra_info("socket")
        if sndbuf and sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            except OSError:
                pass
        self.clients.add(client)
        self.metrics.connections.inc()
        logger.info("client %d connected from %s", client.id, ws.remote_address)
        try:
            await client.run()
        finally:
            self.clients.discard(client)
            logger.info(
                "client %d disconnected (%s): %d frames sent, %d dropped as it read slower than results came",
                client.id,
                ws.close_code if ws.close_code is not None else "no close code",
                client.frames_sent,
                client.frames_dropped,
            )


class ServerThread:
    """A :class:`TrackingServer` on its own event loop in a daemon thread.

    For tests, benchmarks and programs that are not asyncio::

        with ServerThread(TrackingServer(config, model)) as st:
            print(st.url)
    """

    def __init__(self, server: TrackingServer) -> None:
        self.server = server
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="sam2-stream-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                return
            self._started.set()
            try:
                await self._stop.wait()
            finally:
                await self.server.stop()

        asyncio.run(main())

    def call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run ``fn()`` on the server's loop thread and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop is not None and self._stop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
