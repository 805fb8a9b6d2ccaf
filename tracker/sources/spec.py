"""Source descriptions: one URI-like string plus options, parsed without I/O.

The CLI, the server and user code all describe a source the same way
(``parse_source("rtsp://cam/stream", timeout_s=5)``), so this module is the one
place that knows the schemes, the option names and their defaults. It also
holds :func:`redact` (credentials never reach a log line or an error message)
and :class:`SourcePolicy`, the server-side allowlist deciding which sources a
remote client may open.

Nothing here opens a file or a socket, except that a bare path naming an
existing directory is read as an image folder, and :meth:`SourcePolicy.check`
resolves paths to see through symlinks.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from tracker.errors import SourceError, SourceNotAllowedError, SourceUnsupportedError

Kind = Literal["file", "images", "rtsp", "http", "hls", "udp", "rtp", "rtmp", "v4l2", "push"]
Mode = Literal["live", "file"]

#: Kinds read over a network; they get timeouts, low-latency flags and reconnects.
NETWORK_KINDS: frozenset[str] = frozenset({"rtsp", "http", "hls", "udp", "rtp", "rtmp"})
#: Kinds whose end of data means "the sender went away" rather than "the clip is over":
#: a live reader reconnects after it instead of ending.
EOF_IS_DROP_KINDS: frozenset[str] = frozenset({"rtsp", "rtmp", "udp", "rtp"})
#: Every scheme :func:`parse_source` accepts (what a :class:`SourcePolicy` allows).
SCHEMES: tuple[str, ...] = (
    "file", "images", "rtsp", "rtsps", "http", "https", "udp", "rtp", "rtmp", "rtmps", "v4l2", "push",
)
#: Files an image folder source reads (case-insensitive suffixes).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
#: OpenCV preprocessing steps, applied in the order given (see ``tracker.sources.frame``).
PREPROCESS_STEPS: tuple[str, ...] = ("clahe", "denoise", "denoise_nlm")
RTSP_TRANSPORTS: tuple[str, ...] = ("tcp", "udp", "udp_multicast", "http", "https")
#: Schemes carried over TLS, where ``tls_verify`` / ``ca_file`` apply.
TLS_SCHEMES: frozenset[str] = frozenset({"https", "rtsps", "rtmps"})

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_URL_HEAD_RE = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/]*)")
_SECRET_QUERY_RE = re.compile(
    r"(?i)([?&;](?:password|passwd|pwd|pass|token|access_token|auth|key|api_key|apikey|secret|sig|signature)=)[^&;#]*"
)
_PUSH_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HINT = "use a file path, a folder of JPEG/PNG frames, rtsp://, http(s)://, udp://, rtp://, rtmp://, /dev/videoN or push:NAME"


def redact(uri: str) -> str:
    """``uri`` with the password of its user-info and secret query values replaced by ``***``.

    Every log line and error message names a source through this, because camera
    URLs routinely carry ``user:password@``. A user-info without a password is
    hidden whole (it is often a bare token). Strings that are not URLs (paths)
    come back unchanged. A password must not contain an unescaped ``/`` (FFmpeg
    could not parse it either); everything else, ``@ : ? #`` included, is handled.
    """
    match = _URL_HEAD_RE.match(uri)
    if match and "@" in match["authority"]:
        userinfo, host = match["authority"].rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        hidden = f"{user}:***" if has_password else "***"
        uri = f"{match['head']}{hidden}@{host}{uri[match.end():]}"
    if "://" in uri:
        uri = _SECRET_QUERY_RE.sub(r"\1***", uri)
    return uri


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source: what to open and how. Build it with :func:`parse_source`.

    ``uri`` is kept verbatim because the reader needs the credentials; use
    :attr:`display` (redacted) anywhere a human or a log could see it.
    """

    uri: str
    kind: Kind
    scheme: str
    location: str  # what the reader opens: a path, a URL, a device node, a push name
    mode: Mode
    timeout_s: float = 10.0
    rtsp_transport: str | None = None
    resize_wh: tuple[int, int] | None = None  # exact output size (width, height)
    max_side: int | None = None  # or: scale so the longer side is at most this
    preprocess: tuple[str, ...] = ()
    reconnect: bool = False
    max_backoff_s: float = 8.0
    reconnect_attempts: int | None = None  # per outage; None retries until closed
    realtime: bool = False
    buffer_frames: int = 8  # file mode: how far decoding may run ahead
    capture_size_wh: tuple[int, int] | None = None  # v4l2: size asked of the camera
    fps: float | None = None  # v4l2: rate asked of the camera; images: rate for PTS/pacing
    input_format: str | None = None  # v4l2: e.g. "mjpeg"
    autorotate: bool = True
    tls_verify: bool = False  # FFmpeg's default: IP cameras mostly present self-signed certificates
    ca_file: str | None = None  # CA bundle to verify the server against (implies tls_verify)
    av_options: dict[str, str] = field(default_factory=dict)  # extra FFmpeg options, verbatim

    @property
    def display(self) -> str:
        """The URI with credentials redacted: the form used in logs and messages."""
        return redact(self.uri)

    @property
    def is_network(self) -> bool:
        return self.kind in NETWORK_KINDS

    @property
    def host(self) -> str | None:
        """Lower-case host name or address of a network source ('' for ``udp://@:port``)."""
        if not self.is_network:
            return None
        try:
            return (urlsplit(self.location).hostname or "").lower()
        except ValueError:
            return ""

    def __repr__(self) -> str:
        return f"SourceSpec({self.display!r}, kind={self.kind!r}, mode={self.mode!r})"


_OPTION_NAMES = (
    "mode", "timeout_s", "rtsp_transport", "resize", "preprocess", "reconnect", "max_backoff_s",
    "reconnect_attempts", "realtime", "buffer_frames", "size", "fps", "input_format", "autorotate",
    "tls_verify", "ca_file", "av_options",
)


def parse_source(uri: str, **options: Any) -> SourceSpec:
    """Parse a source string and its options into a :class:`SourceSpec`.

    Accepted forms: a file path or ``file:PATH`` / ``file:///PATH``; a directory
    or ``images:DIR`` (JPEG/PNG frames); ``rtsp://``, ``rtsps://``;
    ``http(s)://`` (HLS when the path ends in ``.m3u8``); ``udp://``, ``rtp://``;
    ``rtmp://``, ``rtmps://``; ``/dev/videoN`` or ``v4l2:///dev/videoN``;
    ``push:NAME`` (frames handed in by code).

    Options (strings are accepted too, so a CLI can pass ``key=value`` through):
    ``mode`` ("live" | "file"; default live for network, devices and push, file
    for files and folders), ``timeout_s``, ``rtsp_transport`` (default "tcp"),
    ``resize`` ((w, h), "WxH", or an int / "N" for the longest side),
    ``preprocess`` (list or "clahe,denoise"), ``reconnect`` (default on for
    network sources and devices), ``max_backoff_s``, ``reconnect_attempts``,
    ``realtime`` (pace a file at its own rate, to stand in for a camera),
    ``buffer_frames``, ``size`` / ``fps`` / ``input_format`` (what to ask of a
    V4L2 camera; ``fps`` also times an image folder), ``autorotate``,
    ``tls_verify`` / ``ca_file`` (check the certificate of an https, rtsps or
    rtmps server; off by default, as in FFmpeg), ``av_options`` (extra FFmpeg
    options, passed verbatim).

    Reconnects happen in live mode only: in file mode a reopened stream would
    replay frames already delivered, so a drop ends it with an error.

    Raises:
        SourceUnsupportedError: unknown scheme or a URL without a host/port.
        SourceError: an unknown option or an option value that cannot be used.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError(f"empty source: {_HINT}")
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise SourceError(
            f"unknown source option {unknown[0]!r} for {redact(uri)}: use one of {', '.join(_OPTION_NAMES)}"
        )
    kind, scheme, location = _classify(uri)
    display = redact(uri)
    network = kind in NETWORK_KINDS
    opts = {k: v for k, v in options.items() if v is not None}

    mode = str(opts.pop("mode", "live" if (network or kind in ("v4l2", "push")) else "file")).lower()
    if mode not in ("live", "file"):
        raise SourceError(f"mode must be 'live' or 'file' for {display}, not {mode!r}")
    reconnect_default = network or kind == "v4l2"
    reconnect = _as_bool(opts.pop("reconnect", reconnect_default), "reconnect", display)
    if reconnect and not reconnect_default:
        raise SourceError(f"reconnect applies to network sources and cameras, not to {display}")

    rtsp_transport = opts.pop("rtsp_transport", None)
    if rtsp_transport is not None:
        rtsp_transport = str(rtsp_transport).lower()
        if kind != "rtsp":
            raise SourceError(f"rtsp_transport applies to rtsp:// sources only, not to {display}")
        if rtsp_transport not in RTSP_TRANSPORTS:
            raise SourceError(
                f"rtsp_transport must be one of {', '.join(RTSP_TRANSPORTS)} for {display}, not {rtsp_transport!r}"
            )
    elif kind == "rtsp":
        rtsp_transport = "tcp"

    resize_wh, max_side = _parse_resize(opts.pop("resize", None), display)
    preprocess = _parse_preprocess(opts.pop("preprocess", ()), display)
    capture_size = opts.pop("size", None)
    if capture_size is not None and kind != "v4l2":
        raise SourceError(f"size applies to cameras (/dev/videoN) only, not to {display}; use resize")
    capture_size_wh = _parse_wh(capture_size, "size", display) if capture_size is not None else None
    fps = opts.pop("fps", None)
    if fps is not None and kind not in ("v4l2", "images"):
        raise SourceError(f"fps applies to cameras and image folders only, not to {display}")
    input_format = opts.pop("input_format", None)
    if input_format is not None and kind != "v4l2":
        raise SourceError(f"input_format applies to cameras (/dev/videoN) only, not to {display}")
    av_options = opts.pop("av_options", {})
    if not isinstance(av_options, dict):
        raise SourceError(f"av_options must be a dict of FFmpeg options for {display}")
    attempts = opts.pop("reconnect_attempts", None)
    ca_file = opts.pop("ca_file", None)
    tls_verify = _as_bool(opts.pop("tls_verify", ca_file is not None), "tls_verify", display)
    if (tls_verify or ca_file is not None) and scheme not in TLS_SCHEMES:
        raise SourceError(f"tls_verify and ca_file apply to https://, rtsps:// and rtmps:// sources only, not to {display}")

    spec = SourceSpec(
        uri=uri,
        kind=kind,
        scheme=scheme,
        location=location,
        mode=mode,  # type: ignore[arg-type]
        timeout_s=_positive(opts.pop("timeout_s", 10.0), "timeout_s", display),
        rtsp_transport=rtsp_transport,
        resize_wh=resize_wh,
        max_side=max_side,
        preprocess=preprocess,
        reconnect=reconnect,
        max_backoff_s=_positive(opts.pop("max_backoff_s", 8.0), "max_backoff_s", display),
        reconnect_attempts=None if attempts is None else int(_positive(attempts, "reconnect_attempts", display)),
        realtime=_as_bool(opts.pop("realtime", False), "realtime", display),
        buffer_frames=int(_positive(opts.pop("buffer_frames", 8), "buffer_frames", display)),
        capture_size_wh=capture_size_wh,
        fps=None if fps is None else _positive(fps, "fps", display),
        input_format=None if input_format is None else str(input_format),
        autorotate=_as_bool(opts.pop("autorotate", True), "autorotate", display),
        tls_verify=tls_verify,
        ca_file=None if ca_file is None else str(ca_file),
        av_options={str(k): str(v) for k, v in av_options.items()},
    )
    return spec


def _classify(uri: str) -> tuple[Kind, str, str]:
    """(kind, scheme, location) of a source string; raises on unknown schemes."""
    match = _SCHEME_RE.match(uri)
    scheme = match.group(1).lower() if match else None
    if scheme is not None and len(scheme) == 1:
        scheme = None  # a drive letter, C:\\...
    if scheme is None or (scheme not in SCHEMES and os.path.exists(uri)):
        return _classify_path(uri)
    rest = uri[match.end():] if match else uri
    if scheme == "file":
        path = unquote(urlsplit(uri).path) if rest.startswith("//") else rest
        return _classify_path(path, scheme_given=True)
    if scheme == "images":
        path = unquote(urlsplit(uri).path) if rest.startswith("//") else rest
        if not path:
            raise SourceUnsupportedError(f"images: needs a folder, e.g. images:/data/frames (got {uri!r})")
        return "images", "images", path
    if scheme == "v4l2":
        path = rest[2:] if rest.startswith("//") else rest
        if path.isdigit():
            path = f"/dev/video{path}"
        if not path:
            raise SourceUnsupportedError(f"v4l2: needs a device, e.g. v4l2:///dev/video0 (got {uri!r})")
        return "v4l2", "v4l2", path
    if scheme == "push":
        name = rest
        if not _PUSH_NAME_RE.match(name):
            raise SourceUnsupportedError(
                f"push: needs a name of letters, digits, '_', '.', '-' (at most 64), e.g. push:robot1 (got {uri!r})"
            )
        return "push", "push", name
    if scheme not in SCHEMES:
        raise SourceUnsupportedError(f"unsupported source {redact(uri)}: unknown scheme '{scheme}:'; {_HINT}")
    try:
        parts = urlsplit(uri)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise SourceUnsupportedError(f"unsupported source {redact(uri)}: malformed URL ({exc})") from None
    if scheme in ("udp", "rtp"):
        if port is None:
            raise SourceUnsupportedError(f"unsupported source {redact(uri)}: {scheme}:// needs a port, e.g. {scheme}://127.0.0.1:5000")
        return scheme, scheme, uri  # type: ignore[return-value]
    if not host:
        raise SourceUnsupportedError(f"unsupported source {redact(uri)}: the URL has no host")
    if scheme in ("rtsp", "rtsps"):
        return "rtsp", scheme, uri
    if scheme in ("rtmp", "rtmps"):
        return "rtmp", scheme, uri
    kind: Kind = "hls" if parts.path.lower().endswith(".m3u8") else "http"
    return kind, scheme, uri


def _classify_path(path: str, scheme_given: bool = False) -> tuple[Kind, str, str]:
    if not path:
        raise SourceError(f"empty source: {_HINT}")
    if re.fullmatch(r"/dev/video\d+", path) and not scheme_given:
        return "v4l2", "v4l2", path
    if os.path.isdir(path):
        return "images", "images", path
    return "file", "file", path


def _as_bool(value: Any, name: str, display: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SourceError(f"{name} must be true or false for {display}, not {value!r}")


def _positive(value: Any, name: str, display: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise SourceError(f"{name} must be a positive number for {display}, not {value!r}")
    return number


def _parse_wh(value: Any, name: str, display: str) -> tuple[int, int]:
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
    else:
        parts = list(value) if isinstance(value, (tuple, list)) else []
    try:
        width, height = (int(p) for p in parts)
    except (TypeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0:
        raise SourceError(f"{name} must be (width, height) or 'WxH' with positive integers for {display}, not {value!r}")
    return width, height


def _parse_resize(value: Any, display: str) -> tuple[tuple[int, int] | None, int | None]:
    if value is None:
        return None, None
    if isinstance(value, bool):
        raise SourceError(f"resize must be (width, height), 'WxH' or a longest side for {display}, not {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        side = int(value)
        if side <= 0:
            raise SourceError(f"resize must be a positive longest side for {display}, not {value!r}")
        return None, side
    return _parse_wh(value, "resize", display), None


def _parse_preprocess(value: Any, display: str) -> tuple[str, ...]:
    if isinstance(value, str):
        steps = tuple(s.strip().lower() for s in value.split(",") if s.strip())
    else:
        steps = tuple(str(s).strip().lower() for s in value)
    for step in steps:
        if step not in PREPROCESS_STEPS:
            raise SourceError(
                f"unknown preprocess step {step!r} for {display}: use any of {', '.join(PREPROCESS_STEPS)}"
            )
    return steps


@dataclass(frozen=True)
class SourcePolicy:
    """Which sources a remote client may open (the server's allowlist).

    Everything not listed is refused: ``schemes`` (as in :data:`SCHEMES`; an
    image folder is ``images``, HLS is ``http``/``https``), ``directories``
    (files and folders must *resolve* inside one: ``..`` and symlinks pointing
    out are refused), ``hosts`` (exact names or addresses, ``*.example.org``,
    networks like ``10.0.0.0/8``, or ``*`` for any; compared with the host as
    written, never resolved through DNS), ``devices`` (``/dev/videoN`` paths),
    and ``allow_av_options`` (raw FFmpeg options and ``ca_file`` name things
    on the server, protocols or files, the policy would refuse, so they are off).

    Limits: an HLS playlist on an allowed host may name segments elsewhere (the
    reader restricts the protocols FFmpeg may use, not their hosts), and a
    file swapped for a symlink after the check is not seen (check then open
    promptly).
    """

    schemes: frozenset[str] = frozenset()
    directories: tuple[Path, ...] = ()
    hosts: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    allow_av_options: bool = False

    def check(self, spec: SourceSpec) -> None:
        """Return if ``spec`` is allowed; raise :class:`SourceNotAllowedError` naming why not."""
        prefix = f"source {spec.display} not allowed"
        if spec.scheme not in self.schemes:
            allowed = ", ".join(sorted(self.schemes)) or "none"
            raise SourceNotAllowedError(f"{prefix}: scheme '{spec.scheme}' is not allowed here (allowed: {allowed})")
        if spec.av_options and not self.allow_av_options:
            raise SourceNotAllowedError(f"{prefix}: raw FFmpeg options (av_options) are not accepted here")
        if spec.ca_file is not None and not self.allow_av_options:
            raise SourceNotAllowedError(f"{prefix}: ca_file (a path on this server) is not accepted here")
        if spec.kind in ("file", "images"):
            if not self.allows_path(spec.location):
                raise SourceNotAllowedError(f"{prefix}: the path is outside the allowed folders")
            if spec.kind == "images" and not all(self.allows_path(p) for p in _image_files(spec.location)):
                raise SourceNotAllowedError(f"{prefix}: a frame file links outside the allowed folders")
        elif spec.kind == "v4l2":
            if spec.location not in self.devices:
                raise SourceNotAllowedError(f"{prefix}: device {spec.location} is not allowed here")
        elif spec.is_network:
            host = spec.host or ""
            if not self.allows_host(host):
                raise SourceNotAllowedError(f"{prefix}: host '{host}' is not allowed here")

    def allows_path(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path``, symlinks and ``..`` resolved, lies inside an allowed directory."""
        if "\x00" in os.fspath(path):
            return False
        resolved = Path(path).resolve()
        return any(resolved.is_relative_to(Path(d).resolve()) for d in self.directories)

    def allows_host(self, host: str) -> bool:
        host = host.lower().strip("[]")
        for pattern in self.hosts:
            pattern = pattern.lower()
            if pattern == "*" or pattern == host:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
            if "/" in pattern:
                try:
                    if ipaddress.ip_address(host) in ipaddress.ip_network(pattern, strict=False):
                        return True
                except ValueError:
                    continue
        return False


def _image_files(folder: str) -> list[Path]:
    """The files an image-folder source would read (for the allowlist's symlink check)."""
    try:
        return [p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    except OSError:
        return []
