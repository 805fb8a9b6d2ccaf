"""The per-frame latency a session host on Ray adds, next to the same session in-process.

One ``push:`` session with one object, frames pushed one at a time and each
result awaited: embedded (a ``SessionManager`` in this process, the result
through a subscriber) and on a ``SessionHost`` actor of a local 2-node Ray
cluster (the frame relayed by an actor call, the result pulled with ``poll``:
front → host → front). Prints p50/p99 of push-to-result per frame for both,
in alternating rounds, and the start-up time of a cluster session (host actor
with its model, then ``open``). Both run the model on one CPU thread.

Run as root it re-executes itself in a loopback-only network namespace
(``unshare -n``), as the tests do; ``--no-netns`` runs it where it is.

    .venv/bin/python bench/bench_ray_hosts.py --frames 30 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_ray_annotate import MIB, reexec_in_netns  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def latency_args(doc: str, rounds: int) -> argparse.Namespace:
    """The Ray latency benchmarks' flags; as root, the rest runs in a loopback-only namespace with token auth."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=30, help="frames per round")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--no-netns", action="store_true")
    args = p.parse_args()
    if not args.no_netns:
        reexec_in_netns()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    return args


def main() -> None:
    args = latency_args(__doc__ or "", rounds=2)

    import ray
    import torch
    from ray.cluster_utils import Cluster

    from server.ray_hosts import SessionDirectory, start_hosts
    from tests.frames import moving_shapes, shape_centres
    from tracker.annotate_many import ModelSpec
    from tracker.ingest import open_source
    from tracker.session import InferenceWorker, SessionManager

    torch.set_num_threads(1)
    h, w = 240, 320
    frames = moving_shapes(args.frames + 1, h, w, seed=1)
    point = [list(shape_centres(0, h, w)[0])]
    spec = ModelSpec(model="sam2.1-tiny", device="cpu", image_size=args.image_size, random_weights=0)
    node = dict(num_cpus=1, memory=1024 * MIB, object_store_memory=96 * MIB)
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster.wait_for_nodes()
    model = spec.build()
    lat: dict[str, list[float]] = {"embedded": [], "ray host": []}
    startup = []
    try:
        for r in range(args.rounds):
            for kind in (["embedded", "ray host"] if r % 2 == 0 else ["ray host", "embedded"]):
                if kind == "embedded":
                    worker = InferenceWorker(model, max_batch=1)
                    manager = SessionManager(worker)
                    source = open_source("push:bench", mode="live")
                    session = manager.open(source, name="bench")
                    got: list = []
                    session.subscribe(lambda item: got.append(item) if hasattr(item, "objects") else None)
                    for i, image in enumerate(frames):
                        t0, n = time.perf_counter(), len(got)
                        source.push(image)
                        while len(got) == n:
                            time.sleep(0.0005)
                        if i == 0:
                            session.add_prompt(1, points_xy=point, labels=[1], frame_idx=got[0].frame_idx).result(60)
                        else:
                            lat[kind].append(time.perf_counter() - t0)
                    manager.close_all()
                    worker.stop()
                else:
                    t0 = time.perf_counter()
                    hosts = start_hosts(spec, 1, directory=ray.remote(SessionDirectory).remote())
                    host = next(iter(hosts.values()))
                    sid = ray.get(host.open.remote("push:bench", name="bench"))["session_id"]
                    startup.append(time.perf_counter() - t0)
                    seq = 0
                    for i, image in enumerate(frames):
                        t0 = time.perf_counter()
                        ray.get(host.push.remote(sid, image))
                        result = None
                        while result is None:
                            for rec in ray.get(host.poll.remote(sid, seq, 5.0)):
                                seq = rec["seq"]
                                if rec["kind"] == "result":
                                    result = rec
                        if i == 0:
                            ray.get(host.add_prompt.remote(sid, 1, points_xy=point, labels=[1], frame_idx=result["frame_idx"]))
                        else:
                            lat[kind].append(time.perf_counter() - t0)
                    ray.kill(host, no_restart=True)
                print(f"round {r + 1} {kind:>8}: p50 {percentile(lat[kind][-args.frames:], 50) * 1e3:.0f} ms", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"\n{args.frames} frames x {args.rounds} rounds, {w}x{h} frames, model at {args.image_size} px, 1 CPU thread")
    for kind, values in lat.items():
        print(f"{kind:>8}: push-to-result p50 {percentile(values, 50) * 1e3:.0f} ms, p99 {percentile(values, 99) * 1e3:.0f} ms")
    p50 = percentile(lat["ray host"], 50) - percentile(lat["embedded"], 50)
    print(f"the Ray path adds {p50 * 1e3:+.0f} ms at p50; cluster session start-up (host + model + open) "
          f"median {statistics.median(startup):.1f} s")


if __name__ == "__main__":
    main()
