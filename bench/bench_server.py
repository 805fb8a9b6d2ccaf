"""Live-service benchmarks (issue: live service), measured side by side in one run.

``multistream``: total processed frames/s for 1, 2 and 4 live sessions on one
server, three ways at the same image size: the sessions **one after another**
(the baseline), **concurrently with encoder batching** (the inference worker
puts the newest frame of every session through the image encoder in one call),
and concurrently without batching (``max_batch = 1``: round-robin only).
Each session is a push source fed by a thread at a camera's rate (30 fps,
faster than the model), so every session always has a newest frame waiting and
the figures are the worker's throughput; results reach a WebSocket client per
session, which counts them. "One after another" opens each session alone for
the same number of frames; its frames/s is all frames over the summed time.

``soak``: ``sam2-stream serve`` as its own process, two sessions on the sample
clip played as looping 25 fps cameras, one clicked object each, and 50
WebSocket clients (25 per session) for a bounded time. Reports frames delivered
per client against frames processed, latency percentiles from frame arrival to
client receipt split into time in the inference worker (waiting for it, and
the step that made the masks) and service overhead (everything after the masks
are ready: encoding, fan-out, WebSocket, client read; goal p99 < 20 ms), and
the server's RSS at the start and end of the measured window (goal:
within 5 %).

Random weights (seeded): speed does not depend on what the weights are.

    .venv/bin/python bench/bench_server.py multistream --frames 20
    .venv/bin/python bench/bench_server.py soak --seconds 60 --clients 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.app import ServerThread, TrackingServer  # noqa: E402
from server.client import Client, RemoteFrame  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from tests.frames import moving_shapes, shape_centres  # noqa: E402
from tracker.model import build_model  # noqa: E402

H, W = 240, 320


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(round(q / 100 * (len(data) - 1))))] if data else float("nan")


# ---------------------------------------------------------------- multistream


def _config(sources: dict[str, str], max_batch: int) -> ServerConfig:
    config = ServerConfig(sources=sources)
    config.server.port = 0
    config.server.log_every_s = 0
    config.model.max_batch = max_batch
    config.limits.max_sessions = max(8, len(sources))
    config.limits.opens_per_s = 100.0
    config.limits.open_burst = 100.0
    return config


async def _run_sessions(
    st: ServerThread, names: list[str], frames: list[np.ndarray], n_frames: int, warmup: int, fps: float
) -> float:
    """Open ``names`` at once, click an object in each, feed each from a thread at
    ``fps`` as a live camera would; return total processed frames/s once every
    session is past ``warmup`` frames, over ``n_frames`` per session."""
    clients = [Client(st.url, frame_buffer=4) for _ in names]
    for c in clients:
        await c.connect()
    sessions = [await c.open(name) for c, name in zip(clients, names)]
    sources = [st.server.manager.get(s.id).source for s in sessions]
    for src in sources:
        src.push(frames[0], pts_s=0.0)
    for s in sessions:  # one click per session, on its first frame
        first = await s.next_frame(timeout=120)
        cx, cy = shape_centres(0, H, W)[0]
        await s.click(cx, cy, frame=first.frame_idx)
    counts = {s.id: 0 for s in sessions}
    marks: dict[str, float] = {}
    start_counts: dict[str, int] = {}
    done = asyncio.Event()
    target = len(names) * n_frames

    def on_frame(s_id: str) -> None:
        counts[s_id] += 1
        if not start_counts and all(n >= warmup for n in counts.values()):
            start_counts.update(counts)
            marks["start"] = time.perf_counter()
        if start_counts and sum(counts[k] - start_counts[k] for k in counts) >= target:
            marks.setdefault("end", time.perf_counter())
            done.set()

    for s in sessions:
        s.on_frame = lambda f, s_id=s.id: on_frame(s_id)
    stop = threading.Event()

    def camera(src, offset: int) -> None:
        k = 1
        while not stop.wait(1.0 / fps):
            src.push(frames[(k + offset) % len(frames)], pts_s=k / fps)
            k += 1

    threads = [threading.Thread(target=camera, args=(src, 7 * i), daemon=True) for i, src in enumerate(sources)]
    for t in threads:
        t.start()
    try:
        await asyncio.wait_for(done.wait(), 60 * (warmup + n_frames) * len(names))
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    processed = sum(counts[k] - start_counts[k] for k in counts)
    for s in sessions:
        await s.close()
    for c in clients:
        await c.close()
    return processed / (marks["end"] - marks["start"])


def bench_multistream(model, counts: list[int], n_frames: int, warmup: int, fps: float) -> None:
    frames = moving_shapes(64, H, W)
    print(f"\n== multistream: {H}x{W} frames from {fps:g} fps push cameras, image size {model.image_size}, "
          f"{n_frames} processed frames per session (after {warmup} warm-up), one object each ==")
    print(f"{'sessions':>8} {'one after another':>18} {'concurrent, batched':>20} {'concurrent, max_batch=1':>24} "
          f"{'batched / sequential':>21} {'mean batch':>11}")
    for n in counts:
        names = [f"cam{i}" for i in range(n)]
        sources = {name: f"push:{name}" for name in names}
        # the same sessions one after another: the baseline
        with ServerThread(TrackingServer(_config(sources, max_batch=n), model)) as st:
            rates = [asyncio.run(_run_sessions(st, [name], frames, n_frames, warmup, fps)) for name in names]
        seq = n / sum(1 / r for r in rates)  # n * F frames in the sum of the sessions' times
        results = {}
        for label, max_batch in (("batched", n), ("unbatched", 1)):
            with ServerThread(TrackingServer(_config(sources, max_batch=max_batch), model)) as st:
                steps0, batched0 = st.server.worker.steps, st.server.worker.batched_frames
                results[label] = asyncio.run(_run_sessions(st, names, frames, n_frames, warmup, fps))
                if label == "batched":
                    steps, batched = st.server.worker.steps - steps0, st.server.worker.batched_frames - batched0
                    mean_batch = batched / max(1, steps)
        bat, unb = results["batched"], results["unbatched"]
        print(f"{n:>8} {seq:>14.2f} f/s {bat:>16.2f} f/s {unb:>20.2f} f/s {bat / seq:>20.2f}x {mean_batch:>11.2f}",
              flush=True)


# ---------------------------------------------------------------- soak


@dataclass
class Delivery:
    frame_idx: int
    arrival_s: float
    processed_s: float
    sent_s: float
    received_s: float
    model_s: float
    queue_s: float


@dataclass
class ClientLog:
    session: str
    deliveries: list[Delivery] = field(default_factory=list)


def _start_server(config_path: Path, image_size: int, device: str) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(config_path), "--random-weights", "0",
           "--image-size", str(image_size), "--device", device, "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log: list[str] = []
    deadline = time.time() + 120
    assert proc.stderr is not None
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("the server exited:\n" + "".join(log))
        log.append(line)
        match = re.search(r"listening on (wss?://\S+/)", line)
        if match:
            threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
            return proc, match.group(1), log
    proc.kill()
    raise RuntimeError("the server did not start in 120 s:\n" + "".join(log))


async def _soak(url: str, n_clients: int, seconds: float, warmup_s: float, pid: int) -> None:
    proc = psutil.Process(pid)
    names = ["cam1", "cam2"]
    logs = [ClientLog(names[i % 2]) for i in range(n_clients)]
    clients = [Client(url, frame_buffer=1, request_timeout=120) for _ in range(n_clients)]
    await asyncio.gather(*(c.connect() for c in clients))
    sessions = []
    for c, log in zip(clients, logs):  # one by one: the first open of a name starts its session
        sessions.append(await c.open(log.session))
    window = {"on": False}

    def recorder(log: ClientLog):
        def on_frame(f: RemoteFrame) -> None:
            if window["on"] and f.objects and f.model_s is not None:
                log.deliveries.append(Delivery(f.frame_idx, f.arrival_s, f.processed_s, f.sent_s, f.received_s,
                                               f.model_s, f.queue_s or 0.0))

        return on_frame

    for s, log in zip(sessions, logs):
        s.on_frame = recorder(log)
    # one click per session, from the first client of each
    for name in names:
        i = next(k for k, log in enumerate(logs) if log.session == name)
        first = await sessions[i].next_frame(timeout=120)
        await sessions[i].click(100, 80, frame=first.frame_idx)
    await asyncio.sleep(warmup_s)
    stats0 = {s.name: s for s in (await clients[0].stats()).sessions}
    rss = [(0.0, proc.memory_info().rss)]
    window["on"] = True
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < seconds:
        await asyncio.sleep(min(5.0, seconds - elapsed))
        rss.append((time.monotonic() - t0, proc.memory_info().rss))
    window["on"] = False
    stats1 = {s.name: s for s in (await clients[0].stats()).sessions}
    await asyncio.gather(*(c.close() for c in clients))

    processed = {n: stats1[n].frames_processed - stats0[n].frames_processed for n in names}
    print(f"\n== soak: {n_clients} clients on 2 sessions, {seconds:g} s measured after {warmup_s:g} s warm-up ==")
    for n in names:
        per = [len(log.deliveries) for log in logs if log.session == n]
        print(f"{n}: {processed[n]} frames processed ({processed[n] / seconds:.2f}/s); delivered per client: "
              f"min {min(per)}, mean {statistics.mean(per):.1f}, max {max(per)} "
              f"({100 * statistics.mean(per) / max(1, processed[n]):.1f} % of processed)")
    d = [x for log in logs for x in log.deliveries]
    rows = {
        "end to end: frame arrival -> client receipt": [x.received_s - x.arrival_s for x in d],
        "  waiting for the worker (busy with earlier frames)": [x.queue_s for x in d],
        "  worker step that made the masks (batched encode + tracking)": [
            x.processed_s - x.arrival_s - x.queue_s for x in d],
        "    (this frame's own model time: encoder share + tracking)": [x.model_s for x in d],
        "  service overhead: masks ready -> client receipt": [x.received_s - x.processed_s for x in d],
        "    of which masks ready -> written to this client": [x.sent_s - x.processed_s for x in d],
    }
    print(f"{'latency over ' + str(len(d)) + ' deliveries':<64} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, values in rows.items():
        print(f"{label:<64} {1000 * pct(values, 50):>8.1f} {1000 * pct(values, 99):>8.1f} {1000 * max(values):>8.1f}")
    start, end = rss[0][1], rss[-1][1]
    print("server RSS (MiB) over the window: " + ", ".join(f"{t:.0f}s {r / 2**20:.0f}" for t, r in rss))
    print(f"server RSS start {start / 2**20:.1f} MiB, end {end / 2**20:.1f} MiB: {100 * (end - start) / start:+.2f} %")


def bench_soak(args: argparse.Namespace) -> None:
    clip = ROOT / "samples" / "sample_clip.mp4"
    with tempfile.TemporaryDirectory() as tmp:
        if not clip.exists():
            sys.path.insert(0, str(ROOT / "samples"))
            from client_click import make_clip  # type: ignore[import-not-found]

            clip = Path(tmp) / "clip.mp4"
            make_clip(str(clip))
        config = Path(tmp) / "soak.toml"
        config.write_text(
            "[server]\nlog_every_s = 10\nmax_clients = 512\n"
            "[limits]\nopens_per_s = 100.0\nopen_burst = 100.0\n"
            f"[sources]\ncam1 = {json.dumps(str(clip))}\ncam2 = {json.dumps(str(clip))}\n"
        )
        proc, url, log = _start_server(config, args.image_size, args.device)
        try:
            asyncio.run(_soak(url, args.clients, args.seconds, args.warmup, proc.pid))
        finally:
            proc.terminate()
            proc.wait(60)
        if args.verbose:
            print("".join(log))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=["multistream", "soak"])
    ap.add_argument("--model", default="sam2.1-tiny")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frames", type=int, default=20, help="multistream: frames per session measured")
    ap.add_argument("--warmup-frames", type=int, default=3)
    ap.add_argument("--sessions", default="1,2,4", help="multistream: session counts")
    ap.add_argument("--fps", type=float, default=30.0, help="multistream: frame rate of each push camera")
    ap.add_argument("--clients", type=int, default=50, help="soak: WebSocket clients")
    ap.add_argument("--seconds", type=float, default=60.0, help="soak: measured time")
    ap.add_argument("--warmup", type=float, default=10.0, help="soak: seconds before measuring")
    ap.add_argument("--verbose", action="store_true", help="soak: print the server's log")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, model {args.model}")
    for part in args.parts:
        if part == "multistream":
            model = build_model(args.model, random_weights_seed=0, device=args.device, image_size=args.image_size)
            print(f"device {next(model.parameters()).device}")
            bench_multistream(model, [int(n) for n in args.sessions.split(",")], args.frames, args.warmup_frames, args.fps)
        else:
            bench_soak(args)


if __name__ == "__main__":
    main()
