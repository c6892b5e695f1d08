"""Process-group setup from the ``torchrun`` or SLURM environment; one process without it.

``torchrun --nproc_per_node N -m dassdp train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` then joins the group (NCCL on CUDA, gloo on CPU)
and picks this rank's device. Without those variables nothing is initialised.

Under ``srun`` (one process per task, no torchrun) the same variables are derived from
SLURM's: ``SLURM_PROCID`` (rank), ``SLURM_STEP_NUM_TASKS`` or ``SLURM_NTASKS`` (world size),
``SLURM_LOCALID`` (local rank), ``MASTER_ADDR`` or the first host of the step's node list,
``MASTER_PORT`` or a port derived from ``SLURM_JOB_ID`` (:func:`slurm_environment`). Only an
srun step counts (``SLURM_STEP_ID`` set and not the batch script's own step), so a batch
script that runs ``dassdp train`` directly stays one process.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "broadcast_buffers",
    "cleanup_distributed",
    "export_slurm_environment",
    "first_host",
    "init_distributed",
    "pick_device",
    "replicas_identical",
    "slurm_environment",
    "state_digest",
]

# SLURM's step ids of the batch script and of the "extern" step: not an srun launch
_NOT_SRUN_STEPS = {"batch", "extern", "4294967294", "4294967295"}


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
        # one visible GPU per task (SLURM's --gpu-bind, CUDA_VISIBLE_DEVICES per rank): cuda:0
        pref = f"cuda:{0 if torch.cuda.device_count() == 1 else local_rank}"
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {pref!r} requested but CUDA is not available; use 'cpu'")
    return torch.device(pref)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``."""
    # each bracket group -> its first element (zero padding kept), then the first name
    first = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist)
    return first.strip().split(",")[0]


def slurm_environment(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` for this
    process from an srun step's variables (see the module doc); ``None`` outside an srun step
    of more than one task, or when ``RANK`` is already set (torchrun, submitit's export)."""
    env = os.environ if env is None else env
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if "RANK" in env or "SLURM_PROCID" not in env or step in (None, *_NOT_SRUN_STEPS):
        return None
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if world <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    job = env.get("SLURM_JOB_ID", "0")
    port = 20000 + (int(job) if job.isdigit() else zlib.crc32(job.encode())) % 40000
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
        "MASTER_PORT": env.get("MASTER_PORT") or str(port),
    }


def export_slurm_environment() -> bool:
    """Under an srun step of N > 1 tasks: set the torch variables of
    :func:`slurm_environment` in ``os.environ`` (so ``env://`` and code that reads ``RANK``
    see them); returns whether it did."""
    found = slurm_environment()
    if found is not None:
        os.environ.update(found)
    return found is not None


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun (or srun, see :func:`slurm_environment`) process group if its
    environment is set; else a single process."""
    export_slurm_environment()
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
