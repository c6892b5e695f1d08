"""Split a native call over neurons across torch's intra-op threads.

A native kernel that treats every neuron alike (the cpu LIF backend) runs ``fn(*args, n0, n1,
*tail)`` over disjoint ranges ``[n0, n1)`` of its ``n`` neurons; the C functions release the
GIL (ctypes), so the ranges run in parallel on one process-wide pool, sized to
``torch.get_num_threads()`` and rebuilt when that changes. Small calls run inline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["run_split"]

_POOL: list[tuple[int, ThreadPoolExecutor]] = []  # (threads, pool)
_POOL_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL or _POOL[0][0] != threads:
            old = _POOL[0][1] if _POOL else None
            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dassdp-lif")
            _POOL[:] = [(threads, pool)]
            if old is not None:
                old.shutdown(wait=False)
        return _POOL[0][1]


def run_split(
    fn: Callable[..., Any],
    n: int,
    args: tuple[Any, ...],
    tail: tuple[Any, ...],
    *,
    chunk: int,
    align: int,
) -> None:
    """``fn(*args, n0, n1, *tail)`` over neurons ``[0, n)``: inline with one thread or fewer
    than ``2 * chunk`` neurons, else in ranges of at least ``chunk`` neurons (a multiple of
    ``align``, the kernel's block) over torch's threads; returns when all are done."""
    threads = max(1, torch.get_num_threads())
    if threads == 1 or n < 2 * chunk:
        fn(*args, 0, n, *tail)
        return
    pool = _pool(threads)
    step = max(chunk, -(-n // threads) // align * align)
    jobs = [pool.submit(fn, *args, a, min(a + step, n), *tail) for a in range(0, n, step)]
    for job in jobs:
        job.result()
