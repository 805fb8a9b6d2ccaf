"""``sam2-stream eval`` on the real clips of ``../shared/vos/`` (skipped when absent).

Real label maps: the ground truth scored against itself, against copies shifted
and eroded by known amounts (values that follow from the definitions), and an
``annotate`` run (random weights: the score means nothing, the pipeline must run)
scored end to end from the command line, next to the ground truth as a second run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tracker.evaluate import (
    GroundTruthSequence,
    add_eval_parser,
    boundary_tolerance_px,
    evaluate,
    find_ground_truth,
    find_run,
    region_similarity,
)
from tracker.export import make_writer
from tracker.results import FrameResult, ObjectResult

from tests.test_annotate_shared import VOS, clip_dir  # one place knows where ../shared/vos is

N = 16  # chair frames the known-value tests score (14 of them)

pytestmark = [
    pytest.mark.shared,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not VOS.is_dir(), reason="../shared/vos is absent (only in the project's workplace)"),
]


def chair_labels(n: int = 60) -> list[np.ndarray]:
    folder = clip_dir("pumavos-chair", "Annotations")
    return [np.array(Image.open(folder / f"frame_{i:06d}.png")) for i in range(n)]


def chair_gt(n: int) -> dict[str, GroundTruthSequence]:
    """The chair's first ``n`` ground-truth frames (known values need no more)."""
    files = find_ground_truth(clip_dir("pumavos-chair"))["pumavos-chair"].files
    return {"chair": GroundTruthSequence("chair", {i: files[i] for i in range(n)})}


def write_davis_run(out: Path, name: str, labels: list[np.ndarray]) -> Path:
    h, w = labels[0].shape
    with make_writer("davis", out, video_name=name, height=h, width=w) as writer:
        for i, lab in enumerate(labels):
            objects = {int(k): ObjectResult(int(k), lab == k, 5.0) for k in np.unique(lab) if k}
            writer.write(FrameResult(i, h, w, objects=objects))
    return out


def run_eval(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    p = argparse.ArgumentParser(prog="sam2-stream")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["eval", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_chair_ground_truth_against_itself(tmp_path, capsys):
    """60 label maps in pumavos' layout (Annotations/frame_000010.png beside JPEGImages/): 58 scored, J = F = 1."""
    run = write_davis_run(tmp_path / "run", "chair", chair_labels())
    run_eval(["--gt", str(clip_dir("pumavos-chair")), str(run), "--json", str(tmp_path / "s.json")], capsys)
    (r,) = json.loads((tmp_path / "s.json").read_text())["runs"]
    (seq,) = r["sequences"]
    assert (seq["name"], seq["frames"], r["J"], r["F"], r["J&F"]) == ("pumavos-chair", 58, 1.0, 1.0, 1.0)
    assert [o["obj_id"] for o in seq["objects"]] == [1]


def test_judo_sparse_label_maps_against_themselves():
    """cutie-judo's masks (frames 0, 5, 8, 13, one new object each; 00005.png a pixel narrower)
    are a DAVIS folder a run could have written: skipping the first and last frame leaves
    objects 2 and 3; all frames score all four objects, each from the frame it enters."""
    masks = clip_dir("cutie-judo", "masks", "judo")
    gt = find_ground_truth(masks)
    assert list(gt["judo"].files) == [0, 5, 8, 13]
    (davis,) = evaluate(gt, [find_run(masks)])
    assert [(o.obj_id, o.j, o.f, o.frames) for o in davis.objects] == [(2, 1.0, 1.0, 2), (3, 1.0, 1.0, 1)]
    (every,) = evaluate(gt, [find_run(masks)], all_frames=True)
    assert [(o.obj_id, o.j, o.f, o.frames) for o in every.objects] == [(1, 1.0, 1.0, 4), (2, 1.0, 1.0, 3), (3, 1.0, 1.0, 2), (4, 1.0, 1.0, 1)]


def per_frame_j(gt: list[np.ndarray], pred: list[np.ndarray]) -> float:
    """J counted directly, on the frames DAVIS scores."""
    values = []
    for g, p in zip(gt[1:-1], pred[1:-1]):
        a, b = g == 1, p == 1
        values.append(np.count_nonzero(a & b) / np.count_nonzero(a | b))
    return float(np.mean(values))


@pytest.mark.parametrize("dx", [3, 7, 8, 200])
def test_chair_shifted(tmp_path, dx):
    """The chair is 29 px or more from every edge, so a shift moves its boundary by exactly dx:
    within the 7-px tolerance (0.008 x the 720x480 diagonal, rounded up) F is exactly 1,
    one pixel more and it is not; 200 px away nothing overlaps: J = F = 0."""
    labels = chair_labels(N)
    assert boundary_tolerance_px(labels[0].shape) == 7
    pred = [np.roll(lab, dx, axis=1) for lab in labels]
    (score,) = evaluate(chair_gt(N), [find_run(write_davis_run(tmp_path, "chair", pred))])
    (obj,) = score.objects
    assert obj.j == pytest.approx(per_frame_j(labels, pred), abs=1e-12)
    if dx <= 7:
        assert obj.f == 1.0 and 0 < obj.j < 1
    elif dx == 8:
        assert 0.5 < obj.f < 1.0
    else:
        assert (obj.j, obj.f) == (0.0, 0.0)


def test_chair_eroded(tmp_path):
    """Eroding by one pixel keeps a subset: J = |eroded| / |ground truth| on every frame; the
    boundary moves by a pixel, but the chair's thinnest parts vanish: F falls a little."""
    labels = chair_labels(N)
    kernel = np.ones((3, 3), np.uint8)
    pred = [cv2.erode(lab, kernel) for lab in labels]
    (score,) = evaluate(chair_gt(N), [find_run(write_davis_run(tmp_path, "chair", pred))])
    (obj,) = score.objects
    expected_j = np.mean([np.count_nonzero(p) / np.count_nonzero(g) for g, p in zip(labels[1:-1], pred[1:-1])])
    assert obj.j == pytest.approx(expected_j, abs=1e-12)
    assert obj.j == pytest.approx(np.mean([region_similarity(p == 1, g == 1) for g, p in zip(labels[1:-1], pred[1:-1])]))
    assert 0.9 < obj.f < 1.0


def test_chair_eroded_equals_vos_benchmark(tmp_path):
    """The same numbers from vos-benchmark's evaluator, where it is installed."""
    pytest.importorskip("skimage")
    vb = pytest.importorskip("vos_benchmark.evaluator")
    labels = chair_labels(N)
    pred = [cv2.erode(lab, np.ones((5, 5), np.uint8)) for lab in labels]
    (score,) = evaluate(chair_gt(N), [find_run(write_davis_run(tmp_path, "chair", pred))])
    ref = vb.Evaluator()
    for g, p in zip(labels[1:-1], pred[1:-1]):
        ref.feed_frame(p, g)
    ref_j, ref_f = ref.conclude()
    (obj,) = score.objects
    assert obj.j * 100 == pytest.approx(ref_j[1], abs=1e-9) and obj.f * 100 == pytest.approx(ref_f[1], abs=1e-9)


def test_annotate_run_scored_end_to_end(random_checkpoint, tmp_path, capsys):
    """``sam2-stream annotate`` (random weights, 4 frames, DAVIS and COCO) then ``eval`` with the
    ground truth as a second run: a table and JSON, one row per run; COCO scores as DAVIS."""
    from tracker.cli import main

    src = clip_dir("pumavos-chair")
    clip = tmp_path / "chair4"
    for sub, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
        (clip / sub).mkdir(parents=True)
        for i in range(4):
            shutil.copy(src / sub / f"frame_{i:06d}.{ext}", clip / sub / f"frame_{i:06d}.{ext}")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"prompts": [{"obj_id": 1, "frame": 0, "mask": str(clip / "Annotations" / "frame_000000.png")}]}))
    out = tmp_path / "out"
    argv = ["annotate", str(clip / "JPEGImages"), "--prompts", str(prompts), "--out", str(out), "--video-name", "chair4"]
    argv += ["--format", "davis", "--format", "coco", "--checkpoint", str(random_checkpoint), "--image-size", "256"]
    assert main(argv + ["--device", "cpu", "--quiet"]) == 0
    assert sorted(p.name for p in (out / "chair4").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    oracle = write_davis_run(tmp_path / "oracle", "chair4", [np.array(Image.open(p)) for p in sorted((clip / "Annotations").iterdir())])

    table = run_eval(["--gt", str(clip), f"random={out}", f"oracle={oracle}", "--json", str(tmp_path / "s.json")], capsys)
    random_run, oracle_run = json.loads((tmp_path / "s.json").read_text())["runs"]
    assert (random_run["name"], random_run["format"], oracle_run["name"]) == ("random", "davis", "oracle")
    assert (oracle_run["J"], oracle_run["F"]) == (1.0, 1.0)
    (seq,) = random_run["sequences"]
    assert (seq["name"], seq["frames"], [o["obj_id"] for o in seq["objects"]]) == ("chair4", 2, [1])
    assert 0.0 <= random_run["J"] <= 1.0 and 0.0 <= random_run["F"] <= 1.0
    if (out / "chair4.run.json").exists():  # annotate records its speed (tracker.evaluate.write_run_summary)
        assert random_run["frames_per_s"] > 0 and random_run["model"] == "sam2.1-tiny"
    else:
        assert random_run["frames_per_s"] is None
    lines = table.splitlines()
    summary = lines[lines.index("") + 1 :]
    assert [line.split()[0] for line in summary] == ["run", "random", "oracle"]
    assert summary[2].split()[4:7] == ["100.0", "100.0", "100.0"]
    assert summary[1].split()[4] == f"{100 * random_run['J&F']:.1f}"

    run_eval(["--gt", str(clip), "--format", "coco", str(out), "--json", str(tmp_path / "c.json")], capsys)
    (coco,) = json.loads((tmp_path / "c.json").read_text())["runs"]
    assert coco["format"] == "coco" and coco["sequences"] == random_run["sequences"]
