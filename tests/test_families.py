"""EdgeTAM and SAM 3's tracker through transformers: the streaming predictor's
output equals the library's own unpruned streaming session (``video=None``,
frames added one at a time) given the same frames and prompts, while holding a
bounded state.

The models are the real architectures at reduced size with seeded random
weights; equality is checked on mask logits at the source resolution (1e-4).
The reference makes exactly the calls a user of the library would: a new frame
is ``model(session, frame=pixels)``; a prompt is the processor's
``add_inputs_to_inference_session`` then ``model(session, frame_idx=f)``, and
a prompt on an older frame re-runs the frames after it up to the newest.
The reference runs on the library's model as it ships; the predictor on the
model as the service builds it, with the inference speed-ups
(``tracker.families.speedups``), so those are inside what is compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests.frames import moving_shapes  # noqa: E402
from tracker.errors import ModelConfigError, PromptError  # noqa: E402
from tracker.families import FAMILIES, build_family_model, make_predictor  # noqa: E402
from tracker.families.hf_video import HFVideoPredictor  # noqa: E402

SIZES = {"edgetam": 256, "sam3-tracker": 224}
H, W = 120, 160
N_FRAMES = 14
TOL = 1e-4


#: each family's model as the library ships it (``fast=False``), with the same
#: weights as the served model: every reference runs on it, so the served model's
#: speed-ups (tracker.families.speedups) are inside what is compared
SHIPPED: dict[str, torch.nn.Module] = {}


def family_kwargs(name: str) -> dict[str, Any]:
    return {"device": torch.device("cpu"), "image_size": SIZES[name], "random_weights_seed": 0, "reduced": True}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    """The model as the service builds it (with the inference speed-ups)."""
    torch.set_num_threads(2)
    SHIPPED[request.param] = build_family_model(request.param, fast=False, **family_kwargs(request.param))
    return build_family_model(request.param, **family_kwargs(request.param))


def shipped(model: torch.nn.Module) -> torch.nn.Module:
    """The library's own model with ``model``'s weights (see :data:`SHIPPED`)."""
    return SHIPPED[model.stream_family.name]


def frames(n: int = N_FRAMES, seed: int = 0) -> list[np.ndarray]:
    return moving_shapes(n, H, W, seed=seed)


@dataclass
class Reference:
    """The library's own session, unpruned, driven as a user of it would."""

    model: torch.nn.Module
    family: Any = None  # default: the model's own

    def __post_init__(self) -> None:
        family = self.family or self.model.stream_family
        self.processor = family.processor(int(self.model.config.image_size))
        self.session = family.session_class()(inference_device="cpu", dtype=torch.float32)

    def logits(self, out: Any) -> dict[int, torch.Tensor]:
        (lg,) = self.processor.post_process_masks([out.pred_masks.float()], original_sizes=[[H, W]], binarize=False)
        return {o: lg[i, 0] for i, o in enumerate(out.object_ids)}

    @torch.inference_mode()
    def frame(self, image: np.ndarray, idx: int) -> dict[int, torch.Tensor]:
        pixels = self.processor(images=image, return_tensors="pt").pixel_values[0]
        if not self.session.obj_ids:
            self.session.add_new_frame(pixels, idx)
            return {}
        out = self.model(self.session, frame_idx=idx, frame=pixels)
        return self.logits(out)

    @torch.inference_mode()
    def prompt(self, frame_idx: int, newest: int, obj_id: int, **inputs: Any) -> dict[int, torch.Tensor]:
        self.processor.add_inputs_to_inference_session(
            self.session, frame_idx=frame_idx, obj_ids=[obj_id], original_size=(H, W), **inputs
        )
        first = self.logits(self.model(self.session, frame_idx=frame_idx))
        for t in range(frame_idx + 1, newest + 1):
            self.model(self.session, frame_idx=t)
        return first


def hf_inputs(points=None, labels=None, box=None, mask=None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if points is not None:
        out["input_points"] = [[[list(map(float, p)) for p in points]]]
        out["input_labels"] = [[list(map(int, labels))]]
    if box is not None:
        out["input_boxes"] = [[list(map(float, box))]]
    if mask is not None:
        out["input_masks"] = torch.from_numpy(mask)
    return out


def square_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def run_both(model: torch.nn.Module, script: dict[int, list[dict[str, Any]]], *, removals: dict[int, int] | None = None,
             **options: Any) -> tuple[HFVideoPredictor, int]:
    """Feed the same frames and prompts to the predictor and the reference;
    compare every object's logits on every frame and on every prompt.
    ``script``: frame index -> prompts made after that frame was tracked (each
    with ``obj_id``, optional ``frame`` (a past frame), and points/box/mask)."""
    pred = make_predictor(model, max_prompt_frames=3, min_prompt_frames=3, **options)
    ref = Reference(shipped(model))
    removals = removals or {}
    removed: set[int] = set()
    compared = 0
    for t, image in enumerate(frames()):
        got = pred.track(image)
        want = ref.frame(image, t)
        for obj_id, logits in want.items():
            if obj_id in removed:
                continue
            diff = float((torch.from_numpy(got.objects[obj_id].logits_hw) - logits).abs().max())
            assert diff <= TOL, f"frame {t} object {obj_id}: |diff| {diff:.2e}"
            compared += 1
        assert set(got.objects) == set(want) - removed
        for p in script.get(t, []):
            p = dict(p)
            obj_id, frame_idx = p.pop("obj_id"), p.pop("frame", t)
            mine = pred.add_prompt(
                obj_id, points_xy=p.get("points"), labels=p.get("labels"), box_xyxy=p.get("box"),
                mask_hw=p.get("mask"), frame_idx=frame_idx,
            )
            theirs = ref.prompt(frame_idx, t, obj_id, **hf_inputs(**p))[obj_id]
            diff = float((torch.from_numpy(mine.logits_hw) - theirs).abs().max())
            assert diff <= TOL, f"prompt on frame {frame_idx} for object {obj_id}: |diff| {diff:.2e}"
            assert mine.is_prompted
        if t in removals:
            pred.remove_object(removals[t])
            removed.add(removals[t])
    return pred, compared


def assert_bounded(pred: HFVideoPredictor) -> None:
    held = pred.stored_entries()
    n_obj = len(pred.obj_ids)
    reach = pred._lookback + pred.max_prompt_frames
    assert held["frames"] <= pred.max_prompt_frames and held["features"] == held["frames"]
    assert held["pixels"] == 0
    assert held["non_cond"] <= n_obj * reach, held
    assert held["tracked"] <= n_obj * reach, held
    for od in pred.session.output_dict_per_obj.values():
        for key in ("cond_frame_outputs", "non_cond_frame_outputs"):
            assert all("high_res_masks" not in out for out in od[key].values())


def test_one_object(family_model: torch.nn.Module) -> None:
    pred, compared = run_both(family_model, {0: [{"obj_id": 1, "points": [[60, 50]], "labels": [1]}]})
    assert compared == N_FRAMES - 1
    assert_bounded(pred)
    assert min(pred.session.output_dict_per_obj[0]["non_cond_frame_outputs"]) > 1  # pruning happened


def test_three_objects_points_box_mask(family_model: torch.nn.Module) -> None:
    script = {
        0: [
            {"obj_id": 1, "points": [[60, 50], [10, 10]], "labels": [1, 0]},
            {"obj_id": 2, "box": [5, 80, 60, 115]},
        ],
        1: [{"obj_id": 3, "mask": square_mask(100, 20, 150, 60)}],
    }
    pred, compared = run_both(family_model, script)
    assert compared == 3 * (N_FRAMES - 2) + 2
    assert_bounded(pred)


@pytest.fixture
def batch_spy(family_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> Any:
    """(the frames the predictor tracks through the batched step, the batch sizes
    memory attention sees on ``family_model``), recorded during the test."""
    from tracker.families import hf_video

    frames_seen: list[int] = []
    batches: list[int] = []
    real = hf_video.track_batched

    def spy(m: torch.nn.Module, session: Any, frame_idx: int, **kwargs: Any) -> Any:
        frames_seen.append(frame_idx)
        return real(m, session, frame_idx, **kwargs)

    monkeypatch.setattr(hf_video, "track_batched", spy)
    hook = family_model.memory_attention.register_forward_hook(
        lambda module, args, kwargs, out: batches.append(int(kwargs["current_vision_features"].shape[1])), with_kwargs=True
    )
    yield frames_seen, batches
    hook.remove()


def test_objects_are_batched_and_equal_the_library_one_by_one(
    family_model: torch.nn.Module, batch_spy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three objects prompted on frame 0: every later frame tracks them as one
    batch (one memory-attention call of batch 3; the SAM head in chunks of 2
    here, as a batch larger than ``HEAD_CHUNK`` is cut), and every mask equals
    the library's object-by-object loop (``run_both``'s comparison at 1e-4)."""
    from tracker.families import batched_step

    monkeypatch.setattr(batched_step, "HEAD_CHUNK", 2)
    frames_seen, batches = batch_spy
    script = {0: [{"obj_id": k, "points": [[30 + 40 * k, 50]], "labels": [1]} for k in (1, 2, 3)]}
    pred, compared = run_both(family_model, script)
    assert compared == 3 * (N_FRAMES - 1)
    assert frames_seen == list(range(1, N_FRAMES))
    assert batches == [3] * (N_FRAMES - 1)
    assert_bounded(pred)


def test_objects_of_different_memories_are_batched_by_layout(family_model: torch.nn.Module, batch_spy: Any) -> None:
    """An object added on frame 3 has fewer memories and pointers than the two
    prompted on frame 0 until its banks fill: memory attention runs one batch
    per layout (2 + 1), then one of 3; the masks still equal the library's."""
    frames_seen, batches = batch_spy
    script = {
        0: [{"obj_id": 1, "points": [[60, 50]], "labels": [1]}, {"obj_id": 2, "points": [[120, 50]], "labels": [1]}],
        3: [{"obj_id": 5, "box": [10, 70, 60, 115]}],
    }
    run_both(family_model, script)
    assert frames_seen == list(range(1, N_FRAMES))  # the prompt on frame 3 (after it was tracked): the library's step
    assert batches[:3] == [2, 2, 2] and 1 in batches and batches[-1] == 3


def test_which_frames_are_batched(family_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a frame the library would simply track for every object: not one
    with a conditioning output, not while an object has new inputs, not a
    single object, not a model without memory."""
    from tracker.families.batched_step import plain_tracking_frame

    pred = make_predictor(family_model)
    images = frames(3)
    pred.track(images[0])
    pred.add_prompt(1, points_xy=[[60, 50]], labels=[1])
    s = pred.session
    assert not plain_tracking_frame(family_model, s, 1)  # one object
    pred.add_prompt(2, points_xy=[[120, 50]], labels=[1])
    pred.track(images[1])
    assert plain_tracking_frame(family_model, s, 2) and plain_tracking_frame(family_model, s, 1)
    assert not plain_tracking_frame(family_model, s, 0)  # the prompts' conditioning outputs
    s.obj_with_new_inputs.append(2)
    assert not plain_tracking_frame(family_model, s, 2)
    s.obj_with_new_inputs.remove(2)
    monkeypatch.setattr(family_model, "num_maskmem", 0)
    assert not plain_tracking_frame(family_model, s, 2)


def test_the_first_self_attention_runs_once_for_a_batch(family_model: torch.nn.Module, batch_spy: Any) -> None:
    """Objects batched on a frame bring the same queries to the first
    memory-attention layer (the frame's features): its self-attention runs on
    one of them, later layers' on all (their queries carry each object's
    memory); the masks still equal the library's loop (``run_both``)."""
    frames_seen, batches = batch_spy
    seen: dict[int, list[int]] = {0: [], 1: []}
    layers = family_model.memory_attention.layers
    hooks = [
        layers[i].self_attn.q_proj.register_forward_hook(lambda m, args, out, i=i: seen[i].append(int(args[0].shape[0])))
        for i in (0, 1)
    ]
    try:
        script = {0: [{"obj_id": k, "points": [[30 + 40 * k, 50]], "labels": [1]} for k in (1, 2, 3)]}
        run_both(family_model, script)
    finally:
        for h in hooks:
            h.remove()
    assert batches == [3] * (N_FRAMES - 1)
    assert set(seen[0]) == {1} and seen[1].count(3) == N_FRAMES - 1


def test_shared_self_attention_equals_the_library_on_any_batch(family_model: torch.nn.Module) -> None:
    """The patched self-attention itself: a batch of equal rows gives the
    library's result for that batch (computed once); a batch whose rows differ
    goes through the library's function unchanged."""
    from tracker.families.speedups import _SharedSelfAttention

    attention = family_model.memory_attention
    patched = attention.layers[0].self_attn
    assert isinstance(patched.__dict__.get("forward"), _SharedSelfAttention)
    assert not isinstance(attention.layers[1].self_attn.__dict__.get("forward"), _SharedSelfAttention)
    library = type(patched).forward
    tokens = attention.position_ids.shape[0]
    g = torch.Generator().manual_seed(5)
    same = torch.randn(1, 1, tokens, patched.hidden_size, generator=g).expand(3, -1, -1, -1).clone()
    differ = same.clone()
    differ[1] += torch.randn(differ[1].shape, generator=g)
    rope = attention.rotary_emb(same, attention.position_ids)
    with torch.inference_mode():
        for x in (same, differ):
            ours, _ = patched(query=x, key=x, value=x, position_embeddings=rope)
            theirs, _ = library(patched, query=x, key=x, value=x, position_embeddings=rope)
            assert ours.shape == theirs.shape and float((ours - theirs).abs().max()) <= 1e-5
        ours, _ = patched(query=differ, key=differ, value=differ, position_embeddings=rope)
        assert not torch.equal(ours[0], ours[1])


def test_batch_objects_false_runs_the_library_loop(family_model: torch.nn.Module, batch_spy: Any) -> None:
    frames_seen, batches = batch_spy
    script = {0: [{"obj_id": k, "points": [[30 + 40 * k, 50]], "labels": [1]} for k in (1, 2)]}
    run_both(family_model, script, batch_objects=False)
    assert frames_seen == [] and set(batches) == {1}


def test_object_added_mid_stream_and_removed(family_model: torch.nn.Module) -> None:
    script = {
        0: [{"obj_id": 1, "points": [[60, 50]], "labels": [1]}],
        5: [{"obj_id": 7, "box": [90, 20, 150, 80]}],
        # after the removal: a correction of the remaining object, and a new one
        11: [{"obj_id": 7, "points": [[120, 50]], "labels": [1]}, {"obj_id": 9, "points": [[30, 90]], "labels": [1]}],
    }
    pred, _ = run_both(family_model, script, removals={9: 1})
    assert pred.obj_ids == [7, 9]
    assert_bounded(pred)


def test_correction_on_tracked_frame(family_model: torch.nn.Module) -> None:
    script = {
        0: [{"obj_id": 1, "points": [[60, 50]], "labels": [1]}],
        7: [{"obj_id": 1, "points": [[70, 50], [20, 100]], "labels": [1, 0]}],
    }
    pred, _ = run_both(family_model, script)
    # the library keeps a correction as a tracked (non-conditioning) output
    assert sorted(pred.session.output_dict_per_obj[0]["cond_frame_outputs"]) == [0]
    assert_bounded(pred)


def test_prompt_on_a_past_frame(family_model: torch.nn.Module) -> None:
    script = {
        0: [{"obj_id": 1, "points": [[60, 50]], "labels": [1]}],
        8: [
            {"obj_id": 2, "points": [[120, 40]], "labels": [1], "frame": 6},
            {"obj_id": 1, "points": [[65, 52]], "labels": [1], "frame": 7},
        ],
        # late in the stream, with old outputs already pruned
        12: [{"obj_id": 2, "points": [[110, 45]], "labels": [1], "frame": 10}],
    }
    pred, _ = run_both(family_model, script)
    assert pred.stats.catch_up_frames == 2 + 1 + 2
    assert_bounded(pred)


def test_prompt_outside_the_window_is_refused(family_model: torch.nn.Module) -> None:
    pred = make_predictor(family_model, max_prompt_frames=2, min_prompt_frames=2)
    for image in frames(5):
        pred.track(image)
    with pytest.raises(PromptError, match="older than the prompt window"):
        pred.add_prompt(1, points_xy=[[5, 5]], labels=[1], frame_idx=1)
    with pytest.raises(PromptError, match="outside"):
        pred.add_prompt(1, points_xy=[[500, 5]], labels=[1])
    assert pred.obj_ids == []  # a refused prompt leaves no object behind


def test_a_failed_step_or_prompt_changes_nothing(family_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory half-way through the library's step (outputs stored, memory
    not yet encoded): the session is as before, and tracking goes on exactly as
    if the failed calls had never been made."""
    images = frames(10)
    a, b = make_predictor(family_model), make_predictor(family_model)
    for t, image in enumerate(images[:4]):
        for p in (a, b):
            p.track(image)
            if t == 0:
                p.add_prompt(1, points_xy=[[60, 50]], labels=[1])
    before = a.state_dict()

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(family_model, "_encode_new_memory", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        a.add_prompt(2, points_xy=[[120, 40]], labels=[1])  # a new object
    with pytest.raises(torch.cuda.OutOfMemoryError):
        a.add_prompt(1, points_xy=[[70, 50]], labels=[1], frame_idx=2)  # a correction, with catch-up
    with pytest.raises(torch.cuda.OutOfMemoryError):
        a.track(images[4])  # a step
    monkeypatch.undo()
    assert a.obj_ids == [1]
    after = a.state_dict()
    assert after["sessions"][0]["obj_with_new_inputs"] == before["sessions"][0]["obj_with_new_inputs"]
    assert after["sessions"][0]["point_inputs_per_obj"][0].keys() == before["sessions"][0]["point_inputs_per_obj"][0].keys()
    b.encode(4, images[4])  # frame 4 was seen (encoded) by a as well
    for t, image in enumerate(images[5:], start=5):
        ra, rb = a.track(image), b.track(image)
        assert np.array_equal(ra.objects[1].logits_hw, rb.objects[1].logits_hw), t


def tracking_one_object(model: torch.nn.Module, images: list[np.ndarray]) -> HFVideoPredictor:
    """A predictor that tracked ``images`` with object 1 clicked on the first."""
    pred = make_predictor(model)
    for t, image in enumerate(images):
        pred.track(image)
        if t == 0:
            pred.add_prompt(1, points_xy=[[60, 50]], labels=[1])
    return pred


def assert_tracking_equal(a: HFVideoPredictor, b: HFVideoPredictor, images: list[np.ndarray]) -> None:
    """Both predictors track ``images`` on with bit-identical logits for object 1."""
    for t, image in enumerate(images):
        ra, rb = a.track(image), b.track(image)
        assert np.array_equal(ra.objects[1].logits_hw, rb.objects[1].logits_hw), t


def test_state_dict_resumes_exactly(family_model: torch.nn.Module) -> None:
    images = frames(12)
    a = tracking_one_object(family_model, images[:6])
    b = make_predictor(family_model)
    b.load_state_dict(a.state_dict())
    assert_tracking_equal(a, b, images[6:])


def test_cpu_fallback_copy_takes_over_the_state(family_model: torch.nn.Module) -> None:
    """What a session does after CUDA runs out of memory: a CPU copy of the model
    (``torch.save`` round trip, the library fix included) takes the predictor's
    state and tracks on exactly as the original would."""
    from tracker.session import _cpu_copy

    images = frames(8)
    a = tracking_one_object(family_model, images[:4])
    copy = _cpu_copy(family_model)
    assert copy.stream_family is family_model.stream_family and copy is not family_model
    assert copy._use_mask_as_output.module is copy  # the fix travels with the copy, bound to it
    b = make_predictor(copy)
    b.load_state_dict(a.state_dict())
    assert_tracking_equal(a, b, images[4:])


def test_corrections_as_cond_promotes_the_correction(family_model: torch.nn.Module) -> None:
    pred = make_predictor(family_model, corrections_as_cond=True)
    for t, image in enumerate(frames(6)):
        pred.track(image)
        if t == 0:
            pred.add_prompt(1, points_xy=[[60, 50]], labels=[1])
    pred.add_prompt(1, points_xy=[[70, 50]], labels=[1])
    assert sorted(pred.session.output_dict_per_obj[0]["cond_frame_outputs"]) == [0, 5]


def test_a_mask_prompt_beside_other_objects(family_model: torch.nn.Module) -> None:
    """transformers 5.23's EdgeTAM alone fails here (a mask prompt's object
    scores have another shape than the SAM head's); the fix installed on our
    models reshapes them, values unchanged where the library does not fail."""
    family, fixed = family_model.stream_family, shipped(family_model)
    bare = family.model_class()(fixed.config).eval()
    bare.load_state_dict(fixed.state_dict())

    def run(net: torch.nn.Module) -> dict[int, torch.Tensor]:
        ref = Reference(net, family)
        images = frames(2)
        ref.frame(images[0], 0)
        ref.prompt(0, 0, 1, **hf_inputs(points=[[60, 50]], labels=[1]))
        ref.frame(images[1], 1)
        return ref.prompt(1, 1, 2, **hf_inputs(mask=square_mask(100, 20, 150, 60)))

    try:
        theirs = run(bare)
    except RuntimeError as e:
        assert family.name == "edgetam" and "same number of dimensions" in str(e)
        theirs = None
    ours = run(fixed)
    assert set(ours) == {1, 2}
    if theirs is not None:
        assert all(torch.equal(ours[o], theirs[o]) for o in ours)


def test_edgetam_config_is_repvit_and_the_default_is_refused() -> None:
    import transformers

    edgetam = FAMILIES["edgetam"]
    net = edgetam.model_class()(edgetam.config(image_size=256, reduced=True))
    edgetam.check_architecture(net)
    assert type(net.vision_encoder.backbone.timm_model.stem).__name__ == "RepVitStem"
    with pytest.raises(ModelConfigError, match="too small for EdgeTAM"):
        edgetam.config(image_size=128)
    hiera = edgetam.model_class()(transformers.EdgeTamVideoConfig(image_size=256))
    with pytest.raises(ModelConfigError, match="Hiera"):
        edgetam.check_architecture(hiera)


def test_sam3_tracker_is_the_perception_encoder() -> None:
    sam3 = FAMILIES["sam3-tracker"]
    net = sam3.model_class()(sam3.config(reduced=True))
    sam3.check_architecture(net)
    assert type(net.vision_encoder.backbone).__name__ == "Sam3ViTModel"
    with pytest.raises(ModelConfigError, match="multiple of"):
        sam3.config(image_size=1000)


def test_the_served_model_is_sped_up_and_computes_the_same(family_model: torch.nn.Module) -> None:
    """What ``fast`` changes (tracker.families.speedups): position encodings
    computed once per shape (the same tensor comes back), and for EdgeTAM RepViT
    in its re-parameterised form with NHWC convolutions; the vision features
    equal the shipped model's to float rounding (the streams above compare the
    masks at 1e-4). The random weights give the batch norms trained-looking
    statistics, so the folding is exercised."""
    from tracker.families.speedups import _CachedPositionEncoding

    ship = shipped(family_model)
    cached = [m for m in family_model.modules() if isinstance(m.__dict__.get("forward"), _CachedPositionEncoding)]
    assert cached and not any(isinstance(m.__dict__.get("forward"), _CachedPositionEncoding) for m in ship.modules())
    shape = torch.Size([1, 256, 16, 16])
    one = cached[0](shape, "cpu", torch.float32)
    assert one is cached[0](shape, "cpu", torch.float32)
    batch = torch.Size([3, *shape[1:]])  # a batch: the one image's encoding, expanded (one copy)
    got, want = cached[0](batch, "cpu", torch.float32), type(cached[0]).forward(cached[0], batch, "cpu", torch.float32)
    assert torch.equal(got, want) and got.data_ptr() == one.data_ptr() and not got.is_inference()
    s = SIZES[family_model.stream_family.name]
    pixels = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours, theirs = family_model.get_image_features(pixels), ship.get_image_features(pixels)
    for a, b in zip([*ours.fpn_hidden_states, *ours.fpn_position_encoding], [*theirs.fpn_hidden_states, *theirs.fpn_position_encoding]):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))
    if family_model.stream_family.name == "edgetam":
        norms = (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)
        backbone = family_model.vision_encoder.backbone.timm_model
        assert not any(isinstance(m, norms) for m in backbone.modules())
        assert sum(isinstance(m, norms) for m in ship.vision_encoder.backbone.timm_model.modules()) > 50
        stats = [m for m in ship.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(float(m.running_var.std()) > 0.1 and float(m.weight.detach().std()) > 0.1 for m in stats)
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in family_model.vision_encoder.parameters() if w.dim() == 4)
