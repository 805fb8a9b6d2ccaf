"""``sam2-stream eval --models A,B --video V --prompts P --gt GT``: annotate one
labelled clip with each model, then score every run side by side (J&F and
frames/s), so choosing a model for your own footage is one command.

Each model's run is exactly what ``sam2-stream annotate`` writes (DAVIS PNGs
and the run summary with its speed) in ``WORK/MODEL/``; the scoring is
:func:`tracker.evaluate.evaluate` on those folders.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tracker.evaluate import EvalError, Run, find_run

log = logging.getLogger(__name__)


def add_model_run_args(e: argparse.ArgumentParser) -> None:
    """The options of ``eval`` that make the runs instead of naming them."""
    g = e.add_argument_group("run the models first (instead of naming runs)")
    g.add_argument("--models", help="comma-separated models to annotate the clip with, e.g. sam2.1-tiny,edgetam")
    g.add_argument("--video", help="the labelled clip's frames (a folder of JPEGs, a video file)")
    g.add_argument("--prompts", help="the prompts file for --video (as annotate takes it)")
    g.add_argument("--work", default="eval-runs", help="where each model's annotate output goes (WORK/MODEL/)")
    g.add_argument("--video-name", help="the sequence name the ground truth uses (default: the clip's folder/file name)")
    g.add_argument("--device", default="auto", help="device for the models (auto, cpu, cuda, ...)")
    g.add_argument("--image-size", type=int, default=None, help="model input size (default: each model's own)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    g.add_argument("--random-weights", type=int, metavar="SEED", default=None, help="RANDOM weights (tests only: meaningless scores)")


def run_models(args: argparse.Namespace) -> list[Run]:
    """Annotate ``args.video`` with every model of ``args.models``; the runs to score."""
    from tracker.annotate_many import AnnotateOptions, ModelSpec, VideoJob
    from tracker.cli import annotate_video

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise EvalError("--models names no model")
    if len(set(models)) != len(models):
        raise EvalError(f"--models names a model twice: {args.models}")
    if not args.video or not args.prompts:
        raise EvalError("--models needs the clip to annotate: --video and --prompts")
    name = args.video_name or Path(args.video.removeprefix("images:").rstrip("/")).stem
    runs = []
    for model in models:
        out = Path(args.work) / model.replace("/", "_")
        log.info("annotating %s with %s into %s", name, model, out)

        spec = ModelSpec(
            model=model,
            device=args.device,
            image_size=args.image_size,
            precision=args.precision,
            random_weights=args.random_weights,
        )
        job = VideoJob(video=args.video, prompts=args.prompts, name=name, out=str(out))
        annotate_video(job, AnnotateOptions(formats=("davis",), model_name=model), spec.build, quiet=True)
        runs.append(find_run(out, name=model, pred_format="davis"))
    return runs
