"""Python client of the live service, for robots, scripts and tests.

::

    from server.client import Client

    async with Client("ws://127.0.0.1:8765", token=None) as c:
        s = await c.open("cam1")
        first = await s.next_frame()
        obj = await s.click(320, 240, frame=first.frame_idx)   # a new object
        async for f in s.frames():
            mask = f.masks[obj]          # numpy bool H x W, source resolution
            print(f.frame_idx, f.boxes[obj], f.latency_s)

:class:`SyncClient` wraps the same API for scripts that are not asyncio (it
runs the connection on an event loop in a thread); ``samples/client_click.py``
uses it.

Frames: by default a session keeps only the newest frame not yet taken, like
the server does for a slow client, so a consumer that falls behind skips to
the newest result; pass ``frame_buffer=N`` to keep more. Masks are decoded
lazily, on first access to :attr:`RemoteFrame.masks`.

Errors join the project's tree::

    TrackerError
    └── ClientError              the client cannot go on (version, connection)
        ├── RemoteError          the server answered a request with an error
        └── ConnectionLostError  the connection closed; pending requests fail with it
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server.protocol import (
    PROTOCOL_VERSION,
    AddBox,
    AddPoints,
    Close,
    ErrorMsg,
    EventMsg,
    FrameMsg,
    Hello,
    ListReply,
    ImageClose,
    ImageCloseReply,
    ImageOpen,
    ImageOpenReply,
    ImageSegment,
    ImageSegmentReply,
    ListSessions,
    ObjectMsg,
    Open,
    OpenReply,
    Pause,
    PublishReply,
    PromptReply,
    ProtocolError,
    RemoveObject,
    RemoveReply,
    Reply,
    Request,
    Reset,
    Resume,
    SessionInfo,
    SessionReply,
    Stats,
    StatsReply,
    Subscribe,
    TrackingOptions,
    Unsubscribe,
    SessionDescription,
    ViewReply,
    WebRTCPublish,
    WebRTCView,
    decode_mask,
    decode_reply,
    decode_server_message,
    encode,
    split_binary,
)
from tracker.errors import TrackerError

logger = logging.getLogger("sam2-stream.client")

R = TypeVar("R", bound=Reply)


class ClientError(TrackerError):
    """The client cannot go on: wrong protocol version, unreadable message."""


class RemoteError(ClientError):
    """The server answered a request with an error.

    Attributes: ``code`` (e.g. ``prompt_error``, ``rate_limited``; see
    ``docs/protocol.md``), ``field`` (the request field at fault, if any),
    ``request_id``.
    """

    def __init__(self, code: str, message: str, field: str | None = None, request_id: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.request_id = request_id


class ConnectionLostError(ClientError):
    """The connection to the server closed."""


@dataclass
class RemoteFrame:
    """One processed frame as received. Times are wall-clock seconds; ``pts_s``
    is the source's clock; ``latency_s`` is frame arrival (server) to receipt."""

    session_id: str
    frame_idx: int
    source_index: int | None
    pts_s: float | None
    arrival_s: float | None
    processed_s: float | None
    sent_s: float
    received_s: float
    queue_s: float | None
    model_s: float | None
    width: int
    height: int
    objects: dict[int, ObjectMsg] = field(default_factory=dict)
    payload: bytes = b""

    @classmethod
    def from_message(cls, msg: FrameMsg, payload: bytes, received_s: float) -> RemoteFrame:
        return cls(
            session_id=msg.session_id,
            frame_idx=msg.frame_idx,
            source_index=msg.source_index,
            pts_s=msg.pts_s,
            arrival_s=msg.arrival_s,
            processed_s=msg.processed_s,
            sent_s=msg.sent_s,
            received_s=received_s,
            queue_s=msg.queue_s,
            model_s=msg.model_s,
            width=msg.width,
            height=msg.height,
            objects={o.obj_id: o for o in msg.objects},
            payload=payload,
        )

    @cached_property
    def masks(self) -> dict[int, np.ndarray]:
        """obj_id → bool ``(height, width)`` mask (absent with mask format ``none``)."""
        out = {}
        for obj_id, o in self.objects.items():
            mask = decode_mask(o.mask, self.payload)
            if mask is not None:
                out[obj_id] = mask
        return out

    @property
    def boxes(self) -> dict[int, tuple[int, int, int, int] | None]:
        """obj_id → inclusive ``(x0, y0, x1, y1)`` pixel box, None when the mask is empty."""
        return {i: None if o.box_xyxy is None else tuple(o.box_xyxy) for i, o in self.objects.items()}  # type: ignore[misc]

    @property
    def scores(self) -> dict[int, float]:
        """obj_id → SAM 2 object score logit (> 0: visible)."""
        return {i: o.score for i, o in self.objects.items()}

    @property
    def visible(self) -> dict[int, bool]:
        return {i: o.visible for i, o in self.objects.items()}

    @property
    def latency_s(self) -> float | None:
        return None if self.arrival_s is None else self.received_s - self.arrival_s


class RemoteSession:
    """A session on the server, as seen by this client (see :meth:`Client.open`)."""

    def __init__(self, client: Client, info: SessionInfo, *, subscribed: bool, mask_format: str) -> None:
        self.client = client
        self.info = info
        self.id = info.session_id
        self.subscribed = subscribed
        self.mask_format = mask_format
        self.closed = False
        self.close_reason = ""
        #: called on the client's loop for every frame / event as it arrives; must not block
        self.on_frame: Callable[[RemoteFrame], None] | None = None
        self.on_event: Callable[[EventMsg], None] | None = None
        self.frames_received = 0
        self.frames_skipped = 0  # replaced here before the consumer took them
        self.last_frame: RemoteFrame | None = None
        self._frames: deque[RemoteFrame] = deque(maxlen=client.frame_buffer)
        self._events: deque[EventMsg] = deque(maxlen=256)
        self._changed = asyncio.Event()

    @property
    def width(self) -> int | None:
        return self.info.width

    @property
    def height(self) -> int | None:
        return self.info.height

    def __repr__(self) -> str:
        return f"<RemoteSession {self.id} {self.info.name!r} {'closed' if self.closed else self.info.state}>"

    # ---------------------------------------------------------------- prompts

    async def add_points(
        self,
        points_xy: Sequence[Sequence[float]],
        labels: Sequence[int],
        *,
        frame: int | None = None,
        obj: int | None = None,
        clear_old_points: bool = True,
    ) -> PromptReply:
        """Prompt an object with clicks (source pixels; label 1 positive, 0 negative).

        ``obj`` None makes a new object; ``frame`` is the ``frame_idx`` of the
        frame the clicks were made on (default: the newest sent). Returns the
        object's id and its mask on that frame.
        """
        req = AddPoints(
            id=0,
            session_id=self.id,
            points_xy=[(float(x), float(y)) for x, y in points_xy],
            labels=[int(v) for v in labels],  # type: ignore[misc]
            obj_id=obj,
            frame_idx=frame,
            clear_old_points=clear_old_points,
        )
        return await self.client.request(req, PromptReply)

    async def click(self, x: float, y: float, *, frame: int | None = None, obj: int | None = None, label: int = 1) -> int:
        """One click; returns the object id (a new one when ``obj`` is None)."""
        return (await self.add_points([(x, y)], [label], frame=frame, obj=obj)).obj_id

    async def box(
        self, x0: float, y0: float, x1: float, y1: float, *, frame: int | None = None, obj: int | None = None
    ) -> int:
        """A box prompt; returns the object id."""
        req = AddBox(id=0, session_id=self.id, box_xyxy=(x0, y0, x1, y1), obj_id=obj, frame_idx=frame)
        return (await self.client.request(req, PromptReply)).obj_id

    async def remove(self, obj: int) -> list[int]:
        """Stop tracking an object; returns the ids still tracked."""
        return (await self.client.request(RemoveObject(id=0, session_id=self.id, obj_id=obj), RemoveReply)).objects

    async def reset(self) -> None:
        await self.client.request(Reset(id=0, session_id=self.id), SessionReply)

    async def pause(self) -> None:
        await self.client.request(Pause(id=0, session_id=self.id), SessionReply)

    async def resume(self) -> None:
        await self.client.request(Resume(id=0, session_id=self.id), SessionReply)

    async def close(self) -> None:
        """Close the session on the server, for every client watching it."""
        await self.client.request(Close(id=0, session_id=self.id), SessionReply)

    async def unsubscribe(self) -> None:
        """Stop receiving this session's frames and events (it keeps running)."""
        await self.client.request(Unsubscribe(id=0, session_id=self.id), SessionReply)
        self.subscribed = False
        self.client._sessions.pop(self.id, None)

    # ---------------------------------------------------------------- frames and events

    def _push_frame(self, frame: RemoteFrame) -> None:
        if len(self._frames) == self._frames.maxlen:
            self.frames_skipped += 1
        self._frames.append(frame)
        self.frames_received += 1
        self.last_frame = frame
        if self.on_frame is not None:
            self.on_frame(frame)
        self._changed.set()

    def _push_event(self, event: EventMsg) -> None:
        self._events.append(event)
        if event.kind == "closed":
            self.closed = True
            self.close_reason = event.message
        if self.on_event is not None:
            self.on_event(event)
        self._changed.set()

    def _lost(self, reason: str) -> None:
        self.closed = True
        self.close_reason = self.close_reason or reason
        self._changed.set()

    async def next_frame(self, timeout: float | None = None) -> RemoteFrame:
        """The oldest frame not yet taken (with ``frame_buffer=1``: the newest).

        Raises:
            TimeoutError: none came within ``timeout`` s.
            ConnectionLostError: the session was closed or the connection lost.
        """
        return await self._next(
            self._frames, "frame", timeout, lambda: self.closed, lambda: f"session {self.id} is closed: {self.close_reason}"
        )

    async def frames(self) -> AsyncIterator[RemoteFrame]:
        """Frames as they come, until the session closes."""
        while True:
            try:
                yield await self.next_frame()
            except ConnectionLostError:
                return

    async def next_event(self, timeout: float | None = None) -> EventMsg:
        # unlike frames, waiting for events ends with the connection, not with the session
        return await self._next(
            self._events, "event", timeout,
            lambda: self.closed and not self.client.connected, lambda: f"session {self.id}: {self.close_reason}",
        )

    async def _next(
        self, items: deque, what: str, timeout: float | None, ended: Callable[[], bool], why: Callable[[], str]
    ) -> Any:
        """The oldest of ``items``, waiting for one up to ``timeout`` s; ConnectionLostError
        (``why()``) once ``ended()`` and none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if items:
                return items.popleft()
            if ended():
                raise ConnectionLostError(why())
            self._changed.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no {what} from session {self.id} within {timeout:g} s")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def events(self) -> AsyncIterator[EventMsg]:
        """Events (``lost``, ``found``, ``source_ended``, …) as they come, until ``closed``."""
        while True:
            try:
                event = await self.next_event()
            except ConnectionLostError:
                return
            yield event
            if event.kind == "closed":
                return

    def drain_events(self) -> list[EventMsg]:
        """Events received and not yet taken, without waiting."""
        out = list(self._events)
        self._events.clear()
        return out


@dataclass
class ImageResult:
    """The masks of one image prompt, best first: bool H x W arrays (None with
    ``mask_format="none"``) and SAM's predicted IoU of each."""

    masks: list[np.ndarray | None]
    scores: list[float]
    boxes: list[tuple[int, int, int, int] | None]
    answer: int  # this image's answer number (``previous`` refers to the last one)
    decode_s: float
    embed_s: float  # > 0: the embedding had been evicted and was encoded again

    @property
    def best(self) -> np.ndarray | None:
        return self.masks[0] if self.masks else None


class RemoteImage:
    """An image opened on the server (:meth:`Client.open_image`): prompt it many times."""

    def __init__(self, client: Client, reply: ImageOpenReply) -> None:
        self.client = client
        self.image_id = reply.image_id
        self.width, self.height = reply.width, reply.height
        self.embed_s, self.cached = reply.embed_s, reply.cached
        self.reply = reply

    def __repr__(self) -> str:
        return f"RemoteImage({self.image_id!r}, {self.width}x{self.height}, cached={self.cached})"

    async def segment(
        self,
        *,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        multimask: bool = False,
        previous: int | None = None,
        mask_format: str = "rle",
    ) -> ImageResult:
        """Masks for points (``labels`` 1 add / 0 subtract) and/or a box, in image
        pixels; ``previous=k`` refines candidate ``k`` of the last answer."""
        if points is not None and labels is None:
            labels = [1] * len(points)
        req = ImageSegment(
            id=0,
            image_id=self.image_id,
            points_xy=None if points is None else [(float(x), float(y)) for x, y in points],
            labels=None if labels is None else [int(v) for v in labels],  # type: ignore[misc]
            box_xyxy=None if box is None else tuple(float(v) for v in box),  # type: ignore[arg-type]
            multimask=multimask,
            previous=previous,
            mask_format=mask_format,  # type: ignore[arg-type]
        )
        reply, payload = await self.client.request_with_payload(req, ImageSegmentReply)
        size = (reply.height, reply.width)
        return ImageResult(
            masks=[decode_mask(m.mask, payload, size) for m in reply.masks],
            scores=[m.score for m in reply.masks],
            boxes=[None if m.box_xyxy is None else tuple(m.box_xyxy) for m in reply.masks],  # type: ignore[misc]
            answer=reply.answer,
            decode_s=reply.decode_s,
            embed_s=reply.embed_s,
        )

    async def close(self) -> None:
        await self.client.request(ImageClose(id=0, image_id=self.image_id), ImageCloseReply)


def image_file_bytes(image: str | os.PathLike | np.ndarray | bytes | bytearray) -> bytes:
    """What :meth:`Client.open_image` uploads: a file's bytes as they are, or an
    array (H x W [x 3|4], uint8/uint16/bool) as a lossless PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        from PIL import Image

        from tracker.image_input import rgb_from_array

        buf = io.BytesIO()
        Image.fromarray(rgb_from_array(image)).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    return Path(image).read_bytes()


class Client:
    """A connection to a ``sam2-stream serve`` server; an async context manager.

    Args:
        url: ``ws://host:port/`` or ``wss://…``.
        token: the server's bearer token, if it needs one.
        ssl: an ``ssl.SSLContext`` for ``wss://`` with a private CA.
        origin: an ``Origin`` header to send (browsers send one; scripts need not).
        frame_buffer: frames kept per session for the consumer (1: newest only).
        request_timeout: seconds to wait for any reply.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        ssl: Any = None,
        origin: str | None = None,
        frame_buffer: int = 1,
        request_timeout: float = 60.0,
        open_timeout: float = 10.0,
        max_message_bytes: int = 64 * 2**20,
    ) -> None:
        self.url = url
        self.token = token
        self.ssl = ssl
        self.origin = origin
        self.frame_buffer = max(1, int(frame_buffer))
        self.request_timeout = request_timeout
        self.open_timeout = open_timeout
        self.max_message_bytes = max_message_bytes
        self.hello: Hello | None = None
        #: errors the server sent without a request id (unreadable messages)
        self.unsolicited_errors: deque[ErrorMsg] = deque(maxlen=64)
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, Request, type[Reply]]] = {}
        self._payloads: dict[int, bytes] = {}  # binary replies' payloads, by request id
        self._sessions: dict[str, RemoteSession] = {}
        self._closed_reason = ""

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._reader is not None and not self._reader.done()

    async def connect(self) -> Hello:
        """Connect and read the server's ``hello``.

        Raises:
            ClientError: the server speaks another protocol version.
            websockets.exceptions.InvalidStatus: refused (401 token, 403 origin).
        """
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._ws = await connect(
            self.url,
            additional_headers=headers,
            origin=self.origin,  # type: ignore[arg-type]
            ssl=self.ssl,
            compression=None,
            max_size=self.max_message_bytes,
            open_timeout=self.open_timeout,
            proxy=None,
        )
        first = await asyncio.wait_for(self._ws.recv(), self.open_timeout)
        hello, _ = decode_server_message(first)
        if not isinstance(hello, Hello):
            await self._ws.close()
            raise ClientError(f"expected a hello message from {self.url}, got {type(hello).__name__}")
        if hello.protocol_version != PROTOCOL_VERSION:
            await self._ws.close()
            raise ClientError(
                f"{self.url} speaks protocol version {hello.protocol_version}; this client speaks "
                f"{PROTOCOL_VERSION}: use a matching sam2-stream version"
            )
        self.hello = hello
        self._reader = asyncio.create_task(self._read_loop())
        return hello

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- requests

    async def request(self, req: Request, reply_type: type[R]) -> R:
        """Send a request (its ``id`` is set here) and wait for its reply.

        Raises:
            RemoteError: the server answered with an error.
            ConnectionLostError, TimeoutError.
        """
        if not self.connected:
            raise ConnectionLostError(f"not connected to {self.url}{': ' + self._closed_reason if self._closed_reason else ''}")
        assert self._ws is not None
        req_id = next(self._ids)
        req = msgspec.structs.replace(req, id=req_id)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (future, req, reply_type)
        try:
            await self._ws.send(encode(req).decode())
            return await asyncio.wait_for(future, self.request_timeout)
        except ConnectionClosed as exc:
            raise ConnectionLostError(f"connection to {self.url} closed: {exc}") from None
        finally:
            self._pending.pop(req_id, None)

    async def request_with_payload(self, req: Request, reply_type: type[R]) -> tuple[R, bytes]:
        """:meth:`request` for replies that may come as a binary message (PNG
        masks): the reply and the bytes after its header (``b""`` for text)."""
        if not self.connected:
            raise ConnectionLostError(f"not connected to {self.url}")
        assert self._ws is not None
        req_id = next(self._ids)
        req = msgspec.structs.replace(req, id=req_id)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (future, req, reply_type)
        self._payloads[req_id] = b""
        try:
            await self._ws.send(encode(req).decode())
            reply = await asyncio.wait_for(future, self.request_timeout)
            return reply, self._payloads.get(req_id, b"")
        except ConnectionClosed as exc:
            raise ConnectionLostError(f"connection to {self.url} closed: {exc}") from None
        finally:
            self._pending.pop(req_id, None)
            self._payloads.pop(req_id, None)

    async def open(
        self,
        source: str,
        *,
        mask_format: str = "rle",
        options: dict[str, Any] | None = None,
        subscribe: bool = True,
        model: str | None = None,
        tracking: Mapping[str, Any] | None = None,
    ) -> RemoteSession:
        """Open (or join) a session on a configured source name or an allowed URI.

        ``model``: one of the server's models (``hello.models``); ``tracking``:
        this session's tracking options (``server.protocol.TrackingOptions``,
        e.g. ``{"max_objects": 4, "lost_after_frames": 30}``). Both apply to a
        session this call creates. ``options``: source options (URIs only).
        """
        try:
            tracking_options = None if tracking is None else msgspec.convert(dict(tracking), TrackingOptions)
        except msgspec.ValidationError as exc:
            raise ValueError(f"tracking: {exc}") from None
        req = Open(
            id=0,
            source=source,
            mask_format=mask_format,  # type: ignore[arg-type]
            subscribe=subscribe,
            options=options,
            model=model,
            tracking=tracking_options,
        )
        reply = await self.request(req, OpenReply)
        return self._sessions.get(reply.session.session_id) or RemoteSession(
            self, reply.session, subscribed=False, mask_format=mask_format
        )

    async def subscribe(self, session_id: str, *, mask_format: str = "rle") -> RemoteSession:
        """Watch a session already open on the server (see :meth:`list_sessions`)."""
        await self.request(Subscribe(id=0, session_id=session_id, mask_format=mask_format), SessionReply)  # type: ignore[arg-type]
        return self._sessions[session_id]

    async def list_sessions(self) -> list[SessionInfo]:
        return (await self.request(ListSessions(id=0), ListReply)).sessions

    async def open_image(
        self, image: str | os.PathLike | np.ndarray | bytes | None = None, *, name: str | None = None
    ) -> RemoteImage:
        """Upload an image (a local path, an array, or a file's bytes) or open one
        of the server's image folders by ``name``; its embedding is computed once
        (or found in the server's cache) and :meth:`RemoteImage.segment` prompts it."""
        if (image is None) == (name is None):
            raise ValueError("open_image takes an image (path, array or bytes) or name=, not both")
        if name is not None:
            req = ImageOpen(id=0, name=name)
        else:
            assert image is not None
            data = await asyncio.get_running_loop().run_in_executor(None, image_file_bytes, image)
            req = ImageOpen(id=0, data=base64.b64encode(data).decode("ascii"))
        return RemoteImage(self, await self.request(req, ImageOpenReply))

    async def stats(self, session_id: str | None = None) -> StatsReply:
        return await self.request(Stats(id=0, session_id=session_id), StatsReply)

    async def publish_webrtc(self, offer: Mapping[str, str], *, name: str = "webrtc") -> tuple[dict[str, str], str]:
        """Send video in over WebRTC: the server answers the offer (it must send
        video; gather ICE candidates first) and tracks that video in a new session.

        Returns:
            The answer (``{"sdp", "type"}``, for ``setRemoteDescription``) and
            the session id (:meth:`subscribe` to it for the masks).
        """
        req = WebRTCPublish(id=0, offer=SessionDescription(sdp=offer["sdp"], type=offer["type"]), name=name)
        reply = await self.request(req, PublishReply)
        return {"sdp": reply.answer.sdp, "type": reply.answer.type}, reply.session.session_id

    async def view_webrtc(self, session_id: str, offer: Mapping[str, str], *, draw_masks: bool = True) -> dict[str, str]:
        """Receive a session's processed video over WebRTC (the offer must receive
        video); returns the answer. The viewer closes with this connection."""
        req = WebRTCView(
            id=0, session_id=session_id, offer=SessionDescription(sdp=offer["sdp"], type=offer["type"]),
            draw_masks=draw_masks,
        )
        reply = await self.request(req, ViewReply)
        return {"sdp": reply.answer.sdp, "type": reply.answer.type}

    # ---------------------------------------------------------------- reading

    def _on_reply(self, data: str | bytes, req_id: Any) -> None:
        entry = self._pending.get(req_id) if isinstance(req_id, int) else None
        if entry is None:
            return
        future, req, reply_type = entry
        if isinstance(data, (bytes, bytearray, memoryview)):
            data, payload = split_binary(bytes(data))
            if req_id in self._payloads:
                self._payloads[req_id] = payload
        try:
            reply = decode_reply(data, reply_type)
        except ProtocolError as exc:
            if not future.done():
                future.set_exception(ClientError(str(exc)))
            return
        # register subscriptions here, before the frames that follow the reply are read
        if isinstance(reply, OpenReply) and reply.subscribed:
            self._register(reply.session, reply.mask_format)
        elif isinstance(req, Subscribe) and isinstance(reply, SessionReply):
            existing = self._sessions.get(req.session_id)
            if existing is None:
                info = SessionInfo(
                    session_id=req.session_id, name=req.session_id, source="", state=reply.state, objects=[],
                    subscribers=0, frames_processed=0, frames_dropped=0, newest_frame_idx=None,
                )
                self._register(info, req.mask_format)
        if not future.done():
            future.set_result(reply)

    def _register(self, info: SessionInfo, mask_format: str) -> RemoteSession:
        session = self._sessions.get(info.session_id)
        if session is None:
            session = RemoteSession(self, info, subscribed=True, mask_format=mask_format)
            self._sessions[info.session_id] = session
        else:
            session.info, session.mask_format, session.subscribed = info, mask_format, True
        return session

    async def _read_loop(self) -> None:
        assert self._ws is not None
        reason = "closed"
        try:
            async for data in self._ws:
                received_s = time.time()
                try:
                    msg, payload = decode_server_message(data)
                except ProtocolError as exc:
                    logger.warning("ignoring an unreadable message from %s: %s", self.url, exc)
                    continue
                if isinstance(msg, FrameMsg):
                    session = self._sessions.get(msg.session_id)
                    if session is not None:
                        session._push_frame(RemoteFrame.from_message(msg, payload, received_s))
                elif isinstance(msg, Reply):
                    self._on_reply(data, msg.id)
                elif isinstance(msg, ErrorMsg):
                    entry = self._pending.get(msg.id) if isinstance(msg.id, int) else None
                    if entry is not None and not entry[0].done():
                        entry[0].set_exception(RemoteError(msg.code, msg.message, msg.field, msg.id))
                    else:
                        self.unsolicited_errors.append(msg)
                elif isinstance(msg, EventMsg):
                    session = self._sessions.get(msg.session_id)
                    if session is not None:
                        session._push_event(msg)
                        if msg.kind == "closed":
                            self._sessions.pop(msg.session_id, None)
            reason = f"the server closed the connection ({self._ws.close_code} {self._ws.close_reason})".rstrip()
        except ConnectionClosed as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._closed_reason = reason
            for future, _, _ in list(self._pending.values()):
                if not future.done():
                    future.set_exception(ConnectionLostError(reason))
            for session in self._sessions.values():
                session._lost(reason)


# ---------------------------------------------------------------- synchronous wrapper

T = TypeVar("T")


class SyncSession:
    """:class:`RemoteSession` for synchronous code; same methods, blocking."""

    def __init__(self, client: SyncClient, session: RemoteSession) -> None:
        self._client = client
        self.session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def click(self, x: float, y: float, *, frame: int | None = None, obj: int | None = None, label: int = 1) -> int:
        return self._client._run(self.session.click(x, y, frame=frame, obj=obj, label=label))

    def add_points(self, points_xy: Sequence[Sequence[float]], labels: Sequence[int], **kw: Any) -> PromptReply:
        return self._client._run(self.session.add_points(points_xy, labels, **kw))

    def box(self, x0: float, y0: float, x1: float, y1: float, *, frame: int | None = None, obj: int | None = None) -> int:
        return self._client._run(self.session.box(x0, y0, x1, y1, frame=frame, obj=obj))

    def remove(self, obj: int) -> list[int]:
        return self._client._run(self.session.remove(obj))

    def reset(self) -> None:
        self._client._run(self.session.reset())

    def pause(self) -> None:
        self._client._run(self.session.pause())

    def resume(self) -> None:
        self._client._run(self.session.resume())

    def close(self) -> None:
        self._client._run(self.session.close())

    def unsubscribe(self) -> None:
        self._client._run(self.session.unsubscribe())

    def next_frame(self, timeout: float | None = 30.0) -> RemoteFrame:
        return self._client._run(self.session.next_frame(timeout), None)

    def frames(self, timeout: float | None = 30.0, limit: int | None = None) -> Iterator[RemoteFrame]:
        """Frames until the session closes, ``limit`` frames, or none for ``timeout`` s."""
        n = 0
        while limit is None or n < limit:
            try:
                yield self.next_frame(timeout)
            except ConnectionLostError:
                return
            n += 1

    def next_event(self, timeout: float | None = 30.0) -> EventMsg:
        return self._client._run(self.session.next_event(timeout), None)

    def drain_events(self) -> list[EventMsg]:
        return self._client._call(self.session.drain_events)


class SyncImage:
    """:class:`RemoteImage` for synchronous code; same methods, blocking."""

    def __init__(self, client: SyncClient, image: RemoteImage) -> None:
        self._client = client
        self.image = image

    def __getattr__(self, name: str) -> Any:
        return getattr(self.image, name)

    def segment(self, **kw: Any) -> ImageResult:
        return self._client._run(self.image.segment(**kw))

    def close(self) -> None:
        self._client._run(self.image.close())


class SyncClient:
    """:class:`Client` for synchronous code: the connection lives on an event
    loop in a daemon thread; every method blocks until its reply.

    ::

        with SyncClient("ws://127.0.0.1:8765") as c:
            s = c.open("cam1")
            obj = s.click(100, 80)
            for f in s.frames(limit=50):
                print(f.frame_idx, f.boxes.get(obj))
    """

    def __init__(self, url: str, token: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sam2-stream-client", daemon=True)
        self._thread.start()
        self.client: Client = self._call(lambda: Client(url, token, **options))
        self.timeout = float(options.get("request_timeout", 60.0)) + 5.0

    def _call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def _run(self, coro: Any, timeout: float | None = -1.0) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(self.timeout if timeout == -1.0 else None)

    @property
    def hello(self) -> Hello | None:
        return self.client.hello

    def connect(self) -> Hello:
        return self._run(self.client.connect())

    def open(self, source: str, **kw: Any) -> SyncSession:
        return SyncSession(self, self._run(self.client.open(source, **kw)))

    def subscribe(self, session_id: str, **kw: Any) -> SyncSession:
        return SyncSession(self, self._run(self.client.subscribe(session_id, **kw)))

    def list_sessions(self) -> list[SessionInfo]:
        return self._run(self.client.list_sessions())

    def stats(self, session_id: str | None = None) -> StatsReply:
        return self._run(self.client.stats(session_id))

    def open_image(self, image: Any = None, *, name: str | None = None) -> SyncImage:
        return SyncImage(self, self._run(self.client.open_image(image, name=name)))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> SyncClient:
        if not self.client.connected:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
