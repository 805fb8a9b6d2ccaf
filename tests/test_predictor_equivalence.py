"""The streaming predictor must compute what Meta's ``SAM2VideoPredictor`` computes.

Random weights make masks meaningless, so correctness is shown by equality with
Meta's own predictor: same model object (weights loaded from a checkpoint file),
same frames (a JPEG folder for Meta, the same decoded pixels for us), same
prompts; per-frame mask logits at the video resolution within ``TOL``.

Meta's predictor tracks objects independently (SAM 2.1), but on CPU it crashes
when an object is added after frame 0 while another is tracked (its bfloat16
memories meet fp32 weights); such cases are compared object by object, the late
object against Meta's predictor run on the frames from its first prompt on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.frames import moving_shapes, shape_centres, write_jpeg_folder
from tracker.predictor import StreamingPredictor

TOL = 1e-4
N_FRAMES = 24
H, W = 120, 160


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    folder = tmp_path_factory.mktemp("clip")
    frames = write_jpeg_folder(moving_shapes(N_FRAMES, H, W), folder)
    return folder, frames


def sub_clip(clip: tuple[Path, list[np.ndarray]], start: int, tmp_path: Path) -> Path:
    """Frames ``start..end`` renumbered from 0 (Meta's view of a late object)."""
    folder, frames = clip
    out = tmp_path / f"from_{start}"
    out.mkdir()
    for i in range(start, len(frames)):
        (out / f"{i - start:05d}.jpg").write_bytes((folder / f"{i:05d}.jpg").read_bytes())
    return out


def meta_logits(
    model: torch.nn.Module,
    folder: Path,
    prompts: list[tuple[int, int, dict]],
    *,
    corrections: list[tuple[int, int, dict]] = (),
) -> dict[int, dict[int, torch.Tensor]]:
    """Run Meta's predictor; returns {frame_idx: {obj_id: logits HxW}}.

    ``prompts`` are (frame_idx, obj_id, kwargs for add_new_points_or_box) given
    before propagation; each correction (frame j, ...) stops propagation at j,
    is added, and propagation resumes from j, as an operator's live click would.
    """
    state = model.init_state(str(folder))
    for frame_idx, obj_id, kw in prompts:
        model.add_new_points_or_box(state, frame_idx, obj_id, **kw)
    out: dict[int, dict[int, torch.Tensor]] = {}
    start = None
    stops = sorted(c[0] for c in corrections)
    for stop in stops + [None]:
        n = None if stop is None else stop - (start if start is not None else min(p[0] for p in prompts))
        for f, obj_ids, masks in model.propagate_in_video(state, start_frame_idx=start, max_frame_num_to_track=n):
            out[f] = {oid: masks[i, 0].clone() for i, oid in enumerate(obj_ids)}
        if stop is not None:
            for frame_idx, obj_id, kw in corrections:
                if frame_idx == stop:
                    _, obj_ids, masks = model.add_new_points_or_box(state, frame_idx, obj_id, **kw)
                    out[frame_idx] = {oid: masks[i, 0].clone() for i, oid in enumerate(obj_ids)}
            start = stop
    return out


def ours(
    predictor: StreamingPredictor,
    frames: list[np.ndarray],
    prompts: dict[int, list[tuple[int, dict]]],
) -> dict[int, dict[int, np.ndarray]]:
    """Stream ``frames``; after frame f is tracked, apply ``prompts[f]`` (obj_id, kwargs)."""
    out: dict[int, dict[int, np.ndarray]] = {}
    for f, frame in enumerate(frames):
        res = predictor.track(frame, pts_s=f / 30)
        out[f] = {oid: r.logits_hw for oid, r in res.objects.items()}
        for obj_id, kw in prompts.get(f, []):
            r = predictor.add_prompt(obj_id, **kw)
            out[f][obj_id] = r.logits_hw
    return out


def assert_close(mine: dict[int, dict[int, np.ndarray]], theirs: dict, obj_ids: list[int], frames: range, offset: int = 0) -> float:
    worst = 0.0
    informative = 0
    for f in frames:
        for oid in obj_ids:
            a = mine[f][oid]
            b = theirs[f - offset][oid].numpy()
            assert a.shape == b.shape == (H, W)
            diff = float(np.abs(a - b).max())
            worst = max(worst, diff)
            assert diff <= TOL, f"frame {f} object {oid}: max |diff| {diff:.3g} > {TOL}"
            informative += int(b.min() > -1000 and b.std() > 1e-3)
    # the comparison is only worth something if the logits are not SAM 2's
    # constant "no object" fill
    assert informative >= len(frames) * len(obj_ids) // 2
    return worst


def click(obj: int, frame: int) -> list[list[float]]:
    cx, cy = shape_centres(frame, H, W)[obj]
    return [[cx, cy]]


@pytest.mark.parametrize("batch_objects", [False, True])
def test_one_object_clicked_on_frame_0(model, clip, batch_objects):
    folder, frames = clip
    theirs = meta_logits(model, folder, [(0, 1, dict(points=click(0, 0), labels=[1]))])
    p = StreamingPredictor(model, batch_objects=batch_objects)
    mine = ours(p, frames, {0: [(1, dict(points_xy=click(0, 0), labels=[1]))]})
    assert_close(mine, theirs, [1], range(N_FRAMES))


@pytest.mark.parametrize("batch_objects", [False, True])
def test_three_objects_points_and_box_on_frame_0(model, clip, batch_objects):
    folder, frames = clip
    (x2, y2) = shape_centres(0, H, W)[2]
    box = [x2 - 12, y2 - 12, x2 + 12, y2 + 12]
    neg = [[5.0, 5.0]]
    meta_prompts = [
        (0, 1, dict(points=click(0, 0), labels=[1])),
        (0, 2, dict(points=click(1, 0) + neg, labels=[1, 0])),
        (0, 3, dict(box=box)),
    ]
    theirs = meta_logits(model, folder, meta_prompts)
    p = StreamingPredictor(model, batch_objects=batch_objects)
    mine = ours(
        p,
        frames,
        {
            0: [
                (1, dict(points_xy=click(0, 0), labels=[1])),
                (2, dict(points_xy=click(1, 0) + neg, labels=[1, 0])),
                (3, dict(box_xyxy=box)),
            ]
        },
    )
    worst = assert_close(mine, theirs, [1, 2, 3], range(N_FRAMES))
    if not batch_objects:
        # per-object runs do exactly Meta's arithmetic
        assert worst == 0.0


def test_object_added_mid_stream(model, clip, tmp_path):
    folder, frames = clip
    k = 6  # frames k..end (18) >= 16: Meta's pointer window is the same as a stream's
    mine = ours(
        StreamingPredictor(model),
        frames,
        {
            0: [(1, dict(points_xy=click(0, 0), labels=[1]))],
            k: [(2, dict(points_xy=click(1, k), labels=[1]))],
        },
    )
    theirs_1 = meta_logits(model, folder, [(0, 1, dict(points=click(0, 0), labels=[1]))])
    assert_close(mine, theirs_1, [1], range(N_FRAMES))
    theirs_2 = meta_logits(model, sub_clip(clip, k, tmp_path), [(0, 2, dict(points=click(1, k), labels=[1]))])
    assert_close(mine, theirs_2, [2], range(k, N_FRAMES), offset=k)
    assert all(2 not in mine[f] for f in range(k))


def test_corrective_negative_click(model, clip):
    """A negative click on an already tracked frame j becomes a conditioning frame
    (``add_all_frames_to_correct_as_cond``) and tracking goes on from j."""
    folder, frames = clip
    j = 9
    neg = [[shape_centres(j, H, W)[0][0] + 10, shape_centres(j, H, W)[0][1]]]
    model.add_all_frames_to_correct_as_cond = True
    try:
        theirs = meta_logits(
            model,
            folder,
            [(0, 1, dict(points=click(0, 0), labels=[1]))],
            corrections=[(j, 1, dict(points=neg, labels=[0]))],
        )
    finally:
        model.add_all_frames_to_correct_as_cond = False
    p = StreamingPredictor(model, corrections_as_cond=True)
    mine = ours(
        p,
        frames,
        {0: [(1, dict(points_xy=click(0, 0), labels=[1]))], j: [(1, dict(points_xy=neg, labels=[0]))]},
    )
    assert_close(mine, theirs, [1], range(N_FRAMES))
    # the correction changed the corrected frame and what was tracked after it
    # (random weights give small logits, hence the small margins)
    plain = ours(StreamingPredictor(model), frames, {0: [(1, dict(points_xy=click(0, 0), labels=[1]))]})
    assert np.abs(plain[j][1] - mine[j][1]).max() > 100 * TOL
    assert np.abs(plain[j + 3][1] - mine[j + 3][1]).max() > 5 * TOL


def test_prompt_on_a_recent_frame_catches_up(model, clip, tmp_path):
    """An operator clicks on frame k while the stream is already at frame k+4: the
    object is conditioned on k and re-tracked to the newest frame, exactly as Meta's
    predictor tracks it from frame k."""
    folder, frames = clip
    k, lag = 5, 4
    p = StreamingPredictor(model)
    mine: dict[int, dict[int, np.ndarray]] = {}
    for f, frame in enumerate(frames):
        res = p.track(frame, pts_s=f / 30)
        mine[f] = {oid: r.logits_hw for oid, r in res.objects.items()}
        if f == k + lag:
            r = p.add_points(1, click(0, k), [1], frame_idx=k)
            mine[k][1] = r.logits_hw
    assert p.stats.catch_up_frames == lag
    theirs = meta_logits(model, sub_clip(clip, k, tmp_path), [(0, 1, dict(points=click(0, k), labels=[1]))])
    # frames after the catch-up come from normal tracking and must agree too
    assert_close(mine, theirs, [1], [k, *range(k + lag + 1, N_FRAMES)], offset=k)


def test_bf16_on_the_cpu_equals_meta_under_the_same_autocast(model, clip, monkeypatch):
    """``precision="bf16"`` (2x faster on CPUs with native bf16) runs SAM 2 as Meta's
    predictor runs under ``torch.autocast("cpu", torch.bfloat16)``."""
    folder, frames = clip
    prompt = {0: [(1, dict(points_xy=click(0, 0), labels=[1]))]}
    monkeypatch.setattr(model, "autocast_precision", "bf16", raising=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = meta_logits(model, folder, [(0, 1, dict(points=click(0, 0), labels=[1]))])
    theirs = {f: {oid: t.float() for oid, t in objs.items()} for f, objs in theirs.items()}
    p = StreamingPredictor(model, batch_objects=False)
    assert p.precision == "bf16"
    mine = ours(p, frames, prompt)
    assert_close(mine, theirs, [1], range(N_FRAMES))
    # and bf16 really ran: float32 gives other logits
    monkeypatch.setattr(model, "autocast_precision", "fp32")
    fp32 = ours(StreamingPredictor(model, batch_objects=False), frames, prompt)
    assert max(float(np.abs(fp32[f][1] - mine[f][1]).max()) for f in range(N_FRAMES)) > 10 * TOL
