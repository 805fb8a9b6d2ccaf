"""Image mode benchmarks (issue 14, engine part): what the embedding cache and
batched encoding buy, measured in one run.

* ``prompt``: one image at ``--image-size`` (default 1024, what the weights are
  trained at): a full encode (``prepare`` + ``encode``, what an upload costs on
  a cache miss) next to prompts on the cached embedding (decoder only: a click,
  a click with three candidates, a box and a click, a refinement chained from
  the previous logits), and the ratio (goal: >= 20x);
* ``batch``: ``--batch`` images of different sizes through the encoder as one
  ``encode_batch`` call vs one ``encode`` each, alternated ``--rounds`` times
  (median), in images/s, and the largest difference between the two results.

Random weights (seeded): speed does not depend on what the weights are.

    .venv/bin/python bench/bench_images.py prompt batch --rounds 3
    .venv/bin/python bench/bench_images.py prompt --threads 1 --clock cpu   # on a busy machine
    .venv/bin/python bench/bench_images.py batch --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.frames import moving_shapes, shape_centres  # noqa: E402
from tracker.embedding_cache import EmbeddingCache  # noqa: E402
from tracker.model import build_model, pick_device  # noqa: E402
from tracker.segment import ImageEmbedding, ImageSegmenter  # noqa: E402

H, W = 768, 1024


#: ``--clock``: wall time, or the process's CPU time, which a machine shared
#: with other jobs inflates much less (with ``--threads 1`` it is close to the
#: wall time of an idle core; on CUDA only wall time means anything)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = clock()
    fn()
    sync()
    return clock() - t0


def bench_prompt(seg: ImageSegmenter, rounds: int, prompts: int, sync: Callable[[], None]) -> None:
    """Each round: one full encode, then ``prompts`` prompts of each kind, so that
    the ratios compare times taken under the same load (medians over rounds)."""
    image = moving_shapes(1, H, W, seed=1)[0]
    cache: EmbeddingCache[ImageEmbedding] = EmbeddingCache(1 << 30)
    embedding = seg.embed([seg.prepare(image)], cache)[0].embedding  # also the warm-up
    click = [list(shape_centres(0, H, W)[0])]
    previous = seg.predict(embedding, points_xy=click, labels=[1], multimask=True)
    kinds = {
        "click": dict(points_xy=click, labels=[1]),
        "click, multimask": dict(points_xy=click, labels=[1], multimask=True),
        "box + click": dict(box_xyxy=[300.0, 300.0, 700.0, 600.0], points_xy=[[500.0, 450.0]], labels=[0]),
        "chained refinement": dict(
            points_xy=[*click, [20.0, 20.0]], labels=[1, 0], mask_input=previous.low_res_logits[0]
        ),
    }
    for prompt in kinds.values():
        seg.predict(embedding, **prompt)  # warm-up
    encode_s, hit_s = [], []
    latency: dict[str, list[float]] = {name: [] for name in kinds}
    ratio: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(rounds):
        enc = timed(lambda: seg.encode(seg.prepare(image)), sync)
        encode_s.append(enc)
        hit_s.append(timed(lambda: seg.embed([seg.prepare(image)], cache), sync))
        for name, prompt in kinds.items():
            lat = statistics.median(timed(lambda: seg.predict(embedding, **prompt), sync) for _ in range(prompts))
            latency[name].append(lat)
            ratio[name].append(enc / lat)
    print(f"== prompt on a cached embedding vs a full encode: image {W}x{H}, image_size {seg.image_size}, "
          f"{seg.device}, {torch.get_num_threads()} threads, {rounds} rounds of 1 encode + {prompts} prompts of each kind, "
          f"{'CPU' if clock is time.process_time else 'wall'} time")
    print(f"  full encode (prepare + encode)       : {statistics.median(encode_s) * 1e3:8.1f} ms"
          f"  (embedding {embedding.nbytes / 2**20:.1f} MiB)")
    print(f"  repeated upload (prepare + cache hit): {statistics.median(hit_s) * 1e3:8.1f} ms")
    for name in kinds:
        print(f"  prompt: {name:<29}: {statistics.median(latency[name]) * 1e3:8.1f} ms"
              f"  -> {statistics.median(ratio[name]):6.1f}x faster than an encode")


def bench_batch(seg: ImageSegmenter, n: int, rounds: int, sync: Callable[[], None]) -> None:
    sizes = [(H, W), (480, 640), (1080, 1920), (600, 600), (720, 1280), (300, 400), (1024, 1024), (900, 700)]
    images = [seg.prepare(moving_shapes(1, h, w, seed=i)[0]) for i, (h, w) in enumerate(sizes[i % len(sizes)] for i in range(n))]
    seg.encode_batch(images[:1])  # warm-up
    batched, single = [], []
    for _ in range(rounds):
        out: dict[str, list[ImageEmbedding]] = {}
        batched.append(timed(lambda: out.__setitem__("batch", seg.encode_batch(images)), sync))
        single.append(timed(lambda: out.__setitem__("one", [seg.encode(im) for im in images]), sync))
    diff = max(
        float((x.float() - y.float()).abs().max())
        for a, b in zip(out["batch"], out["one"])
        for x, y in zip((a.image_embed, *a.high_res_feats), (b.image_embed, *b.high_res_feats))
    )
    tb, ts = statistics.median(batched), statistics.median(single)
    print(f"== {n} images through the encoder: image_size {seg.image_size}, {seg.device}, {torch.get_num_threads()} threads, "
          f"median of {rounds} rounds, {'CPU' if clock is time.process_time else 'wall'} time")
    print(f"  one batch  : {n / tb:6.2f} images/s ({tb:.2f} s)")
    print(f"  one by one : {n / ts:6.2f} images/s ({ts:.2f} s)")
    print(f"  batch / one by one: {ts / tb:.2f}x; largest difference of the embeddings: {diff:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=["prompt", "batch"])
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3, help="encodes (prompt) / alternations (batch); median")
    ap.add_argument("--prompts", type=int, default=20, help="prompts timed per kind (median)")
    ap.add_argument("--batch", type=int, default=4, help="images per batch")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    ap.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (default auto)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what is timed (default wall)")
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model = build_model(
        "sam2.1-tiny", device=device, image_size=args.image_size, random_weights_seed=0, precision=args.precision
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seg = ImageSegmenter(model)
    for part in args.parts:
        if part == "prompt":
            bench_prompt(seg, args.rounds, args.prompts, sync)
        else:
            bench_batch(seg, args.batch, args.rounds, sync)


if __name__ == "__main__":
    main()
