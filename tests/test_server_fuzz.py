"""Protocol fuzzing against a live server: thousands of malformed, wrong-typed,
oversized and binary messages (hypothesis, plus a seeded generator). Each one
is answered with an error (or a reply, when it happens to be valid), or its
connection is closed (oversized: 1009, bad UTF-8: 1007); the server never
logs an internal error, and a well-behaved client on the same server keeps
receiving frames the whole time."""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from server.client import SyncClient
from server.protocol import REQUEST_TYPES
from tests.test_server import FRAMES, Raw, make_config, running, source_of

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

MAX_MESSAGE = 16 * 1024
ERROR_CODES = {
    "invalid_json", "invalid_message", "unknown_type", "binary_not_supported", "unknown_session", "unknown_source",
    "not_allowed", "source_error", "frame_not_available", "prompt_error", "session_error", "limit_exceeded",
    "rate_limited", "not_subscribed", "timeout", "webrtc_error",
}
FIELDS = ["id", "type", "session_id", "source", "points_xy", "labels", "obj_id", "frame_idx", "box_xyxy",
          "mask_format", "options", "subscribe", "clear_old_points"]


class Fuzzed:
    """Server, good client and feeder shared by the fuzz tests (one server for all)."""

    def __init__(self, st, good, session, session_id: str) -> None:
        self.st, self.good, self.session, self.session_id = st, good, session, session_id
        self.received: list[float] = []  # the good client's frame arrival times
        self.errors: list[logging.LogRecord] = []
        self.sent = 0
        self.answered = 0
        self.closed = {1007: 0, 1009: 0}
        self._conn: Raw | None = None

    @property
    def conn(self) -> Raw:
        if self._conn is None:
            self._conn = Raw(self.st.url)
        return self._conn

    def drop_conn(self) -> None:
        self._conn = None


class _ErrorLog(logging.Handler):
    def __init__(self, sink: list) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


@pytest.fixture(scope="module")
def fuzzed(model):
    config = make_config(
        server={"max_message_bytes": MAX_MESSAGE},
        limits={"max_objects": 2, "prompts_per_s": 5.0, "prompt_burst": 5.0, "opens_per_s": 50.0, "open_burst": 50.0},
    )
    with running(model, config) as st:
        good = SyncClient(st.url)
        good.connect()
        session = good.open("cam")
        src = source_of(st, session.id)
        fz = Fuzzed(st, good, session, session.id)
        handler = _ErrorLog(fz.errors)
        for name in ("sam2-stream", "websockets", "tracker"):
            logging.getLogger(name).addHandler(handler)
        session.session.on_frame = lambda f: fz.received.append(time.time())
        stop = threading.Event()

        def feed() -> None:  # a camera at ~20 fps; the worker takes the newest frame
            k = 0
            while not stop.wait(0.05):
                src.push(FRAMES[k % len(FRAMES)], pts_s=k / 20)
                k += 1

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        deadline = time.time() + 60
        while not fz.received and time.time() < deadline:
            time.sleep(0.05)
        session.click(40, 40)
        try:
            yield fz
        finally:
            stop.set()
            feeder.join(5)
            for name in ("sam2-stream", "websockets", "tracker"):
                logging.getLogger(name).removeHandler(handler)
            good.close()


# ---------------------------------------------------------------- strategies

json_leaf = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=24)
)
json_value = st.recursive(
    json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=10
)
field_name = st.sampled_from(FIELDS) | st.text(max_size=10)


@st.composite
def request_like(draw, session_ids: list[str]) -> dict:
    """Dicts shaped like requests, with fields of any type (some right, most wrong)."""
    msg = draw(st.dictionaries(field_name, json_value, max_size=6))
    if draw(st.booleans()):
        msg["type"] = draw(st.sampled_from(REQUEST_TYPES) | st.text(max_size=12))
    if draw(st.booleans()):
        msg["id"] = draw(st.integers(min_value=-(2**53), max_value=2**53) | st.text(max_size=70))
    if draw(st.booleans()):
        msg["session_id"] = draw(st.sampled_from(session_ids) | st.text(max_size=70))
    if msg.get("type") in ("add_points", "add_box") and draw(st.booleans()):  # close to valid: reach the model
        msg["points_xy"] = draw(st.lists(st.tuples(st.floats(-50, 400), st.floats(-50, 300)), max_size=3))
        msg["labels"] = draw(st.lists(st.integers(-1, 2), max_size=3))
        msg["box_xyxy"] = draw(st.lists(st.floats(-10, 300), min_size=3, max_size=5))
    if msg.get("session_id") == session_ids[0] and msg.get("type") in ("pause", "close"):
        msg["session_id"] = "x"  # would legitimately stop the good client's frames
    return msg


def messages(session_ids: list[str]):
    text_json = request_like(session_ids).map(lambda m: ("text", json.dumps(m)))
    junk_text = st.text(max_size=200).map(lambda t: ("text", t))
    binary = st.binary(max_size=200).map(lambda b: ("binary", b))
    nested = st.integers(1, 3000).map(lambda n: ("text", "[" * n + "]" * n))
    big = st.integers(MAX_MESSAGE // 2, MAX_MESSAGE - 100).map(
        lambda n: ("text", json.dumps({"type": "open", "id": 1, "source": "x" * n}))
    )
    oversized = st.integers(MAX_MESSAGE + 1, 4 * MAX_MESSAGE).map(lambda n: ("oversized", "x" * n))
    bad_utf8 = st.just(("bad_utf8", b'{"type":"stats","id":1,"x":"\xff\xfe"}'))
    common = st.one_of(text_json, junk_text, binary, nested, big)
    return st.one_of(common, common, common, common, common, common, common, oversized, bad_utf8)


# ---------------------------------------------------------------- driving


def exchange(fz: Fuzzed, batch: list[tuple[str, object]]) -> None:
    """Send a batch; every text/binary message must get one reply or error."""
    expected = 0
    for kind, payload in batch:
        conn = fz.conn
        if kind in ("oversized", "bad_utf8"):
            drain(fz, expected)  # answers to what came before, then the connection is closed
            expected_code = 1009 if kind == "oversized" else 1007
            try:
                conn.ws.send(payload, text=True)  # type: ignore[arg-type]
                while True:
                    msg = conn.recv(timeout=30)
                    assert msg["type"] not in ("reply", "error"), msg
            except ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == expected_code, exc
            fz.closed[expected_code] += 1
            fz.sent += 1
            fz.drop_conn()
            expected = 0
            continue
        conn.ws.send(payload)  # type: ignore[arg-type]
        fz.sent += 1
        expected += 1
        if expected >= 8:
            drain(fz, expected)
            expected = 0
    drain(fz, expected)


def drain(fz: Fuzzed, expected: int) -> None:
    conn = fz.conn
    got = 0
    while got < expected:
        msg = conn.recv(timeout=60)
        if msg["type"] == "error":
            assert msg["code"] in ERROR_CODES, msg
            assert isinstance(msg["message"], str) and msg["message"], msg
            got += 1
        elif msg["type"] == "reply":
            assert msg["ok"] is True
            got += 1
    fz.answered += got


def assert_good_client_kept_receiving(fz: Fuzzed, since: float) -> None:
    times = [t for t in fz.received if t >= since]
    assert len(times) >= 5, f"only {len(times)} frames reached the good client while fuzzing"
    gaps = [b - a for a, b in zip([since, *times], [*times, time.time()])]
    assert max(gaps) < 10.0, f"the good client waited {max(gaps):.1f} s for a frame"
    assert fz.errors == [], [r.getMessage() for r in fz.errors]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_hypothesis_messages_are_answered_and_never_crash_the_server(fuzzed, data):
    if not hasattr(fuzzed, "t0"):
        fuzzed.t0 = time.time()
    batch = data.draw(st.lists(messages([fuzzed.session_id]), min_size=10, max_size=40))
    exchange(fuzzed, batch)


def test_seeded_garbage_and_the_good_client_throughout(fuzzed):
    """Runs after the hypothesis test: more messages, then the checks over both."""
    rng = random.Random(20251125)
    since = getattr(fuzzed, "t0", time.time())
    alphabet = '{}[]":,0123456789.-+eEtrufalsn \\u"abcxyz_'
    batch: list[tuple[str, object]] = []
    for k in range(3000):
        r = rng.random()
        if r < 0.4:  # JSON-ish noise
            batch.append(("text", "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))))
        elif r < 0.7:  # a real type with fields of random types
            fields = {f: rng.choice([None, True, -1, 0, 2**40, 1.5, "x", [], {}, [[1, 2]], "cam"]) for f in rng.sample(FIELDS, 4)}
            fields["type"] = rng.choice(REQUEST_TYPES)
            if fields.get("session_id") is not None and rng.random() < 0.3 and fields["type"] not in ("pause", "close"):
                fields["session_id"] = fuzzed.session_id
            batch.append(("text", json.dumps(fields)))
        elif r < 0.85:
            batch.append(("binary", rng.randbytes(rng.randint(0, 64))))
        else:  # truncated valid requests
            full = json.dumps({"type": "add_points", "id": k, "session_id": fuzzed.session_id,
                               "points_xy": [[10, 10]], "labels": [1]})
            batch.append(("text", full[: rng.randint(0, len(full) - 1)]))
    exchange(fuzzed, batch)
    # the good client got frames all along, nobody logged an internal error, the server still serves
    assert fuzzed.sent >= 5000, fuzzed.sent
    assert fuzzed.answered == fuzzed.sent - sum(fuzzed.closed.values())  # one answer per message, or a close
    assert_good_client_kept_receiving(fuzzed, since)
    assert fuzzed.st._thread.is_alive()
    fresh = Raw(fuzzed.st.url)
    sessions = fresh.request("list_sessions")["sessions"]
    assert fuzzed.session_id in [s["session_id"] for s in sessions]
    before = len(fuzzed.received)
    deadline = time.time() + 30
    while len(fuzzed.received) < before + 2 and time.time() < deadline:
        time.sleep(0.05)
    assert len(fuzzed.received) >= before + 2
    print(f"fuzz: {fuzzed.sent} messages, {fuzzed.answered} answered, connections closed: {fuzzed.closed}, "
          f"good client frames: {len(fuzzed.received)}")
