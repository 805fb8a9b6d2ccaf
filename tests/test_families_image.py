"""Image mode for the transformers families (EdgeTAM, SAM 3's tracker): the
segmenter over each family's video model answers as the library's own image
model (``EdgeTamModel`` / ``Sam3TrackerModel`` built from the matching image
config, with the video model's weights) on the same image and prompts: points,
box, box + points, chained low-res logits, single and multimask, logits within
1e-4; a prompt on an image answers as the same first prompt on a video frame;
bad prompts get SAM 2's errors (message and field); batches equal one by one;
the embedding cache, the ``segment`` CLI and the server's image mode with a
family model.

The models are the real architectures at reduced size with seeded random
weights; ``no_memory_embedding`` (zero at initialisation) is given random values
so that where it is added shows in the masks.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from tests.frames import moving_shapes, shape_centres  # noqa: E402
from tests.test_families import SIZES, family_kwargs  # noqa: E402  (the same reduced models)
from tests.test_segment import BAD_PROMPTS  # noqa: E402
from tracker.embedding_cache import EmbeddingCache  # noqa: E402
from tracker.errors import FrameError, PromptError  # noqa: E402
from tracker.families import FAMILIES, build_family_model  # noqa: E402
from tracker.families.hf_image import HFImageSegmenter, make_segmenter  # noqa: E402
from tracker.segment import ImagePromptError, ImageSegmenter, segment  # noqa: E402

H, W = 120, 160
TOL = 1e-4

#: parameters of the video model that its image model does not have (memory, pointers)
VIDEO_ONLY = (
    "memory_",
    "mask_downsample",
    "spatial_perceiver",
    "object_pointer_proj",
    "temporal_positional_encoding_projection_layer",
    "no_memory_positional_encoding",
    "no_object_pointer",
    "occlusion_spatial_embedding_parameter",
)
#: SAM 3's vision neck has a 0.5x level that the tracker drops (``Sam3TrackerVideoModel.get_image_features``)
SAM3_DROPPED_LEVEL = "vision_encoder.neck.fpn_layers.3."


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    """The model as the service builds it (with the inference speed-ups); its
    ``shipped`` twin (the library's model as it ships, the same weights) is what
    the reference's image model takes its weights from."""
    torch.set_num_threads(2)
    kwargs = family_kwargs(request.param)
    model, twin = build_family_model(request.param, **kwargs), build_family_model(request.param, fast=False, **kwargs)
    for net in (model, twin):
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            net.no_memory_embedding.copy_(torch.randn_like(net.no_memory_embedding))
    SHIPPED[request.param] = twin
    return model


#: each family's model as the library ships it, with the fixture model's weights
SHIPPED: dict[str, torch.nn.Module] = {}


class ImageReference:
    """The library's image model of the family, driven as its documentation
    shows: processor(images, points, labels, boxes) → model → post_process_masks."""

    def __init__(self, video_model: torch.nn.Module) -> None:
        import transformers as tf

        family, cfg = video_model.stream_family, video_model.config
        s = int(cfg.image_size)
        vision = cfg.vision_config.to_dict()
        image_processor = family.processor(s).image_processor
        if family.name == "edgetam":
            config_cls, model_cls, proc_cls = tf.EdgeTamConfig, tf.EdgeTamModel, tf.Sam2Processor
            assert vision["backbone_config"]["architecture"] == "repvit_m1"
        else:
            config_cls, model_cls, proc_cls = tf.Sam3TrackerConfig, tf.Sam3TrackerModel, tf.Sam3TrackerProcessor
            # the tracker's three levels (see the module doc of tracker.families.hf_image)
            vision["scale_factors"] = [4.0, 2.0, 1.0]
        config = config_cls(
            vision_config=vision,
            prompt_encoder_config=cfg.prompt_encoder_config.to_dict(),
            mask_decoder_config=cfg.mask_decoder_config.to_dict(),
        )
        self.model = model_cls(config).eval()
        info = self.model.load_state_dict(video_model.state_dict(), strict=False)
        assert info.missing_keys == [], info.missing_keys  # every weight of the image model is the video model's
        assert [k for k in info.unexpected_keys if not k.startswith(VIDEO_ONLY + (SAM3_DROPPED_LEVEL,))] == []
        assert any(k.startswith("memory_attention.") for k in info.unexpected_keys)
        self.processor = proc_cls(image_processor=image_processor, target_size=s)

    @torch.inference_mode()
    def embeddings(self, image: np.ndarray) -> list[torch.Tensor]:
        pixels = self.processor(images=image, return_tensors="pt").pixel_values
        return self.model.get_image_embeddings(pixels)

    @torch.inference_mode()
    def predict(
        self,
        image: np.ndarray,
        prompt: dict[str, Any],
        multimask: bool,
        *,
        mask_input: np.ndarray | None = None,
        embeddings: list[torch.Tensor] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(low-res logits C x s x s, IoUs C, logits at H x W: C x H x W), in the model's order."""
        kwargs: dict[str, Any] = {}
        if "points_xy" in prompt:
            kwargs["input_points"] = [[[list(map(float, p)) for p in prompt["points_xy"]]]]
            kwargs["input_labels"] = [[list(prompt["labels"])]]
        if "box_xyxy" in prompt:
            kwargs["input_boxes"] = [[list(map(float, prompt["box_xyxy"]))]]
        inputs = self.processor(images=image, return_tensors="pt", **kwargs)
        sizes = inputs.pop("original_sizes")
        if embeddings is not None:
            inputs.pop("pixel_values")
            inputs["image_embeddings"] = embeddings
        if mask_input is not None:
            inputs["input_masks"] = torch.from_numpy(np.asarray(mask_input, np.float32).reshape(1, 1, *mask_input.shape[-2:]))
        out = self.model(**inputs, multimask_output=multimask)
        (full,) = self.processor.post_process_masks(out.pred_masks, sizes, binarize=False)
        return out.pred_masks[0, 0].numpy(), out.iou_scores[0, 0].numpy(), full[0].numpy()


@pytest.fixture(scope="module")
def reference(family_model) -> ImageReference:
    return ImageReference(SHIPPED[family_model.stream_family.name])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return moving_shapes(1, H, W, seed=7)[0]


@pytest.fixture(scope="module")
def others() -> list[np.ndarray]:
    return [moving_shapes(1, 90, 200, seed=3)[0], moving_shapes(1, 256, 256, seed=4)[0]]


@pytest.fixture(scope="module")
def seg(family_model) -> HFImageSegmenter:
    return HFImageSegmenter(family_model)


@pytest.fixture(scope="module")
def emb(seg, image):
    return seg.encode(image)


@pytest.fixture(scope="module")
def ref_emb(reference, image) -> list[torch.Tensor]:
    return reference.embeddings(image)


PROMPTS = [
    dict(points_xy=[list(shape_centres(0, H, W)[0])], labels=[1]),
    dict(points_xy=[list(shape_centres(0, H, W)[1]), [5.0, 5.0]], labels=[1, 0]),
    dict(box_xyxy=[50.0, 60.0, 110.0, 110.0]),
    dict(box_xyxy=[50.0, 60.0, 110.0, 110.0], points_xy=[[80.0, 85.0]], labels=[0]),
]


def assert_same(ours, theirs, multimask: bool) -> None:
    low, ious, full = theirs
    assert len(ours.candidates) == len(ious) == (3 if multimask else 1)
    order = np.argsort(-ious, kind="stable")
    np.testing.assert_allclose(ours.low_res_logits, low[order], atol=TOL, rtol=0)
    for cand, k in zip(ours.candidates, order):
        assert cand.score == pytest.approx(float(ious[k]), abs=TOL)
        sure = np.abs(full[k]) > TOL  # a pixel within the tolerance of 0 may fall either side
        np.testing.assert_array_equal(cand.mask_hw[sure], full[k][sure] > 0)
        assert cand.mask_hw.shape == (H, W)
    assert [c.score for c in ours.candidates] == sorted((c.score for c in ours.candidates), reverse=True)
    assert any(c.mask_hw.any() for c in ours.candidates)  # random weights still give masks worth comparing


def test_embedding_equals_the_image_models(seg, emb, ref_emb):
    ours = [*emb.high_res_feats, emb.image_embed]
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in ref_emb]
    for a, b in zip(ours, ref_emb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert emb.nbytes == sum(t.numel() * t.element_size() for t in ours)


def test_equals_the_image_model_from_pixels(seg, reference, image):
    """The whole path (processor, encoder, decoder, post-processing) on the image
    model; the other tests share one embedding of each."""
    seg.set_image(image)
    prompt = PROMPTS[3]
    assert_same(seg.predict(multimask=True, **prompt), reference.predict(image, prompt, True), True)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_equals_the_image_model(seg, emb, reference, ref_emb, image, prompt, multimask):
    ours = seg.predict(emb, multimask=multimask, **prompt)
    assert_same(ours, reference.predict(image, prompt, multimask, embeddings=ref_emb), multimask)


@pytest.mark.parametrize("multimask", [False, True])
def test_chained_logits_equal_the_image_model(seg, emb, reference, ref_emb, image, multimask):
    """A click, then one more with the best mask's low-res logits, then the logits alone."""
    prompt = PROMPTS[0]
    first = seg.predict(emb, multimask=True, **prompt)
    low, ious, _ = reference.predict(image, prompt, True, embeddings=ref_emb)
    best = low[int(np.argmax(ious))]
    np.testing.assert_allclose(first.low_res_logits[0], best, atol=TOL, rtol=0)
    assert first.low_res_logits.shape[1:] == (seg.mask_side, seg.mask_side)
    more = dict(prompt, points_xy=[*prompt["points_xy"], [30.0, 100.0]], labels=[1, 1])
    ours = seg.predict(emb, mask_input=first.low_res_logits[0], multimask=multimask, **more)
    theirs = reference.predict(image, more, multimask, mask_input=best, embeddings=ref_emb)
    assert_same(ours, theirs, multimask)
    ours = seg.predict(emb, mask_input=first.low_res_logits[0][None], multimask=multimask)
    assert_same(ours, reference.predict(image, {}, multimask, mask_input=best, embeddings=ref_emb), multimask)


def test_an_image_prompt_answers_as_the_first_prompt_on_a_video_frame(family_model, seg, emb, image):
    """The library's video model on a new session, one click on its first frame:
    it adds no_memory_embedding where this segmenter does and keeps the best of
    three masks."""
    from tests.test_families import Reference

    ref = Reference(family_model)
    ref.frame(image, 0)
    ref.processor.add_inputs_to_inference_session(
        ref.session, frame_idx=0, obj_ids=[1], original_size=(H, W), input_points=[[PROMPTS[0]["points_xy"]]],
        input_labels=[[[1]]],
    )
    with torch.inference_mode():
        out = family_model(ref.session, frame_idx=0)
    assert float(out.object_score_logits.reshape(-1)[0]) > 0  # else the video path blanks the mask
    ours = seg.predict(emb, multimask=True, **PROMPTS[0])
    np.testing.assert_allclose(ours.low_res_logits[0], out.pred_masks[0, 0].numpy(), atol=TOL, rtol=0)
    np.testing.assert_array_equal(ours.best.mask_hw, ref.logits(out)[1].numpy() > 0)


# ---------------------------------------------------------------- prompts refused as SAM 2 refuses them


@pytest.fixture(scope="module")
def sam2_seg(model) -> ImageSegmenter:
    return ImageSegmenter(model)


@pytest.fixture(scope="module")
def sam2_emb(sam2_seg, image):
    return sam2_seg.encode(image)


@pytest.mark.parametrize("prompt, field, message", BAD_PROMPTS)
def test_bad_prompts_get_sam2s_errors(seg, emb, sam2_seg, sam2_emb, prompt, field, message):
    with pytest.raises(ImagePromptError) as theirs:
        sam2_seg.predict(sam2_emb, **prompt)
    with pytest.raises(ImagePromptError) as ours:
        seg.predict(emb, **prompt)
    assert (ours.value.field, str(ours.value)) == (theirs.value.field, str(theirs.value))
    assert ours.value.field == field
    assert isinstance(ours.value, PromptError)


def test_bad_input_and_other_models_embeddings(family_model, seg, emb, image):
    fresh = HFImageSegmenter(family_model, max_points=2)
    with pytest.raises(PromptError, match="^no image set: call set_image first$"):
        fresh.predict(points_xy=[[1, 1]], labels=[1])
    with pytest.raises(ImagePromptError, match="^too many points: 3 given, at most 2 per prompt$"):
        fresh.predict(emb, points_xy=[[1, 1]] * 3, labels=[1] * 3)
    fresh.set_image(image)  # usable after refusals
    assert fresh.predict(points_xy=[[10, 10]], labels=[1]).best.mask_hw.shape == (H, W)
    with pytest.raises(FrameError, match=r"^image must be H x W x 3 RGB, got \(10, 10\)$"):
        seg.prepare(np.zeros((10, 10), np.uint8))
    with pytest.raises(FrameError, match="^image must be uint8 RGB, got dtype float32$"):
        seg.prepare(image.astype(np.float32))
    import dataclasses

    other = dataclasses.replace(emb, model="sam2-256px-cpu-auto#999")
    with pytest.raises(FrameError, match="^the embedding was made by model sam2-256px-cpu-auto#999, this segmenter runs "):
        seg.predict(other, points_xy=[[10, 10]], labels=[1])
    wrong = dataclasses.replace(seg.prepare(image), pixels=torch.zeros(3, 96, 96))
    s = seg.image_size
    with pytest.raises(FrameError, match=rf"^prepared image is \(3, 96, 96\), this model takes 3 x {s} x {s}"):
        seg.encode_batch([wrong])


# ---------------------------------------------------------------- embeddings: batches, cache


def _max_diff(a, b) -> float:
    pairs = zip((a.image_embed, *a.high_res_feats), (b.image_embed, *b.high_res_feats))
    return max(float((x - y).abs().max()) for x, y in pairs)


def test_batch_encode_equals_one_by_one(seg, image, others, emb):
    images = [others[0], image, others[1]]
    batch = seg.encode_batch(images)
    for im, e in zip(images, batch):
        assert _max_diff(e, seg.encode(im)) <= 1e-5
        assert e.size_hw == im.shape[:2]
        assert e.image_embed.untyped_storage().nbytes() == e.image_embed.numel() * e.image_embed.element_size()
    assert _max_diff(batch[1], emb) <= 1e-5


def test_embeddings_from_a_batch_shared_with_video_frames(family_model, seg, image, emb):
    """The worker may run video frames (the streaming predictor's inputs) and
    uploads through one ``get_image_features`` call."""
    from tracker.families import make_predictor

    frame = make_predictor(family_model).to_model_input(moving_shapes(1, 80, 100, seed=9)[0])
    prepared = seg.prepare(image)
    with torch.inference_mode():
        out = family_model.get_image_features(torch.cat([frame, seg.model_inputs([prepared])]), return_dict=True)
    (shared,) = seg.embeddings_from_backbone(out, [prepared], start=1)
    assert _max_diff(shared, emb) <= 1e-5


def test_embed_uses_the_cache_and_encodes_duplicates_once(family_model, seg, image, others, emb, monkeypatch):
    calls: list[int] = []
    orig = family_model.get_image_features
    monkeypatch.setattr(family_model, "get_image_features", lambda x, **kw: calls.append(len(x)) or orig(x, **kw))
    cache: EmbeddingCache = EmbeddingCache(1 << 28)
    prepared = [seg.prepare(im) for im in (image, others[0], image)]
    first = seg.embed(prepared, cache)
    assert calls == [2] and [e.cached for e in first] == [False, False, True]
    assert first[0].embedding is first[2].embedding and _max_diff(first[0].embedding, emb) <= 1e-5
    again = seg.embed([seg.prepare(others[0])], cache)
    assert calls == [2] and again[0].cached and again[0].embedding is first[1].embedding
    assert cache.stats().entries == 2
    seg.embed(prepared[:2], max_batch=1)  # no cache: one image per encoder call
    assert calls == [2, 1, 1]
    result = seg.predict(again[0].embedding, **PROMPTS[0])
    assert result.best.mask_hw.shape == others[0].shape[:2]


def test_make_segmenter_picks_the_family(family_model, model):
    assert type(make_segmenter(family_model, max_points=3)) is HFImageSegmenter
    assert make_segmenter(family_model, max_points=3).max_points == 3
    assert type(make_segmenter(model)) is ImageSegmenter


def test_segment_function_takes_a_family_model(family_model, seg, image):
    got = segment(image, model=family_model, **PROMPTS[0])
    want = seg.predict(seg.encode(image), **PROMPTS[0])
    np.testing.assert_array_equal(got.best.mask_hw, want.best.mask_hw)
    np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=1e-6)


# ---------------------------------------------------------------- the CLI and the server


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_segment_cli_with_edgetam(image, tmp_path, capsys):
    """``sam2-stream segment --model edgetam``: masks equal the segmenter's on the
    same (full-size, random-weight) model."""
    from tracker.cli import main
    from tracker.masks import decode_png
    from tracker.model import build_model

    path = tmp_path / "image.png"
    path.write_bytes(_png(image))
    (x, y) = shape_centres(0, H, W)[0]
    args = ["--model", "edgetam", "--random-weights", "0", "--image-size", "256", "--device", "cpu"]
    out = tmp_path / "masks"
    assert main(["segment", str(path), "--point", f"1:{x:.0f},{y:.0f}", "--box", "2:50,60,110,110", "--multimask",
                 "--out", str(out), *args]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["obj_id"] for r in records] == [1, 2] and all(len(r["masks"]) == 3 for r in records)
    seg = make_segmenter(build_model("edgetam", random_weights_seed=0, image_size=256, device="cpu"))
    assert isinstance(seg, HFImageSegmenter)
    e = seg.encode(image)
    for record, prompt in zip(records, (dict(points_xy=[[round(x), round(y)]], labels=[1]), dict(box_xyxy=[50, 60, 110, 110]))):
        want = seg.predict(e, multimask=True, **prompt)
        for m, cand in zip(record["masks"], want.candidates):
            assert m["score"] == pytest.approx(cand.score, abs=1e-4)
            np.testing.assert_array_equal(decode_png(Path(m["png"]).read_bytes()), cand.mask_hw)


def test_server_image_round_trip_with_a_family_model(family_model, seg, image):
    """image_open / image_segment / image_close over WebSocket and HTTP on a
    server whose default model is a family model: the segmenter's masks, typed
    errors naming the field, one embedding cache for both."""
    from tests.test_server import Raw, make_config, running
    from tests.test_server_images import http
    from tracker.masks import decode_rle

    want = seg.predict(seg.encode(image), multimask=True, **PROMPTS[0])

    def assert_masks(reply: dict) -> None:
        assert [m["score"] for m in reply["masks"]] == pytest.approx([c.score for c in want.candidates], abs=1e-5)
        for m, cand in zip(reply["masks"], want.candidates):
            mask = m["mask"]
            np.testing.assert_array_equal(decode_rle({"size": mask["size"], "counts": mask["counts"]}), cand.mask_hw)

    with running(family_model, make_config(sources={}, images={"http_port": 0})) as st:
        base = f"http://127.0.0.1:{st.server.images_http.port}/v1/images"
        status, body = http("POST", base, _png(image))
        assert status == 200, body
        opened = json.loads(body)
        assert (opened["width"], opened["height"], opened["cached"]) == (W, H, False)
        seg_url = f"{base}/{opened['image_id']}/segment"
        status, body = http("POST", seg_url, json.dumps(dict(multimask=True, **PROMPTS[0])).encode())
        assert status == 200, body
        assert_masks(json.loads(body))
        status, body = http("POST", seg_url, json.dumps({"points_xy": [[999, 1]], "labels": [1]}).encode())
        assert status == 400 and json.loads(body)["field"] == "points_xy[0]"
        raw = Raw(st.url)
        try:
            opened = raw.request("image_open", data=base64.b64encode(_png(image)).decode())
            assert (opened["width"], opened["height"], opened["cached"]) == (W, H, True)  # the HTTP upload's embedding
            reply = raw.request("image_segment", image_id=opened["image_id"], multimask=True, **PROMPTS[0])
            assert_masks(reply)
            again = raw.request("image_segment", image_id=opened["image_id"], previous=0, **PROMPTS[0])
            assert len(again["masks"]) == 1 and again["answer"] == 2
            raw.request("image_close", image_id=opened["image_id"])
        finally:
            raw.ws.close()


def test_the_cpu_fallback_copy_segments_the_same(family_model, seg, emb, image):
    """The server's CPU fallback (``_cpu_copy``, then ``make_segmenter``) keeps the family."""
    from tracker.session import _cpu_copy

    copy_seg = make_segmenter(_cpu_copy(family_model))
    assert isinstance(copy_seg, HFImageSegmenter) and copy_seg.model_key != seg.model_key
    got = copy_seg.predict(copy_seg.encode(image), multimask=True, **PROMPTS[0])
    want = seg.predict(emb, multimask=True, **PROMPTS[0])
    np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=1e-6)
