"""``sam2-stream eval``: DAVIS's J and F on masks whose values can be counted by
hand, the protocol (frames, objects, void), the layouts it reads, several runs
side by side, its errors, and equality with vos-benchmark where that is installed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from tracker.evaluate import (
    EvalError,
    GroundTruthSequence,
    PredictedSequence,
    SequenceScorer,
    add_eval_parser,
    boundary_f,
    boundary_map,
    boundary_tolerance_px,
    disk,
    evaluate,
    find_ground_truth,
    find_run,
    region_similarity,
    score_sequence,
    write_run_summary,
)
from tracker.export import make_writer
from tracker.masks import encode_label_png
from tracker.results import FrameResult, ObjectResult

H, W = 20, 40


def square(y0: int, x0: int, h: int = 10, w: int = 10, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0 : y0 + h, x0 : x0 + w] = True
    return m


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sam2-stream")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    return p


def run_eval(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    args = parser().parse_args(["eval", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


# --- the measures, by hand ------------------------------------------------------------


def test_j_of_a_square_shifted_by_one_pixel():
    """10x10 square vs the same shifted right by 1: 9 columns shared, 11 covered: J = 90 / 110."""
    assert region_similarity(square(5, 5), square(5, 6)) == pytest.approx(90 / 110)
    assert region_similarity(square(5, 5), square(5, 5)) == 1.0


def test_boundary_map_of_a_square_counted_by_hand():
    """seg2bmap puts the boundary half a pixel towards the origin: the row above and the
    column left of the square (outside), its own last row and last column (inside)."""
    y0, x0, y1, x1 = 5, 5, 14, 14
    expected = np.zeros((H, W), dtype=bool)
    expected[y0 - 1, x0 - 1 : x1 + 1] = True  # row above, from the upper-left corner: 11 px
    expected[y0 : y1 + 1, x0 - 1] = True  # column left: 10 px
    expected[y1, x0 : x1 + 1] = True  # last row: 10 px
    expected[y0 : y1 + 1, x1] = True  # last column: 10 px, one shared with the last row
    bmap = boundary_map(square(y0, x0))
    np.testing.assert_array_equal(bmap, expected)
    assert bmap.sum() == 11 + 10 + 10 + 10 - 1


def test_boundary_map_edges_of_the_image():
    """On the last row only the right neighbour counts, on the last column only the lower one, never the corner."""
    full = np.ones((4, 5), dtype=bool)
    assert not boundary_map(full).any()
    m = np.zeros((4, 5), dtype=bool)
    m[:, :2] = True  # a band on the left edge: its right edge is the boundary, down to the last row
    expected = np.zeros((4, 5), dtype=bool)
    expected[:, 1] = True
    np.testing.assert_array_equal(boundary_map(m), expected)


def test_tolerance_is_a_fraction_of_the_diagonal_rounded_up():
    assert boundary_tolerance_px((20, 40)) == 1  # 0.008 x 44.7 = 0.36
    assert boundary_tolerance_px((480, 854)) == 8  # DAVIS 480p: 0.008 x 979.7 = 7.84
    assert boundary_tolerance_px((480, 720)) == 7  # 0.008 x 865.3 = 6.92
    assert boundary_tolerance_px((480, 854), bound_th=3) == 3  # >= 1: pixels
    with pytest.raises(EvalError) as err:
        boundary_tolerance_px((20, 40), bound_th=0)
    assert str(err.value) == "bound_th must be a positive number, got 0"


def test_disk_is_skimages_disk():
    np.testing.assert_array_equal(disk(0), [[1]])
    np.testing.assert_array_equal(disk(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    np.testing.assert_array_equal(
        disk(2),
        [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]],
    )


def test_f_of_a_square_against_a_rectangle_twice_as_wide_counted_by_hand():
    """Tolerance 1 px (a cross). Prediction: the 10x10 square, 40 boundary pixels; ground
    truth: the same with 10 more columns, 60. Matched prediction pixels: the row above (11),
    the left column (10), the last row (10) and, of its last column, the top and bottom
    pixels next to the ground truth's upper and lower edges (2): precision 33/40. Matched
    ground-truth pixels: 12 of the row above, 10 of the left column, 11 of the last row:
    recall 33/60. F = 2PR/(P+R) = 0.66."""
    pred, gt = square(5, 5), square(5, 5, w=20)
    assert boundary_map(pred).sum() == 40 and boundary_map(gt).sum() == 60
    p, r = 33 / 40, 33 / 60
    assert boundary_f(pred, gt) == pytest.approx(2 * p * r / (p + r))
    assert boundary_f(pred, gt) == pytest.approx(0.66)
    assert region_similarity(pred, gt) == pytest.approx(0.5)


def test_f_forgives_a_shift_within_the_tolerance_and_not_beyond():
    """A 1-px shift moves every boundary pixel by 1 px, within the 1-px tolerance: F = 1 (J is 9/11).
    Two squares far apart share no boundary pixel: F = 0."""
    assert boundary_f(square(5, 5), square(5, 6)) == 1.0
    assert boundary_f(square(5, 5), square(6, 5)) == 1.0
    assert boundary_f(square(5, 5), square(5, 7)) < 1.0
    assert boundary_f(square(2, 2), square(5, 25)) == 0.0


def test_f_of_one_of_two_squares_counted_by_hand():
    """Prediction: square A (40 boundary px, all on the ground truth's); ground truth: A and a
    far square B (80 px). Precision 1, recall 1/2: F = 2/3; J = 100/200."""
    a, b = square(2, 2), square(5, 25)
    assert boundary_f(a, a | b) == pytest.approx(2 / 3)
    assert region_similarity(a, a | b) == pytest.approx(0.5)


def test_empty_masks():
    empty = np.zeros((H, W), dtype=bool)
    assert region_similarity(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    assert region_similarity(empty, square(5, 5)) == 0.0 and boundary_f(empty, square(5, 5)) == 0.0
    assert region_similarity(square(5, 5), empty) == 0.0 and boundary_f(square(5, 5), empty) == 0.0


def test_void_pixels_count_for_no_one():
    """Void (DAVIS's 255) removes pixels from both masks: a prediction spilling onto void is not penalised."""
    gt, void = square(5, 5), square(5, 15, w=5)
    pred = square(5, 5, w=15)  # covers the object and the void strip
    assert region_similarity(pred, gt) == pytest.approx(100 / 150)
    assert region_similarity(pred, gt, void) == 1.0
    assert boundary_f(pred, gt, void) == 1.0


def test_mask_sizes_must_agree():
    with pytest.raises(EvalError) as err:
        region_similarity(np.zeros((4, 5), bool), np.zeros((4, 6), bool))
    assert str(err.value) == "prediction and ground truth must be 2-D masks of one size, got (4, 5) and (4, 6)"


# --- the protocol ------------------------------------------------------------------------


def label(*objects: tuple[int, np.ndarray], shape: tuple[int, int] = (H, W)) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    for obj_id, m in objects:
        out[m] = obj_id
    return out


def test_scorer_objects_count_from_their_first_appearance():
    """Object 2 enters the ground truth on the second frame; object 9 is only ever predicted."""
    a, b, c = square(2, 2), square(5, 25), square(14, 2, h=4)
    gt = [label((1, a)), label((1, a), (2, b)), label((1, a), (2, b))]
    pred = [label((1, a), (9, c)), label((1, a)), label((1, a), (2, b))]
    scorer = SequenceScorer("s")
    for p, g in zip(pred, gt):
        scorer.add_frame(p, g)
    result = scorer.result()
    assert [o.obj_id for o in result.objects] == [1, 2]
    one, two = result.objects
    assert (one.j, one.f, one.frames) == (1.0, 1.0, 3)
    assert (two.j, two.f, two.frames) == (0.5, 0.5, 2)  # missed on frame 1, right on frame 2
    assert result.j == 0.75 and result.jf == 0.75


def test_scorer_counts_a_prediction_before_the_ground_truth_has_the_object():
    a, b = square(2, 2), square(5, 25)
    scorer = SequenceScorer("s")
    scorer.add_frame(label((1, a), (2, b)), label((1, a)))  # object 2 predicted too early: J = F = 0 here
    scorer.add_frame(label((1, a), (2, b)), label((1, a), (2, b)))
    two = scorer.result().objects[1]
    assert (two.obj_id, two.j, two.f, two.frames) == (2, 0.5, 0.5, 2)


def write_gt(folder: Path, labels: list[np.ndarray], names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, lab in enumerate(labels):
        (folder / f"{(names[i] if names else f'{i:05d}')}.png").write_bytes(encode_label_png(lab))
    return folder


def frame_result(frame_idx: int, lab: np.ndarray) -> FrameResult:
    objects = {int(k): ObjectResult(int(k), lab == k, 5.0) for k in np.unique(lab) if k}
    return FrameResult(frame_idx, lab.shape[0], lab.shape[1], objects=objects)


def write_run(out: Path, name: str, labels: list[np.ndarray], formats: tuple[str, ...] = ("davis",)) -> Path:
    """An annotate output folder, written by the exporters annotate uses."""
    for fmt in formats:
        with make_writer(fmt, out, video_name=name, height=labels[0].shape[0], width=labels[0].shape[1]) as w:
            for i, lab in enumerate(labels):
                w.write(frame_result(i, lab))
    return out


def clip(n: int = 5) -> list[np.ndarray]:
    """Two objects moving right by one pixel a frame."""
    return [label((1, square(2, 2 + i)), (2, square(8, 20 + i, h=8, w=6))) for i in range(n)]


def shifted(labels: list[np.ndarray], dx: int) -> list[np.ndarray]:
    return [np.roll(lab, dx, axis=1) for lab in labels]


def expected_measures(gt: list[np.ndarray], pred: list[np.ndarray], obj_id: int) -> tuple[float, float]:
    """J and F of one object over the frames DAVIS scores (all but the first and the last)."""
    js = [region_similarity(p == obj_id, g == obj_id) for p, g in zip(pred[1:-1], gt[1:-1])]
    fs = [boundary_f(p == obj_id, g == obj_id) for p, g in zip(pred[1:-1], gt[1:-1])]
    return float(np.mean(js)), float(np.mean(fs))


def test_ground_truth_against_itself_scores_one(tmp_path, capsys):
    labels = clip()
    gt = write_gt(tmp_path / "gt" / "walk", labels).parent
    run = write_run(tmp_path / "run", "walk", labels)
    out = run_eval(["--gt", str(gt), str(run), "--json", str(tmp_path / "s.json")], capsys)
    data = json.loads((tmp_path / "s.json").read_text())
    (r,) = data["runs"]
    assert (r["J"], r["F"], r["J&F"], r["objects"]) == (1.0, 1.0, 1.0, 2)
    (seq,) = r["sequences"]
    assert seq["name"] == "walk" and seq["frames"] == 3  # 5 frames less the first and the last
    assert [(o["obj_id"], o["J"], o["F"], o["frames"]) for o in seq["objects"]] == [(1, 1.0, 1.0, 3), (2, 1.0, 1.0, 3)]
    assert "run  sequence  object    J&F      J      F  frames" in out
    assert "run  walk      mean    100.0  100.0  100.0       3" in out


def test_two_runs_side_by_side_with_their_speed(tmp_path, capsys):
    """One command compares models: a row per run with J&F and frames/s (from annotate's
    run summary, or --fps); a run's COCO and DAVIS outputs score the same."""
    labels = clip()
    gt = write_gt(tmp_path / "gt" / "walk", labels).parent
    good = write_run(tmp_path / "good", "walk", labels)
    write_run_summary(good, "walk", frames=10, seconds=4.0, model="sam2.1-tiny")
    bad = write_run(tmp_path / "bad", "walk", shifted(labels, 2), formats=("davis", "coco"))
    out = run_eval(["--gt", str(gt), f"tiny={good}", f"shifted={bad}", "--json", str(tmp_path / "s.json")], capsys)
    runs = json.loads((tmp_path / "s.json").read_text())["runs"]
    assert [(r["name"], r["model"], r["frames_per_s"], r["format"]) for r in runs] == [
        ("tiny", "sam2.1-tiny", 2.5, "davis"),
        ("shifted", None, None, "davis"),
    ]
    j1, f1 = expected_measures(labels, shifted(labels, 2), 1)
    j2, f2 = expected_measures(labels, shifted(labels, 2), 2)
    assert runs[1]["J"] == pytest.approx((j1 + j2) / 2) and runs[1]["F"] == pytest.approx((f1 + f2) / 2)
    assert runs[1]["J&F"] == pytest.approx((j1 + j2 + f1 + f2) / 4)
    assert 0 < runs[1]["J"] < 1 and 0 < runs[1]["F"] < 1
    lines = out.splitlines()
    assert lines[lines.index("") + 1].split() == ["run", "model", "sequences", "objects", "J&F", "J", "F", "frames/s"]
    assert lines[lines.index("") + 2].split() == ["tiny", "sam2.1-tiny", "1", "2", "100.0", "100.0", "100.0", "2.50"]
    assert lines[lines.index("") + 3].split()[:4] == ["shifted", "-", "1", "2"]
    assert lines[lines.index("") + 3].split()[4] == f"{100 * runs[1]['J&F']:.1f}"

    run_eval(["--gt", str(gt), "--format", "coco", str(bad), "--fps", "7.5", "--json", str(tmp_path / "c.json")], capsys)
    (coco,) = json.loads((tmp_path / "c.json").read_text())["runs"]
    assert coco["format"] == "coco" and coco["frames_per_s"] == 7.5
    assert coco["sequences"] == runs[1]["sequences"]


def test_several_sequences_global_mean_is_over_all_objects(tmp_path, capsys):
    """DAVIS's global J-Mean: every object of every sequence weighs the same."""
    two = clip()
    one = [label((1, square(4, 4 + i))) for i in range(5)]
    gt = tmp_path / "gt"
    write_gt(gt / "a", two)
    write_gt(gt / "b", one)
    run = write_run(tmp_path / "run", "a", shifted(two, 3))
    write_run(run, "b", one)
    run_eval(["--gt", str(gt), str(run), "--json", str(tmp_path / "s.json")], capsys)
    (r,) = json.loads((tmp_path / "s.json").read_text())["runs"]
    a, b = r["sequences"]
    assert (a["name"], b["name"]) == ("a", "b") and b["J"] == 1.0
    objects_j = [o["J"] for s in (a, b) for o in s["objects"]]
    assert r["J"] == pytest.approx(np.mean(objects_j))
    assert r["J"] != pytest.approx((a["J"] + b["J"]) / 2)


def test_frames_not_scored_are_not_read(tmp_path, capsys):
    """A run's DAVIS PNGs are decoded frame by frame as scored: the first frame (not scored) is never opened."""
    labels = clip()
    gt = write_gt(tmp_path / "gt" / "walk", labels).parent
    run = write_run(tmp_path / "run", "walk", labels)
    (run / "walk" / "00000.png").write_bytes(b"not a PNG")
    run_eval(["--gt", str(gt), str(run), "--json", str(tmp_path / "s.json")], capsys)
    assert json.loads((tmp_path / "s.json").read_text())["runs"][0]["J"] == 1.0


def test_all_frames_scores_first_and_last(tmp_path, capsys):
    labels = clip()
    pred = [labels[0]] + labels[1:-1] + [np.zeros_like(labels[0])]  # the last frame lost
    gt = write_gt(tmp_path / "gt" / "walk", labels).parent
    run = write_run(tmp_path / "run", "walk", pred)
    run_eval(["--gt", str(gt), str(run), "--json", str(tmp_path / "skip.json")], capsys)
    run_eval(["--gt", str(gt), str(run), "--all-frames", "--json", str(tmp_path / "all.json")], capsys)
    skip = json.loads((tmp_path / "skip.json").read_text())["runs"][0]
    every = json.loads((tmp_path / "all.json").read_text())["runs"][0]
    assert skip["J"] == 1.0
    assert every["J"] == pytest.approx(4 / 5) and every["sequences"][0]["frames"] == 5


# --- layouts -----------------------------------------------------------------------------------


def test_davis_layout(tmp_path):
    labels = clip()
    write_gt(tmp_path / "DAVIS" / "Annotations" / "480p" / "walk", labels)
    write_gt(tmp_path / "DAVIS" / "Annotations" / "480p" / "run", labels[:3])
    gt = find_ground_truth(tmp_path / "DAVIS")
    assert sorted(gt) == ["run", "walk"]
    assert list(gt["walk"].files) == [0, 1, 2, 3, 4]


def test_youtube_vos_names_every_fifth_frame(tmp_path):
    """YouTube-VOS's 00005.png is the second frame of its JPEGImages: matched by name, not number."""
    labels = clip(4)
    names = ["00000", "00005", "00010", "00015"]
    root = tmp_path / "valid"
    write_gt(root / "Annotations" / "walk", labels, names)
    (root / "JPEGImages" / "walk").mkdir(parents=True)
    for n in names:
        (root / "JPEGImages" / "walk" / f"{n}.jpg").write_bytes(b"")
    gt = find_ground_truth(root)
    assert {i: p.name for i, p in gt["walk"].files.items()} == {0: "00000.png", 1: "00005.png", 2: "00010.png", 3: "00015.png"}
    by_number = find_ground_truth(root / "Annotations")
    assert list(by_number["walk"].files) == [0, 5, 10, 15]
    frames = tmp_path / "frames"
    frames.mkdir()
    for n in ["00000", "00001", "00005", "00007", "00010", "00015"]:
        (frames / f"{n}.jpg").write_bytes(b"")
    assert list(find_ground_truth(root / "Annotations" / "walk", frames=frames)["walk"].files) == [0, 2, 4, 5]


def test_plain_folder_with_frame_names(tmp_path):
    """pumavos' layout: Annotations/frame_000010.png beside JPEGImages/frame_000010.jpg, one sequence."""
    labels = clip(3)
    root = tmp_path / "chair"
    write_gt(root / "Annotations", labels, [f"frame_{i:06d}" for i in range(3)])
    gt = find_ground_truth(root)
    assert list(gt) == ["chair"] and list(gt["chair"].files) == [0, 1, 2]
    assert list(find_ground_truth(root / "Annotations")) == ["chair"]


def test_a_single_sequence_is_paired_whatever_its_names(tmp_path, capsys):
    labels = clip()
    gt = write_gt(tmp_path / "labels" / "Annotations", labels)
    run = write_run(tmp_path / "run", "myclip", labels)
    out = run_eval(["--gt", str(gt), str(run / "myclip")], capsys)
    assert "myclip  labels    mean    100.0" in out


# --- errors ----------------------------------------------------------------------------------------


def test_missing_predicted_frame(tmp_path):
    labels = clip()
    gt = find_ground_truth(write_gt(tmp_path / "gt" / "walk", labels))
    run = write_run(tmp_path / "run", "walk", labels)
    (run / "walk" / "00002.png").unlink()
    with pytest.raises(EvalError) as err:
        evaluate(gt, [find_run(run)])
    assert str(err.value) == (
        f"run run, sequence walk: {run / 'walk'} has no frame 2 (ground truth 00002.png); was the run complete?"
    )


def test_sizes_must_agree(tmp_path):
    labels = clip()
    gt = find_ground_truth(write_gt(tmp_path / "gt" / "walk", labels))
    run = write_run(tmp_path / "run", "walk", [lab[:, :-1] for lab in labels])
    with pytest.raises(EvalError) as err:
        evaluate(gt, [find_run(run)])
    assert str(err.value) == "run run, sequence walk, frame 1: the run's mask of object 1 is 39x20, ground truth 00001.png is 40x20"


def test_too_few_frames_for_the_davis_protocol(tmp_path):
    labels = clip(2)
    gt = GroundTruthSequence("walk", find_ground_truth(write_gt(tmp_path / "gt" / "walk", labels))["walk"].files)
    pred = PredictedSequence("walk", "davis", write_run(tmp_path / "run", "walk", labels) / "walk")
    with pytest.raises(EvalError) as err:
        score_sequence(gt, pred)
    assert str(err.value) == (
        "sequence walk: 2 ground-truth frame(s); the first and the last are not scored (DAVIS's semi-supervised "
        "protocol), which leaves none: pass --all-frames"
    )
    assert score_sequence(gt, pred, all_frames=True).j == 1.0


def test_runs_must_cover_the_same_sequences(tmp_path):
    labels = clip()
    gt_root = tmp_path / "gt"
    write_gt(gt_root / "a", labels)
    write_gt(gt_root / "b", labels)
    gt = find_ground_truth(gt_root)
    both = write_run(write_run(tmp_path / "both", "a", labels), "b", labels)
    only_a = write_run(tmp_path / "only_a", "a", labels)
    with pytest.raises(EvalError) as err:
        evaluate(gt, [find_run(both), find_run(only_a)])
    assert str(err.value) == "run only_a has sequences a, run both a, b: runs compared side by side must cover the same sequences"
    other = write_run(tmp_path / "other", "c", labels)
    with pytest.raises(EvalError) as err:
        evaluate(gt, [find_run(other)])
    assert str(err.value) == "run other: sequence(s) c have no ground truth; the ground truth has a, b"
    with pytest.raises(EvalError) as err:
        evaluate(gt, [find_run(both)], frames_per_s=[1.0, 2.0])
    assert str(err.value) == "--fps given 2 time(s) for 1 run(s): give it once per run, in order"
    with pytest.raises(EvalError) as err:
        evaluate(gt, [])
    assert str(err.value) == "no run to score: give at least one annotate output"


def test_bad_inputs_are_named(tmp_path, capsys):
    with pytest.raises(EvalError) as err:
        find_ground_truth(tmp_path / "nope")
    assert str(err.value) == f"--gt {tmp_path / 'nope'}: no such folder; give a DAVIS root, a YouTube-VOS split or a folder of label PNGs"
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError) as err:
        find_ground_truth(tmp_path / "empty")
    assert str(err.value) == f"--gt {tmp_path / 'empty'}: no label PNGs in {tmp_path / 'empty'} or in its sub-folders"
    write_gt(tmp_path / "odd", clip(3), ["a", "b", "c"])
    with pytest.raises(EvalError) as err:
        find_ground_truth(tmp_path / "odd")
    assert str(err.value) == (
        f"cannot tell which frame ground truth {tmp_path / 'odd' / 'a.png'} is: its name ends in no frame number; "
        "pass --frames with the folder of frames the run was given (GT files are then matched to frames by name)"
    )
    with pytest.raises(EvalError) as err:
        find_run(tmp_path / "empty")
    assert str(err.value) == (
        f"run empty: no annotate output in {tmp_path / 'empty'}: expected DAVIS label PNGs (NAME/00000.png ...) "
        "or annotations.json"
    )
    with pytest.raises(EvalError) as err:
        find_run(tmp_path / "empty", pred_format="davis")
    assert str(err.value) == f"run empty: no DAVIS label PNGs (NAME/00000.png ...) in {tmp_path / 'empty'}"
    run = write_run(tmp_path / "r1", "walk", clip())
    gt = write_gt(tmp_path / "gt" / "walk", clip())
    args = parser().parse_args(["eval", "--gt", str(gt), str(run), str(run)])
    with pytest.raises(EvalError) as err:
        args.func(args)
    assert str(err.value) == "two runs are named alike (r1, r1); name them: NAME=RUN"


def test_parser_registers_eval():
    args = parser().parse_args(["eval", "--gt", "GT", "a", "b=c", "--fps", "3", "--fps", "4.5", "--all-frames"])
    assert args.command == "eval" and args.func.__name__ == "cmd_eval"
    assert (args.gt, args.runs, args.fps, args.all_frames, args.pred_format, args.json) == (
        "GT",
        ["a", "b=c"],
        [3.0, 4.5],
        True,
        "auto",
        None,
    )


# --- the reference evaluator ----------------------------------------------------------------------


def test_equals_vos_benchmark_on_random_label_maps():
    """hkchengrex's vos-benchmark (behind XMem's and Cutie's numbers), frame by frame, when installed."""
    pytest.importorskip("skimage")
    evaluator_mod = pytest.importorskip("vos_benchmark.evaluator")
    import cv2

    rng = np.random.default_rng(0)

    def blobs(h: int, w: int) -> np.ndarray:
        lab = np.zeros((h, w), np.uint8)
        for k in (1, 2, 3):
            for _ in range(2):
                cv2.circle(lab, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(2, 14)), k, -1)
        return lab

    for h, w in [(40, 60), (97, 131), (480, 854)]:
        ref, mine = evaluator_mod.Evaluator(), SequenceScorer("x")
        for t in range(5):
            gt = blobs(h, w)
            pred = blobs(h, w) if t % 2 else np.roll(gt, 3 * t, axis=1)
            if t == 2:
                gt[gt == 3] = 0
            ref.feed_frame(pred, gt)
            mine.add_frame(pred, gt)
        ref_j, ref_f = ref.conclude()
        result = mine.result()
        assert sorted(ref_j) == [o.obj_id for o in result.objects]
        for o in result.objects:
            assert o.j * 100 == pytest.approx(ref_j[o.obj_id], abs=1e-9)
            assert o.f * 100 == pytest.approx(ref_f[o.obj_id], abs=1e-9)
            assert o.frames == len(ref.object_iou[o.obj_id])
