"""Image mode equals Meta's SAM2ImagePredictor (set_image + predict) on the same
image and prompts, single and multimask, with and without chained low-res
logits, whether the embedding came from set_image, a batch of several images or
a slice of a batch shared with video frames; one embedding serves many prompts;
bad prompts are refused naming the field."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.frames import moving_shapes, shape_centres
from tests.meta_image import meta_image_predictor, meta_predict
from tracker.errors import FrameError, PromptError
from tracker.segment import ImagePromptError, ImageSegmenter, PreparedImage, segment

H, W = 120, 160


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return moving_shapes(1, H, W, seed=7)[0]


@pytest.fixture(scope="module")
def others() -> list[np.ndarray]:
    """Images of other sizes to share a batch with ``image``."""
    return [moving_shapes(1, 90, 200, seed=3)[0], moving_shapes(1, 256, 256, seed=4)[0]]


@pytest.fixture(scope="module")
def meta(model, image):
    return meta_image_predictor(model, image)


@pytest.fixture(scope="module")
def seg(model) -> ImageSegmenter:
    return ImageSegmenter(model)


@pytest.fixture(scope="module")
def embeddings(seg, image, others):
    """``image``'s embedding made three ways."""
    alone = seg.encode(image)
    batched = seg.encode_batch([others[0], image, others[1]])[1]
    seg.set_image(image)
    return {"alone": alone, "batch": batched, "set_image": None}


PROMPTS = [
    dict(points_xy=[list(shape_centres(0, H, W)[0])], labels=[1]),
    dict(points_xy=[list(shape_centres(0, H, W)[1]), [5.0, 5.0]], labels=[1, 0]),
    dict(box_xyxy=[50.0, 60.0, 110.0, 110.0]),
    dict(box_xyxy=[50.0, 60.0, 110.0, 110.0], points_xy=[[80.0, 85.0]], labels=[0]),
]


def assert_same(ours, theirs, multimask: bool) -> None:
    masks, ious, low = theirs
    assert len(ours.candidates) == (3 if multimask else 1)
    for cand, mask, iou in zip(ours.candidates, masks, ious):
        np.testing.assert_array_equal(cand.mask_hw, mask.astype(bool))
        assert cand.score == pytest.approx(float(iou), abs=1e-6)
    np.testing.assert_allclose(ours.low_res_logits, low, atol=1e-5)
    assert [c.score for c in ours.candidates] == sorted((c.score for c in ours.candidates), reverse=True)


@pytest.mark.parametrize("how", ["set_image", "alone", "batch"])
@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_equals_meta_image_predictor(seg, embeddings, meta, prompt, multimask, how):
    ours = seg.predict(embeddings[how], multimask=multimask, **prompt)
    assert_same(ours, meta_predict(meta, prompt, multimask), multimask)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", PROMPTS[:2] + PROMPTS[3:])
def test_chained_logits_equal_meta(seg, embeddings, meta, prompt, multimask):
    """Refine: a click, then the same click plus one more with the previous best
    mask's low-res logits, as SAM's notebooks do."""
    emb = embeddings["batch"]
    first = seg.predict(emb, multimask=True, **prompt)
    _, _, meta_low = meta_predict(meta, prompt, True)
    np.testing.assert_allclose(first.low_res_logits, meta_low, atol=1e-5)
    more = dict(prompt, points_xy=[*prompt["points_xy"], [30.0, 100.0]], labels=[*prompt["labels"], 1])
    ours = seg.predict(emb, mask_input=first.low_res_logits[0], multimask=multimask, **more)
    assert_same(ours, meta_predict(meta, more, multimask, mask_input=meta_low[0][None]), multimask)
    # the logits alone (no new clicks) refine too
    ours = seg.predict(emb, mask_input=first.low_res_logits[0][None], multimask=multimask)
    assert_same(ours, meta_predict(meta, {}, multimask, mask_input=meta_low[0][None]), multimask)


def _max_diff(a, b) -> float:
    pairs = zip((a.image_embed, *a.high_res_feats), (b.image_embed, *b.high_res_feats))
    return max(float((x.float() - y.float()).abs().max()) for x, y in pairs)


def test_batch_encode_equals_one_by_one(seg, image, others, embeddings):
    """Measured bit-identical on this CPU (float32); 1e-5 leaves room for other kernels."""
    images = [others[0], image, others[1]]
    batch = seg.encode_batch(images)
    for im, emb in zip(images, batch):
        one = seg.encode(im)
        assert _max_diff(emb, one) <= 1e-5
        assert emb.size_hw == im.shape[:2]
        assert emb.image_embed.shape == (1, 256, seg.image_size // 16, seg.image_size // 16)
        assert emb.image_embed.untyped_storage().nbytes() == emb.image_embed.numel() * emb.image_embed.element_size()
    assert batch[1].nbytes == sum(t.numel() * t.element_size() for t in (batch[1].image_embed, *batch[1].high_res_feats))


def test_embeddings_from_a_batch_shared_with_video_frames(model, seg, image, embeddings):
    """The worker may run video frames and uploads through one forward_image call."""
    from tracker.predictor import StreamingPredictor

    frame = StreamingPredictor(model).to_model_input(moving_shapes(1, 80, 100, seed=9)[0])
    batch = torch.cat([frame, seg.model_inputs([seg.prepare(image)])], dim=0)
    with torch.inference_mode():
        backbone = model.forward_image(batch)
    (emb,) = seg.embeddings_from_backbone(backbone, [seg.prepare(image)], start=1)
    assert _max_diff(emb, embeddings["alone"]) <= 1e-5


def test_one_embedding_many_prompts(model, image, monkeypatch):
    seg = ImageSegmenter(model)
    calls = []
    orig = model.forward_image
    monkeypatch.setattr(model, "forward_image", lambda x: calls.append(len(x)) or orig(x))
    emb = seg.encode_batch([image, image[::-1].copy()])[0]
    for p in PROMPTS:
        seg.predict(emb, **p)
    assert calls == [2]


def test_out_of_memory_for_a_batch_encodes_one_by_one(model, image, others, embeddings, monkeypatch, caplog):
    seg = ImageSegmenter(model)
    calls = []
    orig = model.forward_image

    def forward_image(x):
        calls.append(len(x))
        if len(x) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return orig(x)

    monkeypatch.setattr(model, "forward_image", forward_image)
    out = seg.embed([seg.prepare(im) for im in (image, others[0])])
    assert calls == [2, 1, 1]
    assert _max_diff(out[0].embedding, embeddings["alone"]) <= 1e-5
    assert "image encoder out of memory for 2 images at once; encoding them one by one" in caplog.text


def test_prepare_is_meta_transform(seg, image):
    prepared = seg.prepare(image)
    assert prepared.size_hw == (H, W)
    np.testing.assert_array_equal(prepared.pixels.numpy(), seg.predictor._transforms(image).numpy())
    assert prepared.digest == seg.prepare(image.copy()).digest != seg.prepare(image[::-1].copy()).digest


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


S4 = 256 // 4  # low-res logits side of the test model

BAD_PROMPTS = [
    (dict(points_xy=[[10, 10]] * 65, labels=[1] * 65), "points_xy", "too many points: 65 given, at most 64 per prompt"),
    (dict(points_xy=[[10, 10], [10, 130]], labels=[1, 1]), "points_xy[1]", "point (10, 130) is outside the 160x120 frame"),
    (dict(points_xy=[[-1, 10]], labels=[1]), "points_xy[0]", "point (-1, 10) is outside the 160x120 frame"),
    (dict(points_xy=[[10, float("nan")]], labels=[1]), "points_xy[0]", "point coordinates must be finite numbers"),
    (dict(points_xy=[[10, 10, 3]], labels=[1]), "points_xy", "points_xy must be a list of [x, y] pairs, got shape (1, 3)"),
    (dict(points_xy=[[10], [1, 2]], labels=[1, 1]), "points_xy", "points_xy must be a list of [x, y] pairs of numbers"),
    (dict(points_xy=[[10, 10]], labels=[1, 0]), "labels", "1 points but 2 labels"),
    (dict(points_xy=[[10, 10]], labels=[2]), "labels", "labels must be 1 (positive) or 0 (negative), got [2]"),
    (dict(points_xy=[[10, 10]]), "labels", "points and labels must be given together"),
    (dict(labels=[1]), "points_xy", "points and labels must be given together"),
    ({}, "points_xy", "a prompt needs points, a box or a mask"),
    (dict(box_xyxy=[0, 0, 161, 50]), "box_xyxy", "box (0, 0, 161, 50) is outside the 160x120 frame"),
    (dict(box_xyxy=[10, 10, 5, 50]), "box_xyxy", "box (10, 10, 5, 50) is empty: need x0 < x1 and y0 < y1"),
    (dict(box_xyxy=[1, 2, 3]), "box_xyxy", "box must be 4 numbers x0, y0, x1, y1, got [1, 2, 3]"),
    (dict(box_xyxy=[[1, 2], [3]]), "box_xyxy", "the prompt's labels or box are not numbers: "),
    (dict(box_xyxy=[10, 10, 50, 50], mask_input=np.zeros((32, 32))), "mask_input",
     f"mask_input must be {S4} x {S4} low-res logits (a previous result's low_res_logits[i]), got shape (32, 32)"),
    (dict(box_xyxy=[10, 10, 50, 50], mask_input=np.full((S4, S4), np.inf)), "mask_input", "mask_input must hold finite numbers"),
    (dict(box_xyxy=[10, 10, 50, 50], multimask="yes"), "multimask", "multimask must be true or false, got 'yes'"),
]


@pytest.mark.parametrize("prompt, field, message", BAD_PROMPTS)
def test_bad_prompts_name_the_field(seg, embeddings, prompt, field, message):
    emb = embeddings["alone"]
    with pytest.raises(ImagePromptError) as err:
        seg.predict(emb, **prompt)
    assert err.value.field == field
    assert str(err.value).startswith(message) if message.endswith(": ") else str(err.value) == message
    assert isinstance(err.value, PromptError)
    assert seg.predict(emb, points_xy=[[10, 10]], labels=[1]).best.mask_hw.shape == (H, W)  # still usable


def test_embedding_of_another_model_is_refused(seg, embeddings):
    other = dataclasses.replace(embeddings["alone"], model="sam2-256px-cpu-auto#999")
    with pytest.raises(FrameError) as err:
        seg.predict(other, points_xy=[[10, 10]], labels=[1])
    assert str(err.value) == f"the embedding was made by model sam2-256px-cpu-auto#999, this segmenter runs {seg.model_key}"
    wrong = PreparedImage(torch.zeros(3, 128, 128), (10, 10), "x")
    with pytest.raises(FrameError) as err:
        seg.encode_batch([wrong])
    assert str(err.value) == "prepared image is (3, 128, 128), this model takes 3 x 256 x 256: prepare it with this segmenter"


def test_max_points_is_configurable(model, embeddings):
    seg = ImageSegmenter(model, max_points=2)
    with pytest.raises(ImagePromptError) as err:
        seg.predict(embeddings["alone"], points_xy=[[1, 1]] * 3, labels=[1] * 3)
    assert str(err.value) == "too many points: 3 given, at most 2 per prompt"


def test_segment_takes_bytes_files_and_arrays_through_one_path(seg, image, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    path = tmp_path / "image.png"
    path.write_bytes(buf.getvalue())
    prompt = dict(points_xy=[list(shape_centres(0, H, W)[0])], labels=[1])
    want = segment(image, segmenter=seg, **prompt)
    for source in (buf.getvalue(), path, str(path)):
        got = segment(source, segmenter=seg, **prompt)
        np.testing.assert_array_equal(got.best.mask_hw, want.best.mask_hw)
        np.testing.assert_array_equal(got.low_res_logits, want.low_res_logits)
