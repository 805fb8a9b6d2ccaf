"""WebRTC benchmarks: glass-to-mask latency of a publisher, and codec CPU per 720p30 stream.

``latency``: an aiortc publisher (in this process, over 127.0.0.1) sends
moving shapes at ``--fps`` to a :class:`~server.webrtc.WebRTCPublisher`
feeding a live session; one object is clicked and tracked. Per result:

* ``total``: the publisher hands the frame to aiortc -> the session's
  subscriber has its mask (the WebSocket leg to a remote client is not in it);
* ``model``: that frame's image encoder + tracking time (the session's stage times);
* ``total - model``: what the service adds around the model;
* ``ingest``: sent -> pushed into the session's source (encode, RTP over
  loopback, jitter buffer, decode, RGB conversion);
* ``queue``: waiting in the session's one-frame mailbox for the worker.

The same figures with frames pushed straight into a ``PushSource`` (no
WebRTC) are printed next to them (``push`` rows): the difference is WebRTC's
share. On a CPU the model shares the cores with the codecs, so ``model`` and
``queue`` are larger than the model alone would be.

``ingest``: the ``ingest`` figure alone (no model) at 10, 30 and 60 fps.
aiortc's receiver completes a frame only when the first packet of the next
one arrives (it does not use the RTP marker bit), so a publisher's frames
wait about one frame interval on the server whatever the network.

``cpu``: no model. A second process (the robot) encodes 1280x720 at 30 fps
and sends it over 127.0.0.1 to a ``WebRTCPublisher`` in this process
(decode + RGB + push, a thread draining the source as a session would); then
the reverse, a ``SessionVideoTrack`` in this process (RGB -> YUV, optional
mask drawing, encode) to a viewer process that decodes. Each side's process
CPU time (all threads) over ``--seconds`` of streaming is divided by the wall
time: the cores one 720p30 stream costs. aiortc's VP8 encoder runs at
0.5-1.5 Mbit/s (its own limits); H.264 uses libx264.

Usage::

    .venv/bin/python bench/bench_webrtc.py                       # all parts, VP8
    .venv/bin/python bench/bench_webrtc.py cpu --codec h264 --seconds 10
    .venv/bin/python bench/bench_webrtc.py latency --seconds 20 --image-size 256 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.webrtc import (  # noqa: E402
    SessionVideoTrack,
    WebRTCPublisher,
    create_viewer_answer,
    description_to_dict,
    peer_configuration,
    set_ice_host_addresses,
)
from tracker.ingest import PushSource  # noqa: E402
from tracker.results import FrameResult  # noqa: E402

TB = Fraction(1, 90_000)


# ------------------------------------------------------------------ clips and tracks


def shapes_clip(n: int, width: int, height: int) -> list[np.ndarray]:
    """``n`` RGB frames of a loop: a red square circling the centre-left, a disc crossing."""
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.repeat((70 + 25 * np.sin(xx / 23.0) + 15 * np.cos(yy / 17.0))[..., None], 3, axis=2)
    r = max(8, height // 12)
    frames = []
    for i in range(n):
        t = 2 * np.pi * i / n
        img = background.copy()
        cx, cy = width * 0.3 + r * np.cos(t), height * 0.4 + r * np.sin(t)
        img[(np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)] = (220, 40, 40)
        dx = (width * i / n) % width
        img[(xx - dx) ** 2 + (yy - height * 0.7) ** 2 <= (0.8 * r) ** 2] = (40, 200, 70)
        frames.append(img.astype(np.uint8))
    return frames


def square_centre(width: int, height: int) -> tuple[float, float]:
    """Where the red square always covers (the centre of its circle)."""
    return width * 0.3, height * 0.4


class LoopTrack(MediaStreamTrack):
    """Sends pre-made frames in a loop at ``fps``, pts from 0 (90 kHz); remembers wall-clock send times."""

    kind = "video"

    def __init__(self, frames: list[av.VideoFrame], fps: float) -> None:
        super().__init__()
        self.frames, self.fps = frames, fps
        self.count = 0
        self.sent_s: dict[int, float] = {}
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self.count / self.fps - time.monotonic()))
        frame = self.frames[self.count % len(self.frames)]
        frame.pts, frame.time_base = round(self.count * 90_000 / self.fps), TB
        self.sent_s[frame.pts] = time.time()
        self.count += 1
        return frame


def yuv_frames(rgb: list[np.ndarray]) -> list[av.VideoFrame]:
    return [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p") for f in rgb]


def prefer_codec(pc: RTCPeerConnection, codec: str) -> None:
    mime = {"vp8": "video/VP8", "h264": "video/H264"}[codec]
    caps = RTCRtpSender.getCapabilities("video").codecs
    for t in pc.getTransceivers():
        if t.kind == "video":
            wanted = [c for c in caps if c.mimeType == mime]
            t.setCodecPreferences(wanted + [c for c in caps if c.mimeType == "video/rtx"][:1])


def sent_at(sent_s: dict[int, float], pts_s: float | None) -> float | None:
    if pts_s is None:
        return None
    pts = round(pts_s * 90_000)
    return next((sent_s[p] for p in (pts, pts - 1, pts + 1, pts - 2, pts + 2) if p in sent_s), None)


async def bytes_sent(pc: RTCPeerConnection) -> int:
    """Video bytes this peer has sent (RTP payload and headers; 0 when it only receives)."""
    report = await pc.getStats()
    return sum(getattr(st, "bytesSent", 0) for st in report.values() if st.type == "outbound-rtp")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def publish_to(publisher: WebRTCPublisher, track: Any, codec: str) -> RTCPeerConnection:
    """A client peer sending ``track`` to the server-side ``publisher`` (offer/answer done)."""
    client = RTCPeerConnection(peer_configuration())
    client.addTrack(track)
    prefer_codec(client, codec)
    await client.setLocalDescription(await client.createOffer())
    answer = await publisher.accept(description_to_dict(client.localDescription))
    await client.setRemoteDescription(RTCSessionDescription(**answer))
    return client


# ------------------------------------------------------------------ latency


async def latency_run(path: str, args: argparse.Namespace, model: Any) -> dict[str, Any]:
    from tracker.session import InferenceWorker, SessionManager

    width, height = args.size
    worker = InferenceWorker(model)
    manager = SessionManager(worker)
    frames_rgb = shapes_clip(60, width, height)
    rows: list[dict[str, float]] = []
    loop = asyncio.get_running_loop()
    first: asyncio.Future[FrameResult] = loop.create_future()
    sent_s: dict[int, float] = {}
    stop = threading.Event()
    client = publisher = None

    if path == "webrtc":
        publisher = WebRTCPublisher("bench")
        source = publisher.source
    else:
        source = PushSource("bench")
    session = manager.open(source, name="bench")
    times = session.stats.times

    def on_item(item: Any) -> None:  # worker thread, right after this frame's stage times were recorded
        now = time.time()
        if not isinstance(item, FrameResult):
            return
        if not first.done():
            loop.call_soon_threadsafe(lambda: first.done() or first.set_result(item))
            return
        sent = sent_at(sent_s, item.pts_s)
        if sent is None or not item.objects:
            return
        model_s = times.encode[-1] + times.track[-1]
        rows.append({"total": now - sent, "model": model_s, "ingest": item.arrival_s - sent,
                     "queue": times.queue_wait[-1], "t": now})

    session.subscribe(on_item)
    if path == "webrtc":
        track = LoopTrack(yuv_frames(frames_rgb), args.fps)
        sent_s = track.sent_s
        client = await publish_to(publisher, track, args.codec)
    else:
        def pusher() -> None:
            n, start = 0, time.monotonic()
            while not stop.is_set():
                time.sleep(max(0.0, start + n / args.fps - time.monotonic()))
                pts = round(n * 90_000 / args.fps)
                sent_s[pts] = time.time()
                source.push(frames_rgb[n % len(frames_rgb)], pts / 90_000)
                n += 1

        threading.Thread(target=pusher, daemon=True).start()

    result = await asyncio.wait_for(first, 60)
    x, y = square_centre(width, height)  # the square covers it on every frame
    await asyncio.wrap_future(session.add_prompt(1, points_xy=[[x, y]], labels=[1], frame_idx=result.frame_idx))
    t0 = time.time()
    await asyncio.sleep(args.seconds)
    stop.set()
    if client is not None:
        await client.close()
    if publisher is not None:
        await publisher.close()
    manager.close_all()
    worker.stop()
    kept = [r for r in rows if r["t"] - t0 > args.warmup]
    out: dict[str, Any] = {"results": len(kept), "fps_processed": len(kept) / max(1e-9, args.seconds - args.warmup)}
    for key in ("total", "model", "ingest", "queue"):
        vals = [r[key] for r in kept]
        out[key] = {"p50": pct(vals, 50), "p99": pct(vals, 99)}
    extra = [r["total"] - r["model"] for r in kept]
    out["total-model"] = {"p50": pct(extra, 50), "p99": pct(extra, 99)}
    return out


def bench_latency(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tracker.model import build_model

    torch.set_num_threads(max(1, min(args.threads, torch.get_num_threads())))
    model = build_model("sam2.1-tiny", device=args.device, image_size=args.image_size, random_weights_seed=0)
    figures = {}
    for path in ("push", "webrtc"):
        figures[path] = asyncio.run(latency_run(path, args, model))
    print(f"\nglass-to-mask, {args.size[0]}x{args.size[1]} at {args.fps:g} fps, sam2.1-tiny @ {args.image_size} on "
          f"{args.device}, {args.codec}, one object, {args.seconds:g} s ({args.warmup:g} s warm-up dropped)")
    print(f"{'path':8s} {'results':>7s} {'fps':>5s}   " + "   ".join(f"{k:>17s}" for k in
          ("total", "model", "total-model", "ingest", "queue")))
    print(f"{'':8s} {'':7s} {'':5s}   " + "   ".join(f"{'p50':>8s} {'p99':>8s}" for _ in range(5)))
    for path, f in figures.items():
        cells = "   ".join(f"{f[k]['p50'] * 1000:6.1f}ms {f[k]['p99'] * 1000:6.1f}ms"
                           for k in ("total", "model", "total-model", "ingest", "queue"))
        print(f"{path:8s} {f['results']:7d} {f['fps_processed']:5.1f}   {cells}")
    d50 = figures["webrtc"]["total-model"]["p50"] - figures["push"]["total-model"]["p50"]
    print(f"WebRTC's share of total - model (p50, webrtc - push): {d50 * 1000:.1f} ms")
    return figures


# ------------------------------------------------------------------ ingest alone, by frame rate


async def ingest_run(fps: float, args: argparse.Namespace) -> dict[str, float]:
    publisher = WebRTCPublisher("ingest")
    track = LoopTrack(yuv_frames(shapes_clip(30, *args.size)), fps)
    client = await publish_to(publisher, track, args.codec)
    ages: list[float] = []

    def drain() -> None:  # a consumer that keeps up, as the session's reader does
        while (frame := publisher.source.get_latest(timeout=2.0)) is not None:
            sent = sent_at(track.sent_s, frame.pts_s)
            if sent is not None:
                ages.append(frame.arrival_s - sent)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    await asyncio.sleep(args.warmup + min(args.seconds, 6.0))
    await client.close()
    await publisher.close()
    reader.join(5)
    kept = ages[int(args.warmup * fps):]
    return {"p50": pct(kept, 50), "p99": pct(kept, 99), "frames": len(kept)}


def bench_ingest(args: argparse.Namespace) -> dict[str, Any]:
    figures = {fps: asyncio.run(ingest_run(fps, args)) for fps in (10.0, 30.0, 60.0)}
    print(f"\ningest alone (sent -> pushed into the source), {args.size[0]}x{args.size[1]}, {args.codec}, no model")
    for fps, f in figures.items():
        print(f"{fps:4.0f} fps: p50 {f['p50'] * 1000:6.1f} ms  p99 {f['p99'] * 1000:6.1f} ms  "
              f"(frame interval {1000 / fps:5.1f} ms, {f['frames']} frames)")
    return {str(k): v for k, v in figures.items()}


# ------------------------------------------------------------------ CPU per 720p30 stream


def _robot_process(conn: Any, role: str, codec: str, fps: float, size: tuple[int, int]) -> None:
    """The other end in its own process: ``publish`` encodes and sends, ``view`` receives and decodes."""
    logging.basicConfig(level=logging.WARNING)
    set_ice_host_addresses(["127.0.0.1"])
    asyncio.run(_robot(conn, role, codec, fps, size))


async def _robot(conn: Any, role: str, codec: str, fps: float, size: tuple[int, int]) -> None:
    loop = asyncio.get_running_loop()
    pc = RTCPeerConnection(peer_configuration())
    received = [0]
    if role == "publish":
        track = LoopTrack(yuv_frames(shapes_clip(30, *size)), fps)
        pc.addTrack(track)
    else:
        pc.addTransceiver("video", direction="recvonly")

        @pc.on("track")
        def on_track(remote: MediaStreamTrack) -> None:
            async def pull() -> None:
                while True:
                    try:
                        await remote.recv()
                    except Exception:
                        return
                    received[0] += 1

            asyncio.ensure_future(pull())

    prefer_codec(pc, codec)
    await pc.setLocalDescription(await pc.createOffer())
    conn.send(("offer", description_to_dict(pc.localDescription)))
    _, answer = await loop.run_in_executor(None, conn.recv)
    await pc.setRemoteDescription(RTCSessionDescription(**answer))
    cpu0 = n0 = bytes0 = 0.0
    while True:
        msg = (await loop.run_in_executor(None, conn.recv))[0]
        count = track.count if role == "publish" else received[0]
        if msg == "start":
            cpu0, n0, bytes0 = time.process_time(), count, await bytes_sent(pc)
        elif msg == "stop":
            conn.send(("cpu", time.process_time() - cpu0, count - n0, await bytes_sent(pc) - bytes0))
        else:
            break
    await pc.close()


class FakeSession:
    """What a FrameTap needs (``subscribe_frames``): 720p frames at ``fps`` with one object mask."""

    id = "bench"

    def __init__(self, frames: list[np.ndarray], fps: float) -> None:
        from tracker.results import ObjectResult

        self.frames, self.fps = frames, fps
        self._subs: dict[int, Any] = {}
        self._events: dict[int, Any] = {}
        self._n = 0
        self._stop = threading.Event()
        h, w = frames[0].shape[:2]
        mask = np.zeros((h, w), bool)
        mask[h // 4: h // 2, w // 4: w // 2] = True
        self._objects = {1: ObjectResult(1, mask, 5.0)}

    def subscribe_frames(self, cb: Any) -> int:
        self._n += 1
        self._subs[self._n] = cb
        return self._n

    def subscribe(self, cb: Any) -> int:
        self._n += 1
        self._events[self._n] = cb
        return self._n

    def unsubscribe(self, sub_id: int) -> None:
        self._subs.pop(sub_id, None)
        self._events.pop(sub_id, None)

    def run(self) -> None:
        class Frame:
            pass

        h, w = self.frames[0].shape[:2]
        n, start = 0, time.monotonic()
        while not self._stop.is_set():
            time.sleep(max(0.0, start + n / self.fps - time.monotonic()))
            frame = Frame()
            frame.image_rgb = self.frames[n % len(self.frames)]
            result = FrameResult(n, h, w, pts_s=n / self.fps, source_index=n, objects=self._objects)
            for cb in list(self._subs.values()):
                cb(frame, result)
            n += 1

    def stop(self) -> None:
        self._stop.set()


async def cpu_run(direction: str, args: argparse.Namespace, draw_masks: bool = False) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    role = "publish" if direction == "ingest" else "view"
    size = (1280, 720)
    proc = ctx.Process(target=_robot_process, args=(there, role, args.codec, 30.0, size), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    _, offer = await loop.run_in_executor(None, here.recv)
    stop = threading.Event()
    counted = [0]
    fake = None
    if direction == "ingest":
        publisher = WebRTCPublisher("cpu")
        answer = await publisher.accept(offer)

        def drain() -> None:  # what a session's reader does, without a model
            while not stop.is_set():
                if publisher.source.get_latest(timeout=0.5) is not None:
                    counted[0] += 1

        threading.Thread(target=drain, daemon=True).start()
    else:
        fake = FakeSession(shapes_clip(30, *size), 30.0)
        track = SessionVideoTrack(fake, draw_masks=draw_masks)  # type: ignore[arg-type]
        viewer = await create_viewer_answer(offer, track)
        answer = viewer.answer
        threading.Thread(target=fake.run, daemon=True).start()
    here.send(("answer", answer))
    await asyncio.sleep(args.warmup)
    sender = None if direction == "ingest" else viewer.pc
    here.send(("start",))
    cpu0, wall0, n0 = time.process_time(), time.monotonic(), counted[0]
    bytes0 = await bytes_sent(sender) if sender else 0
    await asyncio.sleep(args.seconds)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    sent_bytes = await bytes_sent(sender) - bytes0 if sender else 0
    here.send(("stop",))
    _, other_cpu, other_frames, other_bytes = await loop.run_in_executor(None, here.recv)
    sent_bytes = sent_bytes or other_bytes
    here.send(("bye",))
    stop.set()
    if direction == "ingest":
        frames_here = counted[0] - n0
        await publisher.close()
        here_fps = frames_here / wall
    else:
        fake.stop()
        await viewer.close()
        here_fps = other_frames / wall
    proc.join(10)
    return {"server_cores": cpu / wall, "peer_cores": other_cpu / wall, "fps": here_fps,
            "server_ms_per_frame": 1000 * cpu / max(1, here_fps * wall),
            "peer_ms_per_frame": 1000 * other_cpu / max(1, here_fps * wall),
            "mbit_s": 8 * sent_bytes / wall / 1e6}


def bench_cpu(args: argparse.Namespace) -> dict[str, Any]:
    figures = {
        "ingest": asyncio.run(cpu_run("ingest", args)),
        "egress": asyncio.run(cpu_run("egress", args)),
        "egress+masks": asyncio.run(cpu_run("egress", args, draw_masks=True)),
    }
    print(f"\nCPU per 1280x720 30 fps stream over 127.0.0.1, {args.codec}, {args.seconds:g} s measured, no model "
          f"(cores = process CPU s / wall s, all threads)")
    print(f"{'direction':14s} {'server side':>22s} {'peer side':>22s} {'fps':>6s} {'Mbit/s':>6s}")
    labels = {"ingest": ("decode+RGB+push", "encode (robot)"), "egress": ("YUV+encode", "decode (viewer)"),
              "egress+masks": ("draw+YUV+encode", "decode (viewer)")}
    for key, f in figures.items():
        s_label, p_label = labels[key]
        print(f"{key:14s} {f['server_cores']:5.2f} cores {f['server_ms_per_frame']:5.1f} ms/f   "
              f"{f['peer_cores']:5.2f} cores {f['peer_ms_per_frame']:5.1f} ms/f {f['fps']:6.1f} {f['mbit_s']:6.2f}"
              f"   ({s_label} | {p_label})")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="*", choices=["latency", "ingest", "cpu"], default=[])
    p.add_argument("--seconds", type=float, default=12.0, help="measured time per run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds dropped at the start of each run")
    p.add_argument("--codec", choices=["vp8", "h264"], default="vp8")
    p.add_argument("--fps", type=float, default=30.0, help="publisher frame rate (latency)")
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(640, 480),
                   metavar="WxH", help="publisher frame size (latency)")
    p.add_argument("--image-size", type=int, default=256, help="model input size (latency)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads (latency, CPU)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    set_ice_host_addresses(["127.0.0.1"])
    parts = args.parts or ["latency", "ingest", "cpu"]
    out: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "parts"}}
    if "latency" in parts:
        out["latency"] = bench_latency(args)
    if "ingest" in parts:
        out["ingest"] = bench_ingest(args)
    if "cpu" in parts:
        out["cpu"] = bench_cpu(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
