"""``serve --ray`` next to the embedded server: the per-frame latency the Ray path adds,
through the WebSocket, and the start-up of a cluster front and session.

Two servers on the same machine and the same configured ``push:`` source, with the
same model: the embedded server (sessions in its process) and a front whose sessions
run on a session host of a local 2-node Ray cluster (``[cluster] address``). One
client each; one object clicked on the first frame, then frames pushed one at a
time and each awaited at the client: push → result on the client's socket. For the
Ray front the frame is relayed to the host (an actor call), the result pulled back
by the front's poll and fanned out: front → host → front → client. Rounds alternate
between the two (this machine drifts ±10 %). The model runs on one CPU thread in
both.

Also: the start-up of the Ray front (joining the cluster, starting the host actor
with its model) and of a session on it (open → first frame's result).

Run as root it re-executes itself in a loopback-only network namespace
(``unshare -n``), as the tests do; ``--no-netns`` runs it where it is.

    .venv/bin/python bench/bench_ray_serve.py --frames 30 --rounds 4
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_ray_annotate import MIB  # noqa: E402
from bench.bench_ray_hosts import latency_args, percentile  # noqa: E402


def make_config(image_size: int, cluster_address: str | None):  # type: ignore[no-untyped-def]
    from server.config import ClusterSection, ModelSection, ServerConfig, SourceEntry

    cfg = ServerConfig(sources={"cam": SourceEntry(uri="push:cam")})
    cfg.server.port = 0
    cfg.model = ModelSection(name="sam2.1-tiny", device="cpu", image_size=image_size, random_weights=0)
    cfg.limits.prompts_per_s = 1000
    if cluster_address is not None:
        cfg.cluster = ClusterSection(address=cluster_address, hosts=1, host_cpus=1)
    return cfg


async def drive(server, url: str, frames, point) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    """Push each frame and await it at the client; latencies after the click, and open → first result."""
    from server.client import Client

    lat = []
    async with Client(url) as c:
        t_open = time.perf_counter()
        s = await c.open("cam")
        last = None
        for i, image in enumerate(frames):
            t0 = time.perf_counter()
            await asyncio.to_thread(server.manager.get(s.id).source.push, image)
            while True:
                f = await s.next_frame(timeout=60)
                if last is None or f.frame_idx > last:
                    break
            last = f.frame_idx
            if i == 0:
                first_s = time.perf_counter() - t_open
                await s.add_points([point], [1], frame=f.frame_idx)
            else:
                lat.append(time.perf_counter() - t0)
        await s.close()
    return lat, first_s


def main() -> None:
    args = latency_args(__doc__ or "", rounds=4)

    import ray
    import torch
    from ray.cluster_utils import Cluster

    from server.app import ServerThread, TrackingServer
    from tests.frames import moving_shapes, shape_centres
    from tracker.model import build_model

    torch.set_num_threads(1)
    h, w = 240, 320
    frames = moving_shapes(args.frames + 1, h, w, seed=1)
    point = tuple(float(v) for v in shape_centres(0, h, w)[0])
    node = dict(num_cpus=1, memory=1024 * MIB, object_store_memory=96 * MIB)
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False, namespace="sam2-stream")
    cluster.wait_for_nodes()
    model = build_model("sam2.1-tiny", device="cpu", image_size=args.image_size, random_weights_seed=0)
    lat: dict[str, list[float]] = {"embedded": [], "ray front": []}
    first: dict[str, list[float]] = {"embedded": [], "ray front": []}
    t0 = time.perf_counter()
    front = ServerThread(TrackingServer(make_config(args.image_size, cluster.address), model)).start(300)
    front_start_s = time.perf_counter() - t0
    embedded = ServerThread(TrackingServer(make_config(args.image_size, None), model)).start()
    try:
        for r in range(args.rounds):
            for kind in (["embedded", "ray front"] if r % 2 == 0 else ["ray front", "embedded"]):
                st = embedded if kind == "embedded" else front
                values, first_s = asyncio.run(drive(st.server, st.url, frames, point))
                lat[kind] += values
                first[kind].append(first_s)
                print(f"round {r + 1} {kind:>9}: p50 {percentile(values, 50) * 1e3:.0f} ms", flush=True)
                time.sleep(1.5)  # the closed session leaves the host's table
    finally:
        front.stop()
        embedded.stop()
        ray.shutdown()
        cluster.shutdown()
    print(f"\n{args.frames} frames x {args.rounds} rounds, {w}x{h} frames, model at {args.image_size} px, 1 CPU thread, "
          "push -> result at the WebSocket client")
    print("| server | p50 ms | p99 ms | open -> first result, median s |")
    print("|---|---:|---:|---:|")
    for kind, values in lat.items():
        print(f"| {kind} | {percentile(values, 50) * 1e3:.0f} | {percentile(values, 99) * 1e3:.0f} | "
              f"{statistics.median(first[kind]):.2f} |")
    add50 = percentile(lat["ray front"], 50) - percentile(lat["embedded"], 50)
    add99 = percentile(lat["ray front"], 99) - percentile(lat["embedded"], 99)
    print(f"\nthe Ray path adds {add50 * 1e3:+.0f} ms at p50, {add99 * 1e3:+.0f} ms at p99; start-up of the Ray front "
          f"(join the cluster, start a host actor with its model) {front_start_s:.1f} s")


if __name__ == "__main__":
    main()
