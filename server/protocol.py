"""The WebSocket protocol, without I/O: message types, parsing, encoding.

Everything the server and the Python client say to each other is defined here
as msgspec ``Struct`` types, so one schema validates requests, encodes replies
and pushes, and decodes them on the client. Nothing here touches a socket, a
session or a thread: :mod:`server.app` passes bytes in and out, and this module
is tested on its own (``tests/test_protocol.py``). The wire format is described
for people in ``docs/protocol.md``.

Shape of the conversation (``protocol_version`` 1):

* server → client, first: ``hello`` (versions, model, mask formats, limits,
  the names of the sources it serves);
* client → server: requests (JSON text, arrays/objects nested at most
  :data:`MAX_DEPTH` deep), each with a client-chosen ``id``; every request
  gets exactly one ``reply`` (``ok: true``) or ``error`` with the same ``id``;
  on one connection requests are answered in order, except ``open`` and
  ``webrtc_publish``, which are answered when their source is ready (a few
  at once per connection: ``max_opens_in_flight``);
* server → client pushes: ``frame`` (one per processed frame per subscribed
  session; JSON text, or a binary frame when the subscription asked for PNG
  masks) and ``event`` (object lost/found, source and session state).

Errors the protocol raises join the project's tree (``tracker.errors``)::

    TrackerError
    └── ProtocolError        a request cannot be parsed, validated or served
                             (``code`` for programs, ``field`` names the culprit)

What does not live here: sessions and sockets (:mod:`server.app`), the
client's connection handling (:mod:`server.client`), mask codecs
(:mod:`tracker.masks`).
"""

from __future__ import annotations

import itertools
import re
import struct
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import msgspec
import numpy as np

from tracker.errors import TrackerError
from tracker.masks import (
    decode_png,
    decode_rle,
    encode_png,
    encode_rle,
    mask_box_xyxy,
    mask_to_polygons,
    polygons_to_mask,
)
from tracker.results import FrameResult, ObjectResult

PROTOCOL_VERSION = 1
SERVER_NAME = "sam2-stream"

#: Mask encodings a subscription may ask for; ``rle`` (COCO compressed RLE,
#: pycocotools-compatible) is the default, ``png`` arrives as a binary frame,
#: ``polygon`` is COCO polygons (lossy: no holes), ``none`` sends boxes only.
MASK_FORMATS: tuple[str, ...] = ("rle", "png", "polygon", "none")
MaskFormat = Literal["rle", "png", "polygon", "none"]

#: Magic bytes opening every binary frame message (then a big-endian uint32
#: header length, the JSON header, and the PNG payloads it points into).
BINARY_MAGIC = b"S2F1"

_MAX_COORD = 1e6

#: deepest nesting of arrays and objects in a client message; a request needs 3
#: (``points_xy``), so anything deeper is refused before it is parsed
MAX_DEPTH = 32
#: points one ``add_points`` / ``add_box`` may carry
MAX_POINTS_PER_PROMPT = 64
#: largest integer an ``id`` or a source option may be (exact in a JavaScript number)
MAX_SAFE_INT = 2**53

RequestId = Union[
    Annotated[int, msgspec.Meta(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)],
    Annotated[str, msgspec.Meta(max_length=64)],
]
SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
ObjId = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
FrameIdx = Annotated[int, msgspec.Meta(ge=0, le=MAX_SAFE_INT)]
Coord = Annotated[float, msgspec.Meta(ge=-_MAX_COORD, le=_MAX_COORD)]
PointXY = tuple[Coord, Coord]
PointList = Annotated[list[PointXY], msgspec.Meta(min_length=1, max_length=MAX_POINTS_PER_PROMPT)]
LabelList = Annotated[list[Literal[0, 1]], msgspec.Meta(min_length=1, max_length=MAX_POINTS_PER_PROMPT)]
#: a source option's value; its own range is checked by ``tracker.ingest.parse_source``
OptionValue = Union[
    bool,
    Annotated[int, msgspec.Meta(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)],
    float,  # finite: JSON has no inf/nan, and msgspec refuses numbers beyond a double
    Annotated[str, msgspec.Meta(max_length=256)],
]


class ProtocolError(TrackerError):
    """A request cannot be parsed, validated or served.

    Attributes:
        code: machine-readable reason (see ``docs/protocol.md``), e.g.
            ``invalid_message``, ``unknown_session``, ``rate_limited``.
        field: the request field at fault (``"points_xy[0][1]"``), if one is.
        request_id: the ``id`` of the request, when it could be read.
    """

    def __init__(self, code: str, message: str, *, field: str | None = None, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.request_id = request_id


# ---------------------------------------------------------------- requests


class Request(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """Every client → server message; ``id`` is echoed in its reply or error."""

    id: RequestId


class TrackingOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A session's own tracking choices (``open``'s ``tracking``); unset = the server's.

    ``max_objects`` may not exceed the server's limit (checked when opening).
    """

    #: how far back (seconds) a click may reach: a prompt on a frame older than this is refused
    prompt_window_s: Annotated[float, msgspec.Meta(ge=0, le=60)] | None = None
    #: frames whose features are kept for late clicks (a few MiB each at 1024 px)
    max_prompt_frames: Annotated[int, msgspec.Meta(ge=1, le=600)] | None = None
    #: prompted frames kept per object as memory (the first one and the most recent)
    max_cond_frames: Annotated[int, msgspec.Meta(ge=2, le=64)] | None = None
    #: a click on a tracked object becomes a conditioning frame (keeps acting later)
    corrections_as_cond: bool | None = None
    #: objects share memory-attention / mask-decoder calls (faster; equal within 1e-4)
    batch_objects: bool | None = None
    #: an object not visible for this many frames is reported ``lost``
    lost_after_frames: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None
    max_objects: Annotated[int, msgspec.Meta(ge=1)] | None = None

    def chosen(self) -> dict[str, Any]:
        """The options the client set."""
        return {f: getattr(self, f) for f in self.__struct_fields__ if getattr(self, f) is not None}


class Open(Request, tag="open", kw_only=True):
    """Open a source by its configured name (shared: opening a running name
    subscribes to its session) or by URI where the server's policy allows.

    ``model`` (one of ``hello.models``) and ``tracking`` apply to a session this
    request creates; joining a running session with different ones is refused.
    ``options`` are source options (URIs only).
    """

    source: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    mask_format: MaskFormat = "rle"
    subscribe: bool = True
    options: Annotated[dict[Annotated[str, msgspec.Meta(max_length=64)], OptionValue], msgspec.Meta(max_length=16)] | None = None
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    tracking: TrackingOptions | None = None


class Subscribe(Request, tag="subscribe", kw_only=True):
    session_id: SessionId
    mask_format: MaskFormat = "rle"


class Unsubscribe(Request, tag="unsubscribe", kw_only=True):
    session_id: SessionId


class AddPoints(Request, tag="add_points", kw_only=True):
    """Click(s) on an object, in source pixels; ``obj_id`` null = a new object;
    ``frame_idx`` = the processed frame the operator clicked on (default: the
    newest one sent)."""

    session_id: SessionId
    points_xy: PointList
    labels: LabelList
    obj_id: ObjId | None = None
    frame_idx: FrameIdx | None = None
    clear_old_points: bool = True


class AddBox(Request, tag="add_box", kw_only=True):
    session_id: SessionId
    box_xyxy: tuple[Coord, Coord, Coord, Coord]
    obj_id: ObjId | None = None
    frame_idx: FrameIdx | None = None
    points_xy: PointList | None = None
    labels: LabelList | None = None


class RemoveObject(Request, tag="remove_object", kw_only=True):
    session_id: SessionId
    obj_id: ObjId


class Reset(Request, tag="reset", kw_only=True):
    session_id: SessionId


class Pause(Request, tag="pause", kw_only=True):
    session_id: SessionId


class Resume(Request, tag="resume", kw_only=True):
    session_id: SessionId


class Close(Request, tag="close", kw_only=True):
    session_id: SessionId


class ListSessions(Request, tag="list_sessions", kw_only=True):
    pass


class Stats(Request, tag="stats", kw_only=True):
    session_id: SessionId | None = None


class SessionDescription(msgspec.Struct, forbid_unknown_fields=True):
    """A WebRTC offer or answer as a browser's ``RTCSessionDescription`` serialises it."""

    sdp: Annotated[str, msgspec.Meta(max_length=64 * 1024)]
    type: Annotated[str, msgspec.Meta(max_length=16)]


class WebRTCPublish(Request, tag="webrtc_publish", kw_only=True):
    """Send video in over WebRTC (a robot, a browser webcam): a new session on it.
    ``offer`` must send video; ICE candidates are gathered before offering (no trickle)."""

    offer: SessionDescription
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "webrtc"


class WebRTCView(Request, tag="webrtc_view", kw_only=True):
    """Receive a session's processed video over WebRTC (``offer`` must receive video)."""

    session_id: SessionId
    offer: SessionDescription
    draw_masks: bool = True


ImageId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class ImageOpen(Request, tag="image_open", kw_only=True):
    """An image to segment: its file's bytes in base64 (``data``) or a file in
    the config's ``[images] dirs`` (``name``); exactly one of the two."""

    data: str | None = None
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None


class ImageSegment(Request, tag="image_segment", kw_only=True):
    """A prompt on an open image; ``previous`` feeds candidate ``previous`` of
    this image's last answer back as SAM's ``mask_input`` (its low-res logits,
    kept server-side)."""

    image_id: ImageId
    points_xy: PointList | None = None
    labels: LabelList | None = None
    box_xyxy: tuple[Coord, Coord, Coord, Coord] | None = None
    multimask: bool = False
    previous: Annotated[int, msgspec.Meta(ge=0, le=2)] | None = None
    mask_format: MaskFormat = "rle"


class ImageClose(Request, tag="image_close", kw_only=True):
    image_id: ImageId


AnyRequest = Union[
    Open, Subscribe, Unsubscribe, AddPoints, AddBox, RemoveObject, Reset, Pause, Resume, Close, ListSessions, Stats,
    WebRTCPublish, WebRTCView, ImageOpen, ImageSegment, ImageClose,
]
REQUEST_TYPES: tuple[str, ...] = tuple(t.__struct_config__.tag for t in AnyRequest.__args__)  # type: ignore[attr-defined]

_request_decoder = msgspec.json.Decoder(AnyRequest)


class _Peek(msgspec.Struct):
    """Just enough of a rejected message to answer it (its id and type)."""

    id: Any = None
    type: Any = None


_peek_decoder = msgspec.json.Decoder(_Peek)
_id_decoder = msgspec.json.Decoder(RequestId)
_AT_RE = re.compile(r" - at (?:`key` in )?`\$(?P<path>[^`]*)`$")
_FIELD_RE = re.compile(r"field `(?P<name>[^`]+)`")


def _field_of(message: str) -> str | None:
    """``"Expected `int`, got `str` - at `$.obj_id`"`` → ``"obj_id"``; a value
    in a mapping (``$.options[...]``, msgspec does not name its key) → ``"options"``."""
    match = _AT_RE.search(message)
    path = match["path"].lstrip(".").replace("[...]", "") if match else ""
    named = _FIELD_RE.search(message)
    if named:
        path = f"{path}.{named['name']}" if path else named["name"]
    return path or None


#: a backslash and the character it escapes (only strings hold them in JSON)
_ESCAPE_RE = re.compile(r"\\.", re.S)
#: one JSON string once escapes are gone; an unterminated one runs to the end,
#: so neither pattern ever backtracks: linear passes whatever the text
_BARE_STRING_RE = re.compile(r'"[^"]*(?:"|\Z)')
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
#: what :func:`_shallow_id` walks: strings (escapes kept) and brackets
_TOKEN_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[\[\]{}]', re.S)
_ID_VALUE_RE = re.compile(r'\s*:\s*(-?[0-9]+(?![0-9.eE])|"[^"\\]*(?:\\.[^"\\]*)*")\s*[,}]', re.S)
#: the head of a too-deep message :func:`_shallow_id` reads for its id
_ID_SCAN_CHARS = 4096


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON ``text``, brackets inside strings not counted.

    A linear scan with regular expressions and no recursion, so it is safe on
    any input, unlike a recursive parser (msgspec's decoder recurses once per
    level and raises ``RecursionError`` about 1,000 levels down). Text that is
    not JSON gets a depth too; the parser refuses it afterwards.
    """
    brackets = _NOT_BRACKET_RE.sub("", _BARE_STRING_RE.sub("", _ESCAPE_RE.sub("", text)))
    return max(0, max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0))


def _shallow_id(text: str) -> Any:
    """The top-level ``id`` of a message too deep to parse, when it is a valid
    id in its first :data:`_ID_SCAN_CHARS` characters (else None), read
    without recursion."""
    depth = 0
    head = text[:_ID_SCAN_CHARS]
    for match in _TOKEN_RE.finditer(head):
        token = match.group()
        step = _BRACKET_STEP.get(token)
        if step is not None:
            depth += step
        elif depth == 1 and token == '"id"':
            value = _ID_VALUE_RE.match(head, match.end())
            if value is None:
                return None
            try:
                return _id_decoder.decode(value.group(1))
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None
    return None


def check_depth(text: str) -> None:
    """Refuse a message nested deeper than :data:`MAX_DEPTH` before any parser sees it.

    Raises:
        ProtocolError: ``invalid_message``, with the message's ``id`` when it
            can be read without parsing the rest.
    """
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return  # cannot nest deeper than it has brackets: the common case, no scan
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise ProtocolError(
            "invalid_message",
            f"the message nests arrays/objects {depth} levels deep; at most {MAX_DEPTH} are accepted",
            request_id=_shallow_id(text),
        )


def _peek(data: str | bytes) -> _Peek:
    """The id and type of a message, or nothing; never recurses deeper than :data:`MAX_DEPTH`
    (msgspec recurses once per level of nesting, even to skip a value)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _Peek()  # binary messages are never requests
    if data.count("[") + data.count("{") > MAX_DEPTH and nesting_depth(data) > MAX_DEPTH:
        return _Peek()
    try:
        return _peek_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _Peek()


def _request_id(raw: Any) -> Any:
    """The id to echo: the request's own if it is a valid id, else null."""
    if raw is None or isinstance(raw, bool):
        return None
    try:
        return msgspec.convert(raw, RequestId)
    except msgspec.ValidationError:
        return None


def message_type(data: str | bytes) -> Any:
    """The ``type`` of a message, read without validating the rest (None if unreadable)."""
    return _peek(data).type


def parse_request(data: str | bytes) -> AnyRequest:
    """Parse and validate one client message.

    Raises:
        ProtocolError: ``binary_not_supported`` (requests are JSON text),
            ``invalid_json``, ``unknown_type``, ``invalid_message`` (schema; the
            message names the field, e.g. ``Expected `int`, got `str` - at
            `$.obj_id```; or nested deeper than :data:`MAX_DEPTH`).
            ``request_id`` holds the id when it could be read.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(
            "binary_not_supported", "requests are JSON text messages; binary messages are not accepted"
        )
    check_depth(data)  # the parser and the error path below recurse once per level
    try:
        request = _request_decoder.decode(data)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = _field_of(message)
        peek = _peek(data)
        request_id = _request_id(peek.id)
        if field == "type" and isinstance(peek.type, str):
            shown = peek.type if len(peek.type) <= 40 else peek.type[:40] + "…"
            raise ProtocolError(
                "unknown_type",
                f"unknown message type {shown!r}; use one of: {', '.join(REQUEST_TYPES)}",
                field="type",
                request_id=request_id,
            ) from None
        raise ProtocolError("invalid_message", message, field=field, request_id=request_id) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("invalid_json", f"not valid JSON: {exc}") from None
    _check_request(request)
    return request


def _check_request(request: AnyRequest) -> None:
    """Rules a schema cannot say: one label per point."""
    points = getattr(request, "points_xy", None)
    labels = getattr(request, "labels", None)
    if (points is None) != (labels is None):
        missing = "labels" if labels is None else "points_xy"
        raise ProtocolError(
            "invalid_message", f"points_xy and labels go together; {missing} is missing", field=missing,
            request_id=request.id,
        )
    if isinstance(request, ImageOpen) and (request.data is None) == (request.name is None):
        raise ProtocolError(
            "invalid_message",
            "image_open takes exactly one of data (the image file in base64) and name (a file in the image folders)",
            field="data",
            request_id=request.id,
        )
    if points is not None and labels is not None and len(points) != len(labels):
        raise ProtocolError(
            "invalid_message",
            f"labels must have one entry per point ({len(points)} points, {len(labels)} labels)",
            field="labels",
            request_id=request.id,
        )


# ---------------------------------------------------------------- server → client


class RLEMask(msgspec.Struct, tag="rle", tag_field="format"):
    """COCO compressed RLE (column-major), as ``pycocotools.mask.decode`` takes it."""

    size: list[int]  # [height, width]
    counts: str


class PNGMask(msgspec.Struct, tag="png", tag_field="format"):
    """A 1-bit PNG at ``offset``/``length`` in the binary message's payload."""

    offset: int
    length: int


class PolygonMask(msgspec.Struct, tag="polygon", tag_field="format"):
    """COCO polygons ``[x0, y0, x1, y1, …]`` in source pixels (holes are filled)."""

    size: list[int]
    polygons: list[list[float]]


Mask = Union[RLEMask, PNGMask, PolygonMask]


class ObjectMsg(msgspec.Struct, kw_only=True):
    """One object on one frame. ``score`` is SAM 2's object score logit (> 0:
    visible); ``box_xyxy`` holds inclusive pixel bounds, null for an empty mask."""

    obj_id: int
    score: float
    visible: bool
    box_xyxy: list[int] | None
    area: int
    mask: Mask | None = None


class FrameMsg(msgspec.Struct, tag="frame", tag_field="type", kw_only=True):
    """One processed frame of one session.

    Times are wall-clock seconds (``time.time()`` on the server): ``arrival_s``
    the frame left the decoder, ``processed_s`` the masks were ready,
    ``sent_s`` the message went to this client. ``queue_s`` is how long the
    frame waited for the inference worker, ``model_s`` the model's time on it
    (image encoder share + tracking). ``pts_s`` is the source's own clock.
    """

    sent_s: float = 0.0  # first field: stamped per client by :func:`stamp_sent`
    session_id: str
    frame_idx: int
    source_index: int | None
    pts_s: float | None
    arrival_s: float | None
    processed_s: float | None
    queue_s: float | None = None
    model_s: float | None = None
    width: int
    height: int
    objects: list[ObjectMsg]


class EventMsg(msgspec.Struct, tag="event", tag_field="type", kw_only=True):
    """Something that happened to a session or one of its objects (see
    ``tracker.session.SessionEvent``): ``lost`` / ``found``, ``error``,
    ``moved`` (to the CPU after CUDA ran out of memory), ``source_*``,
    ``paused`` / ``resumed``, ``closed``."""

    session_id: str
    kind: str
    message: str = ""
    obj_id: int | None = None
    frame_idx: int | None = None
    time_s: float = 0.0


class ModelInfo(msgspec.Struct, kw_only=True):
    name: str
    image_size: int
    device: str
    precision: str = "auto"  # the autocast it runs under (tracker.model.PRECISIONS)
    #: the model family ("SAM 2", "EdgeTAM", "SAM 3 tracker") and where it runs from
    family: str = "SAM 2"
    licence: str = ""


class LimitsInfo(msgspec.Struct, kw_only=True):
    """The server's limits a client runs into (``docs/protocol.md``, "Limits").

    Fields after ``idle_timeout_s`` were added later within protocol version 1;
    their defaults are the server defaults, so a client reads older servers too.
    """

    max_sessions: int
    max_objects: int
    prompts_per_s: float
    max_message_bytes: int
    lost_after_frames: int
    idle_timeout_s: float
    #: arrays/objects nested deeper in one message: ``invalid_message``
    max_depth: int = MAX_DEPTH
    #: points in one ``add_points`` / ``add_box``
    max_points_per_prompt: int = MAX_POINTS_PER_PROMPT
    #: points one object may accumulate on one frame (``clear_old_points: false``)
    max_points_per_frame: int = 64
    #: ``open`` / ``webrtc_publish`` requests one connection may have unanswered
    max_opens_in_flight: int = 2
    #: a client that reads nothing for this long while messages wait is closed (1008)
    send_timeout_s: float = 20.0
    #: an image file ``image_open`` takes at most (its base64 in ``data`` is 4/3 of it)
    image_max_bytes: int = 16 * 2**20


class Hello(msgspec.Struct, tag="hello", tag_field="type", kw_only=True):
    protocol_version: int
    server: str
    server_version: str
    client_id: int
    model: ModelInfo  # the default one
    mask_formats: list[str]
    sources: list[str]
    limits: LimitsInfo
    #: optional requests this server serves, e.g. ``webrtc_publish``, ``webrtc_view``
    features: list[str] = []
    #: every model ``open`` may name, the default first
    models: list[ModelInfo] = []


class ErrorMsg(msgspec.Struct, tag="error", tag_field="type", kw_only=True):
    id: Any = None  # the request's id; null when it could not be read
    code: str
    message: str
    field: str | None = None


class Reply(msgspec.Struct, tag="reply", tag_field="type", kw_only=True):
    """Base of every successful answer; subclasses add the request's results."""

    id: Any
    ok: bool = True


class SessionInfo(msgspec.Struct, kw_only=True):
    session_id: str
    name: str
    source: str  # credentials redacted
    state: str  # running | paused | closed
    objects: list[int]
    subscribers: int  # this server's clients subscribed to it
    frames_processed: int
    frames_dropped: int
    newest_frame_idx: int | None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    model: str | None = None  # its name in hello.models
    device: str | None = None  # where it runs now (cpu after a CUDA out-of-memory fallback)
    tracking: dict[str, Any] = {}  # the tracking options it was opened with


class OpenReply(Reply, kw_only=True):
    session: SessionInfo
    created: bool  # false: the named source was already open; this joined it
    subscribed: bool
    mask_format: str


class SessionReply(Reply, kw_only=True):
    """Answer to subscribe / unsubscribe / reset / pause / resume / close."""

    session_id: str
    state: str


class PromptReply(Reply, kw_only=True):
    """The prompted object's mask on the prompted frame (RLE, unless the
    subscription asked for ``none``)."""

    session_id: str
    obj_id: int
    frame_idx: int | None
    object: ObjectMsg


class RemoveReply(Reply, kw_only=True):
    session_id: str
    obj_id: int
    objects: list[int]


class ListReply(Reply, kw_only=True):
    sessions: list[SessionInfo]


class LatencyInfo(msgspec.Struct, kw_only=True):
    """Recent per-frame stage latencies in seconds (p50 / p99 over the last frames)."""

    queue_p50: float | None = None
    queue_p99: float | None = None
    encode_p50: float | None = None
    encode_p99: float | None = None
    track_p50: float | None = None
    track_p99: float | None = None


class SessionStatsInfo(msgspec.Struct, kw_only=True):
    session_id: str
    name: str
    state: str
    frames_in: int
    frames_processed: int
    frames_dropped: int
    source_frames_dropped: int
    step_errors: int
    prompts: int
    objects: int
    subscribers: int
    latency: LatencyInfo


class SubscriptionStats(msgspec.Struct, kw_only=True):
    session_id: str
    mask_format: str
    frames_sent: int
    frames_dropped: int  # replaced by a newer frame before this client took it


class ServerStats(msgspec.Struct, kw_only=True):
    uptime_s: float
    sessions: int
    clients: int
    worker_steps: int
    worker_batched_frames: int


class ImagesStatsInfo(msgspec.Struct, kw_only=True):
    """Image mode: the shared embedding cache and the work done."""

    cache_hits: int
    cache_misses: int
    cache_evictions: int
    cache_rejected: int  # embeddings bigger than the whole budget, not kept
    cache_bytes: int
    cache_entries: int
    cache_budget_bytes: int
    open_images: int  # all clients
    opens: int
    segments: int
    recomputed: int  # prompts whose embedding had been evicted and was encoded again
    encoder_batches: int
    images_encoded: int  # images through those batches (/ encoder_batches = mean batch)
    cpu_fallbacks: int


class StatsReply(Reply, kw_only=True):
    server: ServerStats
    sessions: list[SessionStatsInfo]
    client: list[SubscriptionStats]
    images: ImagesStatsInfo | None = None  # where image mode is served


class ImageOpenReply(Reply, kw_only=True):
    """An open image: its id on this connection, upright size, and what the
    embedding cost (``embed_s`` 0 and ``cached`` true when another upload of the
    same pixels had made it)."""

    image_id: str
    width: int
    height: int
    embed_s: float
    cached: bool
    format: str = ""
    mode: str = ""
    exif_orientation: int = 1


class ImageMaskMsg(msgspec.Struct, kw_only=True):
    """One candidate mask of an image prompt; ``score`` is SAM's predicted IoU."""

    score: float
    box_xyxy: list[int] | None
    area: int
    mask: Mask | None = None


class ImageSegmentReply(Reply, kw_only=True):
    """Masks for one prompt, best first; ``answer`` numbers this image's answers."""

    image_id: str
    answer: int
    width: int
    height: int
    decode_s: float
    embed_s: float
    masks: list[ImageMaskMsg]


class ImageCloseReply(Reply, kw_only=True):
    image_id: str
    closed: bool = True


class PublishReply(Reply, kw_only=True):
    """The session the published video feeds, and the server's WebRTC answer."""

    session: SessionInfo
    answer: SessionDescription


class ViewReply(Reply, kw_only=True):
    session_id: str
    answer: SessionDescription


ServerMessage = Union[Hello, ErrorMsg, FrameMsg, EventMsg, Reply]

_encoder = msgspec.json.Encoder()
_server_decoder = msgspec.json.Decoder(ServerMessage)
_frame_decoder = msgspec.json.Decoder(FrameMsg)


def encode(message: msgspec.Struct) -> bytes:
    """Any message above as UTF-8 JSON (send it as a *text* WebSocket frame)."""
    return _encoder.encode(message)


def encode_error(request_id: Any, code: str, message: str, field: str | None = None) -> bytes:
    return _encoder.encode(ErrorMsg(id=request_id, code=code, message=message, field=field))


def error_from(exc: ProtocolError, request_id: Any = None) -> bytes:
    rid = exc.request_id if exc.request_id is not None else request_id
    return encode_error(rid, exc.code, exc.message, exc.field)


# ---------------------------------------------------------------- frames


@dataclass(frozen=True)
class EncodedFrame:
    """A frame message encoded once per mask format and shared by every client
    subscribed with that format; :func:`stamp_sent` adds the per-client time."""

    data: bytes  # JSON (text frame) or BINARY_MAGIC + header + payload (binary frame)
    binary: bool
    frame_idx: int


_FRAME_PREFIX = b'{"type":"frame","sent_s":0.0,'


def object_msg(result: ObjectResult, mask_format: str, payload: list[bytes] | None = None, offset: int = 0) -> ObjectMsg:
    """One object of a result in the wire form; PNG bytes are appended to ``payload``."""
    mask: Mask | None
    if mask_format == "rle":
        rle = encode_rle(result.mask_hw)
        mask = RLEMask(size=list(rle["size"]), counts=rle["counts"])
    elif mask_format == "png":
        if payload is None:
            raise ValueError("png masks need a payload list")
        png = encode_png(result.mask_hw)
        mask = PNGMask(offset=offset + sum(len(p) for p in payload), length=len(png))
        payload.append(png)
    elif mask_format == "polygon":
        h, w = result.mask_hw.shape
        mask = PolygonMask(size=[int(h), int(w)], polygons=mask_to_polygons(result.mask_hw))
    elif mask_format == "none":
        mask = None
    else:
        raise ValueError(f"unknown mask format {mask_format!r}; use one of {', '.join(MASK_FORMATS)}")
    box = result.box_xyxy
    return ObjectMsg(
        obj_id=int(result.obj_id),
        score=float(result.score),
        visible=bool(result.visible),
        box_xyxy=None if box is None else [int(v) for v in box],
        area=int(result.area),
        mask=mask,
    )


def encode_frame(
    result: FrameResult,
    session_id: str,
    mask_format: str = "rle",
    *,
    queue_s: float | None = None,
    model_s: float | None = None,
) -> EncodedFrame:
    """Encode a processed frame for every subscriber using ``mask_format``.

    JSON for ``rle``/``polygon``/``none``. ``png``: a binary message,
    ``BINARY_MAGIC``, uint32 big-endian header length, the JSON header (a
    ``frame`` message whose masks give ``offset``/``length`` into the payload),
    then the PNG files back to back.
    """
    payload: list[bytes] = []
    objects = [object_msg(r, mask_format, payload) for r in result.objects.values()]
    msg = FrameMsg(
        session_id=session_id,
        frame_idx=int(result.frame_idx),
        source_index=result.source_index,
        pts_s=result.pts_s,
        arrival_s=result.arrival_s,
        processed_s=result.processed_s,
        queue_s=queue_s,
        model_s=model_s,
        width=int(result.width),
        height=int(result.height),
        objects=objects,
    )
    header = _encoder.encode(msg)
    assert header.startswith(_FRAME_PREFIX)
    if mask_format != "png":
        return EncodedFrame(header, False, msg.frame_idx)
    data = BINARY_MAGIC + struct.pack(">I", len(header)) + header + b"".join(payload)
    return EncodedFrame(data, True, msg.frame_idx)


def stamp_sent(frame: EncodedFrame, sent_s: float | None = None) -> bytes:
    """The frame's bytes with ``sent_s`` set (now, by default) for one client."""
    stamp = b'{"type":"frame","sent_s":%.6f,' % (time.time() if sent_s is None else sent_s)
    if not frame.binary:
        return stamp + frame.data[len(_FRAME_PREFIX):]
    (n,) = struct.unpack_from(">I", frame.data, 4)
    header = stamp + frame.data[8 + len(_FRAME_PREFIX): 8 + n]
    return BINARY_MAGIC + struct.pack(">I", len(header)) + header + frame.data[8 + n:]


def image_mask_msg(mask_hw: np.ndarray, score: float, mask_format: str, payload: list[bytes] | None = None) -> ImageMaskMsg:
    """One image candidate in the wire form (the mask formats of frames; PNG
    bytes appended to ``payload``)."""
    mask: Mask | None
    if mask_format == "rle":
        rle = encode_rle(mask_hw)
        mask = RLEMask(size=list(rle["size"]), counts=rle["counts"])
    elif mask_format == "png":
        if payload is None:
            raise ValueError("png masks need a payload list")
        png = encode_png(mask_hw)
        mask = PNGMask(offset=sum(len(p) for p in payload), length=len(png))
        payload.append(png)
    elif mask_format == "polygon":
        h, w = mask_hw.shape
        mask = PolygonMask(size=[int(h), int(w)], polygons=mask_to_polygons(mask_hw))
    elif mask_format == "none":
        mask = None
    else:
        raise ValueError(f"unknown mask format {mask_format!r}; use one of {', '.join(MASK_FORMATS)}")
    box = mask_box_xyxy(mask_hw)
    return ImageMaskMsg(
        score=float(score),
        box_xyxy=None if box is None else [int(v) for v in box],
        area=int(np.count_nonzero(mask_hw)),
        mask=mask,
    )


def encode_binary_reply(reply: Reply, payload: list[bytes]) -> bytes:
    """A reply whose masks are PNG files, laid out as a PNG frame message:
    ``BINARY_MAGIC``, uint32 big-endian header length, the JSON reply, the PNGs."""
    header = _encoder.encode(reply)
    return BINARY_MAGIC + struct.pack(">I", len(header)) + header + b"".join(payload)


def encode_event(event: Any) -> bytes:
    """A ``tracker.session.SessionEvent`` as an ``event`` message."""
    return _encoder.encode(
        EventMsg(
            session_id=event.session_id,
            kind=event.kind,
            message=event.message,
            obj_id=event.obj_id,
            frame_idx=event.frame_idx,
            time_s=event.time_s,
        )
    )


# ---------------------------------------------------------------- client side


def decode_server_message(data: str | bytes) -> tuple[Hello | ErrorMsg | FrameMsg | EventMsg | Reply, bytes]:
    """Parse one server message; returns it and the binary payload (``b""`` for text).

    A ``Reply`` comes back as the base type (``id``, ``ok``); decode the same
    bytes with :func:`decode_reply` and the reply type the request expects.

    Raises:
        ProtocolError: ``invalid_message`` when the bytes are not a message of
            this protocol version.
    """
    try:
        if isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:4]) == BINARY_MAGIC:
            data = bytes(data)
            (n,) = struct.unpack_from(">I", data, 4)
            header = data[8: 8 + n]
            decoder = _frame_decoder if header.startswith(b'{"type":"frame"') else _server_decoder
            return decoder.decode(header), data[8 + n:]
        return _server_decoder.decode(data), b""
    except (msgspec.DecodeError, msgspec.ValidationError, struct.error) as exc:
        raise ProtocolError("invalid_message", f"cannot read a server message: {exc}") from None


def split_binary(data: bytes) -> tuple[bytes, bytes]:
    """A binary message's JSON header and the payload after it."""
    (n,) = struct.unpack_from(">I", data, 4)
    return data[8: 8 + n], data[8 + n:]


def decode_reply(data: str | bytes, reply_type: type[Reply]) -> Reply:
    try:
        return msgspec.json.decode(data, type=reply_type)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError("invalid_message", f"cannot read a {reply_type.__name__}: {exc}") from None


def decode_mask(mask: Mask | None, payload: bytes = b"", size_hw: tuple[int, int] | None = None) -> np.ndarray | None:
    """A wire mask back to a bool ``(H, W)`` array (None for format ``none``)."""
    if mask is None:
        return None
    if isinstance(mask, RLEMask):
        return decode_rle({"size": mask.size, "counts": mask.counts})
    if isinstance(mask, PNGMask):
        return decode_png(payload[mask.offset: mask.offset + mask.length])
    h, w = mask.size
    return polygons_to_mask(mask.polygons, h, w)


# ---------------------------------------------------------------- rate limits


class TokenBucket:
    """``rate`` actions per second on average, bursts of up to ``burst``.

    Pure state with an injectable clock, so the server's per-client prompt
    limit is tested without sleeping.
    """

    def __init__(self, rate: float, burst: float, clock: Any = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def take(self, n: float = 1.0) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def wait_s(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available."""
        missing = n - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate if self.rate > 0 else float("inf")
