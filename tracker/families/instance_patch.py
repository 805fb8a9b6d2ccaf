"""Replacing one method of one module *instance* (the class stays as the library
ships it): how :mod:`tracker.families.hf_video` works around the library's
defects and :mod:`tracker.families.speedups` caches what it recomputes.

A patch keeps the module and the class's own function, so it can call the
original, and it pickles by reference (the CPU fallback copies the model with
``torch.save``)."""

from __future__ import annotations

from typing import Any

import torch


class InstancePatch:
    """The method ``name`` of one module, replaced by this callable.
    Subclasses define ``__call__`` (``self.function(self.module, ...)`` is the original)."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.module = module
        self.function = getattr(type(module), name)

    @classmethod
    def install(cls, module: torch.nn.Module, name: str) -> bool:
        """Patch ``module.name`` with this class unless it already is; whether it was."""
        if isinstance(module.__dict__.get(name), cls):
            return False
        setattr(module, name, cls(module, name))
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - subclasses define it
        raise NotImplementedError
