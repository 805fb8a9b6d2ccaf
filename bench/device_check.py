"""One GPU check for issue 12 (model families), printing ONE table.

Run by ``bench/device_check.sh`` on a CUDA machine (under 8 minutes), or with
``--smoke`` on a CPU (under 3 minutes: small sizes, the CUDA-only parts
skipped with a line saying so) to prove the script works before a GPU is lent.

Checks, in this order (each row of the table is one figure; a failing check is
a row saying why, the others still run; a check that would overrun
``--budget-s`` is a row saying it was skipped):

1. ``equivalence``: each family under bf16 autocast on CUDA (``--smoke``:
   float32 on the CPU) equals its library's own unpruned inference:
   EdgeTAM and SAM 3's tracker by the equivalence tests of
   ``tests/test_families.py`` (their ``Reference``, the transformers session
   with ``video=None``, put on the GPU under the same autocast), SAM 2.1 tiny
   by ``tests/test_predictor_equivalence.py``'s comparison with Meta's
   ``SAM2VideoPredictor`` under the same autocast (max |diff| of mask logits).
2. ``speed``: frames/s of ``track()`` (one object, points on frame 0) at each
   model's size (1024 px, SAM 3's tracker 1008), full-size architectures with
   random weights, eager, at the steady state (the memory bank full).
3. ``objects``: four objects of one stream, EdgeTAM and SAM 3's tracker,
   batched through memory attention and the heads
   (``tracker/families/batched_step.py``) vs the library's object-by-object
   loop (``batch_objects=False``): frames/s.
4. ``multi-stream``: ``--streams`` sessions on one ``InferenceWorker``, their
   frames through the image encoder as one batch (``max_batch=streams``) vs
   one by one (``max_batch=1``): total frames/s.
5. ``annotate``: ``bench/bench_annotate.py video --device cuda`` (ours vs
   Meta's predictor, sam2.1-tiny at 1024 px), its throughput ratio.
6. ``compile``: the same as 2 with the image encoder under ``torch.compile``
   (``nn.Module.compile``, default mode), with the compile + warm-up time.
   Last because it is the slowest; CUDA only.

    bash bench/device_check.sh                       # on the GPU machine
    .venv/bin/python bench/device_check.py --smoke   # here, on the CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_families  # noqa: E402  (the same stream timing as the CPU benchmark)

logger = logging.getLogger("device_check")

MODELS = ("edgetam", "sam2.1-tiny", "sam3-tracker")
FAMILY_MODELS = ("edgetam", "sam3-tracker")
#: tests/test_families.py's equivalence tests, run on the device model
FAMILY_TESTS = (
    "test_one_object",
    "test_three_objects_points_box_mask",
    "test_object_added_mid_stream_and_removed",
    "test_correction_on_tracked_frame",
    "test_prompt_on_a_past_frame",
)
SMOKE_FAMILY_TESTS = ("test_one_object",)
CHECKS = ("equivalence", "speed", "objects", "multi-stream", "annotate", "compile")
SMOKE_SIZE = {"edgetam": 256, "sam2.1-tiny": 256, "sam3-tracker": 224}


@dataclass
class Row:
    check: str
    model: str
    setting: str
    result: str
    note: str = ""
    value: float | None = None


class Budget:
    """Seconds left of the whole run; a check asks before it starts."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


class Checker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke: bool = args.smoke
        self.device = torch.device(args.device)
        self.budget = Budget(args.budget_s)
        self.rows: list[Row] = []
        self.models: dict[str, torch.nn.Module] = {}
        self.has_transformers = _has_transformers()

    # ---------------------------------------------------------------- helpers

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        print(f"  [{row.check}] {row.model} {row.setting}: {row.result} {row.note}".rstrip(), flush=True)
        return row

    def guarded(self, check: str, model: str, setting: str, need_s: float, fn: Callable[[], None]) -> None:
        """Run one check; a failure or a spent budget becomes its row."""
        if not self.budget.allows(need_s):
            self.add(check, model, setting, "SKIPPED", f"time budget: {self.budget.left():.0f} s left, needs ~{need_s:.0f} s")
            return
        if model in FAMILY_MODELS and not self.has_transformers:
            self.add(check, model, setting, "SKIPPED", "transformers is not installed (the optional models extra)")
            return
        try:
            fn()
        except Exception as e:  # one row per failure; the other checks carry on
            logger.debug("%s", traceback.format_exc())
            self.add(check, model, setting, "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")

    def size_of(self, name: str) -> int:
        return SMOKE_SIZE[name] if self.smoke else bench_families.NATIVE_SIZE[name]

    def model(self, name: str) -> torch.nn.Module:
        """The speed checks' model (full size; ``--smoke``: small, SAM 3 reduced), built once."""
        if name not in self.models:
            t0 = time.perf_counter()
            reduced = self.smoke and name == "sam3-tracker"
            self.models[name] = bench_families.build(name, self.size_of(name), reduced=reduced, device=str(self.device))
            self.models[name].autocast_precision = self.precision
            logger.info("built %s in %.1f s", name, time.perf_counter() - t0)
        return self.models[name]

    @property
    def precision(self) -> str:
        """bf16 autocast on CUDA ("auto"); float32 on the CPU unless ``--precision bf16``
        (emulated and several times slower on CPUs without AVX512-BF16/AMX)."""
        return self.args.precision or ("auto" if self.device.type == "cuda" else "fp32")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ---------------------------------------------------------------- 1. equivalence

    def equivalence(self) -> None:
        where = "CUDA bf16 autocast" if self.device.type == "cuda" else f"CPU {self.precision}"
        for name in FAMILY_MODELS:
            self.guarded("equivalence", name, where, 20 if self.smoke else 40, lambda name=name: self._family_equivalence(name, where))
        self.guarded("equivalence", "sam2.1-tiny", where + ", vs Meta's predictor", 20, lambda: self._sam2_equivalence(where))

    def _family_equivalence(self, name: str, where: str) -> None:
        import tests.test_families as tf
        from tracker.families import build_family_model
        from tracker.model import model_autocast

        # reduced models, as the CPU tests use them (on the GPU too: the
        # comparison is of code paths and arithmetic, and the frames are 160x120)
        kwargs = {**tf.family_kwargs(name), "device": self.device, "precision": self.precision}
        net = build_family_model(name, **kwargs)  # served: with the inference speed-ups
        tf.SHIPPED[name] = build_family_model(name, fast=False, **kwargs)  # the reference: the library as it ships

        class DeviceReference(tf.Reference):
            """The test's reference session, on the model's device and under its autocast."""

            def __post_init__(self) -> None:
                family, dev = self.model.stream_family, next(self.model.parameters()).device
                self.processor = family.processor(int(self.model.config.image_size))
                self.session = family.session_class()(
                    inference_device=dev, inference_state_device=dev, video_storage_device=dev, dtype=torch.float32
                )

            def logits(self, out: Any) -> dict[int, torch.Tensor]:
                return {o: t.float().cpu() for o, t in super().logits(out).items()}

            def frame(self, image: np.ndarray, idx: int) -> dict[int, torch.Tensor]:
                with model_autocast(self.model):
                    return super().frame(image, idx)

            def prompt(self, *args: Any, **kwargs: Any) -> dict[int, torch.Tensor]:
                with model_autocast(self.model):
                    return super().prompt(*args, **kwargs)

        tests = SMOKE_FAMILY_TESTS if self.smoke else FAMILY_TESTS
        original = tf.Reference
        tf.Reference = DeviceReference
        passed, failures = 0, []
        t0 = time.perf_counter()
        try:
            for test in tests:
                try:
                    getattr(tf, test)(net)
                    passed += 1
                except AssertionError as e:
                    failures.append(f"{test}: {str(e).splitlines()[0][:120]}")
        finally:
            tf.Reference = original
        result = f"{passed}/{len(tests)} pass" if not failures else f"FAIL {passed}/{len(tests)}"
        note = f"mask logits within {tf.TOL:g} ({time.perf_counter() - t0:.0f} s)" if not failures else "; ".join(failures)
        self.add("equivalence", name, where + f", {len(tests)} scenarios of tests/test_families.py", result, note)

    def _sam2_equivalence(self, where: str) -> None:
        import tests.test_predictor_equivalence as te
        from tests.frames import moving_shapes, write_jpeg_folder
        from tracker.model import build_model, model_autocast
        from tracker.predictor import StreamingPredictor

        size = 256 if self.smoke else 1024
        net = build_model("sam2.1-tiny", device=str(self.device), image_size=size, random_weights_seed=0, precision=self.precision)
        worst_all: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            frames = write_jpeg_folder(moving_shapes(te.N_FRAMES, te.H, te.W), Path(tmp))
            prompts = [(0, 1, dict(points=te.click(0, 0), labels=[1])), (0, 2, dict(points=te.click(1, 0), labels=[1]))]
            with torch.inference_mode(), model_autocast(net):
                theirs = te.meta_logits(net, Path(tmp), prompts)
            theirs = {f: {o: t.float().cpu() for o, t in objs.items()} for f, objs in theirs.items()}
            for batch in (False, True):
                mine = te.ours(
                    StreamingPredictor(net, batch_objects=batch),
                    frames,
                    {0: [(o, dict(points_xy=kw["points"], labels=kw["labels"])) for _, o, kw in prompts]},
                )
                try:
                    worst = te.assert_close(mine, theirs, [1, 2], range(te.N_FRAMES))
                    worst_all.append(f"batch_objects={batch}: pass, max |diff| {worst:.2g}")
                except AssertionError as e:
                    worst_all.append(f"batch_objects={batch}: FAIL {str(e).splitlines()[0][:100]}")
        ok = all(": pass" in w for w in worst_all)
        self.add(
            "equivalence", "sam2.1-tiny", f"{where}, {size} px, 2 objects x {te.N_FRAMES} frames vs Meta's SAM2VideoPredictor",
            "2/2 pass" if ok else "FAIL", "; ".join(worst_all),
        )

    # ---------------------------------------------------------------- 2. speed, 6. compile

    def frames_per_s(self, net: torch.nn.Module, n_timed: int, warmup: int, objects: int = 1, **options: Any) -> float:
        frames = _frames(1 + warmup + n_timed)
        times, _, _, _ = bench_families.time_stream(
            net, frames, bench_families.clicks_for(objects, bench_families.SPEED_HW), warmup, n_timed, **options
        )
        return 1000 / float(np.median(times))

    def speed(self) -> None:
        n = self.args.frames
        for name in MODELS:
            setting = f"{self.size_of(name)} px, eager, 1 object, median of {n} frames"
            if self.smoke:
                setting += " (smoke: small, not a result)"
            self.guarded("speed", name, setting, 15 if self.smoke else 40, lambda name=name, setting=setting: self._speed(name, setting))

    def _speed(self, name: str, setting: str) -> None:
        fps = self.frames_per_s(self.model(name), self.args.frames, warmup=bench_families.STEADY_WARMUP)
        self.add("speed", name, setting, f"{fps:.2f} frames/s", value=fps)

    def compiled(self) -> None:
        if self.device.type != "cuda":
            self.add("compile", "all", "torch.compile of the image encoder", "SKIPPED", "CUDA only (--smoke on the CPU)")
            return
        for name in MODELS:
            self.guarded("compile", name, f"{self.size_of(name)} px, image encoder compiled", 90, lambda name=name: self._compiled(name))

    def _compiled(self, name: str) -> None:
        net = self.model(name)
        encoder = net.image_encoder if hasattr(net, "image_encoder") else net.vision_encoder
        encoder.compile()  # compiles the module's __call__ in place: forward_image / get_image_features use it
        t0 = time.perf_counter()
        self.frames_per_s(net, 1, warmup=2)  # compiles (the prompt frame and the tracking frames share the encoder)
        compile_s = time.perf_counter() - t0
        fps = self.frames_per_s(net, self.args.frames, warmup=bench_families.STEADY_WARMUP)
        eager = next((r.value for r in self.rows if r.check == "speed" and r.model == name and r.value), None)
        ratio = f", {fps / eager:.2f}x eager" if eager else ""
        self.add(
            "compile", name, f"{self.size_of(name)} px, image encoder compiled, 1 object, median of {self.args.frames} frames",
            f"{fps:.2f} frames/s", f"compile + warm-up {compile_s:.0f} s{ratio}", value=fps,
        )

    # ---------------------------------------------------------------- 3. objects batched

    def objects(self) -> None:
        for name in FAMILY_MODELS:
            setting = f"{self.size_of(name)} px, 4 objects, batch_objects true vs false, median of {self.args.frames} frames"
            self.guarded("objects", name, setting, 15 if self.smoke else 40, lambda name=name, setting=setting: self._objects(name, setting))

    def _objects(self, name: str, setting: str) -> None:
        net, warmup = self.model(name), bench_families.STEADY_WARMUP
        batched = self.frames_per_s(net, self.args.frames, warmup, objects=4, batch_objects=True)
        single = self.frames_per_s(net, self.args.frames, warmup, objects=4, batch_objects=False)
        self.add("objects", name, setting, f"{batched:.2f} vs {single:.2f} frames/s",
                 f"objects batched (tracker/families/batched_step.py) vs the library's loop: {batched / single:.2f}x", value=batched / single)

    # ---------------------------------------------------------------- 4. multi-stream

    def multistream(self) -> None:
        k, steps = self.args.streams, self.args.stream_steps
        for name in MODELS:
            setting = f"{k} sessions, {self.size_of(name)} px, {steps} steps"
            self.guarded("multi-stream", name, setting, 20 if self.smoke else 45, lambda name=name, setting=setting: self._multistream(name, setting))

    def _multistream(self, name: str, setting: str) -> None:
        net = self.model(name)
        k, steps = self.args.streams, self.args.stream_steps
        batched = stream_fps(net, k, steps, max_batch=k)
        single = stream_fps(net, k, steps, max_batch=1)
        self.add(
            "multi-stream", name, setting, f"{batched:.2f} vs {single:.2f} frames/s",
            f"batched (max_batch={k}) vs one by one (max_batch=1): {batched / single:.2f}x", value=batched / single,
        )

    # ---------------------------------------------------------------- 5. annotate

    def annotate(self) -> None:
        if self.smoke:
            cmd = ["video", "--frames", "8", "--image-size", "256", "--device", "cpu", "--rounds", "1", "--threads", "1"]
            setting = "bench_annotate.py video, CPU smoke (8 frames, 256 px; not a result)"
        else:
            cmd = ["video", "--frames", str(self.args.annotate_frames), "--size", "1280x720", "--image-size", "1024",
                   "--device", "cuda", "--rounds", "2", "--threads", "8"]
            setting = f"bench_annotate.py video --device cuda, {self.args.annotate_frames} frames 1280x720, 1024 px, 2 rounds"
        self.guarded("annotate", "sam2.1-tiny", setting, 30 if self.smoke else 90, lambda: self._annotate(cmd, setting))

    def _annotate(self, cmd: list[str], setting: str) -> None:
        timeout = max(30.0, min(self.budget.left() - 10, 240.0))
        out = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_annotate.py"), *cmd],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        )
        if out.returncode != 0:
            raise RuntimeError(f"bench_annotate.py exited {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
        text = out.stdout
        print(text, flush=True)
        ratio = re.search(r"throughput ours / meta: ([0-9.]+)x", text)
        fps = {w: re.findall(rf"^\s*{w}\s*:\s*([0-9.]+) frames/s", text, re.M) for w in ("ours", "meta")}
        if ratio is None:
            raise RuntimeError("bench_annotate.py printed no throughput line")
        ours = "/".join(fps["ours"]) or "?"
        meta = "/".join(fps["meta"]) or "?"
        self.add("annotate", "sam2.1-tiny", setting, f"{float(ratio.group(1)):.2f}x ours/meta",
                 f"ours {ours} vs Meta {meta} frames/s", value=float(ratio.group(1)))

    # ---------------------------------------------------------------- run

    def run(self) -> None:
        parts = {"equivalence": self.equivalence, "speed": self.speed, "objects": self.objects, "multi-stream": self.multistream,
                 "annotate": self.annotate, "compile": self.compiled}
        for name, part in parts.items():
            if name in self.args.checks:
                part()
                self.models_sync_free()
            else:
                self.add(name, "all", "", "NOT RUN", "not in --checks")

    def models_sync_free(self) -> None:
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _frames(n: int) -> list[np.ndarray]:
    from tests.frames import moving_shapes

    return moving_shapes(max(4, n), *bench_families.SPEED_HW)


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def stream_fps(net: torch.nn.Module, k: int, steps: int, *, max_batch: int) -> float:
    """``k`` live sessions (push sources) on one inference worker, one object
    each; every step hands each session one frame while the worker is held, so
    the step finds all of them ready (a batch of ``max_batch``). Total frames/s."""
    from tracker.ingest import PushSource
    from tracker.results import FrameResult
    from tracker.session import InferenceWorker, SessionManager

    frames = _frames(steps + 4)
    worker = InferenceWorker(net, max_batch=max_batch)
    manager = SessionManager(worker, models={"bench": net}, max_sessions=k)
    try:
        sources = [PushSource(f"bench{i}") for i in range(k)]
        sessions = [manager.open(src) for src in sources]
        queues: list[queue.Queue] = []
        for s in sessions:
            q: queue.Queue = queue.Queue()
            s.subscribe(q.put)
            queues.append(q)

        def wait_result(q: queue.Queue) -> FrameResult:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                item = q.get(timeout=max(0.01, deadline - time.monotonic()))
                if isinstance(item, FrameResult):
                    return item
            raise TimeoutError("no frame result within 120 s")

        def step(frame: np.ndarray) -> None:
            gate = threading.Event()
            worker.submit(lambda: gate.wait(60))
            for src in sources:
                src.push(frame)
            deadline = time.monotonic() + 30
            while not all(s.has_frame() for s in sessions) and time.monotonic() < deadline:
                time.sleep(0.001)
            gate.set()
            for q in queues:
                wait_result(q)

        step(frames[0])
        xy = bench_families.clicks_for(1, bench_families.SPEED_HW)[0]
        for s in sessions:
            s.add_prompt(1, points_xy=[xy], labels=[1]).result(120)
        for f in range(1, 3):  # warm-up
            step(frames[f])
        t0 = time.perf_counter()
        for f in range(3, 3 + steps):
            step(frames[f])
        return k * steps / (time.perf_counter() - t0)
    finally:
        manager.close_all()
        worker.stop()


def print_table(rows: list[Row], header: str) -> None:
    widths = [max(len(getattr(r, c)) for r in rows + [Row("check", "model", "setting", "result", "note")]) for c in ("check", "model", "setting", "result")]
    print(f"\n== device check: {header}")
    head = Row("check", "model", "setting", "result", "note")
    for r in [head, *rows]:
        cells = [getattr(r, c).ljust(w) for c, w in zip(("check", "model", "setting", "result"), widths)]
        print("  " + " | ".join(cells) + " | " + r.note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU run at small sizes, CUDA-only parts skipped (< 3 min)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting checks after this (default 420; smoke 170)")
    ap.add_argument("--frames", type=int, default=None, help="timed frames per speed figure (default 30; smoke 2)")
    ap.add_argument("--streams", type=int, default=None, help="sessions of the multi-stream check (default 4; smoke 2)")
    ap.add_argument("--stream-steps", type=int, default=None, help="timed steps of the multi-stream check (default 20; smoke 1)")
    ap.add_argument("--annotate-frames", type=int, default=400)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                    help="default: auto (bf16 autocast on CUDA), fp32 on the CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --smoke)")
    ap.add_argument("--checks", type=lambda t: [c.strip() for c in t.split(",")], default=list(CHECKS),
                    help=f"comma-separated subset of {','.join(CHECKS)} (default: all)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("device_check").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown:
        ap.error(f"--checks: unknown check {unknown[0]!r}; use some of {', '.join(CHECKS)}")
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.threads = args.threads if args.threads is not None else (1 if args.smoke else 0)
    args.budget_s = args.budget_s or (170.0 if args.smoke else 420.0)
    args.frames = args.frames or (2 if args.smoke else 30)
    args.stream_steps = args.stream_steps or (1 if args.smoke else 20)
    args.streams = args.streams or (2 if args.smoke else 4)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("device_check: CUDA is not available on this machine; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    if args.threads:
        # on a shared CPU two OpenMP threads wait on each other (8-10x slower under load): 1 for --smoke
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    checker = Checker(args)
    gpu = torch.cuda.get_device_name(checker.device) if checker.device.type == "cuda" else "CPU"
    header = (f"{gpu}, torch {torch.__version__}, {'SMOKE (CPU, small sizes: checks the script, not the figures)' if args.smoke else 'full'}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"device_check: {header}", flush=True)
    if args.smoke:
        print("device_check: --smoke: float32 on the CPU (bf16 autocast is CUDA's; --precision bf16 for the CPU's), "
              "small models (SAM 3's tracker: its reduced variant), one equivalence scenario per family, "
              "torch.compile skipped (CUDA only)", flush=True)
    checker.run()
    print_table(checker.rows, header + f", {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "rows": [asdict(r) for r in checker.rows]}, indent=1))
    failed = [r for r in checker.rows if r.result.startswith(("ERROR", "FAIL"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
