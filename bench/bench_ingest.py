"""Ingest benchmark: file-mode throughput against bare decode loops, and live-mode lag.

Throughput (1080p H.264, every frame; the runs of all variants are interleaved
and the best of ``--repeat`` is kept, since other load on the machine only ever
slows a run down; CPU time per frame, all threads, is reported too):

* ``pyav decode only``: PyAV's own loop, no pixel conversion (the ceiling).
* ``pyav decode+rgb``: PyAV's loop doing the same work as file mode (RGB
  conversion; resized when ``resize`` is set). File mode's ratio to this is
  the overhead of the ingest layer (thread, queue, Frame objects); goal >= 0.9.
* ``ffmpeg -f null``: the system ``ffmpeg`` CLI, decode only and with an rgb24
  conversion (a different FFmpeg version from PyAV's own; for reference).

Live lag: the clip played in real time (``realtime=True``) to a consumer that
takes 100 ms per frame (a slow model), in live mode (newest frame) and, for
contrast, in file mode (every frame, bounded queue). Age = consumer's receive
time - the frame's ``arrival_s``.

Allocator note: at full 1080p, file mode keeps several 6 MB frames alive at
once (the queue), and glibc returns freed blocks of that size to the kernel,
so each new frame page-faults (~0.5-1 ms CPU per frame on a 2-core VM); the
bare loop frees each frame before the next and reuses the same block.
``--tune-malloc`` calls ``tracker.allocator.keep_freed_memory()`` (glibc's
trim/mmap thresholds, as ``sam2-stream`` sets them) for both sides of the comparison.

Usage::

    .venv/bin/python bench/bench_ingest.py [--clip PATH] [--resize 1024] [--repeat 5] [--tune-malloc] [--json out.json]

Without ``--clip`` it uses ``../shared/videos/moviepy__smpte-2997.mp4`` when
present, else encodes a 1080p clip into ``bench/out/`` once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracker.allocator import keep_freed_memory  # noqa: E402
from tracker.ingest import open_source, output_size_hw  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_CLIP = ROOT.parent / "shared" / "videos" / "moviepy__smpte-2997.mp4"


def make_1080p_clip(path: Path, n_frames: int = 250) -> Path:
    """A 1080p H.264 clip with motion and texture (so decoding is not trivially cheap)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (1080 + 64, 1920 + 64, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(n_frames):
            dx, dy = (i * 3) % 64, (i * 2) % 64
            image = np.ascontiguousarray(texture[dy:dy + 1080, dx:dx + 1920])
            image[400:680, (i * 7) % 1600:(i * 7) % 1600 + 320] = (230, 60, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


Measurement = tuple[int, float, float]  # frames, wall seconds, CPU seconds


def bare_loop(clip: Path, convert: bool, resize: int | None) -> Measurement:
    """PyAV's own decode loop with the same decoder threading as file mode."""
    started, cpu = time.perf_counter(), time.process_time()
    n = 0
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        stream.codec_context.thread_count = 0
        reformatter = av.video.reformatter.VideoReformatter()
        for frame in container.decode(stream):
            if convert:
                h, w = output_size_hw((frame.height, frame.width), None, resize)
                reformatter.reformat(frame, width=w, height=h, format="rgb24").to_ndarray()
            n += 1
    return n, time.perf_counter() - started, time.process_time() - cpu


def ingest_loop(clip: Path, resize: int | None) -> Measurement:
    started, cpu = time.perf_counter(), time.process_time()
    with open_source(str(clip), resize=resize) as source:
        n = sum(1 for _ in source)
    return n, time.perf_counter() - started, time.process_time() - cpu


def ffmpeg_null(clip: Path, rgb: bool) -> Measurement | None:
    if shutil.which("ffmpeg") is None:
        return None
    args = ["ffmpeg", "-v", "error", "-nostdin", "-i", str(clip)] + (["-pix_fmt", "rgb24"] if rgb else []) + ["-f", "null", "-"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(args, check=True, timeout=600)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    with av.open(str(clip)) as container:
        n = container.streams.video[0].frames
    return n, elapsed, cpu


def live_lag(clip: Path, mode: str, consumer_s: float, duration_s: float) -> dict[str, float]:
    ages, behind = [], []
    with open_source(str(clip), mode=mode, realtime=True, buffer_frames=8) as source:
        started = time.monotonic()
        while time.monotonic() - started < duration_s:
            frame = source.get_latest(timeout=5)
            if frame is None:
                break
            ages.append(time.time() - frame.arrival_s)
            behind.append(source.stats.decoded - 1 - frame.index)
            time.sleep(consumer_s)
        stats = source.stats
    ages_ms = np.array(ages) * 1000
    return {
        "delivered": stats.delivered, "dropped": stats.dropped,
        "age_p50_ms": float(np.percentile(ages_ms, 50)), "age_p95_ms": float(np.percentile(ages_ms, 95)),
        "age_max_ms": float(ages_ms.max()), "frames_behind_max": int(max(behind)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path)
    parser.add_argument("--resize", type=int, default=1024, help="longest side for the resize runs")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--live-seconds", type=float, default=6.0)
    parser.add_argument("--tune-malloc", action="store_true", help="see 'Allocator note' above")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.tune_malloc and not keep_freed_memory():
        print("--tune-malloc: not glibc; running without it")

    clip = args.clip or (SHARED_CLIP if SHARED_CLIP.exists() else make_1080p_clip(ROOT / "bench" / "out" / "clip_1080p.mp4"))
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        desc = f"{clip.name}: {stream.codec_context.name} {stream.width}x{stream.height}, {stream.frames} frames"
    print(f"clip {desc}; PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info}); {os.cpu_count()} CPUs"
          f"{'; malloc tuned' if args.tune_malloc else ''}")

    results: dict[str, object] = {"clip": str(clip), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()[0],
                                  "malloc_tuned": args.tune_malloc}
    variants: dict[str, Callable[[], Measurement | None]] = {
        "pyav decode only": lambda: bare_loop(clip, False, None),
        "pyav decode+rgb": lambda: bare_loop(clip, True, None),
        "ingest file mode": lambda: ingest_loop(clip, None),
        f"pyav decode+rgb resize {args.resize}": lambda: bare_loop(clip, True, args.resize),
        f"ingest file mode resize {args.resize}": lambda: ingest_loop(clip, args.resize),
        "ffmpeg CLI -f null": lambda: ffmpeg_null(clip, False),
        "ffmpeg CLI -f null -pix_fmt rgb24": lambda: ffmpeg_null(clip, True),
    }
    runs: dict[str, list[Measurement]] = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, run in variants.items():
            one = run()
            if one is not None:
                runs[name].append(one)
    fps: dict[str, float] = {}
    cpu_ms: dict[str, float] = {}
    for name, measured in runs.items():
        if not measured:
            continue
        fps[name] = max(n / wall for n, wall, _ in measured)
        cpu_ms[name] = float(np.median([1000 * cpu / n for n, _, cpu in measured]))
        note = "  (system ffmpeg, incl. start-up)" if name.startswith("ffmpeg") else ""
        print(f"  {name:<36} {fps[name]:7.1f} fps  {cpu_ms[name]:6.2f} CPU ms/frame{note}")
    ratio = fps["ingest file mode"] / fps["pyav decode+rgb"]
    ratio_resize = fps[f"ingest file mode resize {args.resize}"] / fps[f"pyav decode+rgb resize {args.resize}"]
    print(f"file mode / bare loop: {ratio:.3f} (full size), {ratio_resize:.3f} (resize {args.resize}); "
          f"goal >= 0.9: {'met' if min(ratio, ratio_resize) >= 0.9 else 'NOT met'}; "
          f"load average {results['loadavg_before']:.1f} before, {os.getloadavg()[0]:.1f} after")
    results.update(fps=fps, cpu_ms_per_frame=cpu_ms, ratio=ratio, ratio_resize=ratio_resize)

    print(f"live lag, real-time playback, consumer 100 ms/frame, {args.live_seconds:g} s:")
    for mode in ("live", "file"):
        lag = live_lag(clip, mode, 0.1, args.live_seconds)
        results[f"lag_{mode}"] = lag
        print(f"  {mode} mode: age p50 {lag['age_p50_ms']:.0f} ms, p95 {lag['age_p95_ms']:.0f} ms, "
              f"max {lag['age_max_ms']:.0f} ms; {lag['delivered']} delivered, {lag['dropped']} dropped, "
              f"at most {lag['frames_behind_max']} frames behind")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
