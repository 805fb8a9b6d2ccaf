"""Every byte of a client-named file, HTTP or HLS source, read through its policy.

FFmpeg opens more than the URL it was given: an HLS playlist's variant
playlists, segments and AES keys, a redirect's target, a concat list's
entries. For a source a client named (``spec.policy`` set), the reader hands
PyAV's ``av.open(..., io_open=...)`` a :class:`PolicedOpener`: FFmpeg calls it
for the top-level URL and for every nested open, and it checks each URL with
:meth:`SourcePolicy.check_nested` *before* opening anything, then opens it
itself (files by their canonical path, HTTP(S) with :class:`HttpBody`, which
follows a redirect only to a target the policy allows). FFmpeg's own protocols
are switched off for these sources (``protocol_whitelist`` names none), so a
demuxer that opens inputs without ``io_open`` (concat lists, SDP) opens nothing.

What does not live here: which sources a client may name (``policy``), the
FFmpeg options of unpoliced sources (``av_reader``).
"""

from __future__ import annotations

import base64
import errno
import http.client
import io
import logging
import os
import ssl
import stat
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote, urljoin, urlsplit

import av.error

from tracker.errors import SourceNotAllowedError, SourceUnsupportedError
from tracker.sources.policy import DEFAULT_PORTS, SourcePolicy
from tracker.sources.spec import SourceSpec, redact

log = logging.getLogger("tracker.ingest")

#: ``protocol_whitelist`` of a policed source: no FFmpeg protocol at all, every
#: open goes through :class:`PolicedOpener`.
NO_PROTOCOLS = "none"
#: Kinds whose opens go through :class:`PolicedOpener` when the spec has a policy.
POLICED_KINDS: frozenset[str] = frozenset({"file", "http", "hls"})
#: HLS demuxer options for policed sources: reuse of an FFmpeg HTTP connection
#: (``http_persistent``) asserts on custom I/O, and parallel segment fetches are not needed.
HLS_OPTIONS: dict[str, str] = {"http_persistent": "0", "http_multiple": "0"}
MAX_REDIRECTS = 5
_AVIO_FLAG_WRITE = 2
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SKIP_FORWARD_BYTES = 1 << 16  # a short forward seek reads on instead of a new request
_FFCONCAT_MAGIC = b"ffconcat version"


class Body(Protocol):
    """What PyAV's custom I/O reads: ``read(n)``, and ``seek``/``tell`` when ``seekable()``."""

    def read(self, size: int = -1) -> bytes: ...

    def close(self) -> None: ...


class PolicedOpener:
    """PyAV's ``io_open`` for one opening of a policed source (see the module doc).

    Args:
        spec: the source; ``spec.policy`` must be set. Its ``timeout_s``,
            ``tls_verify`` and ``ca_file`` apply to every HTTP(S) open.

    After the first refusal every further open is handed an empty body
    without opening anything: the refusal (raised to PyAV, which re-raises
    it at its next call on this thread) ends the source.
    """

    def __init__(self, spec: SourceSpec) -> None:
        if spec.policy is None:
            raise ValueError("PolicedOpener needs a spec with a policy")
        self.spec = spec
        self.policy: SourcePolicy = spec.policy
        self.opens = 0
        self.refusal: SourceNotAllowedError | None = None
        self._open: dict[int, Body] = {}

    def __call__(self, url: str, flags: int, options: dict[str, str]) -> Body:
        first = self.opens == 0
        self.opens += 1
        if self.refusal is not None:
            return io.BytesIO(b"")
        try:
            body = self._open_checked(url, flags, options, first)
        except SourceNotAllowedError as exc:
            self.refusal = exc
            log.warning("%s", exc)
            raise
        self._open[id(body)] = body
        return _Tracked(body, lambda: self._open.pop(id(body), None))

    def close(self) -> None:
        """Close what is still open (FFmpeg never closes the top-level input of custom I/O)."""
        for body in list(self._open.values()):
            try:
                body.close()
            except OSError:
                pass
        self._open.clear()

    def _open_checked(self, url: str, flags: int, options: dict[str, str], first: bool) -> Body:
        display = self.spec.display
        if flags & _AVIO_FLAG_WRITE:
            raise SourceNotAllowedError(f"source {display} not allowed: it asked to write {redact(url)}")
        inner, decrypt = url, url[:7] in ("crypto+", "crypto:")
        if decrypt:
            inner = url[7:]
        kind, target = self.policy.check_nested(inner, display)
        body: Body
        if kind == "file":
            body = open_file_checked(target, self.policy, display)
        else:
            window = (_int_option(options, "offset"), _int_option(options, "end_offset"))
            body = HttpBody(target, self.spec, window=window)
        if first:
            _refuse_concat_list(body, display)
        if decrypt:
            body = Aes128Body(body, options.get("key", ""), options.get("iv", ""), display)
        return body


class _Tracked:
    """A body that tells its opener when FFmpeg closes it (so a long HLS stream keeps no list)."""

    def __init__(self, body: Body, forget: Callable[[], object]) -> None:
        self._body = body
        self._forget = forget
        self.name = getattr(body, "name", "")
        if callable(getattr(body, "seekable", None)) and body.seekable():  # type: ignore[attr-defined]
            self.seek = body.seek  # type: ignore[attr-defined]
            self.tell = body.tell  # type: ignore[attr-defined]

    def read(self, size: int = -1) -> bytes:
        return self._body.read(size)

    def close(self) -> None:
        self._forget()
        self._body.close()


def _int_option(options: dict[str, str], name: str) -> int | None:
    try:
        value = int(options.get(name, ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _refuse_concat_list(body: Body, display: str) -> None:
    """A concat list's entries are opened by FFmpeg's own I/O, where no policy reaches: say so plainly."""
    peek = getattr(body, "peek", None)
    head = peek(len(_FFCONCAT_MAGIC)) if callable(peek) else b""
    if head[:len(_FFCONCAT_MAGIC)] == _FFCONCAT_MAGIC:
        body.close()
        raise SourceNotAllowedError(
            f"source {display} not allowed: concat lists (ffconcat) are not accepted here; "
            "open their files one by one")


# ---------------------------------------------------------------- files


def open_file_checked(path: str, policy: SourcePolicy, display: str) -> io.BufferedReader:
    """Open a regular file by its canonical ``path``, then check the file actually opened.

    ``/proc/self/fd`` names the file the descriptor holds: a symlink swapped
    in between the check and the open is refused there (Linux; elsewhere the
    check before the open is all there is). FIFOs and devices are refused
    (opened non-blocking, so a FIFO cannot hang the reader).

    Raises:
        SourceNotAllowedError: the opened file lies outside the allowed folders.
        SourceUnsupportedError: not a regular file.
        av.error.FileNotFoundError, av.error.PermissionError: as FFmpeg's file protocol would.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise av.error.FileNotFoundError(errno.ENOENT, "No such file or directory") from None
    except PermissionError:
        raise av.error.PermissionError(errno.EACCES, "Permission denied") from None
    except OSError as exc:
        raise av.error.OSError(exc.errno or errno.EIO, exc.strerror or str(exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceUnsupportedError(f"cannot read {display}: {path} is not a regular file")
        opened = _opened_path(fd)
        if opened is not None and not policy.allows_path(opened):
            raise SourceNotAllowedError(f"source {display} not allowed: {path} is outside the allowed folders")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


# ---------------------------------------------------------------- HTTP(S)


class HttpBody:
    """The body of one HTTP(S) resource for PyAV: read, and seek where the server takes ranges.

    The first request asks for ``bytes=0-`` (as FFmpeg does) to learn whether
    the server can seek. Redirects (301/302/303/307/308) are followed, at most
    :data:`MAX_REDIRECTS`, only to targets the spec's policy allows; a refused
    target is never connected to. Credentials in the URL go out as HTTP Basic
    authentication to that URL's host only. Socket timeouts are ``timeout_s``.

    Errors are PyAV's (``av.error.HTTPNotFoundError``, ``TimeoutError``, …),
    so they map to messages the way FFmpeg's own HTTP errors do.

    Args:
        url: an ``http://`` or ``https://`` URL the policy already allowed.
        spec: the source (policy, timeout, TLS settings).
        window: (offset, end_offset) of a byte range (an HLS ``EXT-X-BYTERANGE``);
            positions are then relative to ``offset``.
    """

    def __init__(self, url: str, spec: SourceSpec,
                 window: tuple[int | None, int | None] = (None, None)) -> None:
        self.name = url
        self._url = url
        self._spec = spec
        self._base = window[0] or 0
        self._end = window[1]  # exclusive, absolute
        self._pos = 0
        self._size: int | None = None
        self._seekable = False
        self._head = b""
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._request(0, first=True)

    # -------------------------------------------------------- file-like API

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def tell(self) -> int:
        return self._pos

    def peek(self, size: int) -> bytes:
        """Up to ``size`` bytes from the current position, without consuming them."""
        while len(self._head) < size:
            chunk = self._read_raw(size - len(self._head))
            if not chunk:
                break
            self._head += chunk
        return self._head[:size]

    def read(self, size: int = -1) -> bytes:
        want = size if size and size > 0 else 65536
        if self._head:
            data, self._head = self._head[:want], self._head[want:]
        else:
            data = self._read_raw(want)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            target = offset
        elif whence == 1:
            target = self._pos + offset
        elif whence == 2 and self._size is not None:
            target = self._size + offset
        else:
            raise av.error.OSError(errno.ESPIPE, "the server did not say how long the resource is")
        if target == self._pos:
            return target
        if not self._seekable or target < 0:
            raise av.error.OSError(errno.ESPIPE, "the server does not answer byte ranges")
        if self._resp is not None and 0 < target - self._pos <= _SKIP_FORWARD_BYTES:
            while self._pos < target and self.read(target - self._pos):
                pass
            if self._pos == target:
                return target
        self._drop_connection()
        self._head = b""
        self._pos = target  # the next read asks for a range from here
        return target

    def close(self) -> None:
        self._drop_connection()

    # -------------------------------------------------------- requests

    def _read_raw(self, want: int) -> bytes:
        at = self._pos + len(self._head)
        if self._end is not None:
            want = min(want, self._end - self._base - at)
            if want <= 0:
                return b""
        if self._resp is None:
            if self._size is not None and at >= self._size:
                return b""
            self._request(at)
            if self._resp is None:
                return b""
        try:
            return self._resp.read1(want)
        except TimeoutError:
            raise av.error.TimeoutError(errno.ETIMEDOUT, "no data within the read timeout") from None
        except (OSError, http.client.HTTPException) as exc:
            raise av.error.OSError(errno.EIO, f"the connection failed ({type(exc).__name__})") from None

    def _request(self, pos: int, first: bool = False) -> None:
        """GET from ``pos`` (relative), following allowed redirects; sets the response or raises."""
        policy = self._spec.policy
        start = self._base + pos
        last = "" if self._end is None else str(self._end - 1)
        url = self._url
        for _ in range(MAX_REDIRECTS + 1):
            conn, resp = self._get(url, f"bytes={start}-{last}")
            if resp.status in _REDIRECT_STATUSES:
                location = resp.getheader("Location") or ""
                conn.close()
                if not location:
                    raise av.error.HTTPServerError(errno.EIO, f"redirect ({resp.status}) without a Location")
                url = urljoin(url, location)
                if policy is not None:
                    kind, _ = policy.check_nested(url, self._spec.display, how="redirects to")
                    if kind != "http":
                        raise SourceNotAllowedError(
                            f"source {self._spec.display} not allowed: it redirects to a local file"
                        )
                elif urlsplit(url).scheme.lower() not in ("http", "https"):
                    raise SourceNotAllowedError(f"source {self._spec.display}: it redirects to {redact(url)}, not HTTP(S)")
                continue
            if resp.status == 416:  # a range past the end: nothing more to read
                conn.close()
                self._conn = self._resp = None
                return
            if resp.status >= 400:
                conn.close()
                raise _http_error(resp.status, resp.reason)
            self._conn, self._resp, self._url = conn, resp, url
            ranged = resp.status == 206
            if first:
                self._seekable = ranged or (resp.getheader("Accept-Ranges", "").lower() == "bytes")
            elif not ranged and start > 0:
                self._drop_connection()
                raise av.error.OSError(errno.ESPIPE, "the server does not answer byte ranges")
            self._size = _resource_size(resp, start, self._base)
            return
        raise av.error.HTTPOtherClientError(errno.EIO, f"more than {MAX_REDIRECTS} redirects")

    def _get(self, url: str, byte_range: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        port = parts.port or DEFAULT_PORTS[scheme]
        timeout = self._spec.timeout_s
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=_tls_context(self._spec))
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        headers = {"User-Agent": "sam2-stream", "Accept": "*/*", "Range": byte_range, "Connection": "close"}
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target, headers=headers)
            return conn, conn.getresponse()
        except TimeoutError:
            conn.close()
            raise av.error.TimeoutError(errno.ETIMEDOUT, "Connection timed out") from None
        except ConnectionRefusedError:
            conn.close()
            raise av.error.ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused") from None
        except ssl.SSLError as exc:
            conn.close()
            raise av.error.OSError(errno.EIO, f"TLS failed ({exc.reason or exc})") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise av.error.OSError(errno.EIO, f"the connection failed ({type(exc).__name__})") from None

    def _drop_connection(self) -> None:
        if self._resp is not None:
            self._resp.close()
        if self._conn is not None:
            self._conn.close()
        self._conn = self._resp = None


def _resource_size(resp: http.client.HTTPResponse, start: int, base: int) -> int | None:
    """Length of the resource in positions relative to ``base``, if the response tells it."""
    content_range = resp.getheader("Content-Range", "")
    total = content_range.rpartition("/")[2]
    if total.isdigit():
        return int(total) - base
    length = resp.getheader("Content-Length", "")
    return int(length) + start - base if length.isdigit() else None


def _http_error(status: int, reason: str) -> av.error.FFmpegError:
    text = f"Server returned {status} {reason}".strip()
    classes: dict[int, type[av.error.FFmpegError]] = {
        400: av.error.HTTPBadRequestError, 401: av.error.HTTPUnauthorizedError,
        403: av.error.HTTPForbiddenError, 404: av.error.HTTPNotFoundError,
        429: av.error.HTTPTooManyRequestsError,
    }
    cls = classes.get(status, av.error.HTTPServerError if status >= 500 else av.error.HTTPOtherClientError)
    return cls(errno.EIO, text)


def _tls_context(spec: SourceSpec) -> ssl.SSLContext:
    """The spec's TLS settings: verified against ``ca_file`` (or the system's CAs), or not at all (FFmpeg's default)."""
    if spec.tls_verify:
        return ssl.create_default_context(cafile=spec.ca_file)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------- HLS AES-128


class Aes128Body:
    """An HLS ``METHOD=AES-128`` segment, decrypted as read (what FFmpeg's ``crypto:`` protocol does).

    AES-128-CBC with PKCS#7 padding; the key and IV come hex-encoded in the
    open's options (``key``, ``iv``), the key itself fetched by an earlier,
    policed open of the playlist's key URI. The last block is held back until
    the end of the data, where the padding is removed.
    """

    def __init__(self, inner: Body, key_hex: str, iv_hex: str, display: str) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        except ImportError:  # pragma: no cover - cryptography comes with aiortc
            inner.close()
            raise SourceUnsupportedError(
                f"cannot read {display}: encrypted HLS needs the 'cryptography' package") from None
        try:
            key, iv = bytes.fromhex(key_hex), bytes.fromhex(iv_hex)
        except ValueError:
            key = iv = b""
        if len(key) != 16 or len(iv) != 16:
            inner.close()
            raise av.error.InvalidDataError(errno.EINVAL, "an AES-128 segment without a 16-byte key and IV")
        self._inner = inner
        self._decryptor: Any = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        self._held = b""
        self._ready = b""
        self._done = False

    def read(self, size: int = -1) -> bytes:
        want = size if size and size > 0 else 65536
        while not self._ready and not self._done:
            chunk = self._inner.read(max(want, 4096))
            if chunk:
                plain = self._held + self._decryptor.update(chunk)
                self._ready, self._held = plain[:-16], plain[-16:]
                continue
            plain = self._held + self._decryptor.finalize()
            pad = plain[-1] if plain else 0
            if not 1 <= pad <= 16 or plain[-pad:] != bytes([pad]) * pad:
                raise av.error.InvalidDataError(errno.EINVAL, "an AES-128 segment with bad padding")
            self._ready, self._held, self._done = plain[:-pad], b"", True
        data, self._ready = self._ready[:want], self._ready[want:]
        return data

    def close(self) -> None:
        self._inner.close()
