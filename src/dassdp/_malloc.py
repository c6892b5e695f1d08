"""glibc allocator settings for training on the CPU (applied by the ``dassdp`` CLI).

A training step allocates and frees activation tensors of tens to hundreds of MiB. glibc
serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` when freed, so each step faults every page of those tensors in
again (measured on ``spikingresformer_cifar`` at batch 16, fp32, 1 thread: ~0.9-1.2 M minor
faults and 17-30 % of the CPU time in the kernel per step). :func:`tune_allocator` sets
``M_MMAP_MAX = 0`` (large blocks come from the heap, which is reused step after step) and
``M_TRIM_THRESHOLD = -1`` (freed heap is kept, not returned and faulted in again): about
15x fewer faults per step, 4 % kernel time, for a few percent more peak RSS (heap
fragmentation; RSS also stays at its peak, as it does for a training process anyway).
See the ``train-step`` section of ``docs/benchmarks.md`` for the numbers.

Opt out with the environment variable ``DASSDP_MALLOC_TUNE=0``. Nothing happens on a
system without glibc's ``mallopt``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["ENV", "allocator_tuned", "tune_allocator"]

ENV = "DASSDP_MALLOC_TUNE"
_M_TRIM_THRESHOLD = -1  # glibc malloc.h parameter numbers
_M_MMAP_MAX = -4
_APPLIED: list[bool] = []  # set once tune_allocator applied the settings in this process


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` applied the settings in this process."""
    return bool(_APPLIED)


def tune_allocator() -> bool:
    """Apply the settings above unless ``DASSDP_MALLOC_TUNE=0``; True if they were applied."""
    if os.environ.get(ENV, "1").strip() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, -1) == 1 and ok
    if ok and not _APPLIED:
        _APPLIED.append(True)
    return ok
