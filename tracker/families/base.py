"""What a model family served through Hugging Face transformers must say about
itself: its classes, its configs (official and reduced for tests), how to check
that what was built is really that architecture, where its checkpoint lives and
under which licence. Everything else (streaming, pruning, prompts, snapshots) is
the same for every such family and lives in :mod:`tracker.families.hf_video`.

A new family is one file beside ``edgetam.py`` that subclasses :class:`HFFamily`
and is listed in :mod:`tracker.families`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from tracker.errors import ModelConfigError

#: what to tell a user whose Python has no transformers
EXTRA_HINT = "install the optional models extra: pip install -e '.[models]' (transformers 5.23, timm)"


def require_transformers() -> Any:
    """transformers, or a clear error naming the extra that brings it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the extra is installed by the README's commands
        raise ModelConfigError(f"this model family runs through Hugging Face transformers: {EXTRA_HINT}") from e
    return transformers


class HFFamily(ABC):
    """One transformers video model family (a ``*VideoModel`` with an inference session)."""

    #: the name users pick (``--model``), also the checkpoint registry's name
    name: str = ""
    #: how the README and ``hello`` call it
    title: str = ""
    #: the resolution the official weights were trained at
    image_size: int = 1024
    #: image sizes must be a multiple of this (the backbone's total stride)
    size_multiple: int = 32
    #: one line for the model table
    licence: str = ""
    #: how the library's tracking step differs per family, for
    #: :mod:`tracker.families.batched_step`: the batch dimension of the stored
    #: memory features, whether memory attention takes the number of spatial
    #: memory frames, whether the memory is cast to the session's dtype first
    memory_batch_dim: int = 0
    memory_attention_counts_spatial: bool = False
    memory_in_session_dtype: bool = False

    @abstractmethod
    def model_class(self) -> type: ...

    @abstractmethod
    def session_class(self) -> type: ...

    @abstractmethod
    def segmentation_output_class(self) -> type:
        """What the video model's ``forward`` returns (``*VideoSegmentationOutput``)."""

    @abstractmethod
    def config(self, *, image_size: int | None = None, reduced: bool = False) -> Any:
        """The official architecture's config (``reduced``: the same architecture
        with fewer, narrower layers, for tests), at ``image_size``."""

    @abstractmethod
    def resize_config(self, config: Any, image_size: int) -> None:
        """Set every size that follows from the input resolution."""

    @abstractmethod
    def processor(self, image_size: int) -> Any:
        """The family's processor (frame preprocessing, prompt coordinates, mask
        post-processing) at ``image_size``."""

    @abstractmethod
    def check_architecture(self, model: torch.nn.Module) -> None:
        """Raise :class:`ModelConfigError` when ``model`` is not this family's
        architecture (e.g. a config that silently built another backbone)."""

    def speed_up(self, model: torch.nn.Module) -> list[str]:
        """This family's inference speed-ups on ``model`` (in place; the same
        function computed faster, see :mod:`tracker.families.speedups`); what
        was done. Default: none beyond the generic ones."""
        return []

    def check_image_size(self, image_size: int) -> int:
        if image_size % self.size_multiple != 0 or image_size < 2 * self.size_multiple:
            raise ModelConfigError(
                f"image_size {image_size} does not fit {self.title}: it must be a multiple of {self.size_multiple} "
                f"(the official weights use {self.image_size})"
            )
        return int(image_size)

    def __reduce__(self) -> tuple:
        # a model copied with torch.save (the CPU fallback) keeps the registry's family, not a copy
        return (_registered_family, (self.name,))

    def info(self) -> dict[str, Any]:
        return {"family": self.title, "image_size": self.image_size, "licence": self.licence, "via": "transformers"}


def _registered_family(name: str) -> HFFamily:
    from tracker.families import FAMILIES

    return FAMILIES[name]
