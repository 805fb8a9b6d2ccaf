"""tracker.allocator: large buffers come from the heap and are reused, not
mapped and page-faulted in again on every frame. Process-wide settings, so
each case runs in a fresh interpreter."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings"
)

PROBE = """
import json, torch
from tracker.allocator import freed_memory_kept, keep_freed_memory, heap_info
unset = freed_memory_kept()
applied = keep_freed_memory()
before = heap_info()
x = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB: beyond any mmap threshold
during = heap_info()
del x
after = heap_info()
huge = torch.empty(300 << 20, dtype=torch.uint8)  # beyond the 256 MiB threshold: a one-off, mapped
huge_mapped = heap_info().mmapped_blocks - after.mmapped_blocks
del huge
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "unset": unset, "kept": freed_memory_kept(),
                  "mapped_during": during.mmapped_blocks - before.mmapped_blocks,
                  "kept_after": after.arena - before.arena, "free_after": after.free,
                  "huge_mapped": huge_mapped, "huge_returned": heap_info().mmapped_blocks == after.mmapped_blocks}))
"""


def probe(env: dict[str, str] | None = None) -> dict:
    import os

    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_large_blocks_come_from_the_heap_and_are_kept_for_reuse():
    r = probe({"SAM2_STREAM_MALLOC": ""})
    assert r["applied"] is True and r["again"] is True
    assert r["unset"] is False and r["kept"] is True
    assert r["mapped_during"] == 0  # no mmap of its own
    assert r["kept_after"] >= 64 << 20 and r["free_after"] >= 64 << 20  # freed, kept in the heap
    assert r["huge_mapped"] == 1 and r["huge_returned"]  # a block over the threshold still goes back


def test_system_opts_out_and_glibc_maps_large_blocks_as_before():
    r = probe({"SAM2_STREAM_MALLOC": "system"})
    assert r["applied"] is False and r["kept"] is False
    assert r["mapped_during"] == 1  # glibc's default: a block that large is mapped on its own
    assert r["kept_after"] < 64 << 20  # and unmapped when freed
