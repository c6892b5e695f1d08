"""Device facts shared by the benchmarks: AMP settings, peak memory, kernel and op counts.

* ``--amp none|fp16|bf16``: :func:`autocast` around forward + loss, and :func:`grad_scaler`
  (fp16 only; bf16 has the float32 exponent range and needs none); whether the scaler stepped
  is :func:`dassdp.engine.precision.optimizer_stepped`, as in training.
* Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU this process's peak
  resident set (``VmHWM``), see :func:`peak_memory_mib`.
* Kernels per call: on CUDA the CUDA kernels the profiler sees (Triton kernels included); on
  the CPU the aten operators dispatched (each is at least one kernel on a GPU), counted with a
  ``TorchDispatchMode``: :func:`count_kernels`.
* Device time inside ``torch.profiler.record_function`` ranges (:func:`range_device_ms`):
  the CUDA time of the kernels launched inside them, measured without synchronising.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

__all__ = [
    "AMP_CHOICES",
    "autocast",
    "count_aten_ops",
    "count_cuda_kernels",
    "count_kernels",
    "grad_scaler",
    "kernel_unit",
    "memory_kind",
    "peak_memory_mib",
    "range_device_ms",
    "reset_peak_memory",
]

AMP_CHOICES = ("none", "fp16", "bf16")


def _amp_dtype(amp: str) -> Any:
    """The autocast dtype of a bench ``--amp`` value (the engine's ``amp`` mapping)."""
    from dassdp.engine.config import amp_dtype

    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
    return amp_dtype(False if amp == "none" else amp)


def autocast(device: Any, amp: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device`` with the ``amp`` dtype (a no-op context for ``none``)."""
    import torch

    from dassdp.engine.precision import autocast as engine_autocast

    return engine_autocast(torch.device(device), _amp_dtype(amp))


def grad_scaler(device: Any, amp: str) -> Any:
    """A ``torch.amp.GradScaler`` for ``fp16``; ``None`` for ``none`` and ``bf16``."""
    import torch

    if _amp_dtype(amp) is not torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def memory_kind(device: Any) -> str:
    """What :func:`peak_memory_mib` measures on ``device``."""
    import torch

    if torch.device(device).type == "cuda":
        return "cuda max_memory_allocated"
    return "process peak RSS"


def reset_peak_memory(device: Any) -> None:
    """Start a new peak: CUDA's peak statistics, or the process's RSS high-water mark."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        from dassdp.bench.rule import peak_rss_kb

        peak_rss_kb(reset=True)


def peak_memory_mib(device: Any) -> float:
    """Peak memory since the last :func:`reset_peak_memory` in MiB (CUDA: allocated by
    tensors; CPU: the whole process's resident set, torch and Python included)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    from dassdp.bench.rule import peak_rss_kb

    return peak_rss_kb() / 1024


def count_aten_ops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` and count the aten operators it dispatches (autograd's backward included);
    returns ``(count, result)``."""
    from dassdp.bench.syncs import count_ops

    counts, result = count_ops(fn)
    return counts["ops"], result


def count_cuda_kernels(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` under the profiler and count the CUDA kernels it launched (Triton's too);
    returns ``(count, result)``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if _is_kernel(e)]
    return len(kernels), result


def _is_kernel(event: Any) -> bool:
    from torch.autograd import DeviceType

    dev = getattr(event, "device_type", None)
    if dev != DeviceType.CUDA:
        return False
    name = event.name
    return not name.startswith(("Memcpy", "Memset", "cudaMemcpy", "cudaMemset"))


def count_kernels(fn: Callable[[], Any], device: Any) -> tuple[int, Any]:
    """CUDA kernels launched by ``fn()`` on CUDA, aten ops dispatched on the CPU (see
    :func:`kernel_unit`)."""
    import torch

    if torch.device(device).type == "cuda":
        return count_cuda_kernels(fn)
    return count_aten_ops(fn)


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
