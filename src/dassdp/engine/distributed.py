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

import gc
import hashlib
import importlib
import os
import re
import sys
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "bind_group_defaults",
    "broadcast_buffers",
    "cleanup_distributed",
    "export_slurm_environment",
    "first_host",
    "gloo_threads",
    "init_distributed",
    "pick_device",
    "release_group_references",
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
        bind_group_defaults()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


# Why a process group can outlive ``destroy_process_group`` (and how that aborted ranks):
# ``torch.distributed.nn.functional`` evaluates ``group.WORLD`` as the default argument of
# ten functions when it is first imported. DDP's constructor imports ``torch._dynamo``, which
# imports that module, so in a process that joined the group first, ten function objects
# hold the default group for the life of the interpreter. ``destroy_process_group`` then
# cannot free it: gloo's worker threads (``pt_gloo_runloop``) and its TCP loop
# (``gloo_tcp_loop``) keep running until interpreter teardown, when the group is finally
# released with the interpreter half gone. A gloo thread that must take the GIL then (to
# drop a tensor's Python object) is ended by CPython with a forced unwind through C++
# ``noexcept`` frames, which is ``std::terminate``: "terminate called without an active
# exception", SIGABRT, seen now and then in ``mp.spawn`` workers. The cure is that the
# group is really freed where it is destroyed: bind the defaults before the group exists
# (:func:`bind_group_defaults`) and drop them if they were bound to it anyway
# (:func:`release_group_references`); :func:`gloo_threads` shows the threads are gone.
_DEFAULTS_MODULE = "torch.distributed.nn.functional"


def bind_group_defaults() -> None:
    """Import the module that captures ``group.WORLD`` in default arguments while there is no
    group (cheap: ~30 ms), so that it binds ``None``. Call before ``init_process_group``."""
    importlib.import_module(_DEFAULTS_MODULE)


def release_group_references(group: object) -> int:
    """Replace ``group`` by ``None`` wherever :data:`_DEFAULTS_MODULE`'s functions bound it as
    a default argument; returns how many functions held it."""
    module = sys.modules.get(_DEFAULTS_MODULE)
    held = 0
    for fn in list(vars(module).values()) if module is not None else ():
        defaults = getattr(fn, "__defaults__", None)
        if defaults and any(value is group for value in defaults):
            fn.__defaults__ = tuple(None if value is group else value for value in defaults)
            held += 1
    return held


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux ``/proc``; empty elsewhere): after
    :func:`cleanup_distributed` there must be none."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


def cleanup_distributed(failed: bool = False) -> None:
    """Leave the process group (if one was joined) so that it is freed here, its threads
    joined, and nothing of it is left for interpreter teardown (see the note above). Call it
    once the DDP model is out of scope: a live ``DistributedDataParallel`` holds the group.

    ``failed=False`` (the normal end): every rank first meets at a barrier, so no rank closes
    its connections while a peer is still in a collective. ``failed=True`` (this rank raised):
    no barrier, since the peers may be waiting in another collective; they see the closed
    connection and fail too, in bounded time, instead of hanging on a barrier."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = dist.group.WORLD
    if not failed and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
    release_group_references(group)
    del group
    # A DDP model in a reference cycle (hooks, closures) holds the group until the cycle
    # collector runs: run it now, so the group is not freed during interpreter teardown.
    # Call this after the training objects are out of scope (the engine does).
    gc.collect()


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
