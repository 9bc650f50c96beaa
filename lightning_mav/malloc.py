"""Keep freed memory in glibc's heap: the ``mav`` / ``lightning`` commands do this at start-up.

By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps
it on free. Video activations are such tensors (a 64-frame D_t step holds dozens of 32-200 MiB tensors), so every
step page-faults all of them in again and the kernel zeroes them, a large share of a long step's time
(docs/choices.md#allocator-mav_malloc). ``mallopt`` turns off mmap allocations and trimming, so freed blocks are reused.

The price: the process keeps its peak heap for its lifetime (it does not hand freed memory back to the system),
which is what a training or sampling process wants. ``MAV_MALLOC=default`` keeps glibc's defaults; the same effect
without this module: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` in the environment, or jemalloc /
tcmalloc through ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> bool:
    """Tell glibc: no mmap allocations, no trimming, 1 GiB top pad. False where it does not apply (not glibc,
    or ``MAV_MALLOC=default``)."""
    if os.environ.get("MAV_MALLOC", "heap") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no mallopt
        return False
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**40) and mallopt(_M_TOP_PAD, 2**30))
