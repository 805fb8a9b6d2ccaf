"""Fetching one file over HTTP into a cache: atomically, checked, with messages a user can act on.

What lives here: :func:`open_url` (a GET whose failures become
:class:`~tracker.errors.CheckpointError` with stable wording), :func:`stream_to_file`
(a response streamed to a temporary file beside its destination, its size, sha256
and content checked, then moved into place with ``os.replace``) and
:func:`sha256_file`. Both checkpoint caches use them: Meta's ``.pt`` files
(``tracker.checkpoints``) and Hugging Face model folders (``tracker.hf_checkpoints``).
What does not: registries, cache layout and the advice in messages: callers pass
the ``hint`` that ends every message (what to download by hand, and where to put it).

Because a file appears only through ``os.replace`` of a complete, checked
temporary file, a reader sees either no file or a valid one, and two processes
downloading the same file at once both end with the same valid file: no lock.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from tracker import __version__
from tracker.errors import CheckpointError

logger = logging.getLogger(__name__)

#: seconds to wait for the connection and for each read before giving up
DEFAULT_TIMEOUT_S = 30.0
USER_AGENT = f"sam2-stream/{__version__}"
_CHUNK_BYTES = 1 << 20


class Response(Protocol):
    """What :func:`stream_to_file` reads: ``urllib``'s response (or a test double)."""

    headers: Mapping[str, str]

    def read(self, amt: int = ...) -> bytes: ...


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are up to a few GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_failure(reason: object, timeout: float) -> str:
    """A short, stable description of a connection failure (for messages tests assert)."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError since 3.10
        return f"no answer within {timeout:g} s"
    if isinstance(reason, socket.gaierror):
        return "host name not found (no network or DNS?)"
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "network unreachable"
    if isinstance(reason, ConnectionError):
        return "connection lost"
    return str(reason) or type(reason).__name__


def open_url(
    url: str,
    *,
    hint: str,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    unredirected_headers: Mapping[str, str] | None = None,
    opener: urllib.request.OpenerDirector | None = None,
    http_error: Callable[[urllib.error.HTTPError], str | None] | None = None,
) -> http.client.HTTPResponse:
    """GET ``url``; every failure is a :class:`CheckpointError` ending in ``hint``.

    Args:
        headers: sent with the request and with any redirect of it.
        unredirected_headers: sent to ``url`` only, never to where it redirects
            (credentials: ``urllib`` drops these on redirects; an ``opener`` may
            re-add them where it trusts the new host).
        http_error: turns an HTTP error status into the whole message, or returns
            None for the default ``cannot download URL: HTTP code reason; hint``.
    """
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    for key, value in (unredirected_headers or {}).items():
        request.add_unredirected_header(key, value)
    try:
        if opener is None:
            return urllib.request.urlopen(request, timeout=timeout)
        return opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            message = http_error(e) if http_error is not None else None
        raise CheckpointError(message or f"cannot download {url}: HTTP {e.code} {e.reason}; {hint}") from e
    except urllib.error.URLError as e:
        raise CheckpointError(f"cannot download {url}: {describe_failure(e.reason, timeout)}; {hint}") from e
    except OSError as e:
        raise CheckpointError(f"cannot download {url}: {describe_failure(e, timeout)}; {hint}") from e


def announced_length(headers: Mapping[str, str]) -> int | None:
    """``Content-Length`` as an int, or None when absent or not a plain number."""
    length = headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None


def stream_to_file(
    response: Response,
    url: str,
    path: Path,
    *,
    hint: str,
    expected_size: int | None,
    expected_sha256: str | None,
    timeout: float,
    progress: bool,
    check: Callable[[Path], str | None] | None = None,
) -> tuple[int, str]:
    """Write ``response``'s body to ``path`` atomically; returns (bytes, sha256).

    The body goes to a temporary file in ``path``'s directory; it becomes ``path``
    (``os.replace``) only once its size equals ``expected_size``, its sha256 equals
    ``expected_sha256`` (each when not None) and ``check`` (given the temporary
    file) finds no problem. Otherwise the temporary file is removed and a
    :class:`CheckpointError` says what went wrong, ending in ``hint``. The caller
    closes ``response``.
    """
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    done = False
    try:
        with os.fdopen(fd, "wb") as out:
            digest = hashlib.sha256()
            received = 0
            with tqdm(
                total=expected_size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name, disable=not progress
            ) as bar:
                while True:
                    try:
                        chunk = response.read(_CHUNK_BYTES)
                    except (OSError, http.client.HTTPException) as e:
                        raise CheckpointError(
                            f"download of {url} failed after {received} bytes: {describe_failure(e, timeout)}; "
                            f"nothing was saved. Run again to retry, or {hint}"
                        ) from e
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if expected_size is not None and received != expected_size:
                raise CheckpointError(
                    f"download of {url} is truncated: got {received} bytes, expected {expected_size} bytes; "
                    f"nothing was saved. Run again to retry, or {hint}"
                )
            actual_sha = digest.hexdigest()
            out.flush()
            os.fsync(out.fileno())
        problem = None
        if expected_sha256 is not None and actual_sha != expected_sha256:
            problem = f"has sha256 {actual_sha}, expected {expected_sha256}"
        elif check is not None:
            problem = check(tmp)
        if problem is not None:
            raise CheckpointError(
                f"download of {url} {problem}; nothing was saved. Run again to retry; if it fails again, {hint}"
            )
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)
    return received, actual_sha


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "USER_AGENT",
    "announced_length",
    "describe_failure",
    "open_url",
    "sha256_file",
    "stream_to_file",
]
