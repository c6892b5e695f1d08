"""All-reduce helpers for DA-SSDP; each is a no-op without an initialised process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device(t: Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors (and CUDA ones via copies).
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce of ``t`` with ``op`` in ``{"sum", "mean", "min", "max"}``."""
    if not is_distributed():
        return t
    ops = {
        "sum": dist.ReduceOp.SUM,
        "mean": dist.ReduceOp.SUM,
        "min": dist.ReduceOp.MIN,
        "max": dist.ReduceOp.MAX,
    }
    work = t.to(_collective_device(t))
    dist.all_reduce(work, op=ops[op])
    if op == "mean":
        work /= dist.get_world_size()
    if work is not t:
        t.copy_(work)
    return t
