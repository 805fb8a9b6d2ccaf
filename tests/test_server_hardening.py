"""Hardening of the protocol and the connections, through the real server on 127.0.0.1.

Each test is one class of attack from issue 11 ("Protocol and connections"):
messages nested a thousand levels deep anywhere are answered with
``invalid_message`` on a connection that stays usable; clients that subscribe
and stop reading are closed within ``send_timeout_s`` (or by the keepalive,
however full their send buffer) while a good client keeps its frames and a
new client gets in; one address cannot take every slot; a source that accepts
the TCP connection and never answers delays nobody else's open or prompt, and
one connection has a bounded number of opens in flight; object ids stay in the
range the protocol accepts; no client-settable value gives an ``internal``
error.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from server.protocol import MAX_DEPTH
from tests.frames import moving_shapes, shape_centres
from tests.test_server import FRAMES, H, W, Raw, make_config, running, source_of
from tests.test_server_security import refused

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]

OPEN_OFTEN = {"opens_per_s": 100.0, "open_burst": 100.0}
#: clients may open http on 127.0.0.1 (the test's listener), waiting up to 60 s for it
STALL_POLICY = {"allow_schemes": ["http"], "allow_hosts": ["127.0.0.1"], "max_timeout_s": 60.0}


class _Records(logging.Handler):
    """Log records of the server's loggers, kept for assertions."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@contextlib.contextmanager
def server_log() -> Iterator[_Records]:
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("sam2-stream.server", "sam2-stream.websockets", "tracker")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, old):
            lg.removeHandler(handler)
            lg.setLevel(level)


def wait_until(predicate, timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def answers_to(c: Raw, ids: set[int], timeout: float) -> dict[int, dict]:
    """The answers to requests ``ids``, in whatever order they come (opens are
    answered when their source is ready, not in request order)."""
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(ids):
        msg = c.recv(max(0.1, deadline - time.monotonic()))
        if msg["type"] in ("reply", "error") and msg.get("id") in ids:
            got[msg["id"]] = msg
    return got


def clients(st) -> int:
    return st.call(lambda: len(st.server.clients))


def send_stuck(st, client_id: int | None = None) -> bool:
    """Whether a connection (``client_id``, or any) cannot send: bytes wait in its transport
    that the kernel does not take, and replies pile up behind them. (How many bytes the
    kernel absorbs first varies from run to run, so no byte count is the sign.)"""

    def stuck() -> bool:
        return any(c.ws.transport.get_write_buffer_size() > 0 and len(c._control) >= 100
                   for c in st.server.clients if client_id is None or c.id == client_id)

    return st.call(stuck)


def non_reading(st, rcvbuf: int = 2048, **kw) -> Raw:
    """A client whose library stops reading at once: its socket's tiny receive
    window fills, then the server's send buffer. (It sends no pings of its own:
    their failure when the server drops it would only be noise in the log.)"""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", st.server.port))
    return Raw(st.url, sock=sock, max_queue=1, ping_interval=None, **kw)


# ---------------------------------------------------------------- nesting


def test_deep_nesting_anywhere_is_answered_and_the_connection_stays_usable(model):
    deep = "[" * 1000 + "]" * 1000
    deep_object = '{"a":' * 1000 + "1" + "}" * 1000
    cases = [  # (message, the id its error must carry)
        ('{"type": "list_sessions", "id": %s}' % deep, None),  # in id
        ('{"type": "open", "id": 2, "source": "cam", "options": {"a": %s}}' % deep, 2),  # in options
        ('{"type": "open", "id": 3, "source": "cam", "options": %s}' % deep_object, 3),
        ('{"id": 4, "x": %s, "type": "list_sessions"}' % deep, 4),  # in a field before type
        ('{"x": %s, "type": "stats", "id": 5}' % deep_object, None),
        ("[" * 100_000, None),
    ]
    with server_log() as log, running(model) as st:
        c = Raw(st.url)
        for n, (text, request_id) in enumerate(cases):
            c.ws.send(text)
            msg = c.recv(timeout=20)
            assert (msg["type"], msg["id"], msg["code"]) == ("error", request_id, "invalid_message"), n
            assert msg["message"].endswith(f"levels deep; at most {MAX_DEPTH} are accepted"), msg
            # the same connection answers a good request right after
            assert c.request("list_sessions")["sessions"] == []
        assert log.messages(logging.ERROR) == []


def test_deep_nesting_in_a_message_over_the_size_limit_closes_1009_without_a_traceback(model):
    """Messages over ``max_message_bytes`` are looked at for their type (only
    ``image_open`` may be that big): that look must not recurse either."""
    from websockets.exceptions import ConnectionClosed

    with server_log() as log, running(model) as st:
        limit = st.server.config.server.max_message_bytes
        for head in ('{"type": "x", "a": ', '{"type": "image_open", "id": 1, "a": '):
            c = Raw(st.url)
            c.ws.send(head + "[" * (limit + 10) + "]" * 10 + "}")
            with pytest.raises(ConnectionClosed) as closed:
                c.recv(timeout=20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert Raw(st.url).request("list_sessions")["sessions"] == []  # the server is fine
        assert log.messages(logging.ERROR) == []


# ---------------------------------------------------------------- clients that stop reading


BIG = moving_shapes(8, 240, 320)  # two objects: ~9 KB of masks per frame


def feed(st, sid: str, good: Raw, stop: threading.Event, got: list[int], failed: list[BaseException]) -> None:
    """Push frames one at a time, each after the good client received the last
    (its frame indices go to ``got``, an exception to ``failed``)."""
    src = source_of(st, sid)
    f = 1
    try:
        while not stop.is_set():
            src.push(BIG[f % len(BIG)], pts_s=f / 30)
            msg = good.next_frame(timeout=60)
            assert len(msg["objects"]) == 2, msg["objects"]
            got.append(msg["frame_idx"])
            f += 1
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        failed.append(exc)


def start_with_two_objects(st) -> tuple[Raw, str]:
    good = Raw(st.url)
    sid = good.request("open", source="cam")["session"]["session_id"]
    source_of(st, sid).push(BIG[0], pts_s=0.0)
    assert good.next_frame()["frame_idx"] == 0
    for x, y in ((64, 72), (224, 156)):
        good.request("add_points", session_id=sid, points_xy=[[x, y]], labels=[1], frame_idx=0)
    return good, sid


def test_clients_that_stop_reading_are_closed_and_their_slots_freed(model):
    send_timeout = 1.0
    n_bad = 3
    config = make_config(
        server={
            "send_timeout_s": send_timeout, "close_timeout_s": 1.0, "send_buffer_bytes": 1024,
            "write_limit_bytes": 1024, "max_clients": n_bad + 1,
            "ping_interval_s": None,  # only the send timeout at work here
        },
    )
    with server_log() as log, running(model, config) as st:
        good, sid = start_with_two_objects(st)
        bad = [non_reading(st, rcvbuf=1024) for _ in range(n_bad)]
        for b in bad:  # from here on they read nothing
            b.send("subscribe", session_id=sid, mask_format="rle")
        assert refused(st.url).response.status_code == 503  # every slot is taken
        stop, got, failed = threading.Event(), [], []
        feeder = threading.Thread(target=feed, args=(st, sid, good, stop, got, failed), daemon=True)
        feeder.start()
        try:
            # a few frames fill each bad client's buffers; then nothing drains for send_timeout_s,
            # and the close frame cannot get through either: closed, then aborted (close_timeout_s)
            took = wait_until(lambda: clients(st) == 1, 60, "the non-reading clients were not dropped")
            frames_meanwhile = len(got)
            wait_until(lambda: len(got) >= frames_meanwhile + 2, 60, "the good client stopped getting frames")
        finally:
            stop.set()
            feeder.join(60)
        assert not feeder.is_alive() and failed == []
        warnings = log.messages(logging.WARNING)
        dropped = [m for m in warnings if m.endswith(f"its socket took no data for {send_timeout:g} s; closing it")]
        assert len(dropped) == n_bad, warnings
        assert frames_meanwhile >= 2 and took < 60
        # the good client got every frame in order, before, while and after the others were dropped
        assert got == list(range(1, len(got) + 1))
        assert Raw(st.url).request("list_sessions")["sessions"][0]["subscribers"] == 1  # a newcomer gets in
        print(f"dropped {n_bad} non-reading clients {took:.1f} s after frames started; good client got {len(got)} frames")


def test_keepalive_closes_a_silent_client_whatever_its_send_buffer_holds(model):
    """websockets' own keepalive waited for a full send buffer to drain before
    starting its pong timer: a client that stopped reading was never closed."""
    config = make_config(
        server={
            "send_timeout_s": 3600.0,  # the send timeout must not be what closes it
            "ping_interval_s": 0.5, "ping_timeout_s": 1.0, "close_timeout_s": 1.0,
            "send_buffer_bytes": 4096, "write_limit_bytes": 4096,
        },
        limits={"max_pending_messages": 100_000},
    )
    with server_log() as log, running(model, config) as st:
        good = Raw(st.url)
        bad = non_reading(st)
        for k in range(400):  # ~100 KB of replies it never reads: its send buffer is full
            bad.ws.send(f'{{"type":"stats","id":{k}}}')
        wait_until(lambda: send_stuck(st, bad.hello["client_id"]), 30, "the bad client's write buffer did not fill")
        took = wait_until(lambda: clients(st) == 1, 30, "the silent client was not closed by the keepalive")
        assert any(m.endswith("no pong within 1 s; closing it") for m in log.messages(logging.WARNING)), log.messages()
        time.sleep(1.5)  # several ping intervals: the client that reads answers its pings and stays
        assert good.request("list_sessions")["sessions"] == [] and clients(st) == 1
        assert took < 30


def test_the_server_stops_with_a_client_that_stopped_reading(model):
    """Its close frame cannot get through a full send buffer: the stop aborts it
    after the close timeout instead of waiting for it."""
    config = make_config(
        server={"send_timeout_s": 3600.0, "ping_interval_s": None, "close_timeout_s": 1.0,
                "send_buffer_bytes": 4096, "write_limit_bytes": 4096},
        limits={"max_pending_messages": 100_000},
    )
    st = running(model, config)
    server = st.__enter__()
    try:
        bad = non_reading(server)
        for k in range(400):
            bad.ws.send(f'{{"type":"stats","id":{k}}}')
        wait_until(lambda: send_stuck(server), 30, "the write buffer did not fill")
    finally:
        t0 = time.monotonic()
        st.__exit__(None, None, None)
    took = time.monotonic() - t0
    assert not server._thread.is_alive() and took < 30, took  # close_timeout_s is 1 s


def test_one_address_cannot_take_every_slot(model):
    config = make_config(server={"max_clients": 10, "max_clients_per_address": 2})
    with running(model, config) as st:
        first, second = Raw(st.url), Raw(st.url)
        err = refused(st.url)
        assert err.response.status_code == 503
        assert err.response.body == b"too many connections from 127.0.0.1 (limit 2 per address); close one first\n"
        # another loopback address is another peer (Linux routes all of 127/8 to lo)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", st.server.port))
        other = Raw(st.url, sock=sock)
        assert other.request("list_sessions")["sessions"] == []
        first.close()
        wait_until(lambda: clients(st) == 2, 10, "the closed connection kept its slot")
        assert Raw(st.url).request("list_sessions")["sessions"] == []
        assert second.request("list_sessions")["sessions"] == []


# ---------------------------------------------------------------- opens


class StallingListener:
    """A TCP port on 127.0.0.1 that accepts connections and never answers,
    until :meth:`hang_up`: then it closes every connection, present and future
    (FFmpeg may retry a connection that closed)."""

    def __init__(self) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.server.settimeout(0.1)
        self.port: int = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._hung_up = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            with self._lock:
                self.accepted.append(conn)
                if self._hung_up.is_set():
                    conn.close()

    def hang_up(self) -> None:
        with self._lock:
            self._hung_up.set()
            for conn in self.accepted:
                conn.close()

    def close(self) -> None:
        self.hang_up()
        self._stop.set()
        self._thread.join(5)
        self.server.close()


@contextlib.contextmanager
def stalling_listener() -> Iterator[StallingListener]:
    listener = StallingListener()
    try:
        yield listener
    finally:
        listener.close()  # stalled opens fail now instead of at their timeout


def test_a_stalled_source_delays_no_other_open_or_prompt(model):
    with stalling_listener() as listener:
        config = make_config(
            policy=STALL_POLICY,
            limits={**OPEN_OFTEN, "max_opens_in_flight": 2},
        )
        stalled_url = f"http://127.0.0.1:{listener.port}/stall.ts"
        with server_log() as log, running(model, config) as st:
            stallers = [Raw(st.url) for _ in range(4)]  # four opens filled the old 4-thread pool
            for s in stallers:
                for _ in range(2):
                    s.send("open", source=stalled_url, options={"timeout_s": 45})
            wait_until(lambda: len(listener.accepted) >= 8, 30, "the stalled opens did not all reach the listener")
            # a third open on a connection with two in flight: refused at once, naming the limit
            over = stallers[0].answer(stallers[0].send("open", source=stalled_url, options={"timeout_s": 45}), timeout=10)
            assert (over["type"], over["code"]) == ("error", "limit_exceeded")
            assert over["message"] == (
                "this connection already has 2 opens in flight (the limit, max_opens_in_flight); wait for their replies"
            )
            # the stallers' other requests are answered meanwhile (opens run beside the reader)
            assert stallers[1].request("list_sessions")["sessions"] == []
            # another client opens a configured source and prompts, not held up by eight stalled opens
            other = Raw(st.url)
            t0 = time.monotonic()
            sid = other.answer(other.send("open", source="cam"), timeout=40)["session"]["session_id"]
            waited = time.monotonic() - t0
            assert waited < 5, f"the open waited {waited:.1f} s behind stalled sources"  # they stall for 45 s
            source_of(st, sid).push(FRAMES[0], pts_s=0.0)
            assert other.next_frame(timeout=30)["frame_idx"] == 0
            x, y = shape_centres(0, H, W)[0]
            assert other.request("add_points", session_id=sid, points_xy=[[x, y]], labels=[1])["obj_id"] == 1
            for s in stallers:  # their opens are still in flight: no answer yet
                assert s.errors == []
        # the listener closed: each stalled open ends with an error of its own, never internal
        assert not any("internal" in m for m in log.messages(logging.ERROR))


def test_opens_in_flight_are_answered_when_their_source_fails(model):
    with stalling_listener() as listener:
        config = make_config(policy=STALL_POLICY, limits=OPEN_OFTEN)
        with running(model, config) as st:
            c = Raw(st.url)
            first = c.send("open", source=f"http://127.0.0.1:{listener.port}/a.ts", options={"timeout_s": 45})
            second = c.send("open", source=f"http://127.0.0.1:{listener.port}/b.ts", options={"timeout_s": 45})
            wait_until(lambda: len(listener.accepted) >= 2, 30, "the opens did not reach the listener")
            listener.hang_up()  # the opens fail now
            answers = answers_to(c, {first, second}, timeout=60)  # in the order the sources failed
            assert [(a["type"], a["code"]) for a in answers.values()] == [("error", "source_error")] * 2, answers
            assert c.request("list_sessions")["sessions"] == []


# ---------------------------------------------------------------- client-settable values


def test_source_options_out_of_range_are_invalid_messages_naming_them(model):
    """The issue's values, through the engine's own option checks (``tracker.sources``'
    ``SourceOptionError``): ``invalid_message`` with ``field: options.NAME`` and the
    range in the message, never an ``internal`` error or an overflow."""
    cases = {  # option: what the message says about its range
        "timeout_s": [1e308, 1e300, -1.0, 2**53, 61.0],  # 61: above this server's [policy] max_timeout_s
        "buffer_frames": [100_000],
        "resize": ["16000x12000"],
    }
    with stalling_listener() as listener:
        config = make_config(policy=STALL_POLICY, limits=OPEN_OFTEN)
        with server_log() as log, running(model, config) as st:
            c = Raw(st.url)
            for name, values in cases.items():
                for value in values:
                    err = c.error("open", source=f"http://127.0.0.1:{listener.port}/x.ts", options={name: value})
                    assert (err["code"], err["field"]) == ("invalid_message", f"options.{name}"), err
                    assert err["message"].startswith(name) or name in err["message"], err
            assert c.request("list_sessions")["sessions"] == []
            assert log.messages(logging.ERROR) == []
        assert listener.accepted == []  # refused before any connection was made


def test_extreme_values_never_give_an_internal_error(model):
    """The largest and smallest value the schema accepts in every prompt field:
    each answered with a reply or a specific error, never ``internal``."""
    with server_log() as log, running(model, make_config(limits={"prompts_per_s": 1000.0, "prompt_burst": 1000.0})) as st:
        c = Raw(st.url)
        sid = c.request("open", source="cam", tracking={
            "prompt_window_s": 60, "max_prompt_frames": 600, "max_cond_frames": 64, "lost_after_frames": 100_000,
        })["session"]["session_id"]
        source_of(st, sid).push(FRAMES[0], pts_s=0.0)
        assert c.next_frame()["frame_idx"] == 0
        big, far = 2**53, 1e6
        requests = [
            ("add_points", {"points_xy": [[far, far]], "labels": [1]}),
            ("add_points", {"points_xy": [[-far, -far]], "labels": [0]}),
            ("add_points", {"points_xy": [[10, 10]] * 64, "labels": [1] * 64}),
            ("add_points", {"points_xy": [[10, 10]], "labels": [1], "frame_idx": big}),
            ("add_points", {"points_xy": [[10, 10]], "labels": [1], "obj_id": 2**31 - 1, "frame_idx": 0}),
            ("add_box", {"box_xyxy": [-far, -far, far, far]}),
            ("add_box", {"box_xyxy": [far, far, -far, -far]}),
            ("add_box", {"box_xyxy": [5, 5, 5, 5], "frame_idx": big}),
            ("remove_object", {"obj_id": 2**31 - 2}),
            ("stats", {"session_id": "x" * 64}),
        ]
        codes = []
        for kind, fields in requests:
            fields = {"session_id": sid, **fields} if kind != "stats" else fields
            msg = c.answer(c.send(kind, **fields))
            codes.append(msg.get("code", "ok"))
            assert msg.get("code") != "internal", (kind, fields, msg)
        c.ws.send('{"type": "list_sessions", "id": %d}' % big)
        assert c.recv()["id"] == big
        err = c.error("open", source="cam", tracking={"max_objects": 2**62})
        assert (err["code"], err["field"]) == ("invalid_option", "tracking.max_objects")
        assert log.messages(logging.ERROR) == [], log.messages(logging.ERROR)
        print("answers:", codes)


# ---------------------------------------------------------------- object ids


def test_object_ids_stay_in_the_protocol_range(model):
    """After obj_id 2147483647 the server used to assign 2147483648, which
    ``remove_object`` cannot name (the id allocation is tracker/session.py's)."""
    top = 2**31 - 1
    with running(model) as st:
        c = Raw(st.url)
        sid = c.request("open", source="cam")["session"]["session_id"]
        source_of(st, sid).push(FRAMES[0], pts_s=0.0)
        assert c.next_frame()["frame_idx"] == 0
        (x0, y0), (x1, y1), _ = shape_centres(0, H, W)
        assert c.request("add_points", session_id=sid, points_xy=[[x0, y0]], labels=[1], obj_id=top)["obj_id"] == top
        new = c.answer(c.send("add_points", session_id=sid, points_xy=[[x1, y1]], labels=[1]))
        reported = [top]
        if new["type"] == "reply":
            assert 1 <= new["obj_id"] <= top and new["obj_id"] != top, new
            reported.append(new["obj_id"])
        else:  # past the range: a clear error instead of an id nobody can name
            assert new["code"] in ("limit_exceeded", "prompt_error") and str(top) in new["message"], new
        source_of(st, sid).push(FRAMES[1], pts_s=1 / 30)
        frame = c.next_frame()
        seen = {o["obj_id"] for o in frame["objects"]}
        assert seen == set(reported) and all(1 <= i <= top for i in seen)
        listed = c.request("list_sessions")["sessions"][0]["objects"]
        assert sorted(listed) == sorted(reported)
        for obj_id in reported:  # every id the server reports can be named
            left = c.request("remove_object", session_id=sid, obj_id=obj_id)["objects"]
            assert obj_id not in left
        assert c.request("list_sessions")["sessions"][0]["objects"] == []


def test_per_address_limits_count_a_host_not_each_of_its_ipv6_addresses():
    """One host usually holds a whole IPv6 /64 and may also arrive IPv4-mapped:
    the per-address limits count what one client is, so neither gets more slots."""
    from server.config import address_key

    assert address_key("::ffff:10.0.0.1") == address_key("10.0.0.1") == "10.0.0.1"
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("127.0.0.1") == "127.0.0.1" and address_key("not-an-ip") == "not-an-ip"
