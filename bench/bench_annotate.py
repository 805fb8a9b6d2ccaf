"""Offline annotation and image-mode benchmarks, measured side by side in one run.

``video``: a generated clip (JPEG folder, the input both tools read) annotated by
``sam2-stream annotate`` (decode and resize on threads a few frames ahead of
the model, bounded state) and by Meta's ``SAM2VideoPredictor`` (``init_state``
loads every frame, then ``propagate_in_video``) with the same model and prompt;
both take every frame's masks to host memory, as a writer must. Each runs in
its own process so peak RSS is its own. Prints frames/s, the ratio, peak RSS
(and peak GPU memory on CUDA) and RSS at 10% vs 100% of the frames (flat =
bounded). ``--size`` sets the frames' size: decoding and resizing 1080p frames
is what the overlap hides; ``--device cuda`` runs both under bf16 autocast, as
Meta's examples do; ``--precision bf16`` runs both under bf16 autocast on the CPU
too (about 2x faster on CPUs with AVX512-BF16 or AMX).

``precision``: ``annotate`` in float32 vs under bf16 autocast (``--precision bf16``),
alternating rounds on the same clip.

``images``: image mode on a folder in one process (one model load, one
embedding per image) vs one ``sam2-stream segment`` process per image.

    .venv/bin/python bench/bench_annotate.py video --frames 3000
    .venv/bin/python bench/bench_annotate.py video --frames 300 --size 1920x1080
    .venv/bin/python bench/bench_annotate.py video --frames 300 --precision bf16 --rounds 3
    .venv/bin/python bench/bench_annotate.py precision --frames 300 --rounds 3
    .venv/bin/python bench/bench_annotate.py images --images 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def make_clip(folder: Path, n: int, h: int, w: int) -> None:
    """``n`` JPEGs cycling through 60 distinct moving-shapes frames (encoded once each)."""
    import io

    from PIL import Image

    from tests.frames import moving_shapes

    encoded = []
    for img in moving_shapes(60, h, w):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"{i:05d}.jpg").write_bytes(encoded[i % len(encoded)])


WORKER = r'''
import json, sys, time, threading, resource
import psutil, torch
sys.path.insert(0, {root!r})
from tracker.model import autocast_context, build_model, pick_device
which, folder, n, size, device, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
torch.set_num_threads({threads})
device = pick_device(device)
model = build_model("sam2.1-tiny", random_weights_seed=0, device=str(device), image_size=size, precision=precision)
from tracker.annotate import Prompt, annotate  # imported (PyAV, OpenCV) before the clock starts
proc = psutil.Process()
marks = {{}}
point = [[0.2 * {W}, 0.3 * {H}]]
t0 = time.perf_counter()
done = 0
def mark(i):
    if i + 1 in (max(1, n // 10), n):
        marks[i + 1] = proc.memory_info().rss
if which == "ours":
    for i, r in enumerate(annotate(folder, [Prompt(1, 0, points_xy=point, labels=[1])], model=model, checkpoint_every=0)):
        done += 1; mark(i)
else:
    with torch.inference_mode(), autocast_context(device, precision):
        state = model.init_state(folder, offload_video_to_cpu=True)
        model.add_new_points_or_box(state, 0, 1, points=point, labels=[1])
        for i, (f, ids, masks) in enumerate(model.propagate_in_video(state)):
            binary = (masks > 0).cpu().numpy()
            done += 1; mark(i)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
print(json.dumps({{"frames": done, "seconds": dt, "peak_rss": peak, "peak_gpu": gpu, "marks": marks, "device": str(device)}}))
'''


def run_worker(
    which: str, folder: Path, n: int, size: int, threads: int, hw: tuple[int, int], device: str, precision: str
) -> dict:
    code = WORKER.format(root=str(ROOT), threads=threads, W=hw[1], H=hw[0])
    out = subprocess.run(
        [sys.executable, "-c", code, which, str(folder), str(n), str(size), device, precision],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternate(
    contenders: dict[str, tuple[str, str]], n: int, size: int, threads: int, hw: tuple[int, int], device: str, rounds: int
) -> dict[str, list[dict]]:
    """Run each contender (label: (which, precision)) once per round, in turn, on one clip."""
    runs: dict[str, list[dict]] = {label: [] for label in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clip"
        make_clip(folder, n, *hw)
        for _ in range(rounds):
            for label, (which, precision) in contenders.items():
                runs[label].append(run_worker(which, folder, n, size, threads, hw, device, precision))
    return runs


def bench_video(n: int, size: int, threads: int, hw: tuple[int, int], device: str, precision: str, rounds: int) -> None:
    """``rounds`` > 1 alternates the two (ours, meta, ours, meta, ...): on a shared
    machine speed drifts by 10% within minutes, so one run each can mislead."""
    h, w = hw
    runs = alternate({"ours": ("ours", precision), "meta": ("meta", precision)}, n, size, threads, hw, device, rounds)
    print(
        f"== annotate: {n} frames {w}x{h} (JPEG folder), sam2.1-tiny random weights, image_size {size}, "
        f"{runs['ours'][0]['device']}, precision {precision}, {threads} CPU threads, {rounds} round(s)"
    )
    for i in range(rounds):
        for which in runs:
            r = runs[which][i]
            m = {int(k): v for k, v in r["marks"].items()}
            lo, hi = min(m), max(m)
            gpu = f", peak GPU {r['peak_gpu'] / 2**20:7.1f} MiB" if r["peak_gpu"] is not None else ""
            print(
                f"  {which:5s}: {fps(r):6.2f} frames/s ({r['seconds']:.1f} s), peak RSS {r['peak_rss'] / 2**20:7.1f} MiB"
                f"{gpu}, RSS frame {lo} -> {hi}: {(m[hi] - m[lo]) / m[lo]:+.1%}"
            )
    ratios = sorted(fps(o) / fps(m) for o, m in zip(runs["ours"], runs["meta"]))
    spread = f" (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})" if rounds > 1 else ""
    peak = max(r["peak_rss"] for r in runs["ours"]) / max(r["peak_rss"] for r in runs["meta"])
    print(f"  throughput ours / meta: {statistics.median(ratios):.2f}x{spread} (goal >= 1.2x);  "
          f"peak RSS ours / meta: {peak:.2f}")


def bench_precision(n: int, size: int, threads: int, hw: tuple[int, int], device: str, rounds: int) -> None:
    """``annotate`` in float32 vs under bf16 autocast, alternating, on the same clip."""
    from tracker.model import cpu_has_native_bf16

    h, w = hw
    runs = alternate({"fp32": ("ours", "fp32"), "bf16": ("ours", "bf16")}, n, size, threads, hw, device, rounds)
    native = "native bf16" if cpu_has_native_bf16() else "NO native bf16 (emulated)"
    print(f"== annotate precision: {n} frames {w}x{h}, image_size {size}, {runs['fp32'][0]['device']} ({native}), "
          f"{threads} CPU threads, {rounds} round(s)")
    for precision, rs in runs.items():
        print(f"  {precision}: " + ", ".join(f"{fps(r):6.2f}" for r in rs) + " frames/s")
    ratios = sorted(fps(b) / fps(f) for f, b in zip(runs["fp32"], runs["bf16"]))
    print(f"  bf16 / fp32: {statistics.median(ratios):.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})")


def fps(run: dict) -> float:
    return run["frames"] / run["seconds"]


def bench_images(count: int, size: int) -> None:
    from PIL import Image

    from tests.frames import moving_shapes

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        for i, img in enumerate(moving_shapes(count, 480, 640, seed=1)):
            Image.fromarray(img).save(folder / f"{i:03d}.jpg")
        common = ["--random-weights", "0", "--image-size", str(size), "--device", "cpu", "--point", "100,100", "--box", "2:300,200,400,320"]
        cmd = [sys.executable, "-m", "tracker.cli", "segment"]
        t0 = time.perf_counter()
        subprocess.run(cmd + [str(folder)] + common, check=True, capture_output=True, cwd=ROOT)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        for img in sorted(folder.iterdir()):
            subprocess.run(cmd + [str(img)] + common, check=True, capture_output=True, cwd=ROOT)
        many = time.perf_counter() - t0
    print(f"== image mode: {count} images 640x480, 2 prompts each, image_size {size}")
    print(f"  one process for the folder: {count / one:6.2f} images/s ({one:.1f} s)")
    print(f"  one process per image     : {count / many:6.2f} images/s ({many:.1f} s)")
    print(f"  speed-up: {many / one:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=["video", "precision", "images"])
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--size", default="160x120", help="video frames' WIDTHxHEIGHT (default 160x120)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate ours and Meta's this many times (median ratio)")
    ap.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16, for both predictors (default auto)")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    for part in args.parts:
        if part == "video":
            bench_video(args.frames, args.image_size, args.threads, (h, w), args.device, args.precision, args.rounds)
        elif part == "precision":
            bench_precision(args.frames, args.image_size, args.threads, (h, w), args.device, args.rounds)
        else:
            bench_images(args.images, args.image_size)


if __name__ == "__main__":
    main()
