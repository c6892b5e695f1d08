"""Process-group setup from the ``torchrun`` environment; one process without it.

``torchrun --nproc_per_node N -m dassdp train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` then joins the group (NCCL on CUDA, gloo on CPU)
and picks this rank's device. Without those variables nothing is initialised.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "broadcast_buffers",
    "cleanup_distributed",
    "init_distributed",
    "pick_device",
    "replicas_identical",
    "state_digest",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world_size``, its ``device``; ``main`` is rank 0."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this rank's CUDA device if available, else the CPU."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        pref = f"cuda:{local_rank}"
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {pref!r} requested but CUDA is not available; use 'cpu'")
    return torch.device(pref)


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group if its environment is set; else a single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, pick_device(device_pref))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def cleanup_distributed() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Under DDP: copy every buffer (BatchNorm running statistics, firing-rate estimates) from
    rank ``src`` to all ranks, as DDP itself does at the start of each forward. Called after a
    training epoch so that evaluation and checkpoints see one model, not one per rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for buf in model.buffers():
        dist.broadcast(buf, src)


def state_digest(model: torch.nn.Module, extra: bytes = b"") -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes and raw bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d buffers too
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(extra)
    return h.hexdigest()


def replicas_identical(model: torch.nn.Module, extra: bytes = b"") -> bool | None:
    """Under DDP: whether every rank holds bit-identical weights and buffers (and ``extra``,
    e.g. the fitted DA-SSDP gate); ``None`` for a single process. A collective."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, state_digest(model, extra))
    return len(set(digests)) == 1
