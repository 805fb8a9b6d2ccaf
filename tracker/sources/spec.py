"""Source descriptions: one URI-like string plus options, parsed without I/O.

The CLI, the server and user code all describe a source the same way
(``parse_source("rtsp://cam/stream", timeout_s=5)``), so this module is the one
place that knows the schemes, the option names and their defaults. It also
holds :func:`redact` (credentials never reach a log line or an error message)
and the hard ranges of every option. The server-side allowlist,
:class:`~tracker.sources.policy.SourcePolicy`, lives in ``policy``.

Nothing here opens a file or a socket; paths are resolved (symlinks, ``..``)
into their canonical form, and a bare path naming an existing directory is
read as an image folder (after the policy's check, for client-named sources).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from tracker.errors import SourceError, SourceOptionError, SourceUnsupportedError

if TYPE_CHECKING:
    from tracker.sources.policy import SourcePolicy

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
    #: set for client-named sources: every URL the reader opens for this spec (nested
    #: ones, redirects, reconnects) is checked against it; None: opened as given
    policy: SourcePolicy | None = field(default=None, compare=False, repr=False)

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

#: Hard ranges of the numeric options, valid for every caller (a server's
#: ``[policy]`` caps client opens further, see :class:`tracker.ingest.SourcePolicy`).
MAX_TIMEOUT_S = 3600.0
MAX_BACKOFF_S = 3600.0
MAX_RECONNECT_ATTEMPTS = 1_000_000
MAX_BUFFER_FRAMES = 1024
MAX_SIDE_PX = 8192  # resize and camera size, each side
MAX_FPS = 1000.0
MAX_AV_OPTIONS = 64
_INPUT_FORMAT_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")


def parse_source(uri: str, *, policy: SourcePolicy | None = None, **options: Any) -> SourceSpec:
    """Parse a source string and its options into a :class:`SourceSpec`.

    Accepted forms: a file path or ``file:PATH`` / ``file:///PATH``; a directory
    or ``images:DIR`` (JPEG/PNG frames); ``rtsp://``, ``rtsps://``;
    ``http(s)://`` (HLS when the path ends in ``.m3u8``); ``udp://``, ``rtp://``;
    ``rtmp://``, ``rtmps://``; ``/dev/videoN`` or ``v4l2:///dev/videoN``;
    ``push:NAME`` (frames handed in by code). A path is made absolute and
    resolved (symlinks, ``..``) here, once: :attr:`SourceSpec.location` is the
    path that is checked and the path that is opened.

    Options (strings are accepted too, so a CLI can pass ``key=value`` through),
    with their ranges:

    ========================  ===========================================================
    ``mode``                  "live" | "file" (default live for network, devices and push,
                              file for files and folders)
    ``timeout_s``             number in (0, 3600], default 10
    ``rtsp_transport``        tcp (default) | udp | udp_multicast | http | https
    ``resize``                (w, h) / "WxH" (each side 1-8192) or a longest side N / "N"
                              (1-8192; only ever shrinks)
    ``preprocess``            any of clahe, denoise, denoise_nlm, each at most once
    ``reconnect``             bool (default on for network sources and devices)
    ``max_backoff_s``         number in (0, 3600], default 8
    ``reconnect_attempts``    integer 1-1000000 per outage (default: until closed)
    ``realtime``              bool: pace a file at its own rate, to stand in for a camera
    ``buffer_frames``         integer 1-1024, default 8 (file mode: decode-ahead depth)
    ``size``                  cameras: "WxH" asked of the device (each side 1-8192)
    ``fps``                   cameras and image folders: number in (0, 1000]
    ``input_format``          cameras: 1-32 letters, digits or '_' (e.g. "mjpeg")
    ``autorotate``            bool, default true
    ``tls_verify``            bool: check the certificate of an https, rtsps or rtmps
                              server (off by default, as in FFmpeg)
    ``ca_file``               path of a CA bundle (implies ``tls_verify``)
    ``av_options``            dict of at most 64 extra FFmpeg options, passed verbatim
    ========================  ===========================================================

    Reconnects happen in live mode only: in file mode a reopened stream would
    replay frames already delivered, so a drop ends it with an error.

    Args:
        uri: the source string.
        policy: for sources a remote client names: the policy is checked
            before anything looks at the file system (so the answer for a
            path outside it is the same whether the path exists or not),
            its option caps apply, and it travels with the spec, so every
            URL the reader opens (playlist entries, segments, keys,
            redirects, reconnects) is checked against it too.
        **options: see the table.

    Raises:
        SourceUnsupportedError: unknown scheme or a URL without a host/port.
        SourceOptionError: an option value outside its range (``.option`` names it).
        SourceNotAllowedError: ``policy`` refuses the source or an option value.
        SourceOptionError: an unknown option (``.option`` names it).
        SourceError: an option that does not apply to this kind of source.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError(f"empty source: {_HINT}")
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise SourceOptionError(
            f"unknown source option {unknown[0]!r} for {redact(uri)}: use one of {', '.join(_OPTION_NAMES)}",
            unknown[0],
        )
    if policy is not None:
        policy.check_written(uri)  # before _classify looks at the file system
    kind, scheme, location = _classify(uri, probe_fs=policy is None)
    display = redact(uri)
    network = kind in NETWORK_KINDS
    opts = {k: v for k, v in options.items() if v is not None}

    mode = str(opts.pop("mode", "live" if (network or kind in ("v4l2", "push")) else "file")).lower()
    if mode not in ("live", "file"):
        raise SourceOptionError(f"mode must be 'live' or 'file' for {display}, not {mode!r}", "mode")
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
            raise SourceOptionError(
                f"rtsp_transport must be one of {', '.join(RTSP_TRANSPORTS)} for {display}, not {rtsp_transport!r}",
                "rtsp_transport",
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
    if input_format is not None:
        if kind != "v4l2":
            raise SourceError(f"input_format applies to cameras (/dev/videoN) only, not to {display}")
        if not _INPUT_FORMAT_RE.match(str(input_format)):
            raise SourceOptionError(
                f"input_format must be 1-32 letters, digits or '_' (e.g. 'mjpeg') for {display}, not {input_format!r}",
                "input_format",
            )
    av_options = opts.pop("av_options", {})
    if not isinstance(av_options, dict):
        raise SourceOptionError(f"av_options must be a dict of FFmpeg options for {display}", "av_options")
    if len(av_options) > MAX_AV_OPTIONS:
        raise SourceOptionError(
            f"av_options must hold at most {MAX_AV_OPTIONS} FFmpeg options for {display}, not {len(av_options)}",
            "av_options",
        )
    attempts = opts.pop("reconnect_attempts", None)
    timeout_s, backoff_s, buffer_frames = 10.0, 8.0, 8
    if policy is not None:  # what a client leaves unset stays inside the server's caps
        attempts = policy.max_reconnect_attempts if attempts is None else attempts
        timeout_s, backoff_s = min(timeout_s, policy.max_timeout_s), min(backoff_s, policy.max_backoff_s)
        buffer_frames = min(buffer_frames, policy.max_buffer_frames)
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
        timeout_s=_number(opts.pop("timeout_s", timeout_s), "timeout_s", MAX_TIMEOUT_S, display),
        rtsp_transport=rtsp_transport,
        resize_wh=resize_wh,
        max_side=max_side,
        preprocess=preprocess,
        reconnect=reconnect,
        max_backoff_s=_number(opts.pop("max_backoff_s", backoff_s), "max_backoff_s", MAX_BACKOFF_S, display),
        reconnect_attempts=None if attempts is None else _integer(
            attempts, "reconnect_attempts", MAX_RECONNECT_ATTEMPTS, display),
        realtime=_as_bool(opts.pop("realtime", False), "realtime", display),
        buffer_frames=_integer(opts.pop("buffer_frames", buffer_frames), "buffer_frames", MAX_BUFFER_FRAMES, display),
        capture_size_wh=capture_size_wh,
        fps=None if fps is None else _number(fps, "fps", MAX_FPS, display),
        input_format=None if input_format is None else str(input_format),
        autorotate=_as_bool(opts.pop("autorotate", True), "autorotate", display),
        tls_verify=tls_verify,
        ca_file=None if ca_file is None else str(ca_file),
        av_options={str(k): str(v) for k, v in av_options.items()},
        policy=policy,
    )
    if policy is not None:
        policy.check(spec)
    return spec


def written_path(uri: str) -> str | None:
    """The path a local source string names, read from the text alone (no file system access).

    None for URLs, devices and push names. ``file:PATH`` strips exactly one
    ``file:``; ``file://[host]/PATH`` and ``images://…`` are URL-decoded.
    """
    match = _SCHEME_RE.match(uri)
    scheme = match.group(1).lower() if match else None
    if scheme is None or len(scheme) == 1:
        return None if re.fullmatch(r"/dev/video\d+", uri) else uri
    if scheme in ("file", "images"):
        rest = uri[match.end():]  # type: ignore[union-attr]
        return unquote(urlsplit(uri).path) if rest.startswith("//") else rest
    return None


def canonical_path(path: str) -> str:
    """``path`` absolute, with symlinks and ``..`` resolved by the kernel's rules (relative to the cwd).

    The one canonical form: the policy checks it and the reader opens it, so
    no later step can read a prefix (``file:``) or a ``..`` differently.

    Raises:
        SourceUnsupportedError: the path cannot be resolved (a symlink loop).
    """
    try:
        return str(Path(path).resolve())
    except (RuntimeError, OSError) as exc:  # a symlink loop: RuntimeError up to 3.12, OSError after
        raise SourceUnsupportedError(f"cannot resolve the path {path!r} ({exc})") from None


def _classify(uri: str, probe_fs: bool = True) -> tuple[Kind, str, str]:
    """(kind, scheme, location) of a source string; raises on unknown schemes.

    ``probe_fs=False`` (client-named sources) never reads a string with an
    unknown scheme as an existing relative path: the answer must not depend on
    what exists.
    """
    match = _SCHEME_RE.match(uri)
    scheme = match.group(1).lower() if match else None
    if scheme is not None and len(scheme) == 1:
        scheme = None  # a drive letter, C:\\...
    if scheme is None or (probe_fs and scheme not in SCHEMES and os.path.exists(uri)):
        return _classify_path(uri)
    rest = uri[match.end():] if match else uri
    if scheme == "file":
        return _classify_path(written_path(uri) or "", scheme_given=True)
    if scheme == "images":
        path = written_path(uri)
        if not path:
            raise SourceUnsupportedError(f"images: needs a folder, e.g. images:/data/frames (got {uri!r})")
        return "images", "images", canonical_path(path)
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
    if "\x00" in path:
        raise SourceUnsupportedError(f"unsupported source {path!r}: a path cannot hold a NUL character")
    location = canonical_path(path)
    if os.path.isdir(location):
        return "images", "images", location
    return "file", "file", location


def _as_bool(value: Any, name: str, display: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SourceOptionError(f"{name} must be true or false for {display}, not {value!r}", name)


def _number(value: Any, name: str, maximum: float, display: str) -> float:
    """A float in (0, maximum]; strings are read as numbers, bools are not numbers."""
    number = float("nan")
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            pass
    if not 0 < number <= maximum:
        raise SourceOptionError(f"{name} must be a number in (0, {maximum:g}] for {display}, not {value!r}", name)
    return number


def _integer(value: Any, name: str, maximum: int, display: str) -> int:
    """An int in [1, maximum]; integral strings and floats (``"4"``, ``4.0``) count, ``2.5`` does not."""
    number: float = float("nan")
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            pass
    if not (1 <= number <= maximum and number == int(number)):
        raise SourceOptionError(f"{name} must be an integer in [1, {maximum}] for {display}, not {value!r}", name)
    return int(number)


def _parse_wh(value: Any, name: str, display: str) -> tuple[int, int]:
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
    else:
        parts = list(value) if isinstance(value, (tuple, list)) else []
    try:
        if any(isinstance(p, (bool, float)) for p in parts):
            raise ValueError
        width, height = (int(p) for p in parts)
    except (TypeError, ValueError):
        width = height = 0
    if not (0 < width <= MAX_SIDE_PX and 0 < height <= MAX_SIDE_PX):
        raise SourceOptionError(
            f"{name} must be (width, height) or 'WxH' with integers in [1, {MAX_SIDE_PX}] for {display}, not {value!r}",
            name,
        )
    return width, height


def _parse_resize(value: Any, display: str) -> tuple[tuple[int, int] | None, int | None]:
    if value is None:
        return None, None
    if isinstance(value, bool):
        raise SourceOptionError(
            f"resize must be (width, height), 'WxH' or a longest side for {display}, not {value!r}", "resize")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        side = int(value)
        if not 0 < side <= MAX_SIDE_PX:
            raise SourceOptionError(
                f"resize must be a longest side in [1, {MAX_SIDE_PX}] for {display}, not {value!r}", "resize")
        return None, side
    return _parse_wh(value, "resize", display), None


def _parse_preprocess(value: Any, display: str) -> tuple[str, ...]:
    if isinstance(value, str):
        steps = tuple(s.strip().lower() for s in value.split(",") if s.strip())
    elif isinstance(value, (list, tuple)):
        steps = tuple(str(s).strip().lower() for s in value)
    else:
        raise SourceOptionError(
            f"preprocess must be a list of steps ({', '.join(PREPROCESS_STEPS)}) for {display}, not {value!r}",
            "preprocess",
        )
    for step in steps:
        if step not in PREPROCESS_STEPS:
            raise SourceOptionError(
                f"unknown preprocess step {step!r} for {display}: use any of {', '.join(PREPROCESS_STEPS)}",
                "preprocess",
            )
    if len(set(steps)) != len(steps):
        raise SourceOptionError(f"preprocess must name each step at most once for {display}, not {value!r}",
                                "preprocess")
    return steps
