"""Offline annotation with EdgeTAM and SAM 3's tracker equals the library's own
offline inference: per object, a session over the whole video
(``video=frames``), the object's prompts, then ``propagate_in_video_iterator``
forward from its first prompt and backward from it (mask logits within 1e-4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests.frames import moving_shapes, shape_centres, write_jpeg_folder  # noqa: E402
from tests.test_families import family_model, shipped  # noqa: E402,F401  (the module-scoped model fixture; its reference)
from tracker.annotate import AnnotateStats, Prompt, annotate  # noqa: E402

N, H, W = 20, 120, 160
TOL = 1e-4


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    folder = tmp_path_factory.mktemp("families_clip")
    decoded = write_jpeg_folder(moving_shapes(N, H, W, seed=5), folder)
    return folder, decoded


def centre(obj: int, frame: int) -> list[float]:
    return list(shape_centres(frame, H, W)[obj])


@torch.inference_mode()
def library_run(model: torch.nn.Module, frames: list[np.ndarray], prompts: list[Prompt]) -> dict[int, torch.Tensor]:
    """One object's logits per frame, as the library computes them offline."""
    family = model.stream_family
    processor = family.processor(int(model.config.image_size))
    video = torch.cat([processor(images=f, return_tensors="pt").pixel_values for f in frames])
    session = family.session_class()(video=video, video_height=H, video_width=W, inference_device="cpu", dtype=torch.float32)
    for p in sorted(prompts, key=lambda p: p.frame_idx):
        inputs = {}
        if p.points_xy:
            inputs = {"input_points": [[p.points_xy]], "input_labels": [[p.labels]]}
        if p.box_xyxy:
            inputs["input_boxes"] = [[p.box_xyxy]]
        processor.add_inputs_to_inference_session(
            session, frame_idx=p.frame_idx, obj_ids=[p.obj_id], original_size=(H, W), **inputs
        )
        model(session, frame_idx=p.frame_idx)
    first = min(p.frame_idx for p in prompts)
    out: dict[int, torch.Tensor] = {}
    for reverse in (False, True):
        for step in model.propagate_in_video_iterator(session, start_frame_idx=first, reverse=reverse):
            (logits,) = processor.post_process_masks([step.pred_masks.float()], original_sizes=[[H, W]], binarize=False)
            out[step.frame_idx] = logits[0, 0]
    return out


def test_annotate_equals_the_library_forward_then_backward(family_model, clip) -> None:  # noqa: F811
    folder, frames = clip
    k, j = 6, 12
    (bx, by) = shape_centres(j, H, W)[0]
    prompts = [
        Prompt(1, k, points_xy=[centre(0, k)], labels=[1]),
        Prompt(1, j, box_xyxy=[bx - 16, by - 16, bx + 16, by + 16]),
        Prompt(2, j, points_xy=[centre(1, j), [5.0, 5.0]], labels=[1, 0]),
    ]
    stats = AnnotateStats()
    ours = {r.frame_idx: r for r in annotate(str(folder), prompts, model=family_model, stats=stats)}
    assert sorted(ours) == list(range(N))
    assert (stats.forward_frames, stats.frames) == (N - k, N)
    for obj_id in (1, 2):
        theirs = library_run(shipped(family_model), frames, [p for p in prompts if p.obj_id == obj_id])
        assert sorted(theirs) == list(range(N))
        for f, logits in theirs.items():
            mine = ours[f].objects[obj_id]
            if mine.logits_hw is not None:
                diff = float(np.abs(mine.logits_hw - logits.numpy()).max())
                assert diff <= TOL, f"frame {f} object {obj_id}: |diff| {diff:.2e}"
            # frames kept for the backward pass come back as masks: equal wherever the logit is not ~0
            sure = np.abs(logits.numpy()) > 1e-3
            np.testing.assert_array_equal(mine.mask_hw[sure], (logits.numpy() > 0)[sure])


def test_annotate_resumes_to_the_same_output(family_model, clip, tmp_path: Path) -> None:  # noqa: F811
    folder, _ = clip
    prompts = [Prompt(1, 3, points_xy=[centre(0, 3)], labels=[1]), Prompt(2, 9, points_xy=[centre(1, 9)], labels=[1])]
    full = {r.frame_idx: r.objects for r in annotate(str(folder), prompts, model=family_model)}
    work = tmp_path / "work"
    run = annotate(str(folder), prompts, model=family_model, work_dir=work, checkpoint_every=4)
    got = {}
    for r in run:
        got[r.frame_idx] = r.objects
        if len(got) == 9:
            run.close()  # stopped mid-way (the state was saved every 4 frames)
            break
    for r in annotate(str(folder), prompts, model=family_model, work_dir=work, resume=True, skip_frames=set(got)):
        got[r.frame_idx] = r.objects
    assert sorted(got) == sorted(full)
    for f in full:
        for obj_id in (1, 2):
            np.testing.assert_array_equal(got[f][obj_id].mask_hw, full[f][obj_id].mask_hw)
