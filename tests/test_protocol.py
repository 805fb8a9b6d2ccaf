"""server.protocol without sockets: request validation with field-naming errors,
the nesting limit (checked without recursion), the bounds of every
client-settable value, frame encoding round trips for every mask format (RLE
checked with pycocotools), per-client send stamps, client-side decoding, the
prompt rate limiter."""

from __future__ import annotations

import json
import time

import msgspec
import numpy as np
import pytest
from pycocotools import mask as mask_util

from server import protocol as P
from tracker.results import FrameResult, ObjectResult


def req(**fields) -> str:
    return json.dumps(fields)


def parse_error(text: str | bytes) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as err:
        P.parse_request(text)
    return err.value


# ---------------------------------------------------------------- requests


def test_every_request_type_parses():
    sid = "abc123"
    cases = [
        req(type="open", id=1, source="cam1"),
        req(type="open", id=2, source="rtsp://h/x", mask_format="png", subscribe=False, options={"timeout_s": 5}),
        req(type="subscribe", id=3, session_id=sid, mask_format="polygon"),
        req(type="unsubscribe", id=4, session_id=sid),
        req(type="add_points", id=5, session_id=sid, points_xy=[[10, 20.5]], labels=[1], frame_idx=7),
        req(type="add_box", id=6, session_id=sid, box_xyxy=[1, 2, 30, 40], obj_id=3),
        req(type="remove_object", id=7, session_id=sid, obj_id=3),
        req(type="reset", id=8, session_id=sid),
        req(type="pause", id=9, session_id=sid),
        req(type="resume", id=10, session_id=sid),
        req(type="close", id=11, session_id=sid),
        req(type="list_sessions", id="twelve"),
        req(type="stats", id=13),
        req(type="webrtc_publish", id=14, offer={"sdp": "v=0\r\n", "type": "offer"}, name="robot1"),
        req(type="webrtc_view", id=15, session_id=sid, offer={"sdp": "v=0\r\n", "type": "offer"}, draw_masks=False),
        req(type="image_open", id=16, data="aGk="),
        req(type="image_segment", id=17, image_id="im1", points_xy=[[1, 2]], labels=[1]),
        req(type="image_close", id=18, image_id="im1"),
    ]
    parsed = [P.parse_request(c) for c in cases]
    assert [type(p).__struct_config__.tag for p in parsed] == [
        "open", "open", "subscribe", "unsubscribe", "add_points", "add_box", "remove_object",
        "reset", "pause", "resume", "close", "list_sessions", "stats", "webrtc_publish", "webrtc_view",
        "image_open", "image_segment", "image_close",
    ]
    points = parsed[4]
    assert isinstance(points, P.AddPoints)
    assert points.points_xy == [(10.0, 20.5)] and points.labels == [1] and points.obj_id is None and points.frame_idx == 7
    assert parsed[1].options == {"timeout_s": 5}
    assert parsed[11].id == "twelve"
    assert set(P.REQUEST_TYPES) == {type(p).__struct_config__.tag for p in parsed}


@pytest.mark.parametrize(
    "text, code, field, message",
    [
        (req(type="add_points", id=1, session_id="s", points_xy=[[1, 2]], labels=[1], obj_id="x"),
         "invalid_message", "obj_id", "Expected `int | null`, got `str` - at `$.obj_id`"),
        (req(type="add_points", id=1, session_id="s", points_xy=[[1, 2]], labels=[2]),
         "invalid_message", "labels[0]", "Invalid enum value 2 - at `$.labels[0]`"),
        (req(type="add_points", id=1, session_id="s", points_xy=[[1, 2], [3, 4]], labels=[1]),
         "invalid_message", "labels", "labels must have one entry per point (2 points, 1 labels)"),
        (req(type="add_points", id=1, session_id="s", points_xy=[[1e9, 2]], labels=[1]),
         "invalid_message", "points_xy[0][0]", "Expected `float` <= 1000000.0 - at `$.points_xy[0][0]`"),
        (req(type="add_points", id=1, session_id="s", points_xy=[], labels=[]),
         "invalid_message", "points_xy", "Expected `array` of length >= 1 - at `$.points_xy`"),
        (req(type="add_box", id=1, session_id="s", box_xyxy=[1, 2, 3]),
         "invalid_message", "box_xyxy", "Expected `array` of length 4 - at `$.box_xyxy`"),
        (req(type="add_box", id=1, session_id="s", box_xyxy=[1, 2, 3, 4], points_xy=[[1, 1]]),
         "invalid_message", "labels", "points_xy and labels go together; labels is missing"),
        (req(type="remove_object", id=1, session_id="s", obj_id=0),
         "invalid_message", "obj_id", "Expected `int` >= 1 - at `$.obj_id`"),
        (req(type="open", id=1), "invalid_message", "source", "Object missing required field `source`"),
        (req(type="open", id=1, source="cam", sauce=1), "invalid_message", "sauce", "Object contains unknown field `sauce`"),
        (req(type="open", id=1, source="cam", mask_format="jpeg"),
         "invalid_message", "mask_format", "Invalid enum value 'jpeg' - at `$.mask_format`"),
        (req(id=1, source="cam"), "invalid_message", "type", "Object missing required field `type`"),
        ("[1, 2]", "invalid_message", None, "Expected `object`, got `array`"),
        (req(type="webrtc_publish", id=1, offer={"sdp": "v=0"}),
         "invalid_message", "offer.type", "Object missing required field `type` - at `$.offer`"),
        (req(type="webrtc_publish", id=1, offer={"sdp": "v=0", "type": "offer"}, name="a b"),
         "invalid_message", "name", "Expected `str` matching regex '^[A-Za-z0-9_.-]{1,64}$' - at `$.name`"),
    ],
)
def test_invalid_requests_name_the_field(text, code, field, message):
    err = parse_error(text)
    assert (err.code, err.field, err.message) == (code, field, message)
    assert err.request_id == (None if text == "[1, 2]" else 1)


def test_unknown_type_lists_the_types():
    err = parse_error(req(type="subscribe_all", id="a"))
    assert err.code == "unknown_type" and err.field == "type" and err.request_id == "a"
    assert err.message == (
        "unknown message type 'subscribe_all'; use one of: open, subscribe, unsubscribe, add_points, add_box, "
        "remove_object, reset, pause, resume, close, list_sessions, stats, webrtc_publish, webrtc_view, "
        "image_open, image_segment, image_close"
    )


def test_ids_that_cannot_be_echoed_become_null():
    assert parse_error(req(type="open", id=True, source="x")).request_id is None
    assert parse_error(req(type="open", id="x" * 65, source="x")).request_id is None
    assert parse_error(req(type="open", id=[1], source="x")).request_id is None
    err = parse_error(req(type="open", id=1.5, source="x"))
    assert err.field == "id" and err.message == "Expected `int | str`, got `float` - at `$.id`"


def test_not_json_and_binary():
    err = parse_error("{not json")
    assert err.code == "invalid_json" and err.message.startswith("not valid JSON: JSON is malformed")
    err = parse_error(b'{"type":"stats","id":1}')
    assert err.code == "binary_not_supported"
    assert err.message == "requests are JSON text messages; binary messages are not accepted"


def test_error_message_round_trip():
    err = parse_error(req(type="remove_object", id=4, session_id="s", obj_id=-1))
    msg, payload = P.decode_server_message(P.error_from(err))
    assert isinstance(msg, P.ErrorMsg) and payload == b""
    assert (msg.id, msg.code, msg.field, msg.message) == (4, "invalid_message", "obj_id", "Expected `int` >= 1 - at `$.obj_id`")


# ---------------------------------------------------------------- nesting


def nested(depth: int, kind: str = "array") -> str:
    """A JSON value nested ``depth`` levels deep."""
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


DEEP = 1000  # what closed the connection with RecursionError before the limit


@pytest.mark.parametrize(
    "text, request_id",
    [
        ('{"type": "list_sessions", "id": %s}' % nested(DEEP), None),  # the id itself is the deep part
        ('{"type": "open", "id": 7, "source": "x", "options": {"a": %s}}' % nested(DEEP), 7),
        ('{"type": "open", "id": "o1", "source": "x", "options": %s}' % nested(DEEP, "object"), "o1"),
        ('{"id": 8, "x": %s, "type": "list_sessions"}' % nested(DEEP), 8),  # before type: a union must skip it
        ('{"x": %s, "type": "list_sessions", "id": 9}' % nested(DEEP, "object"), None),  # id after 4 KiB of brackets
        ('{"type": "add_points", "id": 10, "session_id": "s", "points_xy": %s, "labels": [1]}' % nested(DEEP), 10),
        (nested(DEEP), None),
        (nested(100_000), None),
    ],
)
def test_deep_nesting_is_an_invalid_message_anywhere(text, request_id):
    err = parse_error(text)
    depth = P.nesting_depth(text)
    assert depth > P.MAX_DEPTH
    assert (err.code, err.field, err.request_id) == ("invalid_message", None, request_id)
    assert err.message == f"the message nests arrays/objects {depth} levels deep; at most {P.MAX_DEPTH} are accepted"


def test_nesting_up_to_the_limit_reaches_the_schema():
    inside = nested(P.MAX_DEPTH - 1)  # one level is the message object itself
    err = parse_error('{"type": "list_sessions", "id": 1, "x": %s}' % inside)
    assert (err.code, err.field, err.message) == ("invalid_message", "x", "Object contains unknown field `x`")
    err = parse_error('{"type": "list_sessions", "id": 1, "x": %s}' % nested(P.MAX_DEPTH))
    assert err.message == f"the message nests arrays/objects {P.MAX_DEPTH + 1} levels deep; at most {P.MAX_DEPTH} are accepted"


@pytest.mark.parametrize(
    "text, depth",
    [
        ("", 0),
        ('{"a": 1}', 1),
        ('{"a": [[1], [2, [3]]]}', 4),
        ('{"a": "[[[[{{{{"}', 1),  # brackets in strings do not count
        ('{"a": "\\\\", "b": [[]]}', 3),  # an escaped backslash: the quote after it ends the string
        ('{"a": "\\"[[[[", "b": []}', 2),  # an escaped quote does not end the string
        ('["unterminated [[[[', 1),
        ("]]]][[", 0),  # not JSON: a parser stops at the first character
    ],
)
def test_nesting_depth_skips_strings(text, depth):
    assert P.nesting_depth(text) == depth


def test_nesting_depth_is_linear_on_hostile_text():
    """Texts that make a backtracking string pattern quadratic: a 1 MiB scan stays one pass."""
    mib = 2**20
    for text in ['"' + '\\"' * (mib // 2), '"' * mib, "[" * mib, '{"a":' + '"a",' * (mib // 4)]:
        t0 = time.process_time()
        P.nesting_depth(text)
        # generous: one linear pass takes ~0.1 s; a quadratic one would take hours
        assert time.process_time() - t0 < 10


# ---------------------------------------------------------------- bounds of client-settable values


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"type": "open", "source": "x", "options": {"timeout_s": 2**53 + 1}}, "options",
         "Expected `int` <= 9007199254740992 - at `$.options[...]`"),
        ({"type": "open", "source": "x", "options": {"resize": "x" * 257}}, "options",
         "Expected `str` of length <= 256 - at `$.options[...]`"),
        ({"type": "open", "source": "x", "options": {"k" * 65: 1}}, "options",
         "Expected `str` of length <= 64 - at `key` in `$.options`"),
        ({"type": "open", "source": "x", "options": {str(k): k for k in range(17)}}, "options",
         "Expected `object` of length <= 16 - at `$.options`"),
        ({"type": "open", "source": "x", "options": {"a": [1]}}, "options",
         "Expected `bool | int | float | str`, got `array` - at `$.options[...]`"),
        ({"type": "open", "source": "x" * 2049}, "source", "Expected `str` of length <= 2048 - at `$.source`"),
        ({"type": "open", "source": "x", "tracking": {"prompt_window_s": 61}}, "tracking.prompt_window_s",
         "Expected `float` <= 60.0 - at `$.tracking.prompt_window_s`"),
        ({"type": "open", "source": "x", "tracking": {"max_prompt_frames": 601}}, "tracking.max_prompt_frames",
         "Expected `int` <= 600 - at `$.tracking.max_prompt_frames`"),
        ({"type": "open", "source": "x", "tracking": {"max_cond_frames": 1}}, "tracking.max_cond_frames",
         "Expected `int` >= 2 - at `$.tracking.max_cond_frames`"),
        ({"type": "open", "source": "x", "tracking": {"lost_after_frames": 100_001}}, "tracking.lost_after_frames",
         "Expected `int` <= 100000 - at `$.tracking.lost_after_frames`"),
        ({"type": "open", "source": "x", "tracking": {"max_objects": 0}}, "tracking.max_objects",
         "Expected `int` >= 1 - at `$.tracking.max_objects`"),
        ({"type": "add_points", "session_id": "s", "points_xy": [[1, 1]], "labels": [1], "frame_idx": 2**53 + 1},
         "frame_idx", "Expected `int` <= 9007199254740992 - at `$.frame_idx`"),
        ({"type": "add_points", "session_id": "s", "points_xy": [[1, 1]], "labels": [1], "frame_idx": -1},
         "frame_idx", "Expected `int` >= 0 - at `$.frame_idx`"),
        ({"type": "add_points", "session_id": "s", "points_xy": [[1, 1]], "labels": [1], "obj_id": 2**31},
         "obj_id", "Expected `int` <= 2147483647 - at `$.obj_id`"),
        ({"type": "add_points", "session_id": "s", "points_xy": [[1, 1]] * 65, "labels": [1] * 65},
         "points_xy", "Expected `array` of length <= 64 - at `$.points_xy`"),
        ({"type": "add_box", "session_id": "s", "box_xyxy": [0, 0, 1, -1e6 - 1]},
         "box_xyxy[3]", "Expected `float` >= -1000000.0 - at `$.box_xyxy[3]`"),
        ({"type": "remove_object", "session_id": "s", "obj_id": 2**31}, "obj_id",
         "Expected `int` <= 2147483647 - at `$.obj_id`"),
        ({"type": "subscribe", "session_id": "s" * 65}, "session_id", "Expected `str` of length <= 64 - at `$.session_id`"),
        ({"type": "subscribe", "session_id": ""}, "session_id", "Expected `str` of length >= 1 - at `$.session_id`"),
        ({"type": "webrtc_view", "session_id": "s", "offer": {"sdp": "v" * (64 * 1024 + 1), "type": "offer"}},
         "offer.sdp", "Expected `str` of length <= 65536 - at `$.offer.sdp`"),
    ],
)
def test_every_client_value_has_a_bound(fields, field, message):
    err = parse_error(json.dumps({"id": 1, **fields}))
    assert (err.code, err.field, err.message) == ("invalid_message", field, message)
    assert err.request_id == 1


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" + "0" * 5000])
def test_numbers_beyond_a_double_or_int64_are_refused_not_overflowed(number):
    for text in (
        '{"type": "open", "id": 1, "source": "x", "options": {"timeout_s": %s}}' % number,
        '{"type": "add_points", "id": 1, "session_id": "s", "points_xy": [[%s, 1]], "labels": [1]}' % number,
        '{"type": "open", "id": 1, "source": "x", "tracking": {"prompt_window_s": %s}}' % number,
    ):
        err = parse_error(text)
        assert err.code == "invalid_message" and err.request_id == 1
        assert err.message.startswith(("Number out of range", "Integer value out of range", "Expected `"))


def test_the_largest_accepted_values_parse():
    big = P.parse_request(json.dumps({
        "type": "open", "id": 2**53, "source": "x" * 2048, "options": {"timeout_s": 1e308, "n": -(2**53)},
        "tracking": {"prompt_window_s": 60, "max_prompt_frames": 600, "max_cond_frames": 64, "lost_after_frames": 100_000},
    }))
    assert big.id == 2**53 and big.options == {"timeout_s": 1e308, "n": -(2**53)}  # the option's own range is the source's
    prompt = P.parse_request(json.dumps({
        "type": "add_points", "id": -(2**53), "session_id": "s" * 64, "points_xy": [[1e6, -1e6]] * 64, "labels": [1] * 64,
        "obj_id": 2**31 - 1, "frame_idx": 2**53,
    }))
    assert prompt.obj_id == 2**31 - 1 and prompt.frame_idx == 2**53 and len(prompt.points_xy) == 64


# ---------------------------------------------------------------- frames


def ring_mask(h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = (yy - 20) ** 2 + (xx - 30) ** 2
    return (r2 <= 15**2) & (r2 >= 6**2)  # a hole: polygons fill it, RLE and PNG do not


def frame_result() -> FrameResult:
    m1 = ring_mask()
    m2 = np.zeros_like(m1)
    result = FrameResult(frame_idx=12, height=48, width=64, pts_s=0.48, arrival_s=1000.0, processed_s=1000.2, source_index=30)
    result.objects[1] = ObjectResult(1, m1, 3.5, box_xyxy=(15, 5, 45, 35))
    result.objects[7] = ObjectResult(7, m2, -2.0, box_xyxy=None)
    return result


@pytest.mark.parametrize("fmt", ["rle", "png"])
def test_exact_mask_formats_round_trip(fmt):
    result = frame_result()
    encoded = P.encode_frame(result, "sess", fmt, queue_s=0.01, model_s=0.15)
    assert encoded.binary == (fmt == "png") and encoded.frame_idx == 12
    msg, payload = P.decode_server_message(P.stamp_sent(encoded, 1001.5))
    assert isinstance(msg, P.FrameMsg)
    assert (msg.session_id, msg.frame_idx, msg.source_index, msg.pts_s) == ("sess", 12, 30, 0.48)
    assert (msg.arrival_s, msg.processed_s, msg.sent_s, msg.queue_s, msg.model_s) == (1000.0, 1000.2, 1001.5, 0.01, 0.15)
    assert (msg.width, msg.height) == (64, 48)
    assert [o.obj_id for o in msg.objects] == [1, 7]
    one, seven = msg.objects
    assert (one.score, one.visible, one.box_xyxy, one.area) == (3.5, True, [15, 5, 45, 35], int(ring_mask().sum()))
    assert (seven.visible, seven.box_xyxy, seven.area) == (False, None, 0)
    for o in msg.objects:
        np.testing.assert_array_equal(P.decode_mask(o.mask, payload), result.objects[o.obj_id].mask_hw)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_rle_is_what_pycocotools_decodes():
    result = frame_result()
    raw = json.loads(P.stamp_sent(P.encode_frame(result, "s", "rle")))
    mask = raw["objects"][0]["mask"]
    assert mask["format"] == "rle" and mask["size"] == [48, 64]
    decoded = mask_util.decode({"size": mask["size"], "counts": mask["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), ring_mask())


def test_polygons_fill_holes_and_none_sends_no_mask():
    result = frame_result()
    msg, _ = P.decode_server_message(P.stamp_sent(P.encode_frame(result, "s", "polygon")))
    poly = P.decode_mask(msg.objects[0].mask)
    filled = np.zeros_like(ring_mask())
    yy, xx = np.mgrid[0:48, 0:64]
    filled[(yy - 20) ** 2 + (xx - 30) ** 2 <= 15**2] = True
    assert (poly != filled).mean() < 0.03  # outline simplified by ~1 px, hole filled
    assert poly[20, 30] and not ring_mask()[20, 30]
    msg, _ = P.decode_server_message(P.stamp_sent(P.encode_frame(result, "s", "none")))
    assert [o.mask for o in msg.objects] == [None, None] and msg.objects[0].box_xyxy == [15, 5, 45, 35]


def test_binary_frame_layout():
    encoded = P.encode_frame(frame_result(), "s", "png")
    data = P.stamp_sent(encoded, 5.25)
    assert data[:4] == P.BINARY_MAGIC
    n = int.from_bytes(data[4:8], "big")
    header = json.loads(data[8 : 8 + n])
    assert header["type"] == "frame" and header["sent_s"] == 5.25
    masks = [o["mask"] for o in header["objects"]]
    assert masks[0]["format"] == "png" and masks[0]["offset"] == 0 and masks[1]["offset"] == masks[0]["length"]
    payload = data[8 + n :]
    assert len(payload) == masks[0]["length"] + masks[1]["length"]
    assert payload[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_client_gets_its_own_sent_stamp_on_a_shared_encoding():
    encoded = P.encode_frame(frame_result(), "s", "rle")
    a, b = P.stamp_sent(encoded, 1.0), P.stamp_sent(encoded, 2.0)
    assert json.loads(a)["sent_s"] == 1.0 and json.loads(b)["sent_s"] == 2.0
    assert json.loads(a)["objects"] == json.loads(b)["objects"]
    assert encoded.data.startswith(b'{"type":"frame","sent_s":0.0,')


def test_events_and_replies_decode():
    from tracker.session import SessionEvent

    ev = SessionEvent(kind="lost", session_id="s1", message="object 2 not visible for 15 frames (still tracked)", obj_id=2, frame_idx=40)
    msg, _ = P.decode_server_message(P.encode_event(ev))
    assert isinstance(msg, P.EventMsg)
    assert (msg.kind, msg.session_id, msg.obj_id, msg.frame_idx, msg.message) == ("lost", "s1", 2, 40, ev.message)
    reply = P.RemoveReply(id=9, session_id="s1", obj_id=2, objects=[1, 3])
    data = P.encode(reply)
    generic, _ = P.decode_server_message(data)
    assert isinstance(generic, P.Reply) and generic.id == 9 and generic.ok
    assert P.decode_reply(data, P.RemoveReply) == reply
    with pytest.raises(P.ProtocolError) as err:
        P.decode_server_message(b'{"type":"frame"}')
    assert err.value.code == "invalid_message"


def test_hello_carries_the_protocol_version():
    hello = P.Hello(
        protocol_version=P.PROTOCOL_VERSION, server=P.SERVER_NAME, server_version="0.1.0", client_id=1,
        model=P.ModelInfo(name="sam2.1-tiny", image_size=256, device="cpu"), mask_formats=list(P.MASK_FORMATS),
        sources=["cam1"],
        limits=P.LimitsInfo(max_sessions=8, max_objects=16, prompts_per_s=20, max_message_bytes=2**20,
                            lost_after_frames=15, idle_timeout_s=60),
    )
    raw = msgspec.json.decode(P.encode(hello))
    assert raw["type"] == "hello" and raw["protocol_version"] == 1 and raw["mask_formats"] == ["rle", "png", "polygon", "none"]
    assert P.decode_server_message(P.encode(hello))[0] == hello
    assert (raw["limits"]["max_depth"], raw["limits"]["max_points_per_prompt"]) == (P.MAX_DEPTH, 64)
    # a hello from a server that predates the newer limits still decodes, with the defaults
    for key in ("max_depth", "max_points_per_prompt", "max_points_per_frame", "max_opens_in_flight", "send_timeout_s"):
        del raw["limits"][key]
    old = P.decode_server_message(msgspec.json.encode(raw))[0]
    assert isinstance(old, P.Hello) and old.limits == hello.limits


# ---------------------------------------------------------------- rate limit


def test_token_bucket():
    now = [0.0]
    bucket = P.TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_s() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() and not bucket.take()
    now[0] = 100.0
    assert sum(bucket.take() for _ in range(10)) == 3  # never more than the burst
