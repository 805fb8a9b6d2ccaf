"""The ``sam2-stream`` command line.

``track``: follow objects clicked on the first frame of any source the ingest
layer opens (file, RTSP, HTTP/HLS, UDP, webcam, image folder) and write one JSON
line per processed frame (timestamps, per-object score, box and COCO RLE mask).
``annotate``: offline propagation of a prompts file through a whole video,
written in annotation formats. ``segment``: single images. ``serve`` lives in
``server.cli``, which extends this parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Sequence

from tracker.allocator import keep_freed_memory
from tracker.errors import TrackerError

if TYPE_CHECKING:
    from tracker.annotate import AnnotateStats
    from tracker.annotate_many import AnnotateOptions, VideoJob

logger = logging.getLogger("sam2-stream")


@dataclass
class PromptArg:
    """One ``--point``/``--box`` from the command line, in source pixels."""

    obj_id: int
    points_xy: list[list[float]]
    labels: list[int]
    box_xyxy: list[float] | None = None


def _split_obj(text: str) -> tuple[int, str]:
    if ":" in text:
        obj, rest = text.split(":", 1)
        return int(obj), rest
    return 1, text


def parse_point(text: str) -> PromptArg:
    """``[OBJ:]X,Y[,LABEL]`` → a one-point prompt (label 1 = positive, 0 = negative)."""
    try:
        obj_id, rest = _split_obj(text)
        parts = [float(v) for v in rest.split(",")]
        if len(parts) not in (2, 3):
            raise ValueError
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"--point {text!r}: expected [OBJ:]X,Y[,LABEL], e.g. 1:320,240 or 2:100,80,0") from None
    return PromptArg(obj_id, [parts[:2]], [label])


def parse_box(text: str) -> PromptArg:
    """``[OBJ:]X0,Y0,X1,Y1`` → a box prompt."""
    try:
        obj_id, rest = _split_obj(text)
        parts = [float(v) for v in rest.split(",")]
        if len(parts) != 4:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box {text!r}: expected [OBJ:]X0,Y0,X1,Y1, e.g. 1:100,80,220,200") from None
    return PromptArg(obj_id, [], [], parts)


def parse_key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def merge_prompts(args: Sequence[PromptArg]) -> dict[int, PromptArg]:
    """Points and a box given for the same object become one prompt."""
    merged: dict[int, PromptArg] = {}
    for a in args:
        m = merged.setdefault(a.obj_id, PromptArg(a.obj_id, [], []))
        m.points_xy += a.points_xy
        m.labels += a.labels
        if a.box_xyxy is not None:
            m.box_xyxy = a.box_xyxy
    return merged


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="sam2.1-tiny",
        help="sam2.1-tiny|small|base-plus|large, sam2-*, a sam2 config path (Meta's SAM 2 code); "
        "edgetam (EdgeTAM, fast on CPUs) or sam3-tracker (SAM 3's tracker) through transformers: pip install -e '.[models]'",
    )
    p.add_argument(
        "--checkpoint",
        help="a .pt file in Meta's format, or for edgetam/sam3-tracker a folder in transformers' format "
        "(default: the official one, downloaded once to the cache)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--image-size", type=int, default=None, help="model input size (1024 as trained; 512/256 are faster)")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default=None,
        help="autocast: auto = bf16 on CUDA, fp32 on the CPU; bf16 on a CPU with AVX512-BF16/AMX is ~2x faster",
    )
    p.add_argument(
        "--random-weights",
        type=int,
        metavar="SEED",
        default=None,
        help="RANDOM weights with this seed instead of a checkpoint: meaningless masks, for trying the pipeline only",
    )


def build_model_from_args(args: argparse.Namespace):
    from tracker.annotate_many import ModelSpec

    return ModelSpec.from_args(args).build()


def frame_record(result, *, with_masks: bool = True) -> dict:
    """A FrameResult as one JSON-serialisable line."""
    from tracker.masks import encode_rle

    objects = {}
    for obj_id, r in result.objects.items():
        rec = {"score": round(r.score, 4), "visible": r.visible, "box_xyxy": r.box_xyxy, "area": r.area}
        if with_masks:
            rec["mask_rle"] = encode_rle(r.mask_hw)
        objects[str(obj_id)] = rec
    return {
        "frame_idx": result.frame_idx,
        "source_index": result.source_index,
        "pts_s": result.pts_s,
        "arrival_s": result.arrival_s,
        "processed_s": result.processed_s,
        "size_hw": [result.height, result.width],
        "objects": objects,
    }


def prompt_checks(prompts: dict[int, PromptArg], where: str) -> list[tuple[str, list | None, list | None, list | None]]:
    """``--point``/``--box`` prompts as :func:`tracker.probe.check_points` takes them."""
    return [
        (f"prompt for object {p.obj_id} {where}", p.points_xy or None, p.labels or None, p.box_xyxy)
        for p in prompts.values()
    ]


def cmd_track(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from tracker.ingest import open_source
    from tracker.families import make_predictor
    from tracker.probe import check_points, probe_source

    prompts = merge_prompts(args.prompt or [])
    if not prompts:
        raise SystemExit("track: give at least one --point or --box for the first frame")
    options = dict(args.source_opt or [])
    if args.mode:
        options["mode"] = args.mode
    if args.realtime:
        options["realtime"] = True
    # what can be checked before the model loads: the source exists, the prompts fit its frame
    probe = probe_source(args.source, count_frames=not args.max_frames, **options)
    check_points(probe.size_hw, prompt_checks(prompts, "on frame 0"))
    model = build_model_from_args(args)
    predictor = make_predictor(model)
    every_frame = probe.is_local and options.get("mode", "file") == "file"
    total = probe.frame_count if every_frame else None
    if args.max_frames:
        total = min(total, args.max_frames) if total is not None else args.max_frames
    name = Path(probe.display.removeprefix("images:").rstrip("/")).name or probe.display
    out: IO[str] = open(args.out, "w") if args.out and args.out != "-" else sys.stdout
    t0 = time.perf_counter()
    n = 0
    bar = tqdm(total=total, unit="frame", desc=f"track {name}", disable=args.quiet)
    try:
        with logging_redirect_tqdm(), open_source(args.source, **options) as source:
            for frame in source:
                result = predictor.track(
                    frame.image_rgb,
                    pts_s=frame.pts_s,
                    arrival_s=frame.arrival_s,
                    source_index=frame.index,
                    source_size=frame.source_size,
                )
                if n == 0:
                    for p in prompts.values():
                        r = predictor.add_prompt(
                            p.obj_id,
                            points_xy=p.points_xy or None,
                            labels=p.labels or None,
                            box_xyxy=p.box_xyxy,
                        )
                        result.objects[p.obj_id] = r
                out.write(json.dumps(frame_record(result, with_masks=not args.no_masks)) + "\n")
                out.flush()
                n += 1
                bar.update(1)
                if not every_frame and source.stats.dropped:
                    bar.set_postfix(dropped=source.stats.dropped, refresh=False)
                if args.max_frames and n >= args.max_frames:
                    break
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    dt = time.perf_counter() - t0
    logger.info("done: %d frames in %.1f s (%.2f frames/s)", n, dt, n / dt if dt else 0.0)
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    """One video (``VIDEO --prompts P``), or many: a folder of videos or ``--manifest FILE``."""
    from tracker.annotate_many import VideoJob, cmd_annotate_many, options_from_args

    if args.manifest or args.prompts is None:
        if args.manifest is None and args.video is None:
            raise SystemExit("annotate: give a video and --prompts, a folder of videos, or --manifest FILE")
        return cmd_annotate_many(args)
    if args.video is None:
        raise SystemExit("annotate: give the video to annotate with --prompts")
    name = args.video_name or Path(args.video.removeprefix("images:").rstrip("/")).stem or "video"
    job = VideoJob(video=args.video, prompts=args.prompts, name=name, out=args.out)
    annotate_video(job, options_from_args(args), lambda: build_model_from_args(args), resume=args.resume, quiet=args.quiet)
    return 0


def annotate_video(
    job: "VideoJob",
    options: "AnnotateOptions",
    model_factory: Callable[[], Any],
    *,
    resume: bool = False,
    quiet: bool = False,
    on_frame: Callable[[int], None] | None = None,
) -> "AnnotateStats":
    """What ``annotate`` does for one video: checks, then the model, then the export files in ``job.out``.

    The one-video command, the many-videos loop and the Ray workers all write
    through here, so each video's files are the same whichever ran it.
    ``model_factory`` is called once the checks that need no model have passed;
    ``on_frame`` hears each frame written (progress).
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    keep_freed_memory()  # also for the many-videos loop: frames and activations reused, not page-faulted in each frame

    from tracker.annotate import AnnotateStats, annotate, check_prompts, load_prompts
    from tracker.annotate_many import WORK_DIR
    from tracker.errors import SourceUnsupportedError
    from tracker.export import make_writer
    from tracker.probe import probe_source

    # every check that needs no model first: the source, its length and size against the prompts
    prompts = load_prompts(job.prompts)
    probe = probe_source(job.video)
    check_prompts(prompts, probe)
    if probe.size_hw is None:
        raise SourceUnsupportedError(f"cannot read {probe.display}: no frame decodes")
    height, width = probe.size_hw
    fps = probe.fps
    name = job.name
    obj_ids = sorted({p.obj_id for p in prompts})
    formats = list(options.formats)
    model = model_factory()
    out_dir = Path(job.out)

    def open_writers() -> list:
        return [
            make_writer(f, out_dir, video_name=name, height=height, width=width, fps=fps, obj_ids=obj_ids, resume=resume)
            for f in formats
            if f != "overlay"
        ]

    # a fresh run opens its outputs with its first frame: a run refused before it writes nothing
    writers = open_writers() if resume else None
    done = set.intersection(*(w.done_frames() for w in writers)) if writers else set()
    overlay_rles: dict[int, dict[int, dict]] | None = {} if "overlay" in formats else None
    stats = AnnotateStats()
    bar = tqdm(total=probe.frame_count, unit="frame", desc=f"annotate {name}", initial=len(done), disable=quiet)
    try:
        with logging_redirect_tqdm():
            for result in annotate(
                job.video,
                prompts,
                model=model,
                work_dir=out_dir / WORK_DIR,
                resume=resume,
                skip_frames=done,
                stats=stats,
                checkpoint_every=options.save_state_every,
            ):
                if writers is None:
                    writers = open_writers()
                for w in writers:
                    w.write(result)
                if overlay_rles is not None:
                    overlay_rles[result.frame_idx] = frame_record(result)["objects"]
                bar.update(1)
                if on_frame is not None:
                    on_frame(result.frame_idx)
    except BaseException:
        for w in writers or []:
            w.abort()
        raise
    finally:
        bar.close()
    for w in writers if writers is not None else open_writers():
        w.close()
        logger.info("wrote %s", w.output_path)
    if overlay_rles is not None:
        path = write_overlay(job.video, overlay_rles, out_dir, name, height, width, fps)
        logger.info("wrote %s", path)
    if stats.video_frames is not None and probe.frame_count is not None and stats.video_frames != probe.frame_count:
        logger.warning(
            "%s: its %s said %d frames, %d decoded (a truncated or damaged file?)",
            probe.display,
            "container" if probe.count_from == "header" else probe.count_from,
            probe.frame_count,
            stats.video_frames,
        )
    logger.info(
        "%d frames (%d forward, %d backward) in %.1f s: %.2f frames/s%s",
        stats.frames,
        stats.forward_frames,
        stats.backward_frames,
        stats.seconds,
        (stats.forward_frames + stats.backward_frames) / stats.seconds if stats.seconds else 0.0,
        f", resumed after frame {stats.resumed_from}" if stats.resumed_from is not None else "",
    )
    # the run's speed beside its outputs, for `sam2-stream eval` (a resumed run: the rate of its own part)
    from tracker.evaluate import write_run_summary

    write_run_summary(
        out_dir, name, frames=stats.forward_frames + stats.backward_frames, seconds=stats.seconds, model=options.model_name
    )
    return stats


def write_overlay(video: str, records: dict[int, dict[int, dict]], out_dir: Path, name: str, height: int, width: int, fps: float | None) -> Path:
    """Second pass for ``--format overlay``: decode again, draw the saved masks."""
    from tracker.export import make_writer
    from tracker.ingest import open_source
    from tracker.masks import decode_rle
    from tracker.results import FrameResult, ObjectResult

    writer = make_writer("overlay", out_dir, video_name=name, height=height, width=width, fps=fps)
    with open_source(video, mode="file") as source:
        for idx, frame in enumerate(source):
            result = FrameResult(frame_idx=idx, height=height, width=width, pts_s=frame.pts_s)
            for obj_id, rec in records.get(idx, {}).items():
                result.objects[int(obj_id)] = ObjectResult(
                    obj_id=int(obj_id), mask_hw=decode_rle(rec["mask_rle"]), score=rec["score"], box_xyxy=rec["box_xyxy"]
                )
            writer.write(result, image_rgb=frame.image_rgb)
    writer.close()
    return writer.output_path


def image_size_hw(path: Path) -> tuple[int, int]:
    """(height, width) of an image file as image mode decodes it (EXIF orientation
    applied), from its header: no pixels decoded."""
    from PIL import Image

    from tracker.segment import load_rgb

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = int(image.getexif().get(0x0112, 1))
    except Exception:  # not an image Pillow reads: the decoder says why, in its words
        return load_rgb(path).shape[:2]  # type: ignore[return-value]
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)  # quarter turns swap them


def cmd_segment(args: argparse.Namespace) -> int:
    from tracker.masks import encode_png, encode_rle
    from tracker.probe import check_points
    from tracker.families.hf_image import make_segmenter
    from tracker.segment import load_rgb

    prompts = merge_prompts(args.prompt or [])
    if not prompts:
        raise SystemExit("segment: give at least one --point or --box")
    paths: list[Path] = []
    for item in args.images:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
        elif p.is_file():
            paths.append(p)
        else:
            raise SystemExit(f"segment: {p} is not a file or folder")
    for path in paths:  # every prompt fits every image before the model loads
        check_points(image_size_hw(path), prompt_checks(prompts, f"on {path}"))
    segmenter = make_segmenter(build_model_from_args(args))
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        image = load_rgb(path)
        segmenter.set_image(image)  # one embedding per image, reused by every prompt
        for obj_id, p in prompts.items():
            res = segmenter.predict(
                points_xy=p.points_xy or None, labels=p.labels or None, box_xyxy=p.box_xyxy, multimask=args.multimask
            )
            record = {"image": str(path), "obj_id": obj_id, "masks": []}
            for k, cand in enumerate(res.candidates):
                entry = {"score": round(cand.score, 4), "box_xyxy": cand.box_xyxy, "area": int(cand.mask_hw.sum())}
                if out_dir:
                    suffix = f"_obj{obj_id}" + (f"_{k}" if args.multimask else "")
                    target = out_dir / f"{path.stem}{suffix}.png"
                    target.write_bytes(encode_png(cand.mask_hw))
                    entry["png"] = str(target)
                else:
                    entry["mask_rle"] = encode_rle(cand.mask_hw)
                record["masks"].append(entry)
            print(json.dumps(record), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam2-stream", description="Video object tracking on SAM 2")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("track", help="track objects clicked on the first frame of a source; JSON lines out")
    t.add_argument("source", help="file, folder of frames, rtsp://, http(s)://, udp://, /dev/videoN, …")
    t.add_argument("--point", dest="prompt", action="append", type=parse_point, metavar="[OBJ:]X,Y[,LABEL]")
    t.add_argument("--box", dest="prompt", action="append", type=parse_box, metavar="[OBJ:]X0,Y0,X1,Y1")
    t.add_argument("--out", default="-", help="JSON lines file (default: stdout)")
    t.add_argument("--max-frames", type=int, default=0)
    t.add_argument("--mode", choices=["live", "file"], help="newest frame only (live) or every frame (file)")
    t.add_argument("--realtime", action="store_true", help="play a file at its own frame rate, as a camera would")
    t.add_argument("--no-masks", action="store_true", help="omit RLE masks from the output (boxes and scores only)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--source-opt",
        action="append",
        type=parse_key_value,
        metavar="KEY=VALUE",
        help="source option (timeout_s, rtsp_transport, resize, preprocess, fps, size, ...); repeat for several",
    )
    add_model_args(t)
    t.set_defaults(func=cmd_track)

    from tracker.export import FORMATS

    a = sub.add_parser("annotate", help="propagate prompts through a whole video (forward and backward); export masks")
    a.add_argument(
        "video",
        nargs="?",
        help="video file or folder of frames (with --prompts); without --prompts: a folder of videos, "
        "each with its prompts file NAME.json beside it",
    )
    a.add_argument("--prompts", help="prompts JSON (see samples/prompts.json); required for one video")
    a.add_argument(
        "--manifest",
        metavar="FILE",
        help='many videos: JSON lines of {"video": PATH, "prompts": PATH, "name": NAME}; each written to OUT/NAME/',
    )
    a.add_argument("--out", required=True, help="output folder (many videos: one sub-folder per video)")
    a.add_argument("--format", action="append", choices=FORMATS, help="coco (default), ytvis, davis, mot, overlay; repeat for several")
    a.add_argument("--video-name", help="name used in the outputs (default: the file name)")
    a.add_argument("--resume", action="store_true", help="continue an interrupted run from what is on disk")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument("--save-state-every", type=int, default=50, metavar="N", help="save the resume state every N frames")
    add_model_args(a)
    a.set_defaults(func=cmd_annotate)

    g = sub.add_parser("segment", help="segment single images (image mode of any --model)")
    g.add_argument("images", nargs="+", help="image files or folders")
    g.add_argument("--point", dest="prompt", action="append", type=parse_point, metavar="[OBJ:]X,Y[,LABEL]")
    g.add_argument("--box", dest="prompt", action="append", type=parse_box, metavar="[OBJ:]X0,Y0,X1,Y1")
    g.add_argument("--multimask", action="store_true", help="three candidate masks per prompt, best first, with predicted IoU")
    g.add_argument("--out", help="folder for PNG masks (default: RLE in the JSON output)")
    add_model_args(g)
    g.set_defaults(func=cmd_segment)
    from tracker.evaluate import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    parser: argparse.ArgumentParser | None = None,
    quiet_loggers: Sequence[str] = (),
) -> int:
    """Parse, set up logging, run the subcommand; TrackerError → message, exit 2.

    ``server.cli`` passes its parser (these subcommands plus ``serve``) and the
    loggers that are only worth hearing with ``--verbose``.
    """
    args = (parser or build_parser()).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for name in quiet_loggers:
            logging.getLogger(name).setLevel(logging.WARNING)
    keep_freed_memory()  # before any model is built: large buffers reused frame after frame
    try:
        return int(args.func(args) or 0)
    except TrackerError as e:
        logger.error("%s", e)
        return 2
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
