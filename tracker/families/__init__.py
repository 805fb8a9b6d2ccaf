"""Model families beyond Meta's SAM 2 code, behind the predictor interface of
:class:`tracker.predictor.StreamingPredictor`.

SAM 2 / SAM 2.1 run through Meta's ``sam2`` package (``tracker.model``,
``tracker.predictor``). The families here run through Hugging Face
transformers (an optional extra): each is one module with an
:class:`~tracker.families.base.HFFamily`, and all share one streaming predictor
(:class:`~tracker.families.hf_video.HFVideoPredictor`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from tracker.errors import CheckpointError, ModelConfigError
from tracker.families.base import EXTRA_HINT, HFFamily
from tracker.families.edgetam import FAMILY as EDGETAM
from tracker.families.sam3_tracker import FAMILY as SAM3_TRACKER

logger = logging.getLogger(__name__)

#: name → family, in the order ``--help`` lists them
FAMILIES: dict[str, HFFamily] = {f.name: f for f in (EDGETAM, SAM3_TRACKER)}


def family_named(name: str) -> HFFamily | None:
    return FAMILIES.get(name)


def is_family_model(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "stream_family", None), HFFamily)


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_family_model(
    name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: torch.device,
    image_size: int | None = None,
    random_weights_seed: int | None = None,
    download: bool = True,
    precision: str = "auto",
    reduced: bool = False,
    fast: bool = True,
) -> torch.nn.Module:
    """Build a family's video model ready for inference (eval, on ``device``).

    ``checkpoint``: a directory in the library's format (``save_pretrained``),
    or None for the official one from the cache (:mod:`tracker.hf_checkpoints`).
    ``random_weights_seed``: seeded random weights instead (tests, benchmarks).
    ``reduced``: the narrow test-size variant of the architecture (random weights only).
    ``fast``: apply the inference speed-ups (:mod:`tracker.families.speedups`:
    the same function computed faster); False leaves the library's model as it
    ships (the tests' reference, and a model to ``save_pretrained``: fused
    modules have other weights' names).
    """
    family = FAMILIES[name]
    if reduced and random_weights_seed is None:
        raise ModelConfigError("the reduced test architecture exists with random weights only")
    cls = family.model_class()
    if random_weights_seed is not None:
        config = family.config(image_size=image_size, reduced=reduced)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_weights_seed)
            net = cls(config)
        _make_random_weights_visible(net)
        logger.warning(
            "model %s built with RANDOM weights (seed %d): masks are meaningless; tests/benchmarks only",
            name,
            random_weights_seed,
        )
    else:
        path = _checkpoint_dir(name, checkpoint, download)
        net = _load_pretrained(cls, family, path, image_size)
    family.check_architecture(net)
    from tracker.families.hf_video import install_library_fixes

    install_library_fixes(net)
    net.stream_family = family  # type: ignore[assignment]
    net.image_size = int(net.config.image_size)  # type: ignore[assignment]  # as SAM2Base has it
    net = net.to(device).eval()
    net.autocast_precision = precision  # type: ignore[assignment]
    if fast:
        from tracker.families.speedups import speed_up

        speed_up(net)
    return net


def _checkpoint_dir(name: str, checkpoint: str | os.PathLike | None, download: bool) -> Path:
    from tracker.hf_checkpoints import resolve_hf_checkpoint

    return Path(resolve_hf_checkpoint(os.fspath(checkpoint) if checkpoint is not None else name, download=download))


def _load_pretrained(cls: type, family: HFFamily, path: Path, image_size: int | None) -> torch.nn.Module:
    try:
        config = cls.config_class.from_pretrained(path)
        if image_size is not None:
            family.resize_config(config, image_size)
        net, info = cls.from_pretrained(path, config=config, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load {family.title} weights from {path}: {e}") from e
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        kind, keys = next(iter(bad.items()))
        raise CheckpointError(
            f"{path} does not fit {family.title}: {len(keys)} {kind.replace('_', ' ')} (e.g. {sorted(map(str, keys))[0]}); "
            f"pass the {family.title} checkpoint directory (config.json + model.safetensors)"
        )
    return net


def _make_random_weights_visible(net: torch.nn.Module) -> None:
    """As for SAM 2 (``tracker.model``): a random object-score head says "no
    object" half the time and the masks become constants; a positive bias keeps
    random masks worth comparing.

    Batch norms get trained-looking statistics and affines (they start as the
    identity), so that folding them into convolutions (``fast``) is tested.
    """
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in norms:
            c = bn.num_features
            bn.weight.copy_(0.5 + torch.rand(c, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
            bn.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
    head = getattr(getattr(net, "mask_decoder", None), "pred_obj_score_head", None)
    if head is None:
        return
    with torch.no_grad():
        head.proj_out.bias.fill_(4.0)


def make_predictor(model: torch.nn.Module, *, offline: bool = False, **options: Any) -> Any:
    """The streaming predictor for ``model``'s family (SAM 2: Meta's code).

    ``offline``: for annotating a whole video, where each object is tracked on
    its own from its first prompt (forward, then backward), as the reference
    runs of each library do per object.
    """
    if is_family_model(model):
        from tracker.families.hf_video import HFVideoPredictor

        return HFVideoPredictor(model, independent_objects=offline, **options)
    from tracker.predictor import StreamingPredictor

    return StreamingPredictor(model, **options)


def obj_ptr_window(model: torch.nn.Module) -> int:
    """How many frames back object pointers reach (``min(num_frames, this)``
    offline: a clip shorter than this gives results that depend on its length)."""
    if is_family_model(model):
        return int(model.config.max_object_pointers_in_encoder)
    return int(model.max_obj_ptrs_in_encoder)


__all__ = [
    "EXTRA_HINT",
    "FAMILIES",
    "HFFamily",
    "build_family_model",
    "family_named",
    "is_family_model",
    "make_predictor",
    "obj_ptr_window",
    "transformers_available",
]
