"""The operator page: the files of ``server/static/`` as plain-HTTP routes of the server.

:func:`page_routes` returns the handlers ``TrackingServer(routes=...)`` takes:
``/`` answers ``index.html`` and ``/static/NAME`` the file ``NAME`` under
``server/static/``. The page is public (it holds no data; a browser cannot
send a token with the page's own URL when it sits in the fragment), and
everything it does goes through the WebSocket, which needs the token
whenever the server requires one (``?token=`` from the page's
``#token=…`` fragment or its token field).

What lives here: resolving a request path to a file (:func:`resolve_static`:
percent-decoded, only plain names of the folder's own files, no ``..``, no
hidden files, no symlinks leading out, known types only) and answering it
(:func:`file_response`), with each type's ``Content-Type``, ``no-cache``
and a content security policy that lets the page load nothing from
elsewhere. What does not: the WebSocket protocol (``server.app``), the page
itself (``server/static/``: ``index.html``, ``app.js``, ``connection.js``,
``webrtc.js``, ``overlay.js``, ``rle.js``, ``speed.js`` (the model's pace
against the video's), ``image.js`` (image mode: one picture prompted many
times), ``imagemask.js`` (its PNG and COCO RLE downloads), ``style.css``).

``sam2-stream serve`` serves it (``--no-page`` to leave it out); in code::

    TrackingServer(config, model, routes=page_routes())
"""

from __future__ import annotations

import email.utils
import http
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

#: the page's files
STATIC_DIR = Path(__file__).resolve().parent / "static"

#: the URL prefix of files under :data:`STATIC_DIR`
STATIC_PREFIX = "/static/"

#: what may be served, by suffix; anything else is 404
CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

#: the page talks to its own origin only (the WebSocket included) and loads nothing from elsewhere
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

#: a ``routes`` handler, as ``server.app.RouteHandler``
RouteHandler = Callable[[ServerConnection, Request], "Response | None"]


def content_type(path: Path) -> str | None:
    """The ``Content-Type`` of a file the page serves, or None when its type is not served."""
    return CONTENT_TYPES.get(path.suffix.lower())


def resolve_static(name: str, root: Path = STATIC_DIR) -> Path | None:
    """The file under ``root`` that the URL path segment ``name`` names, or None.

    ``name`` is what follows ``/static/`` in the request path (query string
    and fragment already removed), still percent-encoded. Refused (None):
    empty names or segments, ``..`` or ``.`` segments, hidden files,
    backslashes, NUL, percent-escapes that are not UTF-8,
    absolute paths, types not in :data:`CONTENT_TYPES`, anything that is
    not a regular file, and anything whose real path (symlinks followed)
    lies outside ``root``.
    """
    try:
        decoded = unquote(name, errors="strict") if "%" in name else name
    except UnicodeDecodeError:
        return None
    if not decoded or "\\" in decoded or "\x00" in decoded or decoded.startswith("/"):
        return None
    parts = decoded.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    real_root = root.resolve()
    candidate = real_root.joinpath(*parts)
    if content_type(candidate) is None:
        return None
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(real_root) or not real.is_file():
        return None
    return real


def file_response(path: Path) -> Response:
    """200 with the file ``path`` (read now: the page's files are small) and its content type."""
    return _response(200, path.read_bytes(), content_type(path) or "application/octet-stream")


def not_found(path: str) -> Response:
    """404, plain text (never sniffed as HTML), for a path that names no file the page serves."""
    return _response(404, f"no such file {path!r}\n".encode(), "text/plain; charset=utf-8")


def _response(status: int, body: bytes, ctype: str) -> Response:
    code = http.HTTPStatus(status)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", ctype),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
        ]
    )
    if ctype.startswith("text/html"):
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return Response(code.value, code.phrase, headers, body)


def _request_path(request: Request) -> str:
    return request.path.partition("?")[0].partition("#")[0]


def page_routes(root: Path = STATIC_DIR) -> dict[str, RouteHandler]:
    """The routes serving the operator page from ``root``: ``/`` and ``/static/…``.

    Merge them into ``TrackingServer(routes=...)``; WebSocket upgrades to
    ``/`` still reach the protocol.
    """

    def index(connection: ServerConnection, request: Request) -> Response:
        path = resolve_static("index.html", root)
        return file_response(path) if path is not None else not_found("/")

    def static(connection: ServerConnection, request: Request) -> Response:
        path = _request_path(request)
        found = resolve_static(path[len(STATIC_PREFIX) :], root)
        return file_response(found) if found is not None else not_found(path)

    return {"/": index, "/index.html": index, STATIC_PREFIX: static}
