"""Image mode equals Meta's SAM2ImagePredictor (set_image + predict) on the same
image and prompts; one embedding serves many prompts."""

from __future__ import annotations

import numpy as np
import pytest

from tests.frames import moving_shapes, shape_centres
from tracker.errors import FrameError, PromptError
from tracker.segment import ImageSegmenter, segment

H, W = 120, 160


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return moving_shapes(1, H, W, seed=7)[0]


@pytest.fixture(scope="module")
def meta(model, image):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    p = SAM2ImagePredictor(model)
    s = model.image_size
    p._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    p.set_image(image)
    return p


PROMPTS = [
    dict(points_xy=[list(shape_centres(0, H, W)[0])], labels=[1]),
    dict(points_xy=[list(shape_centres(0, H, W)[1]), [5.0, 5.0]], labels=[1, 0]),
    dict(box_xyxy=[50.0, 60.0, 110.0, 110.0]),
    dict(box_xyxy=[50.0, 60.0, 110.0, 110.0], points_xy=[[80.0, 85.0]], labels=[0]),
]


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_equals_meta_image_predictor(model, image, meta, prompt, multimask):
    seg = ImageSegmenter(model)
    seg.set_image(image)
    ours = seg.predict(multimask=multimask, **prompt)
    pts = np.array(prompt["points_xy"], np.float32) if "points_xy" in prompt else None
    lbl = np.array(prompt["labels"], np.int32) if "labels" in prompt else None
    box = np.array(prompt["box_xyxy"], np.float32) if "box_xyxy" in prompt else None
    masks, ious, low = meta.predict(point_coords=pts, point_labels=lbl, box=box, multimask_output=multimask)
    order = np.argsort(-ious, kind="stable")
    assert len(ours.candidates) == (3 if multimask else 1)
    for cand, i in zip(ours.candidates, order):
        np.testing.assert_array_equal(cand.mask_hw, masks[i].astype(bool))
        assert cand.score == pytest.approx(float(ious[i]), abs=1e-6)
    np.testing.assert_allclose(ours.low_res_logits, low[order], atol=1e-5)
    assert [c.score for c in ours.candidates] == sorted((c.score for c in ours.candidates), reverse=True)


def test_one_embedding_many_prompts(model, image, monkeypatch):
    seg = ImageSegmenter(model)
    calls = []
    orig = model.forward_image
    monkeypatch.setattr(model, "forward_image", lambda x: calls.append(1) or orig(x))
    seg.set_image(image)
    for p in PROMPTS:
        seg.predict(**p)
    assert len(calls) == 1


def test_bad_input(model, image):
    seg = ImageSegmenter(model)
    with pytest.raises(PromptError) as err:
        seg.predict(points_xy=[[1, 1]], labels=[1])
    assert str(err.value) == "no image set: call set_image first"
    with pytest.raises(FrameError) as err:
        seg.set_image(np.zeros((10, 10), np.uint8))
    assert str(err.value) == "image must be H x W x 3 RGB, got (10, 10)"
    seg.set_image(image)
    with pytest.raises(PromptError) as err:
        seg.predict(points_xy=[[200, 1]], labels=[1])
    assert str(err.value) == "point (200, 1) is outside the 160x120 frame"
    r = segment(image, segmenter=seg, points_xy=[[10, 10]], labels=[1])  # still usable
    assert r.best.mask_hw.shape == (H, W)
