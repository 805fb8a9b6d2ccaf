"""The server's allowlist for sources a remote client names: :class:`SourcePolicy`.

A policy answers three questions, all without looking at what exists first:
may a client name this source (scheme, folder, host and port, device, raw
FFmpeg options), are its options inside the server's caps, and may the reader
open this *further* URL on its behalf (an HLS segment or key, a playlist entry,
a redirect target). The third is asked by :mod:`tracker.sources.policed_io`
for every open FFmpeg makes, because the policy travels with the
:class:`~tracker.sources.spec.SourceSpec` (``spec.policy``).

Nothing here opens a file or a socket; paths are resolved (symlinks, ``..``)
to compare their canonical form with the allowed folders, and host names are
compared as written, never resolved through DNS.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tracker.errors import SourceError, SourceNotAllowedError, SourceOptionError
from tracker.sources.spec import _SCHEME_RE, IMAGE_SUFFIXES, SourceSpec, canonical_path, redact, written_path

#: Port a URL without one connects to, per scheme (what ``host:port`` patterns compare with).
DEFAULT_PORTS: dict[str, int] = {
    "http": 80, "https": 443, "rtsp": 554, "rtsps": 322, "rtmp": 1935, "rtmps": 443,
}
#: Schemes of the further URLs a reader may open for a source (besides ``file``).
NESTED_URL_SCHEMES: frozenset[str] = frozenset({"http", "https"})
_NAME_RE = re.compile(r"^(\*|\*\.[a-z0-9_.-]+|[a-z0-9_.-]+)$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class HostPattern:
    """One entry of ``SourcePolicy.hosts``, parsed: a host (or hosts) and an optional port.

    Forms: ``cam1.lan``, ``10.0.0.5``, ``[fd00::5]`` or ``fd00::5``, ``*.cams.example``,
    ``10.0.0.0/8``, ``[fd00::/8]``, ``*`` (any host); each may end in ``:PORT``
    (``cam1.lan:554``, ``[fd00::5]:8554``, ``10.0.0.0/8:554``, ``*:443``), and
    then only that port matches (a URL without a port uses its scheme's default).
    """

    text: str
    name: str | None = None  # exact name, lower case; or "*" for any host; or "*.suffix"
    network: IPNetwork | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Raises ValueError naming the pattern and the accepted forms."""
        raw = text.strip().lower()
        host, port = raw, None
        if raw.startswith("["):
            close = raw.find("]")
            if close < 0:
                raise ValueError(f"host pattern {text!r}: a '[' without its ']'")
            host, rest = raw[1:close], raw[close + 1:]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"host pattern {text!r}: only ':PORT' may follow ']'")
                port = _port(rest[1:], text)
        elif raw.count(":") == 1:
            host, port_text = raw.split(":")
            port = _port(port_text, text)
        if not host:
            raise ValueError(f"host pattern {text!r}: no host")
        if "/" in host:
            try:
                return cls(text, network=ipaddress.ip_network(host, strict=False), port=port)
            except ValueError:
                raise ValueError(f"host pattern {text!r}: {host!r} is not a network like 10.0.0.0/8") from None
        try:
            return cls(text, name=str(ipaddress.ip_address(host)), port=port)
        except ValueError:
            pass
        if not _NAME_RE.match(host):
            raise ValueError(
                f"host pattern {text!r}: use a name, an address, *.domain, a network like 10.0.0.0/8 or *, "
                "each optionally with :PORT ([v6 address]:PORT)"
            )
        return cls(text, name=host, port=port)

    def matches(self, host: str, port: int | None) -> bool:
        """Whether ``host`` (as written in a URL, any case, brackets allowed) and ``port`` fall under it."""
        if self.port is not None and port != self.port:
            return False
        host = host.lower().strip("[]")
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if self.network is not None:
            return address is not None and address in self.network
        name = self.name or ""
        if name == "*":
            return True  # '' included: ``udp://@:5000`` listens on every local address
        if name.startswith("*."):
            return host.endswith(name[1:]) and len(host) > len(name) - 1
        if address is not None:
            return str(address) == name
        return host == name


def _port(text: str, pattern: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"host pattern {pattern!r}: the port must be 1-65535, not {text!r}")
    return int(text)


@dataclass(frozen=True)
class SourcePolicy:
    """Which sources a remote client may open, and everything a reader opens for them.

    Everything not listed is refused:

    * ``schemes`` (as in :data:`~tracker.sources.spec.SCHEMES`; an image folder
      is ``images``, HLS is ``http``/``https``);
    * ``directories``: files and folders must *resolve* inside one (``..`` and
      symlinks pointing out are refused); the path checked is the canonical one
      :func:`~tracker.sources.spec.parse_source` made, and it is the path opened;
    * ``hosts``: :class:`HostPattern` entries, a port restriction included
      (``cam1.lan:554``, ``[fd00::5]:8554``, ``10.0.0.0/8:554``); compared with
      the host as written, never resolved through DNS;
    * ``devices`` (``/dev/videoN`` paths); ``allow_av_options`` (raw FFmpeg
      options and ``ca_file`` name things on the server, protocols or files,
      the policy would refuse, so they are off).

    Guarantees. A local path outside the folders gets one answer whether it
    exists or not (the check runs before anything looks at the file system).
    Every URL FFmpeg opens for a file, HTTP or HLS source, the first and every
    nested one (playlist entries, segments, AES keys, variant playlists) and
    every HTTP redirect, goes through :mod:`tracker.sources.policed_io`, which
    checks it against this policy before it opens anything; FFmpeg's own
    protocols are off for those sources, so a demuxer that opens inputs by
    itself (``concat``/``ffconcat`` lists, SDP files) cannot open anything.
    Files are opened by their canonical path and the opened file is checked
    again (``/proc/self/fd``), so a symlink swapped in after the check is caught
    on Linux. Client options are held to the ``max_*`` caps below
    (:class:`~tracker.errors.SourceOptionError` names the option).

    Limits. Host names are checked as written: DNS decides where an allowed
    name connects (DNS rebinding, a compromised resolver). RTSP, RTMP and UDP
    sources are read by FFmpeg's own network code: their first host and port
    are checked, but an RTSP server on an allowed host can redirect the reader
    (RTSP 3xx) or name the addresses of its media streams. Allow those schemes
    for hosts you trust.
    """

    schemes: frozenset[str] = frozenset()
    directories: tuple[Path, ...] = ()
    hosts: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    allow_av_options: bool = False
    #: caps on client options (the hard ranges of ``parse_source`` hold anyway)
    max_timeout_s: float = 30.0
    max_backoff_s: float = 30.0
    #: None: a client's live source retries until its session closes
    max_reconnect_attempts: int | None = None
    max_buffer_frames: int = 32
    max_resize_side: int = 2048
    max_resize_pixels: int = 2048 * 2048
    max_fps: float = 60.0
    _patterns: tuple[HostPattern, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_patterns", tuple(HostPattern.parse(h) for h in self.hosts))

    # ------------------------------------------------------------ sources

    def check_written(self, uri: str) -> None:
        """Refuse a local source from its text alone, before anything looks at the file system.

        A path outside the folders (or any path, when neither ``file`` nor
        ``images`` is allowed) gets the same answer whether it exists, is a
        folder, or is missing. Other sources pass here; :meth:`check` judges them.
        """
        path = written_path(uri)
        if path is None:
            return
        written = "images" if uri[:7].lower() == "images:" else "file"
        prefix = f"source {redact(uri)} not allowed"
        if (written == "images" and "images" not in self.schemes) or not ({"file", "images"} & self.schemes):
            raise SourceNotAllowedError(f"{prefix}: {self._scheme_refusal(written)}")
        if not self.allows_path(path):
            raise SourceNotAllowedError(f"{prefix}: the path is outside the allowed folders")

    def check(self, spec: SourceSpec) -> None:
        """Return if ``spec`` is allowed; raise naming why not.

        Raises:
            SourceNotAllowedError: the source is outside the policy.
            SourceOptionError: an option is over its cap (``.option`` names it).
        """
        prefix = f"source {spec.display} not allowed"
        if spec.kind in ("file", "images"):
            written = "images" if spec.uri[:7].lower() == "images:" else "file"
            if (written == "images" and "images" not in self.schemes) or not ({"file", "images"} & self.schemes):
                raise SourceNotAllowedError(f"{prefix}: {self._scheme_refusal(written)}")
            if not self.allows_path(spec.location):
                raise SourceNotAllowedError(f"{prefix}: the path is outside the allowed folders")
        if spec.scheme not in self.schemes:
            raise SourceNotAllowedError(f"{prefix}: {self._scheme_refusal(spec.scheme)}")
        if spec.av_options and not self.allow_av_options:
            raise SourceNotAllowedError(f"{prefix}: raw FFmpeg options (av_options) are not accepted here")
        if spec.ca_file is not None and not self.allow_av_options:
            raise SourceNotAllowedError(f"{prefix}: ca_file (a path on this server) is not accepted here")
        if spec.kind == "images" and not all(self.allows_path(p) for p in _image_files(spec.location)):
            raise SourceNotAllowedError(f"{prefix}: a frame file links outside the allowed folders")
        if spec.kind == "v4l2" and spec.location not in self.devices:
            raise SourceNotAllowedError(f"{prefix}: device {spec.location} is not allowed here")
        if spec.is_network:
            host = spec.host or ""
            port = _url_port(spec.location, spec.scheme)
            if not self.allows_host(host, port):
                shown = host if port is None or not any(p.port for p in self._patterns) else _host_port(host, port)
                raise SourceNotAllowedError(f"{prefix}: host '{shown}' is not allowed here")
        self.check_options(spec)

    def check_options(self, spec: SourceSpec) -> None:
        """Hold a client's option values to the server's caps (``[policy] max_*``)."""
        shown = spec.display

        def over(name: str, value: object, cap: float, key: str) -> SourceOptionError:
            return SourceOptionError(
                f"{name} must be at most {cap:g} on this server ([policy] {key}) for {shown}, not {value}", name)

        if spec.timeout_s > self.max_timeout_s:
            raise over("timeout_s", f"{spec.timeout_s:g}", self.max_timeout_s, "max_timeout_s")
        if spec.max_backoff_s > self.max_backoff_s:
            raise over("max_backoff_s", f"{spec.max_backoff_s:g}", self.max_backoff_s, "max_backoff_s")
        cap = self.max_reconnect_attempts
        if cap is not None and spec.reconnect and spec.mode == "live":
            if spec.reconnect_attempts is None:
                raise SourceOptionError(
                    f"reconnect_attempts must be set, at most {cap}, on this server ([policy] max_reconnect_attempts) "
                    f"for {shown}", "reconnect_attempts")
            if spec.reconnect_attempts > cap:
                raise over("reconnect_attempts", spec.reconnect_attempts, cap, "max_reconnect_attempts")
        if spec.buffer_frames > self.max_buffer_frames:
            raise over("buffer_frames", spec.buffer_frames, self.max_buffer_frames, "max_buffer_frames")
        if spec.fps is not None and spec.fps > self.max_fps:
            raise over("fps", f"{spec.fps:g}", self.max_fps, "max_fps")
        for name, wh in (("resize", spec.resize_wh), ("size", spec.capture_size_wh),
                         ("resize", None if spec.max_side is None else (spec.max_side, spec.max_side))):
            if wh is None:
                continue
            if max(wh) > self.max_resize_side or wh[0] * wh[1] > self.max_resize_pixels:
                value = f"{wh[0]}x{wh[1]}" if spec.max_side is None or name == "size" else str(spec.max_side)
                raise SourceOptionError(
                    f"{name} must be at most {self.max_resize_side} px a side and {self.max_resize_pixels} pixels "
                    f"on this server ([policy] max_resize_side, max_resize_pixels) for {shown}, not {value}", name)

    # ------------------------------------------------------------ what a reader opens

    def check_nested(self, url: str, display: str, how: str = "names") -> tuple[str, str]:
        """Judge a URL a reader is about to open for the source shown as ``display``.

        ``how`` says how the source reached it, for the message ("names" for a
        playlist entry, segment or key; "redirects to" for an HTTP redirect).

        Returns:
            ("file", canonical path) or ("http", url): what to open, exactly.

        Raises:
            SourceNotAllowedError: the URL is outside the policy; nothing was opened.
        """
        prefix = f"source {display} not allowed: it {how} {redact(url)}"
        match = _SCHEME_RE.match(url)
        scheme = match.group(1).lower() if match else None
        if scheme is None or len(scheme) == 1 or scheme == "file":
            path = url if scheme != "file" else written_path(url) or ""
            if "file" not in self.schemes:
                raise SourceNotAllowedError(f"{prefix}, and {self._scheme_refusal('file')}")
            if not path or not self.allows_path(path):
                raise SourceNotAllowedError(f"{prefix}, outside the allowed folders")
            return "file", canonical_path(path)
        if scheme not in NESTED_URL_SCHEMES or scheme not in self.schemes:
            raise SourceNotAllowedError(f"{prefix}, and {self._scheme_refusal(scheme)}")
        try:
            parts = urlsplit(url)
            host, port = parts.hostname or "", parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise SourceNotAllowedError(f"{prefix}, a malformed URL") from None
        if not self.allows_host(host, port):
            raise SourceNotAllowedError(f"{prefix}, and host '{_host_port(host, port)}' is not allowed here")
        return "http", url

    # ------------------------------------------------------------ parts

    def allows_path(self, path: str | Path) -> bool:
        """Whether ``path``, symlinks and ``..`` resolved, lies inside an allowed directory."""
        text = str(path)
        if not text or "\x00" in text:
            return False
        try:
            resolved = Path(canonical_path(text))
        except SourceError:  # unresolvable (a symlink loop): inside nothing
            return False
        return any(resolved.is_relative_to(Path(d).resolve()) for d in self.directories)

    def allows_host(self, host: str, port: int | None = None) -> bool:
        """Whether a URL's ``host`` (as written) and ``port`` (None: unknown) match a pattern."""
        return any(p.matches(host, port) for p in self._patterns)

    def _scheme_refusal(self, scheme: str) -> str:
        allowed = ", ".join(sorted(self.schemes)) or "none"
        return f"scheme '{scheme}' is not allowed here (allowed: {allowed})"


def _url_port(url: str, scheme: str) -> int | None:
    try:
        return urlsplit(url).port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _image_files(folder: str) -> list[Path]:
    """The files an image-folder source would read (for the allowlist's symlink check)."""
    try:
        return [p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    except OSError:
        return []
