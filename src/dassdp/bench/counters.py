"""Op, kernel and host-sync counters of the bench harness.

* :func:`count_ops`: every aten operator a call dispatches (autograd's backward included),
  counted with a ``TorchDispatchMode``; on a GPU each is at least one kernel launch, so on
  the CPU this is the proxy of kernel launches. The same pass counts the host syncs
  (:data:`SYNC_OPS`) and the ops that launch a kernel (not :data:`NO_KERNEL_OPS`).
* :func:`count_triton_launches`: the Triton LIF kernels, which run outside the dispatcher.
* :func:`count_cuda_kernels`: on CUDA, the CUDA kernels the profiler sees (Triton's too).
* :func:`range_device_ms`: device time inside ``torch.profiler.record_function`` ranges, the
  CUDA time of the kernels launched inside them, measured without synchronising.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "NO_KERNEL_OPS",
    "SYNC_OPS",
    "count_cuda_kernels",
    "count_kernels",
    "count_ops",
    "count_triton_launches",
    "kernel_unit",
    "range_device_ms",
    "syncs_of",
]

# ``.item()`` / ``float()`` / ``bool()`` of a tensor; a boolean mask (its size is read back);
# a tensor from Python data (a host-to-device copy on a GPU)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "lift_fresh")
# aten ops that launch no kernel on a GPU (allocation, views, metadata)
NO_KERNEL_OPS = frozenset(
    ["empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view",
     "_unsafe_view", "_reshape_alias", "as_strided", "t", "transpose", "permute", "expand",
     "squeeze", "unsqueeze", "detach", "alias", "select", "slice", "unbind", "split",
     "split_with_sizes", "chunk", "view_as", "unflatten", "sym_size", "sym_stride",
     "sym_numel", "sym_storage_offset", "is_same_size"]
)  # fmt: skip


def _op_name(func: Any) -> str:
    packet = getattr(func, "overloadpacket", None)
    return getattr(packet, "__name__", str(func))


def _sync_kind(name: str) -> str | None:
    for op in SYNC_OPS:
        if name == op or name.startswith(op + "_"):  # lift_fresh_copy too
            return op
    return None


def count_ops(
    fn: Callable[[], Any], skip: Callable[[Any], bool] | None = None
) -> tuple[Counter[str], Any]:
    """Run ``fn()`` under a ``TorchDispatchMode``; returns ``(counter, result)``: ``"ops"``
    (every aten op dispatched), ``"kernels"`` (those that launch a kernel: not in
    :data:`NO_KERNEL_OPS`, not a ``dassdp::`` custom op, whose Triton launches
    :func:`count_triton_launches` counts) and one key per :data:`SYNC_OPS` name. A host
    sync whose first argument ``skip(tensor)`` accepts is not counted as one (e.g. the
    optimizer's own step counters, which live on the CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            counts["ops"] += 1
            name = _op_name(func)
            if name not in NO_KERNEL_OPS and "dassdp" not in str(func):
                counts["kernels"] += 1
            kind = _sync_kind(name)
            if kind is not None and not (skip is not None and args and skip(args[0])):
                counts[kind] += 1
            return func(*args, **(kwargs or {}))

    with _Mode():
        result = fn()
    return counts, result


def syncs_of(counts: Counter[str]) -> tuple[int, str]:
    """Total host syncs in ``counts`` and the per-op breakdown (``"name n, ..."``)."""
    total = sum(counts[op] for op in SYNC_OPS)
    detail = ", ".join(f"{op} {counts[op]}" for op in SYNC_OPS if counts[op])
    return total, detail


@contextlib.contextmanager
def count_triton_launches() -> Iterator[Counter[str]]:
    """Count the Triton LIF kernel launches (``counter["launches"]``) made inside the block,
    not counting those of the backend's one-time self-check."""
    from dassdp.neurons.backends import triton as triton_lif

    counts: Counter[str] = Counter()

    class _Counted:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Any:
            if not triton_lif.self_checking():
                counts["launches"] += 1
            return self.kernel[grid]

    original = triton_lif._kernels
    triton_lif._kernels = lambda: tuple(_Counted(k) for k in original())  # type: ignore[assignment]
    try:
        yield counts
    finally:
        triton_lif._kernels = original  # type: ignore[assignment]


def count_cuda_kernels(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` under the profiler and count the CUDA kernels it launched (Triton's too);
    returns ``(count, result)``."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    copies = ("Memcpy", "Memset", "cudaMemcpy", "cudaMemset")
    kernels = [
        e for e in prof.events()
        if getattr(e, "device_type", None) == DeviceType.CUDA and not e.name.startswith(copies)
    ]  # fmt: skip
    return len(kernels), result


def count_kernels(fn: Callable[[], Any], device: Any) -> tuple[int, Any]:
    """CUDA kernels launched by ``fn()`` on CUDA, aten ops dispatched on the CPU (see
    :func:`kernel_unit`); returns ``(count, result)``."""
    import torch

    if torch.device(device).type == "cuda":
        return count_cuda_kernels(fn)
    counts, result = count_ops(fn)
    return counts["ops"], result


def kernel_unit(device: Any) -> str:
    """The label of :func:`count_kernels`'s number on ``device``."""
    import torch

    if torch.device(device).type == "cuda":
        return "CUDA kernels (profiler)"
    return "aten ops dispatched (CPU proxy of kernel launches)"


def range_device_ms(prof: Any, names: tuple[str, ...]) -> dict[str, float]:
    """Device (CUDA) milliseconds of the kernels launched inside each ``record_function``
    range named in ``names``, summed over the profile ``prof``."""
    totals = dict.fromkeys(names, 0.0)
    for event in prof.events():
        if event.name in totals:
            us = getattr(event, "device_time_total", None)
            if us is None:
                us = getattr(event, "cuda_time_total", 0.0)
            totals[event.name] += float(us) / 1e3
    return totals
