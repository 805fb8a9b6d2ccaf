"""Image mode through the server (issue 14), measured side by side in one run.

``live``: one live session (a push source fed at a camera's rate, one clicked
object) on a server, its processed frames/s in rounds that alternate **without**
and **with** image load: during a loaded round ``--clients`` clients each open
a new image (distinct pixels: real encoder work) and prompt it ``--prompts``
times, over and over. The inference worker runs at most one image batch
between two frame steps, so the live rate drops by the encoder's share, never
to zero. Reports frames/s per round, images opened and prompts answered.

``uploads``: ``--n`` clients upload distinct images at the same moment, through
the server, two ways in alternating rounds: **batched** (``[images] max_batch
= n``: the worker sends the pending images through the image encoder in one
call) and **one by one** (``max_batch = 1``). Reports images/s (wall time from
the first send to the last reply) and encoder calls. Batching pays on GPUs; on a
CPU one image at a time is about as fast (``bench/bench_images.py batch``).

Random weights (seeded): speed does not depend on what the weights are.

    .venv/bin/python bench/bench_server_images.py live --image-size 256 --rounds 2 --seconds 8
    .venv/bin/python bench/bench_server_images.py uploads --image-size 256 --n 4 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.app import ServerThread, TrackingServer  # noqa: E402
from server.client import Client  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from tests.frames import moving_shapes, shape_centres  # noqa: E402
from tracker.model import build_model  # noqa: E402

H, W = 240, 320


def _config(image_batch: int) -> ServerConfig:
    config = ServerConfig(sources={"cam": "push:cam"})
    config.server.port = 0
    config.server.log_every_s = 0
    config.images.max_batch = image_batch
    config.images.opens_per_s = 1000.0
    config.images.open_burst = 1000
    config.images.max_open_per_client = 1000
    config.limits.prompts_per_s = 1000.0
    config.limits.prompt_burst = 1000
    config.limits.prompt_timeout_s = 600.0  # a batch of 1024 px images on a busy CPU takes a while
    return config


def _png(seed: int, size: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------- live


async def _live(st: ServerThread, args: argparse.Namespace) -> list[dict]:
    frames = moving_shapes(12, H, W)
    viewer = Client(st.url, frame_buffer=4)
    await viewer.connect()
    session = await viewer.open("cam")
    source = st.server.manager.get(session.id).source
    source.push(frames[0], pts_s=0.0)
    first = await session.next_frame(timeout=120)
    cx, cy = shape_centres(0, H, W)[0]
    await session.click(cx, cy, frame=first.frame_idx)
    count = [0]
    session.on_frame = lambda f: count.__setitem__(0, count[0] + 1)
    stop = threading.Event()

    def camera() -> None:
        k = 1
        while not stop.wait(1.0 / args.fps):
            source.push(frames[k % len(frames)], pts_s=k / args.fps)
            k += 1

    threading.Thread(target=camera, daemon=True).start()
    loaders = [Client(st.url) for _ in range(args.clients)]
    for c in loaders:
        await c.connect()
    seed = [1000]
    rows = []

    async def load(c: Client, done: asyncio.Event, tally: dict) -> None:
        while not done.is_set():
            seed[0] += 1
            im = await c.open_image(_png(seed[0], args.upload_size))
            tally["images"] += 1
            for k in range(args.prompts):
                await im.segment(points=[[10 + k, 20 + k]], labels=[1], multimask=True)
                tally["prompts"] += 1
            await im.close()

    await asyncio.sleep(2.0)  # warm-up
    try:
        for r in range(args.rounds):
            for loaded in (False, True):
                tally = {"images": 0, "prompts": 0}
                done = asyncio.Event()
                tasks = [asyncio.create_task(load(c, done, tally)) for c in loaders] if loaded else []
                n0, t0 = count[0], time.perf_counter()
                await asyncio.sleep(args.seconds)
                n1, t1 = count[0], time.perf_counter()
                done.set()
                await asyncio.gather(*tasks)
                rows.append(
                    {"round": r, "image_load": loaded, "live_fps": (n1 - n0) / (t1 - t0), **tally,
                     "seconds": round(t1 - t0, 2)}
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop.set()
        for c in [viewer, *loaders]:
            await c.close()
    return rows


def bench_live(model: torch.nn.Module, args: argparse.Namespace) -> None:
    with ServerThread(TrackingServer(_config(args.clients), model)).start() as st:
        rows = asyncio.run(_live(st, args))
    for loaded in (False, True):
        fps = [r["live_fps"] for r in rows if r["image_load"] is loaded]
        print(f"live session, image load {'on ' if loaded else 'off'}: {statistics.mean(fps):.2f} frames/s "
              f"(rounds: {', '.join(f'{v:.2f}' for v in fps)})")
    on = [r for r in rows if r["image_load"]]
    secs = sum(r["seconds"] for r in on)
    print(f"meanwhile: {sum(r['images'] for r in on) / secs:.2f} images/s opened, "
          f"{sum(r['prompts'] for r in on) / secs:.2f} prompts/s answered")


# ---------------------------------------------------------------- uploads


async def _uploads(st: ServerThread, n: int, seed: int, size: int) -> tuple[float, int]:
    clients = [Client(st.url) for _ in range(n)]
    for c in clients:
        await c.connect()
    datas = [_png(seed + k, size) for k in range(n)]
    worker = st.server.worker
    calls0 = worker.image_batches
    t0 = time.perf_counter()
    images = await asyncio.gather(*(c.open_image(d) for c, d in zip(clients, datas)))
    dt = time.perf_counter() - t0
    assert not any(im.cached for im in images)
    calls = worker.image_batches - calls0
    for c in clients:
        await c.close()
    return n / dt, calls


def bench_uploads(model: torch.nn.Module, args: argparse.Namespace) -> None:
    results: dict[str, list[float]] = {"batched": [], "one by one": []}
    calls: dict[str, list[int]] = {"batched": [], "one by one": []}
    seed = 5000
    with ServerThread(TrackingServer(_config(args.n), model)).start() as batched, ServerThread(
        TrackingServer(_config(1), model)
    ).start() as single:
        asyncio.run(_uploads(batched, 1, 1, args.upload_size))  # warm-up
        for r in range(args.rounds):
            for name, st in (("batched", batched), ("one by one", single)):
                seed += args.n
                rate, n_calls = asyncio.run(_uploads(st, args.n, seed, args.upload_size))
                results[name].append(rate)
                calls[name].append(n_calls)
                print(json.dumps({"round": r, "mode": name, "images_per_s": round(rate, 3), "encoder_calls": n_calls}))
    for name in results:
        print(f"{args.n} concurrent uploads, {name}: {statistics.mean(results[name]):.3f} images/s "
              f"(encoder calls per round: {calls[name]})")
    ratio = statistics.mean(results["batched"]) / statistics.mean(results["one by one"])
    print(f"batched / one by one: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["live", "uploads"])
    parser.add_argument("--image-size", type=int, default=256, help="the model's input size")
    parser.add_argument("--upload-size", type=int, default=512, help="side of the uploaded images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="live: length of each round")
    parser.add_argument("--fps", type=float, default=30.0, help="live: the camera's rate")
    parser.add_argument("--clients", type=int, default=2, help="live: clients loading images")
    parser.add_argument("--prompts", type=int, default=5, help="live: prompts per opened image")
    parser.add_argument("--n", type=int, default=4, help="uploads: concurrent uploads")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model("sam2.1-tiny", device=args.device, image_size=args.image_size, random_weights_seed=0)
    print(f"model sam2.1-tiny (random weights) at {args.image_size} px on {args.device}, torch threads "
          f"{torch.get_num_threads()}")
    (bench_live if args.what == "live" else bench_uploads)(model, args)


if __name__ == "__main__":
    main()
