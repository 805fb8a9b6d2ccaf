"""The live service: a ``websockets`` asyncio server in front of the tracking sessions.

I/O only. Messages are parsed and encoded by :mod:`server.protocol`; tracking
is :mod:`tracker.session` (one :class:`~tracker.session.InferenceWorker`
thread per device runs the model for every session); each client and each
session's fan-out live in :mod:`server.connection`. What this module adds:

* :class:`TrackingServer`: sessions opened by name or URI (with a model and
  tracking options of the client's choosing), the hubs, reports;
* HTTP on the same port, answered during the WebSocket handshake:
  ``/healthz``, ``/metrics`` (Prometheus), and :attr:`TrackingServer.routes`,
  the hook where the operator page (static files) plugs in;
* auth (bearer token in ``Authorization`` or ``?token=``, required unless
  bound to loopback), an Origin allowlist, TLS, message size limits without
  compression (a compressed message can expand enormously), connection limits
  (``max_clients``, ``max_clients_per_address``), and a graceful stop that
  closes sessions before connections;
* threads for blocking calls: opening sources on a pool with a thread for
  every open that may be in flight (so a source that never answers delays no
  one else), closing sessions and other blocking calls on another.

:class:`ServerThread` runs a server on its own loop thread for tests,
benchmarks and programs that are not asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs

import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from server.config import ConfigError, address_key, ServerConfig, SourceCatalog
from server.connection import ClientConnection, SessionHub
from server.images import ImageService, max_image_message_bytes
from server.metrics import CONTENT_TYPE, ClientSample, ServerMetrics, SessionSample, Snapshot
from server.protocol import (
    MASK_FORMATS,
    PROTOCOL_VERSION,
    SERVER_NAME,
    Hello,
    ImagesStatsInfo,
    LatencyInfo,
    LimitsInfo,
    ModelInfo,
    ProtocolError,
    ServerStats,
    SessionInfo,
    SessionStatsInfo,
)
from tracker.ingest import VideoSource
from tracker.model import model_precision
from tracker.session import InferenceWorker, OptionError, SessionError, SessionLimits, SessionManager, TrackingSession

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


def _peer_host(connection: ServerConnection) -> str:
    """The address a connection comes from, as ``max_clients_per_address`` counts it."""
    address = connection.remote_address
    return address_key(str(address[0]) if isinstance(address, tuple) and address else str(address))


def _percentiles(values: deque) -> tuple[float | None, float | None]:
    data = sorted(list(values))
    if not data:
        return None, None
    return statistics.median(data), data[min(len(data) - 1, int(round(0.99 * (len(data) - 1))))]


class TrackingServer:
    """The WebSocket server with its sessions; see the module docstring.

    Args:
        config: the server's configuration (``server.config.load_config``).
        model: the default SAM 2 model (``tracker.model.build_model``); one
            inference worker per device runs the models of every session.
        model_name: its name for clients (``hello``, ``open``'s ``model``;
            default: ``config.model.name``).
        models: more models sessions may choose, by name (``[models]`` in the config).
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
        models: dict[str, torch.nn.Module] | None = None,
        routes: dict[str, RouteHandler] | None = None,
    ) -> None:
        config.check()
        self.config = config
        self.model = model
        self.model_name = model_name or config.model.name
        if models and self.model_name in models:
            raise ValueError(f"models: {self.model_name!r} is the default model's name; give the other one another name")
        self.models: dict[str, torch.nn.Module] = {self.model_name: model, **(models or {})}
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
        #: every connection from its handshake to its end (or failed handshake) -> peer address
        self._connections: dict[ServerConnection, str] = {}
        self._handled: set[ServerConnection] = set()  # those whose handler runs
        self._client_ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._ws: Server | None = None
        self.loop: asyncio.AbstractEventLoop
        self.worker: InferenceWorker
        self.manager: SessionManager
        self.images: ImageService | None = None
        self.images_http: Any = None  # server.images_http.ImagesHttp where [images] http_port is set
        self.encoder_pool: ThreadPoolExecutor
        self._blocking_pool: ThreadPoolExecutor
        self._open_pool: ThreadPoolExecutor

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        host = self.config.server.host
        host = f"[{host}]" if ":" in host else host
        return f"{'wss' if self._ssl else 'ws'}://{host}:{self.port}/"

    @property
    def cluster(self) -> bool:
        """Whether sessions run on a Ray cluster (``[cluster] address``, ``serve --ray``)."""
        return self.config.cluster.address is not None

    def _local_manager(self) -> SessionManager:
        cfg = self.config
        return SessionManager(
            self.worker,
            max_sessions=cfg.limits.max_sessions,
            limits=SessionLimits(
                max_objects=cfg.limits.max_objects,
                lost_after_frames=cfg.limits.lost_after_frames,
                idle_timeout_s=cfg.limits.idle_timeout_s,
                max_points_per_frame=cfg.limits.max_points_per_frame,
                prompts_per_step=cfg.limits.prompts_per_step,
            ),
            predictor_options={"return_logits": False},
            models=self.models,
            cpu_fallback=cfg.model.cpu_fallback,
        )

    def _abort_start(self) -> None:
        """A start that fails after the sessions' manager exists: stop the worker, leave the cluster's sessions."""
        self.worker.stop()
        if self.cluster:
            self.manager.close_all()

    async def start(self) -> None:
        """Start the worker and listen; returns once clients can connect."""
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        self.worker = InferenceWorker(self.model, max_batch=cfg.model.max_batch, max_image_batch=cfg.images.max_batch)
        if self.cluster:  # sessions on Ray session hosts; this process keeps the protocol (and image mode)
            from server.ray_front import RemoteSessionManager, model_specs

            try:
                self.manager = await self.loop.run_in_executor(
                    None, RemoteSessionManager.connect, cfg, model_specs(cfg, self.model_name)
                )
            except BaseException:
                self.worker.stop()
                raise
        else:
            self.manager = self._local_manager()
        for name in self.catalog.names:  # a configured session's choices must be usable
            model_name, tracking = self.catalog.session_choices(name)
            try:
                self.manager.check_options(model_name, tracking)
            except OptionError as exc:
                self._abort_start()
                raise ConfigError(f"source {name!r} in the config: {exc}") from None
        self.encoder_pool = ThreadPoolExecutor(2, thread_name_prefix="sam2-stream-encode")
        self._blocking_pool = ThreadPoolExecutor(4, thread_name_prefix="sam2-stream-io")
        # a thread for each open that may be in flight: every client slot's
        # max_opens_in_flight (a connection keeps its slot until its opens end),
        # so no open ever queues behind another; threads start on demand
        self._open_pool = ThreadPoolExecutor(
            cfg.server.max_clients * cfg.limits.max_opens_in_flight, thread_name_prefix="sam2-stream-open"
        )
        if cfg.images.enabled:
            from tracker.families.hf_image import make_segmenter

            self.images = ImageService(cfg, make_segmenter(self.model), self.worker, self.run_blocking)
        s = cfg.server
        origins: list[str | None] | None = [*s.allow_origins, None] if s.allow_origins else None
        try:
            self._ws = await serve(
                self._handle_connection,
                s.host,
                s.port,
                origins=origins,  # type: ignore[arg-type]
                compression=None,
                # image_open carries a file in base64: the only message allowed past
                # max_message_bytes (server.connection closes others with 1009)
                max_size=self.max_size,
                # messages read ahead of the one being answered: with image-sized
                # messages allowed, few, so one connection buffers a few images at most
                max_queue=16 if self.max_size <= s.max_message_bytes else 4,
                write_limit=s.write_limit_bytes,
                # keepalive is server.connection.ClientConnection's: websockets'
                # waits for a full send buffer before its pong timer starts
                ping_interval=None,
                ping_timeout=None,
                close_timeout=s.close_timeout_s,
                process_request=self._process_request,
                server_header=f"{SERVER_NAME}/{server_version()}",
                ssl=self._ssl,
                logger=logging.getLogger("sam2-stream.websockets"),
            )
        except BaseException:
            self._abort_start()
            raise
        self.port = self._ws.sockets[0].getsockname()[1]
        if self.images is not None and cfg.images.http_port is not None:
            from server.images_http import ImagesHttp

            self.images_http = ImagesHttp(self)
            try:
                await self.images_http.start(s.host, cfg.images.http_port, self._ssl)
            except BaseException:
                self._ws.close()
                self._abort_start()
                raise
        self.started_s = time.time()
        self.spawn(self._housekeeping())
        logger.info(
            "listening on %s (token %s, origins %s, TLS %s); model %s at %d px on %s%s; sources: %s",
            self.url,
            "required" if self._require_token else "not required (loopback)",
            ", ".join(s.allow_origins) if s.allow_origins else "any",
            "on" if self._ssl else "off",
            self.model_name,
            int(self.model.image_size),
            self.worker.device,
            f" (also: {', '.join(list(self.models)[1:])})" if len(self.models) > 1 else "",
            ", ".join(self.catalog.names) or "none configured",
        )

    async def stop(self) -> None:
        """Graceful stop: refuse new requests, close every session (subscribers
        get a ``closed`` event), close connections (1001), stop the worker."""
        if self.closing:
            return
        self.closing = True
        if self.images_http is not None:
            await self.images_http.stop()
        sessions = self.manager.list()
        if self.cluster:  # the cluster's sessions stay on their hosts for the other fronts
            logger.info("shutting down: %d client(s); %d cluster session(s) stay on their hosts", len(self.clients),
                        len(sessions))
        else:
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
            self._ws.close()  # 1001 to every connection; a client that stopped reading cannot take it
            try:
                grace = self.config.server.close_timeout_s + 1
                await asyncio.wait_for(asyncio.shield(self._ws.wait_closed()), grace)
            except asyncio.TimeoutError:
                for client in list(self.clients):
                    client.ws.transport.abort()
                await self._ws.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = list(self.manager.workers)  # a Ray front's own worker (image mode) is not among them
        if self.worker not in workers:
            workers.append(self.worker)
        for worker in workers:
            await self.run_blocking(worker.stop)
        if self.images is not None:
            await self.run_blocking(self.images.stop)
        if self._webrtc is not None and self.config.webrtc.ice_host_addresses:
            self._webrtc.set_ice_host_addresses(None)  # process-wide: leave it as found
        self._blocking_pool.shutdown(wait=False)
        self._open_pool.shutdown(wait=False, cancel_futures=True)  # a stalled open ends on its own timeout
        self.encoder_pool.shutdown(wait=False)
        logger.info("stopped")

    @property
    def max_size(self) -> int:
        """The largest WebSocket message taken: ``max_message_bytes``, or an
        ``image_open`` of an ``[images] max_bytes`` file in base64 when larger."""
        size = self.config.server.max_message_bytes
        if self.config.images.enabled:
            size = max(size, max_image_message_bytes(self.config.images))
        return size

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
        """Run a blocking call (closing a session, stopping a worker) off the loop."""
        return await self.loop.run_in_executor(self._blocking_pool, fn, *args)

    async def run_open(self, fn: Callable[..., VideoSource], *args: Any) -> VideoSource:
        """Open a source off the loop, on a thread of its own (see ``_open_pool``).

        A source that opens once the server is stopping is closed again there
        (its opener is gone) and the open fails with ``shutting_down``.
        """
        return await self.loop.run_in_executor(self._open_pool, self._open_unless_closing, fn, *args)

    async def run_cluster(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A blocking call to the Ray cluster (an open placed on a session host) on the open threads."""
        return await self.loop.run_in_executor(self._open_pool, functools.partial(fn, *args, **kwargs))

    def _open_unless_closing(self, fn: Callable[..., VideoSource], *args: Any) -> VideoSource:
        source = fn(*args)
        if self.closing:
            source.close()
            raise ProtocolError("shutting_down", "the server is shutting down")
        return source

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

    async def open_session(
        self,
        source: str,
        options: dict[str, Any] | None,
        model: str | None = None,
        tracking: dict[str, Any] | None = None,
    ) -> tuple[TrackingSession, bool]:
        """A configured name's session (opened on first use), or a new session on
        a URI the policy allows, with the model and tracking options asked for
        (checked before any source opens). Returns the session and whether it
        was created."""
        tracking = dict(tracking or {})
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
                    self._check_join(hub.session, model, tracking)
                    return hub.session, False
                config_model, config_tracking = self.catalog.session_choices(source)
                asked_model, asked_tracking = model, tracking
                model, tracking = model or config_model, {**config_tracking, **tracking}
                self._check_options(model, tracking)
                if self.cluster:  # opened on a session host, or the session of this name another front opened
                    self._check_session_limit()
                    session, created = await self.run_cluster(
                        self.manager.open_remote, self._opener("open_named", (source,)), name=source, model=model,
                        options=tracking, join=True,
                    )
                    if not created:
                        self._check_join(session, asked_model, asked_tracking)
                    self._named[source] = session.id
                    self.hub(session)
                    return session, created
                self._check_session_limit()
                opened = await self.run_open(self.catalog.open_named, source)
                session = self.manager.open(opened, name=source, model=model, options=tracking)
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
        self._check_options(model, tracking)
        self._check_session_limit()
        if self.cluster:  # the policy is checked here, the source opens on the session host
            spec = await self.run_cluster(self.catalog.check_uri, source, options)
            session, _ = await self.run_cluster(
                self.manager.open_remote, self._opener("open_uri", (source, options)), name=spec.display, model=model,
                options=tracking,
            )
        else:
            opened = await self.run_open(self.catalog.open_uri, source, options)
            session = self.manager.open(opened, name=opened.spec.display, model=model, options=tracking)
        self.hub(session)
        return session, True

    def _opener(self, method: str, args: tuple) -> Any:
        """What a session host calls to open a source: the catalog's ``method`` under this config's policy."""
        from server.ray_front import SourceOpener

        return SourceOpener(self.config, method, args)

    def _check_options(self, model: str | None, tracking: dict[str, Any]) -> None:
        try:
            self.manager.check_options(model, tracking)
        except OptionError as exc:
            field = "model" if exc.option is None else f"tracking.{exc.option}"
            raise ProtocolError("invalid_option", str(exc), field=field) from None

    def _check_join(self, session: TrackingSession, model: str | None, tracking: dict[str, Any]) -> None:
        """Joining a running session: a different model or tracking options cannot apply."""
        if model is not None and model != session.model_name:
            raise ProtocolError(
                "invalid_option",
                f"{session.name!r} already runs with model {session.model_name!r}; join it without a model, "
                "or close it first",
                field="model",
            )
        current = session.tracking_values()
        differ = sorted(k for k, v in tracking.items() if current.get(k) != v)
        if differ:
            raise ProtocolError(
                "invalid_option",
                f"{session.name!r} already runs with other tracking options ({', '.join(differ)}); "
                "join it without them, or close it first",
                field=f"tracking.{differ[0]}",
            )

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
        if self.cluster:  # a push: session on a host; the publisher's frames are relayed to it
            session, _ = await self.run_cluster(self.manager.open_remote, f"push:{name}", name=f"webrtc:{name}")
            source = session.source
        else:
            session, source = None, name
        publisher = webrtc.WebRTCPublisher(
            source, configuration=self.peer_configuration(), frame_timeout_s=self.config.webrtc.frame_timeout_s
        )
        if session is None:
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
        if hub is None and self.cluster:  # a session another front opened: every front serves it
            try:
                hub = self.hub(self.manager.get(session_id))
            except SessionError:
                return None
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
            model=self.model_info(self.model_name),
            models=[self.model_info(name) for name in self.models],
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
                max_points_per_frame=limits.max_points_per_frame,
                max_opens_in_flight=limits.max_opens_in_flight,
                send_timeout_s=self.config.server.send_timeout_s,
                image_max_bytes=self.config.images.max_bytes,
            ),
        )

    def model_info(self, name: str) -> ModelInfo:
        net = self.models[name]
        family = getattr(net, "stream_family", None)
        return ModelInfo(
            name=name,
            image_size=int(net.image_size),
            device=str(next(net.parameters()).device),
            precision=model_precision(net),
            family=family.title if family is not None else "SAM 2",
            licence=family.licence if family is not None else "Apache-2.0",
        )

    def features(self) -> list[str]:
        """Optional requests served here: the WebRTC ones when aiortc is installed and allowed."""
        if self._has_aiortc is None:
            self._has_aiortc = importlib.util.find_spec("aiortc") is not None
        images = ["images"] if self.config.images.enabled else []
        if not self._has_aiortc:
            return images
        w = self.config.webrtc
        return [name for name, on in (("webrtc_publish", w.publish), ("webrtc_view", w.view)) if on] + images

    def images_stats(self) -> ImagesStatsInfo | None:
        if self.images is None:
            return None
        st = self.images.stats()
        c = st.cache
        return ImagesStatsInfo(
            cache_hits=c.hits,
            cache_misses=c.misses,
            cache_evictions=c.evictions,
            cache_rejected=c.rejected,
            cache_bytes=c.bytes,
            cache_entries=c.entries,
            cache_budget_bytes=c.budget_bytes,
            open_images=st.open_images,
            opens=st.counters.opens,
            segments=st.counters.segments,
            recomputed=st.counters.recomputed,
            encoder_batches=st.encoder_batches,
            images_encoded=st.images_encoded,
            cpu_fallbacks=st.counters.cpu_fallbacks,
        )

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
            model=info["model"],
            device=info["device"],
            tracking=info["tracking"],
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
            worker_steps=sum(w.steps for w in self.manager.workers),
            worker_batched_frames=sum(w.batched_frames for w in self.manager.workers),
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
        workers = self.manager.workers
        return Snapshot(
            sessions, clients, sum(w.steps for w in workers), sum(w.batched_frames for w in workers), self.images_stats()
        )

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
        return self._admit(connection)

    def _admit(self, connection: ServerConnection) -> Response | None:
        """Count a WebSocket handshake against ``max_clients`` and
        ``max_clients_per_address`` (from its handshake on, so simultaneous
        handshakes cannot overshoot); HTTP 503 beyond either."""
        s = self.config.server
        address = _peer_host(connection)
        if len(self._connections) >= s.max_clients:
            return self._respond(connection, 503, f"too many clients (limit {s.max_clients})\n")
        if sum(1 for a in self._connections.values() if a == address) >= s.max_clients_per_address:
            logger.info("refused a connection from %s: %d connections from it already", address, s.max_clients_per_address)
            return self._respond(
                connection,
                503,
                f"too many connections from {address} (limit {s.max_clients_per_address} per address); "
                "close one first\n",
            )
        self._connections[connection] = address
        self.spawn(self._release_unhandled(connection))
        return None

    async def _release_unhandled(self, connection: ServerConnection) -> None:
        """Free the slot of a connection whose handshake failed after it was
        admitted (its handler never runs; a handler frees its own slot)."""
        try:
            await connection.wait_closed()
        finally:
            if connection not in self._handled:
                self._connections.pop(connection, None)

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
        self._handled.add(ws)  # first: websockets calls this without a pause after the handshake
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
            self._connections.pop(ws, None)
            self._handled.discard(ws)
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
