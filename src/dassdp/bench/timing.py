"""Small helpers shared by the ``rule``, ``overhead`` and ``throughput`` benchmarks.

Timing that is correct on CUDA (synchronise before reading the clock), the machine's load
average (other processes on a shared machine make CPU times noisy, so it is reported next
to every number), device parsing with a clear error, and per-device output names (a CUDA run
writes ``## <name> (cuda)`` and ``docs/bench/<name>-cuda.csv``, so CPU numbers survive it).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "default_csv",
    "device_of",
    "load_average",
    "median",
    "section_name",
    "sync",
    "timed",
]


def device_of(name: str) -> Any:
    """``torch.device(name)``; ``cuda`` without a visible GPU is a ``ValueError``."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def sync(device: Any) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    """Run ``fn()`` once; return ``(seconds, result)`` with the device synchronised."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (``nan`` if empty)."""
    return statistics.median(values) if values else float("nan")


def load_average() -> str:
    """The 1/5/15-minute load averages as ``"a, b, c"`` (``"n/a"`` where unsupported)."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def section_name(name: str, device: str) -> str:
    """``docs/benchmarks.md`` section of benchmark ``name`` on ``device``: ``rule`` on the CPU,
    ``rule (cuda)`` on a GPU."""
    kind = str(device).split(":")[0]
    return name if kind == "cpu" else f"{name} ({kind})"


def default_csv(name: str, device: str) -> Path:
    """Default CSV path: ``docs/bench/<name>.csv`` (CPU) or ``docs/bench/<name>-cuda.csv``."""
    kind = str(device).split(":")[0]
    return Path("docs/bench") / (f"{name}.csv" if kind == "cpu" else f"{name}-{kind}.csv")
