"""The process's memory allocator, set for frame-after-frame work.

Why: glibc's ``malloc`` serves a request over its mmap threshold (which it
raises as it goes, to 32 MiB at most) with a fresh ``mmap`` and hands it back
with ``munmap`` when freed, and it returns freed memory at the top of its heap
to the kernel beyond 128 KiB. Frame-after-frame work makes the same large
buffers on every frame: a decoded 1080p frame (6 MB, several alive at once in
file mode's queue), inference's activations at 1024 px (EdgeTAM's memory
attention MLP alone: two 4096 x 2048 float32 tensors, 32 MiB each). So each
frame page-faults them in again, each page zeroed by the kernel: a third of
the cost of decoding a 1080p frame, about a tenth of EdgeTAM's frame on a
2-core CPU (``bench/bench_ingest.py``, ``bench/RESULTS_families.md``). With
the mmap threshold at 256 MiB and the trim threshold at 1 GiB, freed blocks
stay in the heap and the next frame reuses them: the same arithmetic, without
the page faults.

The price: up to ``retain_mb`` of freed memory stays in the process for reuse
instead of going back to the system (a streaming service's memory is flat
anyway: ``bench/bench_families.py memory``); a block over 256 MiB (a one-off)
is still mapped and returned. It changes the whole process's allocator, so the
library never does it on its own: ``sam2-stream`` (every subcommand), the Ray
actors and the benchmarks call :func:`keep_freed_memory` at start-up.
``SAM2_STREAM_MALLOC=system`` keeps glibc's defaults. Only glibc has these
settings; elsewhere nothing is changed.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: the environment variable that opts out (``system``: glibc's defaults)
ENV = "SAM2_STREAM_MALLOC"
#: blocks up to this size come from the heap (beyond: mapped, returned when freed)
MMAP_THRESHOLD = 256 << 20
#: freed memory kept for reuse by default (MiB): the heap's free top beyond it goes back
RETAIN_MB = 1024
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - a glibc without the usual soname
        return None


def keep_freed_memory(retain_mb: int = RETAIN_MB) -> bool:
    """Serve blocks up to :data:`MMAP_THRESHOLD` from the heap and keep up to
    ``retain_mb`` of freed memory for reuse (see the module's docstring);
    whether the setting is in effect. Idempotent; call it early, before the
    model is built and frames flow (blocks already mapped stay so)."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "").strip().lower() == "system":
        logger.debug("%s=system: glibc's malloc defaults kept", ENV)
        return False
    libc = _libc()
    if libc is None:
        return False
    retain = min(max(int(retain_mb), 1) << 20, 2**31 - 1)  # mallopt takes a C int
    # setting either threshold turns glibc's own adjustment off, so both are set
    if libc.mallopt(_M_MMAP_THRESHOLD, min(MMAP_THRESHOLD, retain)) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, retain) != 1:
        logger.warning("mallopt refused the allocator settings: glibc's defaults stay")
        return False
    _applied = True
    logger.debug("malloc: blocks up to %d MiB from the heap, up to %d MiB of freed memory kept", MMAP_THRESHOLD >> 20, retain >> 20)
    return True


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has put its setting in effect in this process."""
    return _applied


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
