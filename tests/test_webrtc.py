"""WebRTC: offers checked without I/O, a publisher's video tracked by a real session,
processed video to a viewer (masks drawn), hang-ups ending the source, and newest-frame
delivery that drops instead of queueing. Peers are aiortc on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc import AudioStreamTrack, MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

from server.webrtc import (
    NewestSlot,
    PtsClock,
    SessionVideoTrack,
    TappedFrame,
    WebRTCError,
    WebRTCPublisher,
    create_viewer_answer,
    description_to_dict,
    fit_result,
    frame_tap,
    ice_host_addresses,
    parse_offer,
    peer_configuration,
    video_directions,
)
from tests.frames import SHAPES, moving_shapes, shape_centres
from tracker.export import object_colour
from tracker.ingest import PushSource
from tracker.results import FrameResult, ObjectResult
from tracker.session import InferenceWorker, SessionError, SessionEvent, SessionManager

H, W = 120, 160
FPS = 15
CLIP = moving_shapes(30, H, W)
TB = Fraction(1, 90_000)

network = pytest.mark.network


@pytest.fixture(autouse=True)
def loopback_only():
    with ice_host_addresses(["127.0.0.1"]):
        yield


@pytest.fixture()
def worker(model):
    w = InferenceWorker(model, max_batch=4)
    yield w
    w.stop()


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---------------------------------------------------------------- peers for the tests


class ClipTrack(MediaStreamTrack):
    """Sends ``frames`` in a loop at ``fps`` in real time, pts from 0; remembers send times."""

    kind = "video"

    def __init__(self, frames: list[np.ndarray], fps: float = FPS) -> None:
        super().__init__()
        self.frames, self.fps = frames, fps
        self.count = 0
        self.sent_s: dict[int, float] = {}  # pts -> perf_counter at send
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.perf_counter()
        due = self._start + self.count / self.fps
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        frame = av.VideoFrame.from_ndarray(self.frames[self.count % len(self.frames)], format="rgb24")
        frame.pts, frame.time_base = round(self.count * 90_000 / self.fps), TB
        self.sent_s[frame.pts] = time.perf_counter()
        self.count += 1
        return frame


async def publish(publisher: WebRTCPublisher, track: MediaStreamTrack, audio: bool = False) -> RTCPeerConnection:
    client = RTCPeerConnection(peer_configuration())
    if audio:
        client.addTrack(AudioStreamTrack())
    client.addTrack(track)
    await client.setLocalDescription(await client.createOffer())
    answer = await publisher.accept(description_to_dict(client.localDescription))
    await client.setRemoteDescription(RTCSessionDescription(**answer))
    return client


async def view(track: MediaStreamTrack):
    """A viewer peer; returns (its pc, the server's WebRTCViewer, a queue of received frames)."""
    client = RTCPeerConnection(peer_configuration())
    client.addTransceiver("video", direction="recvonly")
    received: asyncio.Queue = asyncio.Queue()

    @client.on("track")
    def on_track(remote: MediaStreamTrack) -> None:
        async def pull() -> None:
            while True:
                try:
                    received.put_nowait(await remote.recv())
                except Exception:
                    received.put_nowait(None)
                    return

        asyncio.ensure_future(pull())

    await client.setLocalDescription(await client.createOffer())
    viewer = await create_viewer_answer(description_to_dict(client.localDescription), track)
    await client.setRemoteDescription(RTCSessionDescription(**viewer.answer))
    return client, viewer, received


async def next_item(q: "queue.Queue", want: type, timeout: float = 20.0, pred=lambda item: True):
    """The next item of type ``want`` matching ``pred`` from a session subscriber queue, without blocking the loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            item = q.get_nowait()
        except queue.Empty:
            await asyncio.sleep(0.01)
            continue
        if isinstance(item, want) and pred(item):
            return item
    raise AssertionError(f"no {want.__name__} in {timeout} s")


def shape_mask(i: int, k: int = 0) -> np.ndarray:
    """Ground truth of shape ``k`` (0: the red square) on clip frame ``i``."""
    cx, cy = shape_centres(i, H, W)[k]
    r = SHAPES[k][3]
    yy, xx = np.mgrid[0:H, 0:W]
    return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)


# ---------------------------------------------------------------- sans-I/O


OFFER_SEND = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n"
)


def test_video_directions_reads_each_video_section():
    assert video_directions(OFFER_SEND) == ["sendonly"]
    two = "v=0\r\nm=video 9 RTP/AVP 96\r\nm=video 0 RTP/AVP 96\r\na=sendonly\r\n"
    assert video_directions(two) == ["sendrecv", "inactive"]  # no attribute: sendrecv; port 0: rejected
    assert video_directions("v=0\r\nm=audio 9 RTP/AVP 0\r\na=recvonly\r\n") == []


@pytest.mark.parametrize(
    ("obj", "want", "message"),
    [
        ("v=0", "send", 'webrtc offer must be an object {"sdp": ..., "type": "offer"}, got str'),
        ({"sdp": OFFER_SEND, "type": "answer"}, "send",
         "webrtc offer: type must be 'offer', got 'answer'; send pc.localDescription after createOffer()"),
        ({"type": "offer"}, "send",
         "webrtc offer: sdp must be the SDP text (starting 'v=0'); send pc.localDescription.sdp"),
        ({"sdp": "v=0\r\n" + "a=x\r\n" * 20000, "type": "offer"}, "send",
         "webrtc offer: sdp is larger than 65536 bytes; offer one video track only"),
        ({"sdp": OFFER_SEND.replace("a=sendonly", "a=recvonly"), "type": "offer"}, "send",
         "webrtc offer sends no video (m=video recvonly); add the camera track "
         "(pc.addTrack(stream.getVideoTracks()[0], stream)) before createOffer()"),
        ({"sdp": OFFER_SEND, "type": "offer"}, "recv",
         "webrtc offer receives no video (m=video sendonly); add pc.addTransceiver('video', "
         "{direction: 'recvonly'}) before createOffer()"),
        ({"sdp": "v=0\r\nm=audio 9 RTP/AVP 0\r\n", "type": "offer"}, "recv",
         "webrtc offer receives no video (no m=video section); add pc.addTransceiver('video', "
         "{direction: 'recvonly'}) before createOffer()"),
    ],
)
def test_parse_offer_refuses_with_what_to_fix(obj, want, message):
    with pytest.raises(WebRTCError) as info:
        parse_offer(obj, want=want)
    assert str(info.value) == message


def test_parse_offer_accepts_a_sending_offer():
    description = parse_offer({"sdp": OFFER_SEND, "type": "offer"}, want="send")
    assert description.type == "offer" and description.sdp == OFFER_SEND


def test_newest_slot_replaces_and_counts():
    async def main():
        slot: NewestSlot[int] = NewestSlot()
        assert slot.put(1) is False and slot.put(2) is True and slot.put(3) is True
        assert await slot.get() == 3
        waiter = asyncio.ensure_future(slot.get())
        await asyncio.sleep(0)
        slot.put(4)
        assert await waiter == 4
        slot.put(5)
        slot.close()
        assert slot.put(6) is False
        assert await slot.get() == 5  # the waiting item still goes out
        assert await slot.get() is None
        assert (slot.put_count, slot.replaced) == (5, 2)

    run(main(), 5)


def test_pts_clock_is_90khz_and_strictly_increasing():
    now = [10.0]
    clock = PtsClock(lambda: now[0])
    assert clock.next() == 0
    now[0] = 10.5
    assert clock.next() == 45_000
    assert clock.next() == 45_001  # same instant: still increases
    now[0] = 10.2  # a clock step back never makes pts go back
    assert clock.next() == 45_002


def test_fit_result_scales_masks_to_the_delivered_frame():
    mask = np.zeros((H, W), bool)
    mask[10:50, 20:100] = True
    result = FrameResult(0, H, W, objects={1: ObjectResult(1, mask, 3.0)})
    small = fit_result(result, (60, 80))
    assert small.objects[1].mask_hw.shape == (60, 80) and (small.height, small.width) == (60, 80)
    assert small.objects[1].mask_hw[5:25, 10:50].all() and small.objects[1].mask_hw.sum() == 20 * 40
    assert fit_result(result, (H, W)) is result


class FakeFramesSession:
    """Just the session API a FrameTap uses, with the proposed ``subscribe_frames`` hook."""

    id = "fake"

    def __init__(self) -> None:
        self.frame_subs: dict = {}
        self.subs: dict = {}
        self._n = 0

    def subscribe_frames(self, cb) -> int:
        self._n += 1
        self.frame_subs[self._n] = cb
        return self._n

    def subscribe(self, cb) -> int:
        self._n += 1
        self.subs[self._n] = cb
        return self._n

    def unsubscribe(self, sub_id: int) -> None:
        self.frame_subs.pop(sub_id, None)
        self.subs.pop(sub_id, None)

    def emit_frame(self, index: int, image: np.ndarray) -> None:
        class F:
            pass

        frame = F()
        frame.image_rgb, frame.index = image, index
        result = FrameResult(index, *image.shape[:2], source_index=index)
        for cb in list(self.frame_subs.values()):
            cb(frame, result)
        for cb in list(self.subs.values()):  # plain subscribers get results too, as on a real session
            cb(result)

    def emit_event(self, kind: str) -> None:
        for cb in list(self.subs.values()):
            cb(SessionEvent(kind, self.id))


def test_frame_tap_uses_subscribe_frames_when_the_session_has_it():
    session = FakeFramesSession()
    tap = frame_tap(session)  # type: ignore[arg-type]
    got: list = []
    sub = tap.subscribe(got.append)
    assert frame_tap(session) is tap and len(session.frame_subs) == 1 and len(session.subs) == 1
    session.emit_frame(7, CLIP[0])
    session.emit_event("paused")
    assert isinstance(got[0], TappedFrame) and got[0].image_rgb is CLIP[0] and got[0].result.frame_idx == 7
    assert got[1].kind == "paused"
    tap.unsubscribe(sub)
    assert session.frame_subs == {} and session.subs == {}  # an unwatched session is not held open


def test_frame_tap_pairs_frames_and_results_on_a_real_session(worker):
    manager = SessionManager(worker)
    source = PushSource("tap")
    session = manager.open(source)
    got: "queue.Queue" = queue.Queue()
    tap = frame_tap(session)
    sub = tap.subscribe(got.put)
    assert session.subscriber_count == 2  # frames + events while the tap has subscribers
    for i in range(3):
        source.push(CLIP[i], pts_s=i / FPS)
        item = run(next_item(got, TappedFrame), 30)
        assert item.result.source_index == i and item.image_rgb is not CLIP[i]
        np.testing.assert_array_equal(item.image_rgb, CLIP[i])
    tap.unsubscribe(sub)
    assert session.subscriber_count == 0
    manager.close_all()
    with pytest.raises(SessionError, match="is closed"):
        tap.subscribe(got.put)
    assert tap.subscriber_count == 0


# ---------------------------------------------------------------- ingest


@network
@pytest.mark.timeout(60)
def test_published_video_is_tracked_after_a_click(worker):
    """(a) aiortc publisher -> WebRTCPublisher -> PushSource -> session; click, then masks."""
    manager = SessionManager(worker)

    async def main():
        publisher = WebRTCPublisher("robot")
        session = manager.open(publisher.source, name="robot")
        results: "queue.Queue" = queue.Queue()
        session.subscribe(results.put)
        clip = ClipTrack(CLIP)
        client = await publish(publisher, clip)
        first = await next_item(results, FrameResult)
        i = round(first.pts_s * FPS) % len(CLIP)  # the clip frame the session saw
        cx, cy = shape_centres(i, H, W)[0]
        prompted = session.add_prompt(1, points_xy=[[cx, cy]], labels=[1], frame_idx=first.frame_idx)
        assert (await asyncio.wrap_future(prompted)).mask_hw.shape == (H, W)
        tracked = [await next_item(results, FrameResult, pred=lambda r: 1 in r.objects) for _ in range(5)]
        frame_idx = [r.frame_idx for r in tracked]
        pts = [r.pts_s for r in tracked]
        assert frame_idx == sorted(set(frame_idx)) and frame_idx[0] > first.frame_idx
        assert pts == sorted(set(pts)) and pts[0] > first.pts_s
        for r in tracked:
            assert r.objects[1].mask_hw.shape == (H, W) and (r.height, r.width) == (H, W)
            # the publisher's own timestamps (from 0), to a tick: the decoder rescales them
            assert min(abs(pts - r.pts_s * 90_000) for pts in clip.sent_s) <= 2
        assert publisher.stats.frames_pushed > 0 and publisher.end_reason is None
        await client.close()
        await publisher.close()

    run(main(), 50)
    manager.close_all()


@network
@pytest.mark.timeout(60)
def test_publisher_hang_up_ends_the_source_and_the_session_reports_it(worker):
    """(c) the robot closes its peer connection: the push source ends, the session says source_ended."""
    manager = SessionManager(worker)

    async def main():
        ended: list[str] = []
        publisher = WebRTCPublisher("robot", on_end=ended.append)
        session = manager.open(publisher.source)
        events: "queue.Queue" = queue.Queue()
        session.subscribe(events.put)
        client = await publish(publisher, ClipTrack(CLIP), audio=True)
        audio_answer = client.remoteDescription.sdp.split("m=audio")[1].split("m=video")[0]
        assert "a=inactive" in audio_answer  # audio is declined, not queued up unread
        await next_item(events, FrameResult)
        t0 = time.monotonic()
        await client.close()
        event = await next_item(events, SessionEvent, 10, pred=lambda e: e.kind.startswith("source_"))
        assert event.kind == "source_ended"
        assert time.monotonic() - t0 < 5.0
        assert ended == ["the publisher stopped sending video"] and publisher.source.ended
        assert publisher.pc.connectionState == "closed"
        assert session.state == "running"  # the server decides when to close it

    run(main(), 40)
    manager.close_all()


@network
@pytest.mark.timeout(60)
def test_closing_the_session_hangs_up_the_publisher(worker):
    manager = SessionManager(worker)

    async def main():
        publisher = WebRTCPublisher("robot")
        session = manager.open(publisher.source)
        await publish(publisher, ClipTrack(CLIP))
        while publisher.stats.frames_pushed == 0:
            await asyncio.sleep(0.02)
        manager.close(session.id, "operator closed it")
        assert await publisher.wait_ended(5) == "the session closed its source"  # at its next frame
        for _ in range(100):
            if publisher.pc.connectionState == "closed":
                break
            await asyncio.sleep(0.02)
        assert publisher.pc.connectionState == "closed"

    run(main(), 30)


class SilentTrack(MediaStreamTrack):
    """A camera that never delivers a frame."""

    kind = "video"

    async def recv(self) -> av.VideoFrame:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


@network
@pytest.mark.timeout(30)
def test_a_publisher_that_sends_no_video_times_out():
    async def main():
        publisher = WebRTCPublisher("mute", frame_timeout_s=1.0)
        client = await publish(publisher, SilentTrack())
        assert await publisher.wait_ended(5) == "no video arrived within 1 s of the answer"
        assert publisher.source.ended
        await client.close()

    run(main(), 20)


def test_a_refused_offer_ends_the_source():
    async def main():
        publisher = WebRTCPublisher("robot")
        with pytest.raises(WebRTCError):
            await publisher.accept({"sdp": OFFER_SEND.replace("a=sendonly", "a=recvonly"), "type": "offer"})
        assert publisher.source.ended and publisher.end_reason.startswith("bad offer: webrtc offer sends no video")
        with pytest.raises(WebRTCError, match="already answered an offer"):
            await publisher.accept({"sdp": OFFER_SEND, "type": "offer"})

    run(main(), 10)


@network
@pytest.mark.timeout(60)
def test_a_slow_converter_drops_frames_instead_of_queueing():
    """(d) ingest: the converter takes 120 ms per frame against 30 fps sent; lag stays one frame."""

    async def main():
        publisher = WebRTCPublisher("slow")
        frames = moving_shapes(30, 240, 320)
        clip = ClipTrack(frames, fps=30)
        original = publisher._push
        lags: list[float] = []
        queued: list[int] = []

        def slow_push(frame: av.VideoFrame) -> bool:
            newest = max(clip.sent_s) / 90_000
            lags.append(newest - float(frame.pts * frame.time_base))  # how old the converted frame is
            queued.append(publisher._video._queue.qsize())
            time.sleep(0.12)
            return original(frame)

        publisher._push = slow_push  # type: ignore[method-assign]
        client = await publish(publisher, clip)
        while clip.count < 60:
            await asyncio.sleep(0.05)
        await client.close()
        await publisher.wait_ended(5)
        stats = publisher.stats
        assert stats.frames_received >= 50
        assert stats.frames_skipped >= 0.6 * stats.frames_received
        assert stats.frames_pushed + stats.frames_skipped == stats.frames_received
        assert max(queued) <= 2  # aiortc's own queue is drained at once
        # a frame waits at most one conversion (120 ms) plus network/decode time, whatever the run length
        assert np.median(lags) < 0.2 and max(lags[2:]) < 0.35, lags

    run(main(), 40)


# ---------------------------------------------------------------- egress


def _ground_truth_masks(session, frames_by_index: dict[int, int]) -> None:
    """Make the session's object 1 exactly the red square (random weights track nothing useful)."""
    original = session.predictor.propagate

    def propagate(frame_idx, **kw):
        result = original(frame_idx, **kw)
        i = frames_by_index[result.source_index]
        result.objects = {1: ObjectResult(1, shape_mask(i), 5.0)}
        return result

    session.predictor.propagate = propagate


@network
@pytest.mark.timeout(60)
@pytest.mark.parametrize("draw_masks", [True, False])
def test_viewer_receives_processed_frames_with_masks_drawn(worker, draw_masks):
    """(b) SessionVideoTrack -> viewer: frame size kept; with draw_masks the square turns object 1's colour."""
    manager = SessionManager(worker)
    source = PushSource("cam")
    session = manager.open(source)
    clip_index: dict[int, int] = {}
    _ground_truth_masks(session, clip_index)

    async def main():
        sent: dict[int, FrameResult] = {}
        track = SessionVideoTrack(session, draw_masks=draw_masks, on_frame=lambda pts, r: sent.__setitem__(pts, r))
        client, viewer, received = await view(track)
        stop = threading.Event()

        def feed() -> None:
            for n in range(200):
                if stop.is_set():
                    return
                clip_index[n] = n % len(CLIP)
                source.push(CLIP[n % len(CLIP)], pts_s=n / FPS)
                time.sleep(1 / FPS)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        colour = np.array(object_colour(1), np.float32)
        checked = 0
        try:
            while checked < 3:
                frame = await asyncio.wait_for(received.get(), 20)
                assert frame is not None and (frame.height, frame.width) == (H, W)
                # the viewer sees the sender's 90 kHz pts from 0 (to a tick, after the decoder's rescaling)
                pts = min(sent, key=lambda p: abs(p - float(frame.pts * frame.time_base) * 90_000))
                assert abs(pts - float(frame.pts * frame.time_base) * 90_000) <= 2
                result = sent[pts]
                i = clip_index[result.source_index]
                square = shape_mask(i)
                inner = square.copy()  # 4 px in from the edge: no outline, no label
                for shift, axis in ((4, 0), (-4, 0), (4, 1), (-4, 1)):
                    inner &= np.roll(square, shift, axis)
                shown = frame.to_ndarray(format="rgb24").astype(np.float32)[inner]
                original = CLIP[i].astype(np.float32)[inner]
                d_shown = np.abs(shown - colour).sum(axis=1).mean()
                d_original = np.abs(original - colour).sum(axis=1).mean()
                if draw_masks:
                    assert d_shown < 0.7 * d_original, (d_shown, d_original)
                else:
                    assert abs(d_shown - d_original) < 0.2 * d_original, (d_shown, d_original)
                checked += 1
            pts = sorted(sent)
            assert pts == list(sent) and pts[0] == 0  # strictly increasing from 0, 90 kHz
            assert track.stats.frames_sent >= 3
        finally:
            stop.set()
            await client.close()
            await viewer.close()
        assert track.readyState == "ended" and frame_tap(session).subscriber_count == 0

    run(main(), 50)
    manager.close_all()


@network
@pytest.mark.timeout(60)
def test_the_viewer_track_ends_when_the_session_closes(worker):
    manager = SessionManager(worker)
    source = PushSource("cam")
    session = manager.open(source)

    async def main():
        track = SessionVideoTrack(session, draw_masks=True)
        client, viewer, received = await view(track)
        for i in range(2):  # aiortc's jitter buffer completes a frame when the next one starts
            source.push(CLIP[i], pts_s=i / FPS)
            await asyncio.sleep(0.3)
        assert await asyncio.wait_for(received.get(), 20) is not None
        manager.close(session.id, "done")
        for _ in range(250):
            if viewer.pc.connectionState == "closed":
                break
            await asyncio.sleep(0.02)
        assert track.readyState == "ended" and viewer.pc.connectionState == "closed"
        await client.close()
        await viewer.close()

    run(main(), 30)


def test_a_slow_viewer_drops_frames_instead_of_queueing():
    """(d) egress: 60 processed frames at 30 fps; the encoder takes 200 ms a frame."""
    session = FakeFramesSession()
    shown: list[int] = []  # frame_idx of each frame sent
    latest = [-1]  # newest frame_idx produced

    def produce() -> None:
        for n in range(60):
            latest[0] = n
            session.emit_frame(n, CLIP[n % len(CLIP)])
            time.sleep(1 / 30)
        session.emit_event("source_ended")

    async def main():
        track = SessionVideoTrack(session, on_frame=lambda pts, r: shown.append(r.frame_idx))  # type: ignore[arg-type]
        render = track._render

        def slow_render(item):
            time.sleep(0.2)
            return render(item)

        track._render = slow_render  # type: ignore[method-assign]
        threading.Thread(target=produce, daemon=True).start()
        behind = []
        while True:
            try:
                await track.recv()
            except Exception:
                return track, behind
            behind.append(latest[0] - shown[-1])  # newer frames that came during the render

    track, behind = run(main(), 20)
    stats = track.stats
    assert stats.frames_in == 60
    assert 6 <= stats.frames_sent <= 16
    assert stats.frames_dropped == stats.frames_in - stats.frames_sent  # dropped, never queued
    assert shown == sorted(set(shown)) and shown[-1] == 59  # the newest always goes out last
    assert max(behind) <= 9, behind  # one render's worth (~6 frames), not a growing backlog
    assert track.readyState == "ended"
