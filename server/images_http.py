"""Image mode over plain HTTP, for clients without WebSockets.

::

    POST   /v1/images                 body: the image file's bytes   → 200 {"image_id", "width", …}
    POST   /v1/images/{id}/segment    body: JSON, image_segment's fields → 200 {"masks": […], …}
    DELETE /v1/images/{id}                                            → 200 {"image_id", "closed": true}

The same :class:`server.images.ImageService` (cache, limits, worker) and the
same token and Origin rules as the WebSocket. It listens on a port of its own
(``[images] http_port``): the WebSocket server answers HTTP only during its
handshake, and websockets refuses any request with a body there (``unsupported
request body``), so a POST cannot reach it on the WebSocket port.

A deliberately small HTTP/1.1 server on asyncio streams: one request per
connection (``Connection: close``), ``Content-Length`` bodies only (no chunked
encoding), request line and headers bounded, every read and write bounded in
time. HTTP images are shared by every HTTP client that has the token (the id is
the capability) and bounded by ``[images] http_max_open``: opening one more
closes the oldest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Request

from server.connection import BinaryReply, _segment_reply
from server.config import address_key
from server.images import max_image_message_bytes
from server.protocol import ImageSegment, ProtocolError, TokenBucket, check_depth, parse_request

if TYPE_CHECKING:
    from server.app import TrackingServer

logger = logging.getLogger("sam2-stream.images.http")

#: the owner id of images opened over HTTP (WebSocket clients count from 1)
HTTP_OWNER = -1
_MAX_LINE = 8192
_MAX_HEADERS = 64
_IMAGE_PATH = re.compile(r"^/v1/images/(?P<id>[A-Za-z0-9]{1,64})(?P<segment>/segment)?$")
#: addresses whose rate-limit buckets are kept (least recently seen dropped first)
_MAX_ADDRESSES = 4096

_STATUS = {
    "invalid_json": 400,
    "invalid_message": 400,
    "invalid_image": 400,
    "prompt_error": 400,
    "unknown_image": 404,
    "image_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "image_too_large": 413,
    "limit_exceeded": 429,
    "rate_limited": 429,
    "shutting_down": 503,
    "not_supported": 501,
    "timeout": 504,
}
_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 411: "Length Required", 413: "Content Too Large", 429: "Too Many Requests",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable", 504: "Gateway Timeout",
}


class _HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


class ImagesHttp:
    """The HTTP front of the image service (see the module doc)."""

    def __init__(self, server: TrackingServer) -> None:
        self.server = server
        self.port: int | None = None
        self._server: asyncio.AbstractServer | None = None
        #: per address, least recently used first (the oldest go past _MAX_ADDRESSES)
        self._buckets: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()
        self._active: dict[str, int] = {}  # connections being served, per address

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, ssl=ssl_context, limit=_MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("image HTTP API on %s://%s:%d/v1/images", "https" if ssl_context else "http", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # ---------------------------------------------------------------- HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        timeout = self.server.config.server.send_timeout_s
        peer = writer.get_extra_info("peername")
        address = address_key(str(peer[0])) if peer else "?"
        status, body, content_type = 500, b"", "application/json"
        admitted = False
        try:
            try:
                try:
                    self._admit(address)
                except _HttpError:
                    # read the request line and headers (briefly) before answering, so the
                    # client reads the 503 instead of a reset while it is still sending
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._read_head(reader), 1.0)
                    raise
                admitted = True
                method, target, headers = await asyncio.wait_for(self._read_head(reader), timeout)
                payload = await asyncio.wait_for(self._read_body(reader, method, target, headers, address), timeout)
                status, body, content_type = await self._route(method, target, headers, payload, address)
            except _HttpError as exc:
                status = exc.status
                body = json.dumps({"error": exc.code, "message": exc.message, "field": exc.field}).encode()
            except asyncio.TimeoutError:
                status, body = 408, json.dumps({"error": "timeout", "message": "the request was not read in time"}).encode()
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError, LookupError):
                status, body = 400, json.dumps({"error": "bad_request", "message": "malformed HTTP request"}).encode()
            except Exception:
                logger.exception("image HTTP request from %s failed", address)
                body = json.dumps({"error": "internal", "message": "internal error; the server logged it"}).encode()
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("ascii")
            writer.write(head + body)
            await asyncio.wait_for(writer.drain(), timeout)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            if admitted:
                self._release(address)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except (asyncio.TimeoutError, ConnectionError, ssl.SSLError):
                pass

    def _admit(self, address: str) -> None:
        """The WebSocket's connection limits: ``max_clients`` in all, ``max_clients_per_address`` each."""
        s = self.server.config.server
        if sum(self._active.values()) >= s.max_clients:
            raise _HttpError(503, "busy", f"too many connections (limit {s.max_clients})")
        if self._active.get(address, 0) >= s.max_clients_per_address:
            raise _HttpError(
                503, "busy", f"too many connections from {address} (limit {s.max_clients_per_address} per address)"
            )
        self._active[address] = self._active.get(address, 0) + 1

    def _release(self, address: str) -> None:
        left = self._active.get(address, 1) - 1
        if left > 0:
            self._active[address] = left
        else:
            self._active.pop(address, None)

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, Headers]:
        line = (await reader.readuntil(b"\n")).decode("latin-1").rstrip("\r\n")
        parts = line.split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise _HttpError(400, "bad_request", f"not an HTTP/1.1 request line: {line[:80]!r}")
        headers = Headers()
        for _ in range(_MAX_HEADERS + 1):
            raw = (await reader.readuntil(b"\n")).decode("latin-1").rstrip("\r\n")
            if not raw:
                return parts[0], parts[1], headers
            name, sep, value = raw.partition(":")
            if not sep:
                raise _HttpError(400, "bad_request", f"malformed header line {raw[:80]!r}")
            headers[name.strip()] = value.strip()
        raise _HttpError(400, "bad_request", f"more than {_MAX_HEADERS} headers")

    async def _read_body(
        self, reader: asyncio.StreamReader, method: str, target: str, headers: Headers, address: str
    ) -> bytes:
        self._check_access(target, headers)
        if "Transfer-Encoding" in headers:
            raise _HttpError(411, "length_required", "send the body with a Content-Length (no chunked encoding)")
        try:
            length = int(headers.get("Content-Length", "0"))
        except ValueError:
            raise _HttpError(400, "bad_request", "Content-Length must be a number") from None
        uploads = method == "POST" and urlsplit(target).path == "/v1/images"
        # only an upload may be image-sized; a prompt or a close is a small JSON body
        limit = max_image_message_bytes(self.server.config.images) if uploads else self.server.config.server.max_message_bytes
        if length < 0 or length > limit:
            raise _HttpError(
                413, "image_too_large", f"the body is {length} bytes; at most {limit} are read", field="data"
            )
        if uploads:  # the rate limit before the bytes are read, not after
            opens, _ = self._bucket(address)
            if not opens.take():
                raise _HttpError(429, "rate_limited", f"too many image opens; retry in {opens.wait_s():.2f} s")
        return await reader.readexactly(length) if length else b""

    def _check_access(self, target: str, headers: Headers) -> None:
        """The WebSocket's rules: the token (header or ``?token=``), the Origin allowlist."""
        s = self.server.config.server
        origin = headers.get("Origin")
        if origin is not None and s.allow_origins and origin not in s.allow_origins:
            raise _HttpError(403, "forbidden", f"origin {origin!r} is not allowed")
        if not self.server.authorized(Request(target, headers)):
            raise _HttpError(
                401, "unauthorized", "a bearer token is required: send 'Authorization: Bearer TOKEN' or ?token=TOKEN"
            )

    # ---------------------------------------------------------------- routes

    async def _route(
        self, method: str, target: str, headers: Headers, body: bytes, address: str
    ) -> tuple[int, bytes, str]:
        images = self.server.images
        if images is None or self.server.closing:
            raise _HttpError(503, "shutting_down", "the server is shutting down")
        path = urlsplit(target).path
        opens, prompts = self._bucket(address)
        try:
            if path == "/v1/images":
                if method != "POST":
                    raise _HttpError(405, "method_not_allowed", "POST the image file's bytes to /v1/images")
                return 200, await self._open(body), "application/json"  # rate-limited before its body was read
            match = _IMAGE_PATH.match(path)
            if match is None:
                raise _HttpError(404, "not_found", f"no such path {path!r}; see docs/protocol.md (HTTP)")
            image_id = match["id"]
            if match["segment"]:
                if method != "POST":
                    raise _HttpError(405, "method_not_allowed", "POST a JSON prompt to /v1/images/{id}/segment")
                if not prompts.take():
                    raise ProtocolError("rate_limited", f"too many prompts; retry in {prompts.wait_s():.2f} s")
                return await self._segment(image_id, body)
            if method != "DELETE":
                raise _HttpError(405, "method_not_allowed", "DELETE /v1/images/{id} closes an image")
            images.close(HTTP_OWNER, image_id)
            return 200, json.dumps({"image_id": image_id, "closed": True}).encode(), "application/json"
        except ProtocolError as exc:
            raise _HttpError(_STATUS.get(exc.code, 400), exc.code, exc.message, exc.field) from None

    def _bucket(self, address: str) -> tuple[TokenBucket, TokenBucket]:
        buckets = self._buckets.get(address)
        if buckets is not None:
            self._buckets.move_to_end(address)
        else:
            while len(self._buckets) >= _MAX_ADDRESSES:
                self._buckets.popitem(last=False)  # the least recently seen; never everyone's at once
            cfg = self.server.config
            buckets = self._buckets[address] = (
                TokenBucket(cfg.images.opens_per_s, cfg.images.open_burst),
                TokenBucket(cfg.limits.prompts_per_s, cfg.limits.prompt_burst),
            )
        return buckets

    async def _open(self, body: bytes) -> bytes:
        images = self.server.images
        assert images is not None
        while images.count_open(HTTP_OWNER) >= self.server.config.images.http_max_open:
            oldest = images.oldest(HTTP_OWNER)
            if oldest is None:
                break
            images.close(HTTP_OWNER, oldest)
        opened = await images.open(HTTP_OWNER, raw=body, field="data")
        h, w = opened.image.size_hw
        d = opened.decoded
        return json.dumps(
            {
                "image_id": opened.image.image_id, "width": w, "height": h, "embed_s": opened.embed_s,
                "cached": opened.cached, "format": d.format, "mode": d.mode, "exif_orientation": d.exif_orientation,
            }
        ).encode()

    async def _segment(self, image_id: str, body: bytes) -> tuple[int, bytes, str]:
        images = self.server.images
        assert images is not None
        try:
            text = (body or b"{}").decode("utf-8")
            check_depth(text)  # json.loads recurses once per level
            fields = json.loads(text)
        except ValueError as exc:
            raise ProtocolError("invalid_json", f"the body is not JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise ProtocolError("invalid_message", "the body must be a JSON object of image_segment's fields")
        for key in ("type", "id", "image_id"):
            if key in fields:
                raise ProtocolError("invalid_message", f"{key} is not a body field here (the path names the image)", field=key)
        req = parse_request(json.dumps({"type": "image_segment", "id": 0, "image_id": image_id, **fields}))
        assert isinstance(req, ImageSegment)
        answer = await images.segment(
            HTTP_OWNER,
            image_id,
            points_xy=None if req.points_xy is None else [list(p) for p in req.points_xy],
            labels=None if req.labels is None else list(req.labels),
            box_xyxy=None if req.box_xyxy is None else list(req.box_xyxy),
            multimask=req.multimask,
            previous=req.previous,
        )
        reply = await self.server.loop.run_in_executor(self.server.encoder_pool, _segment_reply, req, answer)
        if isinstance(reply, BinaryReply):
            return 200, bytes(reply), "application/octet-stream"
        out: dict[str, Any] = msgspec.to_builtins(reply)
        for key in ("type", "id", "ok"):
            out.pop(key, None)
        return 200, json.dumps(out).encode(), "application/json"
