"""Building SAM 2 / SAM 2.1 models from the configs shipped inside the ``sam2`` package.

What lives here: short model names (``sam2.1-tiny`` …) → sam2 config, device choice,
``image_size`` override, loading weights in Meta's checkpoint format with errors a
user can act on, and a seeded *random-weights* mode for tests and benchmarks.
What does not: downloading checkpoints (``tracker.checkpoints``) and inference
(``tracker.predictor``).

The model object is Meta's own ``SAM2VideoPredictor`` (a ``SAM2Base``) built with
the same hydra overrides as ``sam2.build_sam.build_sam2_video_predictor``, so the
streaming predictor and Meta's predictor can share one set of weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tracker.checkpoints import CHECKPOINT_ALIASES, CHECKPOINTS, load_state_dict_file, resolve_checkpoint
from tracker.errors import CheckpointMismatchError, ModelConfigError

logger = logging.getLogger(__name__)

#: the same post-processing overrides as sam2.build_sam.build_sam2_video_predictor
_VIDEO_OVERRIDES = [
    "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=8",
]

ALLOWED_IMAGE_SIZES = (256, 512, 768, 1024)


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a config (short name or sam2 config path) and its options."""

    config: str
    image_size: int | None = None  # None: the config's (1024)
    device: str = "auto"


def canonical_model_name(name: str) -> str:
    return CHECKPOINT_ALIASES.get(name, name)


def model_names() -> list[str]:
    """Short names of the official models: SAM 2 / 2.1 (Meta's code), then the
    families served through transformers (``tracker.families``)."""
    from tracker.families import FAMILIES

    return list(CHECKPOINTS) + list(FAMILIES)


def resolve_config(model: str) -> str:
    """Map a short name or a config path to a config name hydra can compose."""
    name = canonical_model_name(model)
    if name in CHECKPOINTS:
        return CHECKPOINTS[name].config
    if model.endswith(".yaml"):
        import sam2

        pkg_root = Path(sam2.__file__).parent
        candidate = model.split("sam2/", 1)[-1] if model.startswith("sam2/") else model
        if (pkg_root / candidate).is_file():
            return candidate
        if Path(model).is_file():
            # hydra composes by name within the sam2 search path; an absolute
            # path outside it is addressed with a leading "//"
            return "//" + str(Path(model).resolve())
        raise ModelConfigError(
            f"model config {model!r} not found inside the sam2 package or on disk; "
            f"use one of {', '.join(CHECKPOINTS)}"
        )
    raise ModelConfigError(
        f"unknown model {model!r}; use one of {', '.join(CHECKPOINTS)} or a sam2 config path"
    )


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` prefers CUDA, then Apple MPS, then CPU; explicit names are checked."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelConfigError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelConfigError(f"device {device!r} asked for but MPS is not available; use --device cpu")
    return dev


#: ``precision`` choices: "auto" is bf16 autocast on CUDA (fp16 where the GPU
#: has no bf16) and float32 elsewhere; "bf16" on the CPU is worth it where the
#: CPU has native bf16 (AVX512-BF16 or AMX): about 2x faster there
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


def check_precision(precision: str, device: torch.device) -> str:
    """Refuse what cannot run; warn where it would run but slowly."""
    if precision not in PRECISIONS:
        raise ModelConfigError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ModelConfigError("precision fp16 is for GPUs; on the CPU use bf16 (or fp32)")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("precision bf16 on a CPU without native bf16 (AVX512-BF16/AMX) is emulated and slower than fp32")
    return precision


def cpu_has_native_bf16() -> bool:
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def autocast_context(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The autocast SAM 2 runs under for ``precision`` on ``device`` (see :data:`PRECISIONS`).

    Meta runs SAM 2 under bf16 autocast on GPUs; every precision keeps the
    memories in bfloat16 as Meta's predictor stores them.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    # fp16 on the CPU only happens to a CUDA model's CPU fallback copy: float32 there
    if precision == "auto" or (precision == "fp16" and device.type == "cpu"):
        if device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def model_precision(model: torch.nn.Module) -> str:
    """The precision ``build_model`` gave the model ("auto" for models built elsewhere)."""
    return str(getattr(model, "autocast_precision", "auto"))


def model_autocast(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """:func:`autocast_context` for the model's own device and precision."""
    return autocast_context(next(model.parameters()).device, model_precision(model))


_HOLE_FILL_NOTE_SHOWN = False


def has_cuda_extension() -> bool:
    """Whether sam2 was built with its ``_C`` extension (connected components)."""
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def _disable_hole_filling_without_extension(model: torch.nn.Module) -> None:
    """SAM 2 fills small mask holes with a CUDA kernel from ``sam2._C``.

    PyPI's sam2 1.1.0 has no compiled extension, so Meta's code would try the
    kernel on every frame, fail, and emit a long UserWarning each time. The
    outcome is the same (holes not filled), so we switch the step off once and
    say so once, instead of letting the warning flood the logs.
    """
    global _HOLE_FILL_NOTE_SHOWN
    if getattr(model, "fill_hole_area", 0) > 0 and not has_cuda_extension():
        model.fill_hole_area = 0
        if not _HOLE_FILL_NOTE_SHOWN:
            _HOLE_FILL_NOTE_SHOWN = True
            logger.info(
                "sam2 is installed without its CUDA extension (sam2._C): SAM 2's optional "
                "small-hole filling of masks is off (results otherwise unchanged)"
            )


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(
    model: str = "sam2.1-tiny",
    *,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    image_size: int | None = None,
    random_weights_seed: int | None = None,
    download: bool = True,
    precision: str = "auto",
) -> torch.nn.Module:
    """Build a SAM 2 model ready for inference (eval mode, on ``device``).

    Args:
        model: short name (``sam2.1-tiny``, ``sam2.1-small``, ``sam2.1-base-plus``,
            ``sam2.1-large``, ``sam2-*``) or a sam2 config path; or a family
            served through transformers (``edgetam``, ``sam3-tracker``: see
            :mod:`tracker.families`), whose ``checkpoint`` is a directory.
        checkpoint: a local ``.pt`` file in Meta's format (``{"model": state_dict}``),
            or None to use the official checkpoint of ``model`` from the cache
            (downloaded once if absent and ``download`` is true).
        image_size: the model's input resolution; smaller is faster and less
            accurate (the official weights are trained at 1024).
        random_weights_seed: build seeded *random* weights instead of loading any
            checkpoint. Only for tests and benchmarks: masks are meaningless.
        precision: the autocast inference runs under (:data:`PRECISIONS`); kept
            on the model, so every predictor of it uses the same.
    """
    from tracker.families import FAMILIES, build_family_model

    if model in FAMILIES:
        dev = pick_device(device)
        check_precision(precision, dev)
        return build_family_model(
            model,
            checkpoint=checkpoint,
            device=dev,
            image_size=image_size,
            random_weights_seed=random_weights_seed,
            download=download,
            precision=precision,
        )
    config = resolve_config(model)
    if image_size is not None and (image_size % 32 != 0 or image_size < 64):
        raise ModelConfigError(
            f"image_size {image_size} is not usable: it must be a multiple of 32 (e.g. {ALLOWED_IMAGE_SIZES})"
        )
    dev = pick_device(device)
    check_precision(precision, dev)

    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import sam2  # noqa: F401  (initialises hydra's config module)

    overrides = list(_VIDEO_OVERRIDES)
    if image_size is not None:
        overrides.append(f"++model.image_size={int(image_size)}")
    try:
        cfg = compose(config_name=config, overrides=overrides)
    except Exception as e:  # hydra raises several types for missing/broken configs
        raise ModelConfigError(f"cannot read model config {config!r}: {e}") from e
    OmegaConf.resolve(cfg)
    with _seeded(random_weights_seed):
        net = instantiate(cfg.model, _recursive_=True)

    if random_weights_seed is not None:
        _make_random_weights_visible(net, random_weights_seed)
        logger.warning(
            "model %s built with RANDOM weights (seed %d): masks are meaningless; tests/benchmarks only",
            model,
            random_weights_seed,
        )
    else:
        if checkpoint is None:
            checkpoint = resolve_checkpoint(canonical_model_name(model), download=download)
        load_weights(net, checkpoint, model_name=model)

    _disable_hole_filling_without_extension(net)
    net = net.to(dev)
    net.eval()
    net.autocast_precision = precision
    return net


def _make_random_weights_visible(net: torch.nn.Module, seed: int) -> None:
    """Nudge the object-score head of a random model towards "object present".

    A randomly initialised object-score head says "no object" about half the
    time, and then SAM 2 replaces every mask logit with a constant (-1024):
    tests comparing two predictors would then compare constants. A positive bias
    on that head's last layer keeps random masks non-trivial. Seeded, so the same
    seed always gives the same model.
    """
    head = getattr(net.sam_mask_decoder, "pred_obj_score_head", None)
    if head is None:
        return
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.bias.fill_(4.0)


def load_weights(net: torch.nn.Module, checkpoint: str | os.PathLike, *, model_name: str = "") -> None:
    """Load Meta-format weights into ``net``; refuse anything that does not fit exactly."""
    path = Path(checkpoint)
    state_dict = load_state_dict_file(path)
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(
        k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(
                f"{len(wrong_shape)} keys with other shapes (e.g. {k}: "
                f"checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)})"
            )
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit model {model_name or 'config'}: {'; '.join(parts)}. "
            "Pass the checkpoint that matches --model (e.g. sam2.1_hiera_tiny.pt for sam2.1-tiny)"
        )
    net.load_state_dict(state_dict, strict=True)
    logger.info("loaded weights from %s", path)


def model_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights as Meta's checkpoints hold them (for saving random models)."""
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}
