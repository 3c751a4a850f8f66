"""Keep freed tensor memory in the process instead of handing it back to the kernel.

glibc serves every block over its mmap threshold (128 KB, rising to at most 32 MB) with a
fresh mmap and unmaps it on free, so each training step and each inference batch faults its
activations back in, page by page, and the kernel zeroes every page first. On a 2-core AMD
EPYC (`benchmarks/allocator.py`, docs/performance.md) that cost an fp32 EfficientNet-Lite0
step more than half its time (2.2x faster without it) and a bf16 ResNet-18 step 1.4x.
PyTorch's CPU guide answers this with jemalloc or tcmalloc through LD_PRELOAD, which has to
be set before Python starts and is not on PyPI; glibc's own `mallopt` does the same from
inside the process, with no dependency. The price: memory freed at the peak stays with the
process (resident memory stays near its high-water mark rather than falling between steps),
and a freed block is not reused for a request a few bytes larger (posix_memalign's slack),
so the heap can grow by such a block before the pattern settles.

Applied on import of `cxrlab` (Linux with glibc only). `CXRLAB_MALLOC=system` leaves the
allocator as it was; so does a `GLIBC_TUNABLES` that already sets a malloc tunable, or an
LD_PRELOADed jemalloc/tcmalloc (mallopt would not reach them anyway).
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only when 2 GB lie free at the top

_applied: bool | None = None


def user_chose_allocator() -> str | None:
    """Why the allocator is left alone, or None."""
    if os.environ.get("CXRLAB_MALLOC", "").lower() == "system":
        return "CXRLAB_MALLOC=system"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return "LD_PRELOAD allocator"
    return None


def on_glibc() -> bool:
    """Linux with glibc: where mallopt exists and means what this module asks of it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it; True if in effect. Idempotent."""
    global _applied
    if _applied is None:
        _applied = on_glibc() and not user_chose_allocator() and _mallopt()
    return _applied


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                    _NEVER_TRIM))
