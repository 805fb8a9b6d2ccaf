"""Offline annotation on the real clips of ``../shared/vos/`` (skipped when absent).

Real frames and real annotation files: DAVIS-style label maps as mask prompts
(one PNG per frame holding several objects, one of them a pixel narrower than
the video), and an H.264 file whose decoded frames must give exactly what the
same frames give from an image folder (the path proven equal to Meta's
predictor).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tracker.annotate import Prompt, annotate
from tracker.errors import PromptError

VOS = Path(__file__).resolve().parents[1].parent / "shared" / "vos"
TOL = 1e-4

pytestmark = [
    pytest.mark.shared,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not VOS.is_dir(), reason="../shared/vos is absent (only in the project's workplace)"),
]


def clip_dir(*parts: str) -> Path:
    path = VOS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{'/'.join(parts)} is not in ../shared/vos")
    return path


def test_judo_label_maps_as_prompts_equal_meta_object_by_object(model):
    """Objects 1, 3 and 4 first appear on frames 0, 8 and 13 (one label map each)."""
    frames = clip_dir("cutie-judo", "images", "judo")
    masks = clip_dir("cutie-judo", "masks", "judo")
    firsts = {1: 0, 3: 8, 4: 13}
    prompts = [Prompt(obj, f, mask_path=masks / f"{f:05d}.png", mask_index=obj) for obj, f in firsts.items()]
    results = {r.frame_idx: r for r in annotate(str(frames), prompts, model=model)}
    assert sorted(results) == list(range(16))
    assert all(sorted(r.objects) == [1, 3, 4] for r in results.values())
    for obj, first in firsts.items():
        label = np.array(Image.open(masks / f"{first:05d}.png"))
        state = model.init_state(str(frames))
        model.add_new_mask(state, first, obj, label == obj)
        seen = set()
        for reverse in (False, True):
            for f, _, logits in model.propagate_in_video(state, reverse=reverse):
                mine = results[f].objects[obj]
                np.testing.assert_array_equal(mine.mask_hw, logits[0, 0].numpy() > 0)
                if mine.logits_hw is not None:  # kept as RLE while waiting for the backward pass
                    diff = float(np.abs(mine.logits_hw - logits[0, 0].numpy()).max())
                    assert diff <= TOL, f"object {obj} frame {f}: {diff}"
                seen.add(f)
        assert seen == set(range(16))


def test_judo_label_map_of_another_size_refused_before_work(model):
    frames = clip_dir("cutie-judo", "images", "judo")
    mask = clip_dir("cutie-judo", "masks", "judo", "00005.png")  # 853 wide, the frames 854
    run = annotate(str(frames), [Prompt(2, 5, mask_path=mask, mask_index=2)], model=model)
    with pytest.raises(PromptError) as err:
        next(run)
    assert str(err.value) == f"mask {mask} is 853x480 but the video is 854x480"


def test_h264_file_gives_what_its_frames_give_from_a_folder(model, tmp_path):
    """chair.mp4 through PyAV, the decode thread and the read-ahead vs the same
    decoded frames as lossless PNGs: identical logits, forward and backward."""
    from tracker.ingest import open_source

    video = clip_dir("pumavos-chair", "chair.mp4")
    label = np.array(Image.open(clip_dir("pumavos-chair", "Annotations", "frame_000010.png")))
    (tmp_path / "m.png").write_bytes((VOS / "pumavos-chair" / "Annotations" / "frame_000010.png").read_bytes())
    folder = tmp_path / "frames"
    folder.mkdir()
    with open_source(str(video), mode="file") as source:
        for frame in source:
            Image.fromarray(frame.image_rgb).save(folder / f"{frame.index:05d}.png")
    assert len(list(folder.iterdir())) == 60
    prompt = [Prompt(1, 10, mask_path=tmp_path / "m.png")]
    from_file = {r.frame_idx: r.objects[1].logits_hw for r in annotate(str(video), prompt, model=model)}
    from_folder = {r.frame_idx: r.objects[1].logits_hw for r in annotate(str(folder), prompt, model=model)}
    assert sorted(from_file) == sorted(from_folder) == list(range(60))
    assert label.shape == from_file[0].shape == (480, 720)
    for f in range(60):
        np.testing.assert_array_equal(from_file[f], from_folder[f])
