"""A small HTTP file server on 127.0.0.1 for the ingest tests (runs in-process, on a thread).

Python's ``SimpleHTTPRequestHandler`` does not answer ``Range`` requests, which
FFmpeg needs to reach the index at the end of an MP4; this one does. Paths under
``/private/`` need HTTP Basic credentials, to test authentication failures.
``redirects`` answers chosen paths with ``302 Found`` and a ``Location``, and
``seen`` records every connection accepted and every request path, so a test
can prove a server was never contacted.

Usage::

    with serve_directory(folder, user="u", password="p") as base_url:
        ...  # base_url == "http://127.0.0.1:<port>"

    seen: list[str] = []
    with serve_directory(folder, redirects={"/a.mp4": "http://127.0.0.1:9/b.mp4"}, seen=seen) as base_url:
        ...  # seen == ["connect", "GET /a.mp4", ...]

or run it as a script: ``python tests/servers/http_server.py DIR [PORT]``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import ssl
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with byte ranges and Basic auth under /private/."""

    credentials: str | None = None  # "user:password"
    redirects: dict[str, str] = {}  # request path -> Location of a 302
    seen: list[str] | None = None  # "GET /path" per request, when recording

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def _authorised(self) -> bool:
        if not self.path.startswith("/private/") or self.credentials is None:
            return True
        expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
        if self.headers.get("Authorization") == expected:
            return True
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def _redirected(self) -> bool:
        location = self.redirects.get(self.path)
        if location is None:
            return False
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def do_HEAD(self) -> None:
        if self._authorised() and not self._redirected():
            super().do_HEAD()

    def do_GET(self) -> None:
        if self.seen is not None:
            self.seen.append(f"GET {self.path}")
        if not self._authorised() or self._redirected():
            return
        path = Path(self.translate_path(self.path))
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if not match or not path.is_file():
            super().do_GET()
            return
        size = path.stat().st_size
        start = int(match[1]) if match[1] else max(0, size - int(match[2] or 0))
        end = min(size - 1, int(match[2])) if match[1] and match[2] else size - 1
        if start >= size:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            remaining = end - start + 1
            try:
                while remaining > 0:
                    chunk = f.read(min(65536, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass


class RecordingServer(ThreadingHTTPServer):
    """Appends "connect" to ``seen`` for every connection accepted (before any request is read)."""

    seen: list[str] | None = None

    def verify_request(self, request: object, client_address: object) -> bool:
        if self.seen is not None:
            self.seen.append("connect")
        return True


@contextlib.contextmanager
def serve_directory(folder: os.PathLike[str] | str, user: str | None = None, password: str | None = None,
                    port: int = 0, certfile: str | None = None, keyfile: str | None = None,
                    redirects: dict[str, str] | None = None, seen: list[str] | None = None) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 while the block runs; yields the base URL (https with a certificate).

    ``redirects`` maps request paths to the ``Location`` of a 302; ``seen``
    (a list the caller keeps) gets "connect" per connection and "GET /path" per request.
    """
    handler = type("Handler", (RangeHandler,), {"credentials": f"{user}:{password}" if user else None,
                                                "redirects": dict(redirects or {}), "seen": seen})
    server = RecordingServer(("127.0.0.1", port), partial(handler, directory=str(folder)))
    server.seen = seen
    server.daemon_threads = True
    scheme = "http"
    if certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


if __name__ == "__main__":
    with serve_directory(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else 0) as url:
        print(f"READY {url}", flush=True)
        threading.Event().wait()
