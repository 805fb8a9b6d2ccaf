"""Streaming predictor benchmarks (issue: engine), measured side by side in one run.

Three parts, each printing figures and ratios:

* ``overhead``: per-frame latency split into image encoder / memory attention /
  SAM heads / memory encoder / bookkeeping (everything else), and the ratio of
  ``StreamingPredictor.track`` to the bare SAM2Base calls (``forward_image`` +
  ``track_step`` with a plain output dict) on the same frames;
* ``objects``: per-frame cost for N = 1, 2, 4, 8 objects, ours next to Meta's
  ``SAM2VideoPredictor.propagate_in_video`` on the same frames and model, and
  the per-object marginal cost;
* ``memory``: stored per-frame entries and RSS over a long stream (ours), and
  Meta's predictor's RSS growth on the same frames for comparison.

Random weights (seeded): speed does not depend on what the weights are.

    .venv/bin/python bench/bench_predictor.py overhead objects --frames 60
    .venv/bin/python bench/bench_predictor.py memory --frames 10000 --meta-frames 2000
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.frames import moving_shapes, shape_centres, write_jpeg_folder  # noqa: E402
from tracker.model import build_model  # noqa: E402
from tracker.predictor import StreamingPredictor  # noqa: E402

H, W = 240, 320


class StageTimer:
    """Wall time per model stage, from forward hooks (synchronised on CUDA)."""

    STAGES = {
        "encoder": "image_encoder",
        "memory_attention": "memory_attention",
        "heads": ("sam_prompt_encoder", "sam_mask_decoder", "obj_ptr_proj"),
        "memory_encoder": "memory_encoder",
    }

    def __init__(self, model: torch.nn.Module) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._handles = []
        self._sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
        for stage, names in self.STAGES.items():
            for name in (names,) if isinstance(names, str) else names:
                module = getattr(model, name)
                self._handles.append(module.register_forward_pre_hook(self._start(stage)))
                self._handles.append(module.register_forward_hook(self._stop(stage)))
        self._t0: dict[str, float] = {}

    def _start(self, stage):
        def hook(module, args):
            self._sync()
            self._t0[stage] = time.perf_counter()

        return hook

    def _stop(self, stage):
        def hook(module, args, out):
            self._sync()
            self.totals[stage] += time.perf_counter() - self._t0.pop(stage)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def frames_and_clicks(n: int, n_objects: int = 1):
    frames = moving_shapes(n, H, W)
    clicks = []
    for k in range(n_objects):
        cx, cy = shape_centres(0, H, W)[k % 3]
        clicks.append([[cx + 2 * (k // 3), cy]])
    return frames, clicks


def run_ours(model, frames, clicks, timer: "StageTimer | None" = None, **kw) -> list[float]:
    p = StreamingPredictor(model, return_logits=False, **kw)
    p.track(frames[0])
    for k, pts in enumerate(clicks):
        p.add_points(k + 1, pts, [1])
    if timer is not None:
        timer.totals.clear()  # count tracking frames only
    times = []
    for f in frames[1:]:
        t = time.perf_counter()
        p.track(f)
        times.append(time.perf_counter() - t)
    return times


def run_bare(model, frames, clicks) -> list[float]:
    """The minimum SAM 2 needs per frame: ``forward_image`` + ``track_step`` per object
    with a plain, never-pruned output dict. Preprocessing is the same PIL resize."""
    pre = StreamingPredictor(model)  # only for its frame preprocessing
    s = model.image_size

    def feats(img):
        out = model.forward_image(pre.to_model_input(img))
        _, vf, vp, fs = model._prepare_backbone_features(out)
        return vf, vp, fs

    dicts = []
    with torch.inference_mode():
        vf, vp, fs = feats(frames[0])
        for pts in clicks:
            od = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
            p = torch.tensor(pts, dtype=torch.float32)[None] / torch.tensor([W, H]) * s
            out = model.track_step(0, True, vf, vp, fs, {"point_coords": p, "point_labels": torch.ones(1, 1, dtype=torch.int32)}, None, od, 1 << 30, run_mem_encoder=True)
            od["cond_frame_outputs"][0] = out
            dicts.append(od)
        times = []
        for i, img in enumerate(frames[1:], start=1):
            t = time.perf_counter()
            vf, vp, fs = feats(img)
            for od in dicts:
                od["non_cond_frame_outputs"][i] = model.track_step(i, False, vf, vp, fs, None, None, od, 1 << 30, run_mem_encoder=True)
            times.append(time.perf_counter() - t)
    return times


def run_meta(model, folder: Path, clicks, n: int) -> list[float]:
    state = model.init_state(str(folder))
    for k, pts in enumerate(clicks):
        model.add_new_points_or_box(state, 0, k + 1, points=pts, labels=[1])
    times = []
    t = time.perf_counter()
    for f, _, _ in model.propagate_in_video(state):
        now = time.perf_counter()
        if f > 0:
            times.append(now - t)
        t = now
    return times


def med_ms(times: list[float], warmup: int = 3) -> float:
    return 1000 * statistics.median(times[warmup:] if len(times) > warmup + 3 else times)


def bench_overhead(model, n: int) -> None:
    frames, clicks = frames_and_clicks(n, 1)
    run_ours(model, frames[:8], clicks)  # warm-up
    bare = run_bare(model, frames, clicks)
    timer = StageTimer(model)
    ours = run_ours(model, frames, clicks, timer=timer)
    timer.remove()
    per_frame = {k: 1000 * v / (n - 1) for k, v in timer.totals.items()}
    total = 1000 * sum(ours) / len(ours)
    print(f"\n== overhead: 1 object, {n} frames {W}x{H}, image_size {model.image_size}, device {model.device}")
    for stage in StageTimer.STAGES:
        print(f"  {stage:17s} {per_frame.get(stage, 0.0):8.2f} ms/frame")
    book = total - sum(per_frame.values())
    print(f"  {'bookkeeping':17s} {book:8.2f} ms/frame  (preprocessing, feature/memory bookkeeping, mask resize)")
    print(f"  {'total (mean)':17s} {total:8.2f} ms/frame")
    o, b = med_ms(ours), med_ms(bare)
    print(f"  ours vs bare SAM2Base calls (median): {o:.2f} / {b:.2f} ms = {o / b:.3f}  (goal <= 1.05)")


def bench_objects(model, n: int, counts: list[int]) -> None:
    print(f"\n== objects: {n} frames {W}x{H}, image_size {model.image_size}, device {model.device}")
    print(f"  {'N':>3} {'ours ms/frame':>14} {'batched':>10} {'meta ms/frame':>14} {'ours/meta':>10} {'batched/meta':>13} {'per-object marginal (best of ours)':>36}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        frames, _ = frames_and_clicks(n, 1)
        frames = write_jpeg_folder(frames, Path(tmp))
        for count in counts:
            _, clicks = frames_and_clicks(n, count)
            ours = med_ms(run_ours(model, frames, clicks, batch_objects=False))
            batched = med_ms(run_ours(model, frames, clicks, batch_objects=True))
            meta = med_ms(run_meta(model, Path(tmp), clicks, n))
            best = min(ours, batched)
            base = best if base is None else base
            marginal = (best - base) / (count - 1) if count > 1 else 0.0
            print(
                f"  {count:>3} {ours:>14.2f} {batched:>10.2f} {meta:>14.2f} {ours / meta:>10.3f} {batched / meta:>13.3f}"
                f" {marginal:>24.2f} ms ({best / base:.2f}x one object)"
            )


def bench_memory(model, n: int, meta_n: int) -> None:
    proc = psutil.Process()
    frames, clicks = frames_and_clicks(40, 2)
    p = StreamingPredictor(model, return_logits=False)
    p.track(frames[0], pts_s=0.0)
    for k, pts in enumerate(clicks):
        p.add_points(k + 1, pts, [1])
    print(f"\n== memory: ours, {n} frames, 2 objects, image_size {model.image_size}")
    rss = {}
    t0 = time.perf_counter()
    for f in range(1, n):
        p.track(frames[f % len(frames)], pts_s=f / 30)
        if f in (200, n // 2, n - 1) or f % 2000 == 0:
            rss[f] = proc.memory_info().rss
            print(f"  frame {f:6d}: RSS {rss[f] / 2**20:8.1f} MiB, stored {p.stored_entries()}, {(time.perf_counter() - t0) / f * 1000:.1f} ms/frame")
    growth = (rss[n - 1] - rss[200]) / rss[200]
    print(f"  ours: RSS growth frame 200 -> {n - 1}: {growth:+.2%} (goal < 5%)")
    del p
    gc.collect()

    print(f"\n== memory: Meta's SAM2VideoPredictor, {meta_n} frames (init_state holds every frame, outputs kept)")
    with tempfile.TemporaryDirectory() as tmp:
        write_jpeg_folder([frames[f % len(frames)] for f in range(meta_n)], Path(tmp))
        before = proc.memory_info().rss
        state = model.init_state(tmp, offload_video_to_cpu=True)
        after_init = proc.memory_info().rss
        for k, pts in enumerate(clicks):
            model.add_new_points_or_box(state, 0, k + 1, points=pts, labels=[1])
        marks = {}
        for f, _, _ in model.propagate_in_video(state):
            if f in (200, meta_n - 1):
                marks[f] = proc.memory_info().rss
        g = (marks[meta_n - 1] - marks[200]) / marks[200]
        per_frame = (marks[meta_n - 1] - marks[200]) / (meta_n - 201)
        print(f"  init_state: +{(after_init - before) / 2**20:.1f} MiB for {meta_n} frames")
        print(f"  meta: RSS growth frame 200 -> {meta_n - 1}: {g:+.2%} ({per_frame / 1024:.1f} KiB/frame; "
              f"{per_frame * n / 2**20:.0f} MiB extrapolated to {n} frames, plus init_state's frames)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=["overhead", "objects", "memory"])
    ap.add_argument("--model", default="sam2.1-tiny")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--meta-frames", type=int, default=2000)
    ap.add_argument("--objects", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, random_weights_seed=0, device=args.device, image_size=args.image_size)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model}")
    for part in args.parts:
        if part == "overhead":
            bench_overhead(model, args.frames)
        elif part == "objects":
            bench_objects(model, args.frames, [int(c) for c in args.objects.split(",")])
        else:
            bench_memory(model, args.frames, args.meta_frames)


if __name__ == "__main__":
    main()
