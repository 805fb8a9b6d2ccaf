"""Model families side by side (issue 12): EdgeTAM, SAM 2.1 tiny and SAM 3's
tracker, each through its streaming predictor (``tracker.families.make_predictor``).

Two parts:

* ``speed``: per-frame time of ``track()`` at the models' own resolution
  (1024 px; SAM 3's tracker 1008 px) on 640x480 frames, full-size
  architectures with seeded random weights (speed does not depend on what the
  weights are), in ONE process, in alternating rounds (edgetam, sam2.1-tiny,
  sam3-tracker, then again ...: on a shared machine speed drifts within
  minutes), fp32 and bf16 autocast, one object and four (points on frame 0,
  ``--warmup`` frames, then ``--frames`` timed frames). Prints wall ms/frame,
  the process's CPU ms/frame (with one torch thread: the work without the waits
  for a core on a loaded machine), frames/s, the image encoder's share
  (transformers families), and frames/s relative to sam2.1-tiny (paired within
  each round, then the median). The issue's goal: edgetam >= 5x sam2.1-tiny's
  frames/s. On a CPU without native bf16 (AVX512-BF16 / AMX) bf16 is
  emulated: it is measured all the same and the header says so.
  SAM 3's tracker costs minutes per frame on a 2-core CPU, so by default it
  runs in the first round only, fp32, one object, one timed frame
  (``--sam3-*`` options); emulated bf16 (8-25x slower than fp32 here) runs in
  the first round only, one object (``--bf16-*``). The default speed run,
  from the CPU times measured here: ~13 minutes on this 2-core machine when
  quiet (several times that under other load); the default memory run ~30
  (edgetam ~0.2 s, sam2.1-tiny ~0.45 s per 256 px frame; ``--parallel`` halves it).
* ``memory``: RSS of a process streaming ``--memory-frames`` small frames
  (160x120; sam2.1-tiny at ``--memory-size``, EdgeTAM at no less than 256
  px, where its perceiver's 16x16 latent grid fits) with one object prompted
  on frame 0, at 30 frames/s of timestamps (the 2 s prompt window), sampled
  every ``--every`` frames; RSS growth from frame 200 to the last (goal <= 5 %)
  and ``stored_entries()`` at the end. Each model runs in its own subprocess,
  so the RSS is its own (``--parallel``: all at once). SAM 3's full tracker
  only takes multiples of 336 px and costs seconds per frame here, so by
  default its memory run uses the *reduced* test variant of the same
  architecture (``FAMILIES["sam3-tracker"].config(reduced=True)``: a narrow
  two-layer ViT, the same memory design and pruning) at 224 px;
  ``--sam3-full-memory`` runs the full one at 336 px.

Both parts set the process's allocator as ``sam2-stream`` does
(``tracker.allocator.keep_freed_memory``: large buffers from the heap, reused
frame after frame, for every model alike); ``--malloc system`` keeps glibc's
defaults, to measure what that setting is worth (two runs, alternated).

The figures measured here, and the exact commands, are in bench/RESULTS_families.md.

    .venv/bin/python bench/bench_families.py speed memory --json /tmp/families.json   # the defaults
    .venv/bin/python bench/bench_families.py speed --precisions fp32 --json /tmp/speed.json
    .venv/bin/python bench/bench_families.py speed --models edgetam,sam2.1-tiny --precisions bf16 --rounds 1
    .venv/bin/python bench/bench_families.py memory --parallel --models edgetam,sam2.1-tiny --memory-size 128
    .venv/bin/python bench/bench_families.py speed --image-size 256 --frames 1 --rounds 1   # a quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tracker.allocator import ENV as ALLOCATOR_ENV  # noqa: E402
from tracker.allocator import freed_memory_kept, keep_freed_memory  # noqa: E402

MODELS = ("edgetam", "sam2.1-tiny", "sam3-tracker")
#: EdgeTAM as transformers ships it, without tracker.families.speedups (speed only:
#: the same weights and outputs, to show what the speed-ups gain side by side)
SHIPPED = "edgetam-shipped"
SPEED_MODELS = (*MODELS, SHIPPED)
BASELINE = "sam2.1-tiny"
#: the resolution each model's official weights use (the speed part's)
NATIVE_SIZE = {"edgetam": 1024, SHIPPED: 1024, "sam2.1-tiny": 1024, "sam3-tracker": 1008}
#: frames after the prompt frame before the steady state: SAM 2's and EdgeTAM's
#: memory bank (num_maskmem = 7: the prompt frame and the 6 latest) is full from then on
STEADY_WARMUP = 6
#: the speed part's frames (a camera's VGA; track() resizes them)
SPEED_HW = (480, 640)
#: the memory part's frames and model sizes
MEMORY_HW = (120, 160)
MEMORY_SIZE = {"edgetam": 256, "sam2.1-tiny": 256, "sam3-tracker": 224}
EDGETAM_MIN_SIZE = 256  # its perceiver's 2D latents are a 16 x 16 grid over the s/16 feature map
SAM3_FULL_MEMORY_SIZE = 336  # the smallest the full tracker takes: 14-px patches, windows of 24


# ---------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (they mean nothing without it)."""
    from tracker.model import cpu_has_native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "malloc": "kept freed memory" if freed_memory_kept() else "system",
    }


def build(name: str, image_size: int, *, reduced: bool = False, device: str = "cpu") -> torch.nn.Module:
    """A model with seeded random weights (``reduced``: the family's test variant)."""
    if name == SHIPPED:
        from tracker.families import build_family_model

        return build_family_model("edgetam", device=torch.device(device), image_size=image_size, random_weights_seed=0, fast=False)
    if reduced:
        from tracker.families import build_family_model

        return build_family_model(
            name, device=torch.device(device), image_size=image_size, random_weights_seed=0, reduced=True
        )
    from tracker.model import build_model

    return build_model(name, device=device, image_size=image_size, random_weights_seed=0)


def speed_size(name: str, override: int | None) -> int:
    """The speed part's image size: the model's own, or ``--image-size`` for a
    quick run (SAM 3's full tracker: rounded down to a multiple of 336, at least 336)."""
    if override is None:
        return NATIVE_SIZE[name]
    if name == "sam3-tracker":
        return max(SAM3_FULL_MEMORY_SIZE, override // SAM3_FULL_MEMORY_SIZE * SAM3_FULL_MEMORY_SIZE)
    return override


def clicks_for(n_objects: int, hw: tuple[int, int]) -> list[list[float]]:
    """One positive click per object on frame 0: the three shapes' centres, then
    beside them (a fourth object is a second click-prompted object on shape 0)."""
    from tests.frames import shape_centres

    centres = shape_centres(0, *hw)
    return [[centres[k % 3][0] + 6 * (k // 3), centres[k % 3][1]] for k in range(n_objects)]


# ---------------------------------------------------------------------------- speed


@dataclass
class SpeedRun:
    """One timed stream: a model, a precision, a number of objects, one round."""

    model: str
    precision: str
    objects: int
    round: int
    image_size: int
    frame_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    encoder_ms: list[float] = field(default_factory=list)
    #: wall ms of the first frame after the prompt frame (one memory in the bank)
    first_ms: float = float("nan")

    @property
    def ms(self) -> float:
        return statistics.mean(self.frame_ms)

    @property
    def cpu(self) -> float:
        return statistics.mean(self.cpu_ms)

    @property
    def encoder(self) -> float:
        return statistics.mean(self.encoder_ms) if self.encoder_ms else float("nan")


def _timed(fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        into.append(1000 * (time.perf_counter() - t0))
        return out

    return wrapper


def time_stream(
    model: torch.nn.Module, frames: list[np.ndarray], clicks: list[list[float]], warmup: int, n_timed: int, **options: Any
) -> tuple[list[float], list[float], list[float], float]:
    """Points on frame 0, ``warmup`` frames, then ``n_timed`` timed ``track()``
    calls; (wall ms per frame, process CPU ms per frame, ms of the image
    encoder in each of those frames: SAM 3 / EdgeTAM only, where ``track``
    goes through ``forward_batch``; wall ms of frame 1, the first after the
    prompt frame, where the memory bank holds one frame). With one torch
    thread on a shared machine the CPU time is the work itself, the wall time
    includes the waits for a core. ``options``: the predictor's (e.g.
    ``batch_objects``)."""
    from tracker.families import make_predictor

    pred = make_predictor(model, return_logits=False, **options)
    encoder: list[float] = []
    pred.forward_batch = _timed(pred.forward_batch, encoder)  # the encoder's share, at no cost
    pred.track(frames[0])
    for k, xy in enumerate(clicks):
        pred.add_prompt(k + 1, points_xy=[xy], labels=[1])
    first = float("nan")
    for f in range(1, 1 + warmup):
        t0 = time.perf_counter()
        pred.track(frames[f % len(frames)])
        if f == 1:
            first = 1000 * (time.perf_counter() - t0)
    encoder.clear()
    times, cpu = [], []
    for f in range(1 + warmup, 1 + warmup + n_timed):
        t0, c0 = time.perf_counter(), time.process_time()
        pred.track(frames[f % len(frames)])
        times.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    pred.close()
    return times, cpu, list(encoder), times[0] if warmup == 0 else first


def bench_speed(args: argparse.Namespace) -> dict[str, Any]:
    from tests.frames import moving_shapes
    from tracker.model import check_precision, cpu_has_native_bf16

    models = args.models
    frames = moving_shapes(max(8, 1 + args.warmup + args.frames), *SPEED_HW)
    built: dict[str, torch.nn.Module] = {}
    for name in models:
        t0 = time.perf_counter()
        built[name] = build(name, speed_size(name, args.image_size))
        logging.getLogger("bench").info("built %s in %.1f s", name, time.perf_counter() - t0)
    for p in {*args.precisions, *args.sam3_precisions}:
        check_precision(p, torch.device("cpu"))
    runs: list[SpeedRun] = []
    for r in range(args.rounds):
        for name in models:  # the alternation: every model once per round, in turn
            slow = name == "sam3-tracker"
            if slow and r >= args.sam3_rounds:
                continue
            net = built[name]
            warmup, n_timed = (args.sam3_warmup, args.sam3_frames) if slow else (args.warmup, args.frames)
            for precision in args.sam3_precisions if slow else args.precisions:
                emulated = precision == "bf16" and not cpu_has_native_bf16()
                if emulated and r >= args.bf16_rounds:
                    continue
                net.autocast_precision = precision  # read by each new predictor
                counts = (args.sam3_objects or args.objects) if slow else args.objects
                for n_obj in [n for n in counts if not emulated or n in (args.bf16_objects or counts)]:
                    run = SpeedRun(name, precision, n_obj, r, speed_size(name, args.image_size))
                    run.frame_ms, run.cpu_ms, run.encoder_ms, run.first_ms = time_stream(
                        net, frames, clicks_for(n_obj, SPEED_HW), warmup, n_timed
                    )
                    runs.append(run)
                    print(
                        f"  round {r + 1}/{args.rounds} {name:15s} {precision:4s} {n_obj} obj: "
                        f"{run.ms:9.1f} ms/frame, CPU {run.cpu:9.1f} ms (encoder {run.encoder:8.1f} ms)",
                        flush=True,
                    )
    return {"runs": [dict(asdict(x), ms=x.ms, cpu=x.cpu, encoder=x.encoder) for x in runs], "summary": summarise_speed(runs, models, args)}


def summarise_speed(runs: list[SpeedRun], models: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median over rounds per (model, precision, objects); the ratio to the
    baseline is paired within each round (same minutes, same machine load)."""
    rows = []
    for name in models:
        for precision in sorted({*args.precisions, *args.sam3_precisions}, reverse=True):
            for n_obj in sorted({*args.objects, *(args.sam3_objects or [])}):
                mine = [x for x in runs if (x.model, x.precision, x.objects) == (name, precision, n_obj)]
                if not mine:
                    continue
                base = {x.round: x for x in runs if (x.model, x.precision, x.objects) == (BASELINE, precision, n_obj)}
                ms = [x.ms for x in mine]
                ratios = sorted(base[x.round].ms / x.ms for x in mine if x.round in base)
                cpu_ratios = sorted(base[x.round].cpu / x.cpu for x in mine if x.round in base)
                first_ratios = sorted(base[x.round].first_ms / x.first_ms for x in mine if x.round in base)
                rows.append(
                    {
                        "model": name,
                        "image_size": mine[0].image_size,
                        "precision": precision,
                        "objects": n_obj,
                        "ms_per_frame": statistics.median(ms),
                        "ms_min": min(ms),
                        "ms_max": max(ms),
                        "frames_per_s": 1000 / statistics.median(ms),
                        "cpu_ms_per_frame": statistics.median(x.cpu for x in mine),
                        "cpu_frames_per_s": 1000 / statistics.median(x.cpu for x in mine),
                        "encoder_ms": statistics.median(x.encoder for x in mine),
                        "fps_vs_baseline": statistics.median(ratios) if ratios else None,
                        "fps_vs_baseline_rounds": ratios,
                        "cpu_fps_vs_baseline": statistics.median(cpu_ratios) if cpu_ratios else None,
                        "first_ms": statistics.median(x.first_ms for x in mine),
                        "first_fps_vs_baseline": statistics.median(first_ratios) if first_ratios else None,
                        "rounds": len(mine),
                    }
                )
    return rows


def print_speed(result: dict[str, Any], info: dict[str, Any], args: argparse.Namespace) -> None:
    bf16 = "native bf16" if info["native_bf16"] else "bf16 EMULATED (no AVX512-BF16/AMX: slower than fp32 here)"
    print(
        f"\n== speed: track() per frame, {SPEED_HW[1]}x{SPEED_HW[0]} frames resized to each model's size, random weights, "
        f"{args.warmup} warm-up + {args.frames} timed frames after the prompt frame x {args.rounds} alternating round(s)"
    )
    print(f"   timed: frames {args.warmup + 1}-{args.warmup + args.frames} after the prompt frame"
          + (" (the memory bank full: the steady state of a live stream)" if args.warmup >= STEADY_WARMUP else
             f" (the memory bank is full from frame {STEADY_WARMUP + 1}: these frames cost less than a live stream's)")
          + "; 1st: frame 1, one memory in the bank")
    if "sam3-tracker" in args.models:
        print(f"   sam3-tracker: {args.sam3_warmup} warm-up + {args.sam3_frames} timed frame(s), in the first {args.sam3_rounds} "
              f"round(s), precisions {','.join(args.sam3_precisions)}, objects {','.join(map(str, args.sam3_objects or args.objects))} "
              "(a frame at 1008 px takes minutes on this CPU)")
    print(f"   {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch thread(s), {bf16}; "
          f"malloc: {info['malloc']}; load {info['load_avg_1m']:.1f} at the start; {info['date_utc']}")
    print("   wall: ms of track() as measured; CPU: the process's CPU ms in it (the work, without waits for a core)")
    print(f"  {'model':15s} {'size':>5s} {'prec':>5s} {'obj':>3s} {'wall ms':>9s} {'rounds':>13s} {'frames/s':>9s} "
          f"{'CPU ms':>9s} {'CPU fr/s':>9s} {'encoder':>8s} {'wall fps/' + BASELINE:>22s} {'CPU fps/' + BASELINE:>20s} "
          f"{'1st ms':>8s} {'1st fps/' + BASELINE:>20s}")
    for row in result["summary"]:
        ratio, spread, cpu_ratio = row["fps_vs_baseline"], row["fps_vs_baseline_rounds"], row["cpu_fps_vs_baseline"]
        ratio_s = "-" if ratio is None else (
            f"{ratio:.2f}x" + (f" ({spread[0]:.2f}-{spread[-1]:.2f})" if len(spread) > 1 else "")
        )
        cpu_s = "-" if cpu_ratio is None else f"{cpu_ratio:.2f}x"
        rounds = f"{row['ms_min']:.0f}-{row['ms_max']:.0f}" if row["rounds"] > 1 else "1 round"
        enc = "-" if row["encoder_ms"] != row["encoder_ms"] else f"{row['encoder_ms']:.0f}"
        first_ratio = row.get("first_fps_vs_baseline")
        first_s = "-" if first_ratio is None else f"{first_ratio:.2f}x"
        print(
            f"  {row['model']:15s} {row['image_size']:5d} {row['precision']:>5s} {row['objects']:3d} "
            f"{row['ms_per_frame']:9.0f} {rounds:>13s} {row['frames_per_s']:9.3f} {row['cpu_ms_per_frame']:9.0f} "
            f"{row['cpu_frames_per_s']:9.3f} {enc:>8s} {ratio_s:>22s} {cpu_s:>20s} {row['first_ms']:8.0f} {first_s:>20s}"
        )
    goal = [r for r in result["summary"] if r["model"] == "edgetam" and r["fps_vs_baseline"] is not None]
    for r in goal:
        verdict = "met" if r["fps_vs_baseline"] >= 5 else "NOT met"
        steady = "steady state" if args.warmup >= STEADY_WARMUP else f"frames {args.warmup + 1}-{args.warmup + args.frames}, NOT the steady state"
        print(f"  goal edgetam >= 5x {BASELINE} frames/s ({r['precision']}, {r['objects']} obj, {steady}): "
              f"wall {r['fps_vs_baseline']:.2f}x, CPU {r['cpu_fps_vs_baseline']:.2f}x: {verdict}"
              f"  (frame 1 after the prompt: {r['first_fps_vs_baseline']:.2f}x)")
    shipped = {(r["precision"], r["objects"]): r for r in result["summary"] if r["model"] == SHIPPED}
    for r in (r for r in result["summary"] if r["model"] == "edgetam" and (r["precision"], r["objects"]) in shipped):
        base = shipped[(r["precision"], r["objects"])]
        print(f"  edgetam's speed-ups (tracker.families.speedups) vs as shipped ({r['precision']}, {r['objects']} obj): "
              f"{base['ms_per_frame']:.0f} -> {r['ms_per_frame']:.0f} ms/frame ({base['ms_per_frame'] / r['ms_per_frame']:.2f}x)")


# ---------------------------------------------------------------------------- memory


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: stream ``spec["frames"]`` frames, sample RSS."""
    import psutil

    from tests.frames import moving_shapes
    from tracker.families import make_predictor

    torch.set_num_threads(int(spec["threads"]))
    name, size = spec["model"], int(spec["image_size"])
    net = build(name, size, reduced=bool(spec["reduced"]))
    pred = make_predictor(net, return_logits=False)
    frames = moving_shapes(40, *MEMORY_HW)
    proc = psutil.Process()
    pred.track(frames[0], pts_s=0.0)
    pred.add_prompt(1, points_xy=[clicks_for(1, MEMORY_HW)[0]], labels=[1])
    samples = []
    t0 = time.perf_counter()
    n, every = int(spec["frames"]), int(spec["every"])
    for f in range(1, n + 1):
        pred.track(frames[f % len(frames)], pts_s=f / 30)  # a 30 fps camera: the 2 s prompt window
        if f % every == 0 or f == n:
            samples.append(
                {"frame": f, "rss": proc.memory_info().rss, "s": time.perf_counter() - t0, "stored": pred.stored_entries()}
            )
            print(f"  [{name}] frame {f}: RSS {samples[-1]['rss'] / 2**20:.1f} MiB, {samples[-1]['s']:.0f} s, stored {samples[-1]['stored']}",
                  file=sys.stderr, flush=True)
    return {
        "model": name,
        "image_size": size,
        "reduced": bool(spec["reduced"]),
        "frames": n,
        "samples": samples,
        "ms_per_frame": 1000 * samples[-1]["s"] / n,
        "stored_end": pred.stored_entries(),
    }


def memory_size(name: str, asked: int, full_sam3: bool) -> int:
    """The memory part's image size. SAM 3's tracker: 224 (reduced) or 336
    (full). EdgeTAM: at least 256, where its spatial perceiver's 16 x 16 grid of
    2D latents fits the stride-16 feature map (at 128 px the library divides by
    a zero window size)."""
    if name == "sam3-tracker":
        return SAM3_FULL_MEMORY_SIZE if full_sam3 else MEMORY_SIZE[name]
    if name == "edgetam":
        return max(EDGETAM_MIN_SIZE, asked)
    return asked


def bench_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One subprocess per model (its RSS is its own); ``--parallel``: all at once."""
    procs = []
    for name in (m for m in args.models if m != SHIPPED):  # its memory is edgetam's
        full_sam3 = name == "sam3-tracker" and args.sam3_full_memory
        spec = {
            "model": name,
            "image_size": memory_size(name, args.memory_size, full_sam3),
            "reduced": name == "sam3-tracker" and not full_sam3,
            "frames": args.memory_frames,
            "every": args.every,
            "threads": args.threads or torch.get_num_threads(),
        }
        cmd = [sys.executable, str(Path(__file__).resolve()), "memory-worker", "--spec", json.dumps(spec)]
        procs.append((name, time.perf_counter(), cmd, None))
        if args.parallel:
            procs[-1] = (name, time.perf_counter(), cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    out = []
    for name, t0, cmd, proc in procs:
        if proc is None:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        stdout, _ = proc.communicate()
        if proc.returncode != 0:  # the others' figures still count
            print(f"  {name:13s} FAILED (exit {proc.returncode}); its stderr is above", flush=True)
            out.append({"model": name, "error": f"exit {proc.returncode}"})
            continue
        res = json.loads(stdout.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t0
        by_frame = {s["frame"]: s["rss"] for s in res["samples"]}
        lo = 200 if 200 in by_frame else min(by_frame)
        hi = max(by_frame)
        res["growth_from"], res["growth_to"] = lo, hi
        res["growth"] = (by_frame[hi] - by_frame[lo]) / by_frame[lo]
        out.append(res)
        print(
            f"  {name:13s} done: {res['frames']} frames at {res['ms_per_frame']:.1f} ms/frame, "
            f"RSS {by_frame[lo] / 2**20:.1f} -> {by_frame[hi] / 2**20:.1f} MiB ({res['growth']:+.2%})",
            flush=True,
        )
    return out


def print_memory(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\n== memory: RSS of one process per model streaming {MEMORY_HW[1]}x{MEMORY_HW[0]} frames, 1 object, "
        f"sampled every {args.every} frames"
    )
    print(f"  {'model':13s} {'size':>5s} {'variant':>8s} {'frames':>7s} {'ms/frame':>9s} {'RSS@200 MiB':>12s} "
          f"{'RSS@end MiB':>12s} {'growth':>8s} {'goal<=5%':>9s}  stored_entries() at the end")
    for r in results:
        if "error" in r:
            print(f"  {r['model']:13s} FAILED: {r['error']}")
            continue
        by_frame = {s["frame"]: s["rss"] for s in r["samples"]}
        variant = "reduced" if r["reduced"] else "full"
        ok = "yes" if r["growth"] <= 0.05 else "NO"
        print(
            f"  {r['model']:13s} {r['image_size']:5d} {variant:>8s} {r['frames']:7d} {r['ms_per_frame']:9.1f} "
            f"{by_frame[r['growth_from']] / 2**20:12.1f} {by_frame[r['growth_to']] / 2**20:12.1f} {r['growth']:+8.2%} {ok:>9s}  "
            f"{r['stored_end']}"
        )
    for r in (r for r in results if "error" not in r):
        trace = ", ".join(f"{s['frame']}:{s['rss'] / 2**20:.0f}" for s in r["samples"])
        print(f"  {r['model']} RSS MiB by frame: {trace}")


# ---------------------------------------------------------------------------- main


def _csv(kind: Callable[[str], Any], allowed: tuple | None = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(map(str, allowed))}")
        return values

    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=["speed", "memory", "memory-worker"])
    ap.add_argument("--models", type=_csv(str, SPEED_MODELS), default=list(SPEED_MODELS),
                    help=f"comma-separated (default: all three and {SHIPPED}, EdgeTAM without our speed-ups, speed only)")
    ap.add_argument("--precisions", type=_csv(str, ("fp32", "bf16")), default=["fp32", "bf16"])
    ap.add_argument("--objects", type=_csv(int), default=[1, 4], help="object counts (default 1,4)")
    ap.add_argument("--frames", type=int, default=2, help="timed frames per stream (default 2)")
    ap.add_argument("--warmup", type=int, default=STEADY_WARMUP,
                    help=f"frames after the prompt frame before timing (default {STEADY_WARMUP}: the memory bank is full, "
                    "the steady state of a live stream; frame 1's time is reported as well)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    ap.add_argument("--image-size", type=int, default=None, help="speed at this size instead of each model's own (quick runs)")
    ap.add_argument("--sam3-frames", type=int, default=1, help="timed frames per sam3-tracker stream (default 1)")
    ap.add_argument("--sam3-warmup", type=int, default=0, help="sam3-tracker frames after the prompt frame before timing (default 0)")
    ap.add_argument("--sam3-rounds", type=int, default=1, help="rounds that include sam3-tracker (default 1: the first)")
    ap.add_argument("--sam3-objects", type=_csv(int), default=[1], help="sam3-tracker's object counts (default 1)")
    ap.add_argument("--bf16-objects", type=_csv(int), default=[1],
                    help="object counts for emulated bf16 (no AVX512-BF16/AMX: 8-25x slower than fp32; default 1)")
    ap.add_argument("--bf16-rounds", type=int, default=1, help="rounds that include emulated bf16 (default 1)")
    ap.add_argument("--sam3-precisions", type=_csv(str, ("fp32", "bf16")), default=["fp32"],
                    help="sam3-tracker's precisions (default fp32: emulated bf16 costs minutes per frame here)")
    ap.add_argument("--memory-frames", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100, help="RSS sample period in frames")
    ap.add_argument("--memory-size", type=int, default=256, help="edgetam / sam2.1-tiny image_size for memory")
    ap.add_argument("--sam3-full-memory", action="store_true", help="full SAM 3 tracker at 336 px for memory (slow)")
    ap.add_argument("--parallel", action="store_true", help="memory: run the models' processes at the same time")
    ap.add_argument(
        "--threads", type=int, default=0,
        help="torch CPU threads (default 0: torch's default, one per core; on a machine shared with other work "
        "1 is steadier: two OpenMP threads wait on each other, measured 8-10x slower per frame under load ~10)",
    )
    ap.add_argument("--malloc", choices=("keep", "system"), default="keep",
                    help="keep: large buffers from the heap, reused (as sam2-stream sets it; the default); system: glibc's defaults")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    if args.malloc == "system":
        os.environ[ALLOCATOR_ENV] = "system"  # the memory part's subprocesses too
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.parts == ["memory-worker"]:
        print(json.dumps(memory_worker(json.loads(args.spec))))
        return
    if BASELINE not in args.models and "speed" in args.parts:
        logging.getLogger("bench").warning("%s not among --models: no ratios", BASELINE)
    info = machine_info()
    report: dict[str, Any] = {"machine": info, "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "spec"}}
    print(f"bench_families: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"transformers {info['transformers']}, load {info['load_avg_1m']}, {info['date_utc']}", flush=True)
    if "speed" in args.parts:
        report["speed"] = bench_speed(args)
        print_speed(report["speed"], info, args)
    if "memory" in args.parts:
        report["memory"] = bench_memory(args)
        print_memory(report["memory"], args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
