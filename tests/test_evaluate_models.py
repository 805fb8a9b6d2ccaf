"""``eval --models``: one command annotates a labelled clip with each model and
scores the runs side by side (J&F, frames/s). Random weights here, so the
scores mean nothing; what is checked is that each run is annotate's own output
(the same PNGs as ``annotate`` writes) scored against the ground truth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from tests.frames import moving_shapes, shape_centres, write_jpeg_folder
from tracker.evaluate import EvalError, add_eval_parser
from tracker.masks import encode_label_png

N, H, W = 8, 120, 160


def labels(i: int) -> np.ndarray:
    lab = np.zeros((H, W), dtype=np.uint8)
    (x, y), _, _ = shape_centres(i, H, W)
    lab[int(y) - 14 : int(y) + 15, int(x) - 14 : int(x) + 15] = 1
    return lab


@pytest.fixture
def labelled_clip(tmp_path: Path) -> tuple[Path, Path, Path]:
    frames = tmp_path / "JPEGImages" / "walk"
    write_jpeg_folder(moving_shapes(N, H, W, seed=1), frames)
    gt = tmp_path / "Annotations" / "walk"
    gt.mkdir(parents=True)
    for i in range(N):
        (gt / f"{i:05d}.png").write_bytes(encode_label_png(labels(i)))
    (x, y), _, _ = shape_centres(0, H, W)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"prompts": [{"obj_id": 1, "frame": 0, "points": [[x, y]], "labels": [1]}]}))
    return frames, tmp_path / "Annotations", prompts


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sam2-stream")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["eval", *argv])
    return args.func(args)


def test_models_are_run_then_scored_side_by_side(labelled_clip, tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    frames, gt, prompts = labelled_clip
    work = tmp_path / "runs"
    argv = [
        "--gt", str(gt), "--video", str(frames), "--prompts", str(prompts), "--models", "sam2.1-tiny,edgetam",
        "--work", str(work), "--random-weights", "0", "--image-size", "256", "--device", "cpu",
        "--json", str(tmp_path / "scores.json"),
    ]
    assert run(argv) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "scores.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["sam2.1-tiny", "edgetam"]
    for r in data["runs"]:
        assert 0.0 <= r["J&F"] <= 1.0 and r["frames_per_s"] > 0
        assert sorted(p.name for p in (work / r["name"] / "walk").glob("*.png")) == [f"{i:05d}.png" for i in range(N)]
        assert json.loads((work / r["name"] / "walk.run.json").read_text())["model"] == r["name"]
    assert "sam2.1-tiny" in out and "edgetam" in out


def test_models_need_the_clip(labelled_clip, capsys) -> None:
    _, gt, _ = labelled_clip
    with pytest.raises(EvalError, match="--video and --prompts"):
        run(["--gt", str(gt), "--models", "sam2.1-tiny"])
    with pytest.raises(EvalError, match="name the runs"):
        run(["--gt", str(gt)])
