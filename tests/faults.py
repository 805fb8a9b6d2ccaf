"""Injected faults: a method that fails once, as a model step can (CUDA out of memory)."""

from __future__ import annotations

from typing import Any


def fail_on_call(obj: Any, name: str, call: int, exc: BaseException) -> None:
    """Replace ``obj.name`` so that its ``call``-th call raises ``exc``; every other
    call goes to the original method."""
    original = getattr(obj, name)
    calls = 0

    def failing(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call:
            raise exc
        return original(*args, **kw)

    setattr(obj, name, failing)
