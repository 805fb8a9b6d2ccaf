"""Offline annotation: equal to Meta's predictor (forward then backward), resumable,
and bad input refused before any long work."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.frames import moving_shapes, shape_centres, write_jpeg_folder
from tracker.annotate import AnnotateStats, Prompt, annotate, load_prompts
from tracker.errors import PromptError

N, H, W = 24, 120, 160
TOL = 1e-4


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("annotate_clip")
    write_jpeg_folder(moving_shapes(N, H, W, seed=3), folder)
    return folder


def centre(obj: int, frame: int) -> list[float]:
    return list(shape_centres(frame, H, W)[obj])


def test_equals_meta_forward_then_backward(model, clip):
    k, j = 8, 16
    (bx, by) = shape_centres(j, H, W)[0]
    box = [bx - 16, by - 16, bx + 16, by + 16]
    prompts = [
        Prompt(1, k, points_xy=[centre(0, k)], labels=[1]),
        Prompt(2, k, points_xy=[centre(1, k), [5.0, 5.0]], labels=[1, 0]),
        Prompt(1, j, box_xyxy=box),
    ]
    state = model.init_state(str(clip))
    model.add_new_points_or_box(state, k, 1, points=[centre(0, k)], labels=[1])
    model.add_new_points_or_box(state, k, 2, points=[centre(1, k), [5.0, 5.0]], labels=[1, 0])
    model.add_new_points_or_box(state, j, 1, box=box)
    theirs = {}
    for reverse in (False, True):
        for f, ids, masks in model.propagate_in_video(state, reverse=reverse):
            theirs[f] = {oid: masks[i, 0].numpy() for i, oid in enumerate(ids)}

    stats = AnnotateStats()
    order = []
    worst = 0.0
    for res in annotate(str(clip), prompts, model=model, stats=stats):
        order.append(res.frame_idx)
        assert sorted(res.objects) == [1, 2]
        for oid, r in res.objects.items():
            diff = float(np.abs(r.logits_hw - theirs[res.frame_idx][oid]).max())
            worst = max(worst, diff)
            assert diff <= TOL, f"frame {res.frame_idx} object {oid}: {diff}"
            np.testing.assert_array_equal(r.mask_hw, theirs[res.frame_idx][oid] > 0)
    assert order == list(range(k, N)) + list(range(k - 1, -1, -1))
    assert (stats.forward_frames, stats.backward_frames, stats.frames) == (N - k, k, N)


def test_objects_first_prompted_on_different_frames(model, clip):
    """Each object is tracked from its own first prompt, forward and backward; a frame
    is yielded once, with every object."""
    prompts = [Prompt(1, 4, points_xy=[centre(0, 4)], labels=[1]), Prompt(2, 10, points_xy=[centre(1, 10)], labels=[1])]
    results = {r.frame_idx: r for r in annotate(str(clip), prompts, model=model)}
    assert sorted(results) == list(range(N))
    assert all(sorted(r.objects) == [1, 2] for r in results.values())
    # object 2 alone, as Meta's predictor tracks it
    state = model.init_state(str(clip))
    model.add_new_points_or_box(state, 10, 2, points=[centre(1, 10)], labels=[1])
    for reverse in (False, True):
        for f, _, masks in model.propagate_in_video(state, reverse=reverse):
            np.testing.assert_array_equal(results[f].objects[2].mask_hw, masks[0, 0].numpy() > 0)


def test_resume_after_interruption_equals_uninterrupted_run(model, clip, tmp_path):
    prompts = [Prompt(1, 6, points_xy=[centre(0, 6)], labels=[1])]
    full = {r.frame_idx: r.objects[1].logits_hw for r in annotate(str(clip), prompts, model=model)}
    work = tmp_path / "work"
    got = {}
    run = annotate(str(clip), prompts, model=model, work_dir=work, checkpoint_every=4)
    for r in run:
        got[r.frame_idx] = r.objects[1].logits_hw
        if len(got) == 11:  # "crash" in the forward pass, after a checkpoint at frame 15
            break
    run.close()
    assert (work / "annotate_state.pt").is_file()
    stats = AnnotateStats()
    for r in annotate(str(clip), prompts, model=model, work_dir=work, resume=True, skip_frames=set(got), stats=stats):
        assert r.frame_idx not in got
        got[r.frame_idx] = r.objects[1].logits_hw
    assert stats.resumed_from == 15
    assert sorted(got) == list(range(N))
    for f in range(N):
        np.testing.assert_array_equal(got[f], full[f])
    assert not (work / "annotate_state.pt").exists()


def test_bad_prompts_refused_before_work(model, clip, tmp_path):
    with pytest.raises(PromptError) as err:
        list(annotate(str(clip), [Prompt(1, 30, points_xy=[[5, 5]], labels=[1])], model=model))
    assert str(err.value) == f"prompt on frame 30 but {clip} has only {N} frames"
    with pytest.raises(PromptError) as err:
        list(annotate(str(clip), [Prompt(1, 0, points_xy=[[500, 5]], labels=[1])], model=model))
    assert str(err.value) == "prompt for object 1 on frame 0: point (500, 5) is outside the 160x120 frame"
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"prompts": [{"obj_id": 1, "frame": 0, "colour": "red", "points": [[1, 1]]}]}))
    with pytest.raises(PromptError) as err:
        load_prompts(bad)
    assert str(err.value) == f"prompts file {bad}, prompt 0: unknown field(s) colour"
    with pytest.raises(PromptError) as err:
        load_prompts(tmp_path / "nope.json")
    assert str(err.value) == f"prompts file {tmp_path / 'nope.json'} not found"


def test_prompts_file_round_trip(tmp_path):
    from tracker.masks import encode_png

    mask = np.zeros((H, W), bool)
    mask[10:20, 10:30] = True
    (tmp_path / "m.png").write_bytes(encode_png(mask))
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps({"prompts": [
        {"obj_id": 1, "frame": 3, "points": [[10, 20], [30, 40]], "labels": [1, 0]},
        {"obj_id": 2, "frame": 0, "box": [1, 2, 30, 40]},
        {"obj_id": 3, "frame": 5, "mask": "m.png"},
        {"obj_id": 4, "points": [[7, 8]]},
    ]}))
    p = load_prompts(f)
    assert p[0] == Prompt(1, 3, points_xy=[[10, 20], [30, 40]], labels=[1, 0])
    assert p[1] == Prompt(2, 0, box_xyxy=[1, 2, 30, 40])
    assert p[2].mask_path == tmp_path / "m.png"
    assert p[3] == Prompt(4, 0, points_xy=[[7, 8]], labels=[1])


def test_read_ahead_forwards_items_then_the_error_and_stays_bounded():
    from tracker.annotate import _on_thread

    produced = []
    closed = threading.Event()

    def items():
        try:
            for i in range(5):
                produced.append(i)
                yield i
            raise ValueError("broken stream after frame 4")
        finally:
            closed.set()

    got = []
    with pytest.raises(ValueError, match="after frame 4"):
        for item in _on_thread(items(), depth=2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
    assert closed.is_set()

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    produced.clear()
    closed.clear()
    reader = _on_thread(endless(), depth=2)
    assert next(reader) == 0
    time.sleep(0.3)  # the reader fills the queue, then waits
    assert len(produced) <= 1 + 2 + 1  # taken + queued + one waiting to be queued
    reader.close()  # the consumer stops early: the reader and its generator are closed
    assert closed.is_set()


def test_prepared_frame_encodes_like_the_array(model, clip):
    """The read-ahead path (resize on another thread, then encode) gives the same features."""
    from PIL import Image

    from tracker.errors import FrameError
    from tracker.predictor import PreparedFrame, StreamingPredictor

    image = np.array(Image.open(sorted(clip.iterdir())[0]).convert("RGB"))
    a, b = StreamingPredictor(model), StreamingPredictor(model)
    a.encode(0, image)
    prepared = b.prepare_frame(image)
    assert prepared.source_size == (H, W) and prepared.image.shape == (a.image_size, a.image_size, 3)
    b.encode(0, prepared)
    with pytest.raises(FrameError) as err:
        a.encode(1, PreparedFrame(image[:64, :64], torch.from_numpy(image[:64, :64]), (H, W)))
    assert str(err.value) == "prepared frame is 64x64, this model takes 256x256: prepare it with this predictor"
    fa, fb = a._frames[0], b._frames[0]
    assert fa.source_hw == fb.source_hw == (H, W)
    assert len(fa.payload) == len(fb.payload)  # the frame's backbone_fpn
    for x, y in zip(fa.payload, fb.payload):
        assert torch.equal(x, y)


def test_mask_prompts_from_one_label_map_equal_meta(model, clip, tmp_path):
    """DAVIS / YouTube-VOS give every object of the first frame in one palette PNG:
    ``mask_index`` takes one object out of it."""
    from tracker.masks import encode_label_png

    k = 5
    yy, xx = np.mgrid[0:H, 0:W]
    label = np.zeros((H, W), np.uint8)
    for obj, index in ((0, 1), (1, 2)):
        cx, cy = centre(obj, k)
        label[(np.abs(xx - cx) <= 12) & (np.abs(yy - cy) <= 12)] = index
    (tmp_path / "00005.png").write_bytes(encode_label_png(label))
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps({"prompts": [
        {"obj_id": 1, "frame": k, "mask": "00005.png", "mask_index": 1},
        {"obj_id": 2, "frame": k, "mask": "00005.png", "mask_index": 2},
    ]}))
    prompts = load_prompts(f)
    assert [(p.obj_id, p.mask_index) for p in prompts] == [(1, 1), (2, 2)]
    results = {r.frame_idx: r for r in annotate(str(clip), prompts, model=model)}
    assert sorted(results) == list(range(N))
    state = model.init_state(str(clip))
    for obj_id in (1, 2):
        model.add_new_mask(state, k, obj_id, label == obj_id)
    compared = set()
    for reverse in (False, True):
        for f_idx, ids, masks in model.propagate_in_video(state, reverse=reverse):
            for i, obj_id in enumerate(ids):
                diff = float(np.abs(results[f_idx].objects[obj_id].logits_hw - masks[i, 0].numpy()).max())
                assert diff <= TOL, f"frame {f_idx} object {obj_id}: {diff}"
                compared.add((f_idx, obj_id))
    assert len(compared) == 2 * N


@pytest.mark.parametrize(("entry", "expected"), [
    ({"mask_index": 1, "points": [[1, 1]]}, "mask_index must be an integer 1-255 next to a mask, got 1"),
    ({"mask": "l.png", "mask_index": 0}, "mask_index must be an integer 1-255 next to a mask, got 0"),
    ({"mask": "l.png", "mask_index": "2"}, "mask_index must be an integer 1-255 next to a mask, got '2'"),
])
def test_bad_mask_index_refused_when_read(entry, expected, tmp_path):
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps({"prompts": [{"obj_id": 1, "frame": 0, **entry}]}))
    with pytest.raises(PromptError) as err:
        load_prompts(f)
    assert str(err.value) == f"prompts file {f}, prompt 0: {expected}"


def test_label_map_without_the_index_refused_before_work(model, clip, tmp_path):
    from tracker.masks import encode_label_png

    label = np.zeros((H, W), np.uint8)
    label[10:20, 10:20] = 1
    (tmp_path / "l.png").write_bytes(encode_label_png(label))
    prompts = [Prompt(1, 0, mask_path=tmp_path / "l.png", mask_index=3)]
    with pytest.raises(PromptError) as err:
        next(annotate(str(clip), prompts, model=model))
    assert str(err.value) == f"mask {tmp_path / 'l.png'} has no pixels of index 3"


def test_each_frame_encoded_once(model, clip, monkeypatch):
    """The prompted frame's features from the prompt pass are reused, not computed again."""
    encoded = []
    forward_image = model.forward_image

    def counting(img):
        encoded.append(img.shape[0])
        return forward_image(img)

    monkeypatch.setattr(model, "forward_image", counting)
    results = list(annotate(str(clip), [Prompt(1, 8, points_xy=[centre(0, 8)], labels=[1])], model=model))
    assert len(results) == N
    assert sum(encoded) == N
