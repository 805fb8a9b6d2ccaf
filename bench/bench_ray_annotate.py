"""Annotating many videos on Ray: throughput with 1 vs 2 workers, and the start-up time.

Generates ``--videos`` clips (each with a prompts file), starts a local Ray
cluster of 2 nodes with 1 CPU each (``ray.cluster_utils.Cluster``, token auth,
memory and object store set), then annotates the whole folder in alternating
rounds: the actor pool with 1 worker, with 2 workers, and (``--local``) one
video after another in this process as ``annotate FOLDER`` does without Ray.
Prints, per configuration, the median frames/s over the rounds and each
round's time to its first video started (worker actor up, model loaded), plus
the cluster's own start-up time.

On a 2-core machine expect parity between 1 and 2 workers (two 1-thread workers
vs one): the point is the pool's overhead, not a speedup. Run as root it
re-executes itself in a loopback-only network namespace (``unshare -n``), as the
tests do, since Ray binds to the machine's routable address; ``--no-netns``
runs it where it is.

    .venv/bin/python bench/bench_ray_annotate.py --videos 4 --frames 24 --rounds 2
    .venv/bin/python bench/bench_ray_annotate.py --videos 8 --frames 48 --rounds 3 --local
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20


def reexec_in_netns() -> None:
    """As root, once: run this script again inside a loopback-only network namespace."""
    if os.environ.get("SAM2_STREAM_RAY_NETNS") == "1" or os.geteuid() != 0 or not shutil.which("unshare"):
        return
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env = {**os.environ, "SAM2_STREAM_RAY_NETNS": "1", "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        code = subprocess.call(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                                sys.executable, *sys.argv], env=env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(code)


def make_videos(folder: Path, count: int, frames: int, size_hw: tuple[int, int]) -> None:
    from tests.videogen import make_clip

    for i in range(count):
        make_clip(folder / f"v{i}.mp4", n_frames=frames, size_hw=size_hw)
        h, w = size_hw
        prompts = [{"obj_id": 1, "frame": frames // 4, "points": [[w * 0.3, h * 0.5]]},
                   {"obj_id": 2, "frame": frames // 4, "box": [w * 0.55, h * 0.2, w * 0.9, h * 0.8]}]
        (folder / f"v{i}.json").write_text(json.dumps({"prompts": prompts}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=24, help="frames per video")
    p.add_argument("--size", default="320x240", help="video WxH")
    p.add_argument("--image-size", type=int, default=256, help="model input size")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local", action="store_true", help="also one video after another in this process (no Ray)")
    p.add_argument("--no-netns", action="store_true", help="do not re-execute in a loopback-only namespace")
    args = p.parse_args()
    if not args.no_netns:
        reexec_in_netns()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))

    import ray
    from ray.cluster_utils import Cluster

    from server.ray_annotate import run_on_ray
    from server.ray_cluster import WorkerShape
    from tracker.annotate_many import AnnotateOptions, JobProgress, ModelSpec, find_videos, run_local

    w, h = (int(v) for v in args.size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench-ray-annotate-"))
    (work / "videos").mkdir()
    make_videos(work / "videos", args.videos, args.frames, (h, w))
    spec = ModelSpec(model="sam2.1-tiny", device="cpu", image_size=args.image_size, random_weights=0)
    options = AnnotateOptions(formats=("coco",), model_name="sam2.1-tiny")
    node = dict(num_cpus=1, memory=1024 * MIB, object_store_memory=96 * MIB)

    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster.wait_for_nodes()
    cluster_s = time.perf_counter() - t0
    print(f"cluster: head + 1 worker node up and joined in {cluster_s:.1f} s")
    configs = ["1 worker", "2 workers"] + (["local"] if args.local else [])
    rates: dict[str, list[float]] = {c: [] for c in configs}
    firsts: dict[str, list[float]] = {c: [] for c in configs}
    try:
        for r in range(args.rounds):
            for config in configs if r % 2 == 0 else configs[::-1]:
                out = work / f"out-{r}-{config.replace(' ', '')}"
                jobs = find_videos(work / "videos", out)
                progress = JobProgress(len(jobs))
                start = time.perf_counter()
                first: list[float] = []
                if config == "local":
                    import torch

                    torch.set_num_threads(2)
                    run_local(jobs, options, spec, progress=progress)
                else:
                    def on_event(event, first=first) -> None:  # type: ignore[no-untyped-def]
                        if event.kind == "started" and not first:
                            first.append(time.perf_counter() - start)

                    run_on_ray(jobs, options, spec, workers=int(config[0]), shape=WorkerShape(num_cpus=1),
                               progress=progress, on_event=on_event)
                dt = time.perf_counter() - start
                assert progress.failed == 0, progress.summary()
                rates[config].append(progress.frames / dt)
                firsts[config].append(first[0] if first else 0.0)
                print(f"round {r + 1} {config:>9}: {progress.frames} frames in {dt:.1f} s = {progress.frames / dt:.2f} "
                      f"frames/s" + (f", first video started after {first[0]:.1f} s" if first else ""), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.videos} videos x {args.frames} frames at {w}x{h}, model at {args.image_size} px, {args.rounds} rounds")
    for config in configs:
        line = f"{config:>9}: median {statistics.median(rates[config]):.2f} frames/s"
        if config != "local":
            line += f"; start-up (worker actor + model) median {statistics.median(firsts[config]):.1f} s"
        print(line)


if __name__ == "__main__":
    main()
