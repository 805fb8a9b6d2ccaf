"""Inference speed-ups for a transformers family model: the same functions,
computed faster. Applied by :func:`tracker.families.build_family_model` unless
asked not to (``fast=False``, which is the library exactly as it ships: the
tests' reference).

* :func:`cache_position_encodings`: sine position encodings depend only on a
  feature map's shape, yet transformers 5.23 recomputes EdgeTAM's neck's on
  every frame (its ``lru_cache(maxsize=1)`` is shared by the four FPN levels,
  so it always misses): ~0.1 s per 1024 px frame on a 2-core CPU. Each
  instance keeps its own encodings per (channels, height, width, device,
  dtype), computed for one image and expanded to the batch (every image of a
  batch has the same encoding): bit-exact, and one copy whatever the batch.
* :func:`fuse_reparameterizable`: RepViT's inference form (timm's ``fuse()``:
  batch norms folded into the convolutions, the depthwise 1x1 and identity
  branches folded into the 3x3). The network computes the same function;
  outputs differ by float rounding only (``tests/test_families.py`` compares
  against the unfused library at 1e-4).
* :func:`channels_last`: convolutions in NHWC, where oneDNN runs without
  reordering each input and output (most of EdgeTAM's bf16 backbone time on a
  CPU was those reorders).
* :func:`share_first_self_attention`: when several objects go through memory
  attention as one batch (``tracker.families.batched_step``), the first
  layer's self-attention gets the same queries for every object (the frame's
  own features; the memories only enter in the cross-attention after it), so
  it attends once and every object takes that result. Each call checks that
  the rows really are equal. At 1024 px that is a fifth of EdgeTAM's memory
  attention for every object but the first (~12 % of a four-object frame on a
  2-core CPU).

Measured in ``bench/bench_families.py`` (its ``edgetam-shipped`` model is
EdgeTAM without them, side by side).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tracker.families.instance_patch import InstancePatch

logger = logging.getLogger(__name__)


class _CachedPositionEncoding(InstancePatch):
    """A sine position embedding module's ``forward`` that computes each image
    shape's encoding (channels, height, width, device, dtype) once per instance
    and expands it to a batch. Picklable (the CPU fallback copies the model);
    the copy starts with an empty cache."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        super().__init__(module, name)
        self.cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def __call__(self, shape: torch.Size, device: torch.device | str, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:  # a padding mask changes the encoding: nothing to reuse
            return self.function(self.module, shape, device, dtype, mask)
        batch, *rest = tuple(shape)
        key = (tuple(rest), str(torch.device(device)), dtype)
        one = self.cache.get(key)
        if one is None:
            # an ordinary tensor (not an inference-mode one), usable anywhere
            with torch.inference_mode(False), torch.no_grad():
                one = self.cache[key] = self.function(self.module, torch.Size([1, *rest]), device, dtype)
        return one if batch == 1 else one.expand(batch, *rest)

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self.module, "function": self.function, "cache": {}}


def _same_rows(x: torch.Tensor) -> bool:
    """Whether every entry of ``x``'s batch (dimension 0) equals the first."""
    return x.stride(0) == 0 or all(torch.equal(x[0], x[i]) for i in range(1, x.shape[0]))


class _SharedSelfAttention(InstancePatch):
    """A memory-attention layer's self-attention that, given a batch whose
    queries are all the same (several objects on one frame, before anything of
    their own memories has entered), attends once and expands the result to the
    batch; any other input goes to the library's function as it is."""

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_embeddings: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, Any]:
        if query.shape[0] > 1 and key is query and value is query and _same_rows(query):
            one = query[:1]
            out, weights = self.function(self.module, one, one, one, position_embeddings, **kwargs)
            return out.expand(query.shape[0], *out.shape[1:]), weights
        return self.function(self.module, query, key, value, position_embeddings, **kwargs)


def share_first_self_attention(model: torch.nn.Module) -> int:
    """Install :class:`_SharedSelfAttention` on the first memory-attention
    layer's self-attention (the only one whose queries are the frame's own
    features: later layers' queries carry each object's memory); how many."""
    layers = getattr(getattr(model, "memory_attention", None), "layers", None)
    if not layers or not hasattr(layers[0], "self_attn"):
        return 0
    return int(_SharedSelfAttention.install(layers[0].self_attn, "forward"))


def cache_position_encodings(model: torch.nn.Module) -> int:
    """Give every sine position embedding of ``model`` its own cache; how many."""
    return sum(
        _CachedPositionEncoding.install(module, "forward")
        for module in model.modules()
        if hasattr(type(module), "build_sine_position_embedding")
    )


@torch.no_grad()
def fuse_reparameterizable(module: torch.nn.Module) -> int:
    """Replace every child that has an inference form (timm's ``fuse()``, as
    RepViT's ``ConvNorm`` / ``RepVggDw`` / ``NormLinear`` have) by it, depth
    first from the top as timm's own ``RepVit.fuse`` does; how many."""
    n = 0
    for name, child in list(module.named_children()):
        fuse = getattr(child, "fuse", None)
        if callable(fuse):
            fused = fuse()
            setattr(module, name, fused)
            n += 1 + fuse_reparameterizable(fused)
        else:
            n += fuse_reparameterizable(child)
    return n


def channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """``module``'s 4-D weights in NHWC: its convolutions then produce NHWC
    outputs (PyTorch follows the weight's memory format), which the next
    convolution takes without a reorder."""
    return module.to(memory_format=torch.channels_last)


def speed_up(model: torch.nn.Module) -> list[str]:
    """Apply the generic speed-ups and the family's own; what was done."""
    done = []
    if n := cache_position_encodings(model):
        done.append(f"{n} position encodings cached")
    if share_first_self_attention(model):
        done.append("first self-attention shared by a batch of objects")
    done += model.stream_family.speed_up(model)
    logger.debug("inference speed-ups for %s: %s", model.stream_family.name, ", ".join(done) or "none")
    return done
