"""The process's memory allocator, set for frame-after-frame inference.

Why: glibc's ``malloc`` serves every request over its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and hands it back with ``munmap`` when freed.
Inference at 1024 px makes such buffers on every frame (EdgeTAM's memory
attention MLP alone: two 4096 x 2048 float32 activations, 32 MiB each), so each
frame page-faults them in again, each page zeroed by the kernel: about a tenth
of EdgeTAM's frame on a 2-core CPU (``bench/RESULTS_families.md``). With
``mmap`` off for ``malloc`` and a high trim threshold, a freed block stays in
the heap and the next frame reuses it: the same arithmetic, without the page
faults.

The price: memory freed below the trim threshold is kept by the process for
reuse instead of going back to the system, so the resident size stays at its
high-water mark (a streaming service's memory is flat anyway:
``bench/bench_families.py memory``). ``SAM2_STREAM_MALLOC=system`` keeps
glibc's defaults. Only glibc has these settings; elsewhere nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: the environment variable that opts out (``system``: glibc's defaults)
ENV = "SAM2_STREAM_MALLOC"
#: freed memory at the top of the heap beyond this goes back to the system
TRIM_THRESHOLD = 1 << 30
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied = False


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - a glibc without the usual soname
        return None


def keep_freed_memory(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse
    (see the module's docstring); whether the setting is in effect. Idempotent;
    call it early, before the model is built (blocks already mapped stay so)."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "").strip().lower() == "system":
        logger.debug("%s=system: glibc's malloc defaults kept", ENV)
        return False
    libc = _libc()
    if libc is None:
        return False
    threshold = min(int(trim_threshold), 2**31 - 1)  # mallopt takes a C int
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, threshold) != 1:
        logger.warning("mallopt refused the allocator settings: glibc's defaults stay")
        return False
    _applied = True
    logger.debug("malloc: no mmap for large blocks, freed memory kept up to %d MiB", threshold >> 20)
    return True


@dataclass(frozen=True)
class HeapInfo:
    """What glibc's ``mallinfo2`` says of the process's heap (bytes)."""

    arena: int  #: heap bytes obtained from the system (brk and arenas)
    mmapped_blocks: int  #: blocks served by their own mmap right now
    mmapped_bytes: int
    in_use: int  #: bytes of the heap in use
    free: int  #: bytes of the heap free (kept for reuse)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def heap_info() -> HeapInfo | None:
    """The heap's figures, or None where glibc (2.33 or newer) is not there."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return HeapInfo(arena=m.arena, mmapped_blocks=m.hblks, mmapped_bytes=m.hblkhd, in_use=m.uordblks, free=m.fordblks)
