"""The server's configuration file and the sources it serves.

A TOML file (``sam2-stream serve --config server.toml``) read with ``tomllib``
through msgspec, so a wrong key or type is refused at start-up with its path
(``Expected `int`, got `str` - at `$.server.port```), not at the first client::

    [server]
    host = "127.0.0.1"          # a non-loopback host needs a token
    port = 8765
    token = "…"                 # or the SAM2_STREAM_TOKEN environment variable
    allow_origins = ["https://ops.example.org"]
    tls_cert = "cert.pem"       # both: wss:// and https://
    tls_key = "key.pem"

    [model]                     # the default model
    name = "sam2.1-tiny"
    image_size = 512
    cpu_fallback = true         # out of CUDA memory: move that session to the CPU

    [models.large]              # more models sessions may choose (open's "model")
    name = "sam2.1-large"

    [limits]
    max_sessions = 8
    max_objects = 16
    prompts_per_s = 20

    [policy]                    # what clients may open by URI (default: nothing)
    allow_schemes = ["rtsp"]
    allow_hosts = ["10.0.0.0/8"]
    allow_dirs = ["/data/videos"]

    [webrtc]                    # video in/out over WebRTC (aiortc)
    ice_host_addresses = ["192.168.1.20"]

    [images]                    # image mode: image_open / image_segment
    dirs = ["/data/photos"]     # what image_open's "name" may read
    cache_bytes = 1073741824    # embeddings kept, all clients together

    [cluster]                   # serve --ray: sessions on Ray session hosts (docs/scaling.md)
    address = "10.0.0.2:6379"
    max_sessions_per_host = 4

    [sources]                   # what clients open by name
    cam1 = "rtsp://user:pw@10.0.0.5/stream"
    clip = { uri = "clip.mp4", loop = true, options = { resize = 640 } }
    dock = { uri = "rtsp://10.0.0.6/stream", model = "large", tracking = { max_objects = 4 } }

Relative paths (sources, ``allow_dirs``, TLS files) are relative to the file's
folder. Files named here play as a live camera (``mode = "live"``,
``realtime = true``) and loop unless ``loop = false``.

Also here: :class:`SourceCatalog` (opens a configured name, or a URI the
policy allows) and :class:`LoopingSource`. Errors: :class:`ConfigError`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import msgspec

from tracker.errors import SourceError, SourceNotAllowedError, TrackerError
from tracker.ingest import Frame, SourcePolicy, SourceSpec, VideoSource, open_source, parse_source
from tracker.sources.base import ThreadedSource

logger = logging.getLogger("sam2-stream.config")

TOKEN_ENV = "SAM2_STREAM_TOKEN"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

OptionValue = Union[bool, int, float, str, list[Union[int, float, str]]]


class ConfigError(TrackerError):
    """The server's configuration cannot be used (bad file, missing token, bad TLS files)."""


class ServerSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8765
    token: str | None = None
    #: None: required unless bound to loopback
    require_token: bool | None = None
    allow_origins: list[str] = []
    tls_cert: str | None = None
    tls_key: str | None = None
    #: largest client message; larger ones close the connection (1009)
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 2**20)] = 2**20
    #: keepalive: a ping this often (None: no pings) ...
    ping_interval_s: Annotated[float, msgspec.Meta(gt=0)] | None = 20.0
    #: ... and its pong within this long of starting to write the ping, however
    #: full the send buffer is (else close 1011); None: pongs are not awaited
    ping_timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = 20.0
    #: kernel send buffer per client: bounds how stale a slow client's frames get
    send_buffer_bytes: Annotated[int, msgspec.Meta(ge=1024)] | None = 256 * 1024
    #: asyncio write buffer per client before a send waits (and newer frames replace older)
    write_limit_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 32 * 1024
    max_clients: Annotated[int, msgspec.Meta(ge=1)] = 256
    #: WebSocket connections from one IP address at most, so sockets from one
    #: address cannot take every ``max_clients`` slot (HTTP 503 beyond it;
    #: behind a reverse proxy every client has the proxy's address)
    max_clients_per_address: Annotated[int, msgspec.Meta(ge=1)] = 16
    #: a client whose socket takes no data for this long (its send buffer full:
    #: it stopped reading) is closed with 1008, aborted if the close frame cannot
    #: get through either, and its slot freed
    send_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 20.0
    #: a closing handshake that takes longer (the peer does not answer, or cannot
    #: read the close frame behind a full buffer) ends with the connection aborted
    close_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    #: a status line in the log this often while sessions run (0: never)
    log_every_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0


class ModelEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One model the server loads (``tracker.model.build_model``'s arguments)."""

    name: str = "sam2.1-tiny"
    checkpoint: str | None = None
    device: str = "auto"
    image_size: Annotated[int, msgspec.Meta(ge=64, le=4096)] | None = None
    random_weights: int | None = None
    #: autocast (tracker.model.PRECISIONS): auto = bf16 on CUDA, fp32 on the CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class ModelSection(ModelEntry, forbid_unknown_fields=True, kw_only=True):
    """The default model, and what holds for every model."""

    #: newest frames of up to this many sessions share one image-encoder call
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    #: a session that runs out of CUDA memory moves to a CPU copy of its model
    #: (slow, logged) instead of dropping frame after frame
    cpu_fallback: bool = False


class LimitsSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_sessions: Annotated[int, msgspec.Meta(ge=1)] = 8
    max_objects: Annotated[int, msgspec.Meta(ge=1)] = 16
    lost_after_frames: Annotated[int, msgspec.Meta(ge=1)] = 15
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    prompts_per_s: Annotated[float, msgspec.Meta(gt=0)] = 20.0
    prompt_burst: Annotated[float, msgspec.Meta(ge=1)] = 40.0
    opens_per_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    open_burst: Annotated[float, msgspec.Meta(ge=1)] = 5.0
    prompt_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: replies/events waiting for a client that does not read; beyond it the client is closed
    max_pending_messages: Annotated[int, msgspec.Meta(ge=8)] = 256
    #: opens (``open``, ``webrtc_publish``) one client may have in flight at once
    max_opens_in_flight: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    #: points one object may accumulate on one frame (prompts with
    #: ``clear_old_points: false`` add up); beyond it a prompt is refused
    max_points_per_frame: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 64
    #: prompt/control commands the inference worker runs per session between two
    #: frame steps, so one session's prompts cannot starve other sessions' frames
    prompts_per_step: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1


class PolicySection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a client may open by URI, and the caps on its source options; see ``tracker.ingest.SourcePolicy``.

    ``allow_hosts`` entries may carry a port: ``cam1.lan:554``, ``[fd00::5]:8554``,
    ``10.0.0.0/8:554``, ``*:443``. The caps hold for client-named URIs only
    (configured sources are the operator's); ``parse_source``'s hard ranges
    hold everywhere.
    """

    allow_schemes: list[str] = []
    allow_dirs: list[str] = []
    allow_hosts: list[str] = []
    allow_devices: list[str] = []
    allow_av_options: bool = False
    #: largest ``timeout_s`` a client may ask for (an open waits this long on a silent host)
    max_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    #: largest ``max_backoff_s`` (wait between reconnect attempts)
    max_backoff_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    #: largest ``reconnect_attempts``; also the default for clients that set none (unset: unlimited)
    max_reconnect_attempts: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    #: largest ``buffer_frames`` (frames decoded ahead in file mode)
    max_buffer_frames: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    #: largest side of ``resize`` (and a camera's ``size``), in pixels
    max_resize_side: Annotated[int, msgspec.Meta(ge=16, le=8192)] = 2048
    #: largest width x height of ``resize`` (and a camera's ``size``)
    max_resize_pixels: Annotated[int, msgspec.Meta(ge=256, le=8192 * 8192)] = 2048 * 2048
    #: largest ``fps`` (cameras, image folders)
    max_fps: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 60.0


class WebRTCSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Video over WebRTC (``server.webrtc``, needs aiortc): in from publishers, out to viewers."""

    #: clients may send video in (``webrtc_publish``): each publisher is a new session
    publish: bool = True
    #: clients may receive a session's processed video (``webrtc_view``)
    view: bool = True
    #: local addresses offered as ICE host candidates; empty: every interface but 127.0.0.1
    ice_host_addresses: list[str] = []
    #: STUN/TURN URLs, e.g. "stun:stun.example.org:3478"; none by default (LAN peers)
    ice_servers: list[str] = []
    #: end a publisher's source when no frame came for this long
    frame_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 20.0


class ImagesSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Image mode (``image_open`` / ``image_segment``, :mod:`server.images`)."""

    #: serve image mode at all
    enabled: bool = True
    #: folders ``image_open``'s ``name`` may read from (canonical paths inside them only)
    dirs: list[str] = []
    #: embeddings kept for every client together (LRU, recomputed on demand once evicted)
    cache_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1 << 30
    #: an uploaded or named image file's size at most (the WebSocket takes its base64)
    max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * 2**20)] = 16 * 2**20
    #: an image's width x height at most, checked from its header (decompression bombs)
    max_pixels: Annotated[int, msgspec.Meta(ge=1)] = 50_000_000
    #: images one connection may have open at once
    max_open_per_client: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    #: image files held for every client together (open images keep their file so an
    #: evicted embedding can be encoded again); beyond it ``image_open`` is refused
    open_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 256 * 2**20
    #: ``image_open`` requests per second per client, and bursts
    opens_per_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    open_burst: Annotated[int, msgspec.Meta(ge=1)] = 10
    #: images pending at once that share one image-encoder call
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    #: plain-HTTP image API (POST /v1/images, …) on this port of ``[server] host``
    #: (0: any free port); None: off. websockets' handshake takes no request bodies,
    #: so it cannot share the WebSocket port
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    #: images open over HTTP, all HTTP clients together; beyond it the oldest is closed
    http_max_open: Annotated[int, msgspec.Meta(ge=1)] = 64


class ClusterSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``serve --ray``: sessions run on Ray session hosts (:mod:`server.ray_front`, docs/scaling.md)."""

    #: the cluster: HOST:PORT of its head, ``auto`` (this machine's, or $RAY_ADDRESS), ``local``
    #: (a private one in this process); None: sessions run in this process (the default)
    address: str | None = None
    #: Ray namespace of the hosts and the directory: fronts of one service share it
    namespace: str = "sam2-stream"
    #: session hosts (one per device); None: as many as the cluster holds
    hosts: Annotated[int, msgspec.Meta(ge=1, le=4096)] | None = None
    #: what each host asks Ray for: CPUs, GPUs (whole or fractional; None: 1 where the cluster has GPUs)
    host_cpus: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    host_gpus: Annotated[float, msgspec.Meta(ge=0)] | None = None
    #: custom Ray resources each host needs, e.g. { accelerator_type_A100 = 0.01 }
    host_resources: dict[str, float] = {}
    #: per-host limits placement respects (the cluster's total is [limits] max_sessions)
    max_sessions_per_host: Annotated[int, msgspec.Meta(ge=1)] = 8
    max_objects_per_host: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: frames between two snapshots of a session's tracking state (also after every prompt)
    snapshot_every: Annotated[int, msgspec.Meta(ge=1)] = 30
    #: how long the hosts may take to start (placed by Ray, models loaded)
    start_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0


class SourceEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    uri: str
    #: files: start again at the end (default true); ignored for live sources
    loop: bool | None = None
    options: dict[str, OptionValue] = {}
    #: the model its session uses (a key of [models], or the default's name); a client may choose another
    model: str | None = None
    #: its session's tracking options (``tracker.session.TRACKING_OPTIONS``); a client's override them
    tracking: dict[str, Union[bool, int, float]] = {}


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    #: more models sessions may choose by these names (the default is ``model.name``)
    models: dict[str, ModelEntry] = {}
    limits: LimitsSection = msgspec.field(default_factory=LimitsSection)
    policy: PolicySection = msgspec.field(default_factory=PolicySection)
    webrtc: WebRTCSection = msgspec.field(default_factory=WebRTCSection)
    images: ImagesSection = msgspec.field(default_factory=ImagesSection)
    cluster: ClusterSection = msgspec.field(default_factory=ClusterSection)
    sources: dict[str, Union[str, SourceEntry]] = {}
    #: folder relative paths are read from (the config file's); not a file key
    base_dir: str | None = None

    # ------------------------------------------------------------ derived

    def resolve(self, path: str) -> str:
        p = Path(path).expanduser()
        if not p.is_absolute() and self.base_dir:
            p = Path(self.base_dir) / p
        return str(p)

    def model_names(self) -> list[str]:
        """The names clients give ``open``'s ``model``: the default's first."""
        return [self.model.name, *self.models]

    def token(self) -> str | None:
        """The bearer token clients must send: the file's, else ``$SAM2_STREAM_TOKEN``."""
        return self.server.token or os.environ.get(TOKEN_ENV) or None

    def requires_token(self) -> bool:
        if self.server.require_token is not None:
            return self.server.require_token
        return self.token() is not None or not is_loopback(self.server.host)

    def source_policy(self) -> SourcePolicy:
        """The ``[policy]`` table as the allowlist client-named sources are parsed and read under.

        Raises:
            ConfigError: an ``allow_hosts`` entry that is not a host pattern.
        """
        p = self.policy
        try:
            return SourcePolicy(
                schemes=frozenset(s.lower() for s in p.allow_schemes),
                directories=tuple(Path(self.resolve(d)) for d in p.allow_dirs),
                hosts=tuple(p.allow_hosts),
                devices=tuple(p.allow_devices),
                allow_av_options=p.allow_av_options,
                max_timeout_s=p.max_timeout_s,
                max_backoff_s=p.max_backoff_s,
                max_reconnect_attempts=p.max_reconnect_attempts,
                max_buffer_frames=p.max_buffer_frames,
                max_resize_side=p.max_resize_side,
                max_resize_pixels=p.max_resize_pixels,
                max_fps=p.max_fps,
            )
        except ValueError as exc:
            raise ConfigError(f"[policy] allow_hosts: {exc}") from None

    def ssl_context(self) -> ssl.SSLContext | None:
        cert, key = self.server.tls_cert, self.server.tls_key
        if not cert and not key:
            return None
        if not (cert and key):
            raise ConfigError("TLS needs both a certificate and a key: pass --tls-cert CERT.pem --tls-key KEY.pem")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.resolve(cert), self.resolve(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
        return context

    def check(self) -> None:
        """Refuse what would start an unsafe or broken server.

        Raises:
            ConfigError: a public bind without a token, a bad source name or
                source, half a TLS configuration.
        """
        if self.requires_token() and not self.token():
            raise ConfigError(
                f"the server binds to {self.server.host}, not loopback, so clients need a token: "
                f"set {TOKEN_ENV}, pass --token, or set [server] token in the config file"
            )
        for name in self.sources:
            if not _NAME_RE.match(name):
                raise ConfigError(f"source name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
        for name in self.models:
            if not _NAME_RE.match(name):
                raise ConfigError(f"model name {name!r} in [models]: use 1-64 letters, digits, '_', '.', '-'")
            if name == self.model.name:
                raise ConfigError(f"[models.{name}] has the default model's name ([model] name = {name!r}); rename one")
        catalog = SourceCatalog(self)
        for name in self.sources:
            catalog.spec(name)
        self.ssl_context()


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def address_key(host: str) -> str:
    """What one client is for the per-address limits: an IPv4 address (IPv4-mapped
    IPv6 too), or an IPv6 /64 (one host usually holds a whole /64, so counting
    single IPv6 addresses would let it take every slot)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def load_config(path: str | os.PathLike[str] | None = None) -> ServerConfig:
    """Read a config file (None: the defaults).

    Raises:
        ConfigError: the file is missing, not TOML, or a key or value is wrong
            (the message names the file and the key).
    """
    if path is None:
        return ServerConfig()
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {p}: {exc.strerror or exc}") from None
    try:
        config = msgspec.toml.decode(data, type=ServerConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    config.base_dir = str(p.resolve().parent)
    return config


# ---------------------------------------------------------------- sources


class SourceCatalog:
    """Opens sources for clients: configured names, or URIs the policy allows."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.policy = config.source_policy()

    @property
    def names(self) -> list[str]:
        return list(self.config.sources)

    def spec(self, name: str) -> tuple[SourceSpec, bool]:
        """The parsed spec of a configured name and whether it loops."""
        entry = self.config.sources[name]
        if isinstance(entry, str):
            entry = SourceEntry(uri=entry)
        uri = entry.uri
        try:
            probe = parse_source(uri)
            if probe.kind in ("file", "images") and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri):
                uri = self.config.resolve(uri)
                probe = parse_source(uri)
            options = dict(entry.options)
            if probe.kind in ("file", "images"):
                options.setdefault("mode", "live")
                options.setdefault("realtime", True)
            spec = parse_source(uri, **options)
        except SourceError as exc:
            raise ConfigError(f"source {name!r} in the config: {exc}") from None
        loop = entry.loop if entry.loop is not None else spec.kind == "file"
        return spec, bool(loop and spec.kind == "file")

    def session_choices(self, name: str) -> tuple[str | None, dict[str, Any]]:
        """The model and tracking options the config gives a named source's session."""
        entry = self.config.sources[name]
        if isinstance(entry, str):
            return None, {}
        return entry.model, dict(entry.tracking)

    def open_named(self, name: str) -> VideoSource:
        """Open a configured source (blocking: run it off the event loop)."""
        spec, loop = self.spec(name)
        if loop:
            return LoopingSource(spec)
        return open_source(spec)

    def open_uri(self, uri: str, options: dict[str, Any] | None = None) -> VideoSource:
        """Open a client-named URI if the policy allows it (blocking).

        The policy goes with the parsed spec: every URL the reader opens for
        it (HLS segments and keys, redirects, reconnects) is checked as well.

        Raises:
            SourceNotAllowedError: the policy refuses it, or a URL it leads to (default: every URI).
            SourceOptionError: an option outside its range or over the ``[policy]`` cap
                (``.option`` names it).
            SourceError: it cannot be parsed or opened.
        """
        return open_source(self.check_uri(uri, options))

    def check_uri(self, uri: str, options: dict[str, Any] | None = None) -> SourceSpec:
        """A client-named URI parsed under the policy, as :meth:`open_uri` opens it
        (files play live); raises as :meth:`open_uri` does, opening nothing."""
        options = dict(options or {})
        spec = parse_source(uri, policy=self.policy, **options)
        if spec.kind == "push":
            raise SourceNotAllowedError(f"source {spec.display} not allowed: push sources are named in the server's config")
        if spec.kind in ("file", "images") and "realtime" not in options and "mode" not in options:
            spec = parse_source(uri, policy=self.policy, mode="live", realtime=True, **options)
        return spec


class LoopingSource(ThreadedSource):
    """A file played as a camera, from the start again each time it ends.

    Frame indices keep counting and PTS keep growing across loops, as they
    would from a camera, so a session never sees time go backwards.
    """

    def __init__(self, spec: SourceSpec, max_loops: int | None = None) -> None:
        super().__init__(spec)
        self.max_loops = max_loops
        self.loops = 0
        self._inner: VideoSource = open_source(spec)  # opening errors go to the opener
        self.fps = self._inner.fps
        self.size = self._inner.size
        self._start()

    def _run(self) -> None:
        period = 1.0 / self.fps if self.fps else 1.0 / 30.0
        offset = 0.0
        last_out: float | None = None
        while not self._stop.is_set():
            inner = self._inner
            first = True
            delivered = 0
            try:
                for frame in inner:
                    if first and last_out is not None and frame.pts_s is not None:
                        offset = last_out + period - frame.pts_s
                    first = False
                    pts = None if frame.pts_s is None else frame.pts_s + offset
                    out = Frame(self._next_index, pts, frame.arrival_s, frame.image_rgb, frame.source_size)
                    self._next_index += 1
                    if not self._buffer.put(out):
                        return
                    delivered += 1
                    last_out = pts
            except SourceError as exc:
                self._fail(exc)
                return
            finally:
                inner.close()
            if self._stop.is_set():
                return
            self.loops += 1
            if delivered == 0 or (self.max_loops is not None and self.loops >= self.max_loops):
                self._end()
                return
            try:
                self._inner = open_source(self.spec)
            except SourceError as exc:
                self._fail(exc)
                return
            if self._stop.is_set():  # closed while reopening
                self._inner.close()
                return

    def close(self) -> None:
        self._stop.set()
        self._inner.close()
        super().close()
