"""Worker processes for the gloo tests (imported by spawned children; not a test module)."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import dassdp
from dassdp import DASSDP, DASSDPConfig
from dassdp.engine.distributed import cleanup_distributed, gloo_threads
from snn_fixtures import TinySNN

CFG = DASSDPConfig(warmup_epochs=1, A_plus=0.02, A_minus=0.004)
STEPS = 4


def _finish(out_dir: str, tag: str, rank: int) -> None:
    """Leave the process group as the engine does, once the DDP model is out of scope (the
    worker's training function has returned), then record this rank's gloo threads: the group
    must be freed (its threads joined) here, not left to interpreter teardown, where a gloo
    thread taking the GIL aborts the rank ("terminate called without an active exception";
    see dassdp.engine.distributed)."""
    cleanup_distributed()
    with open(os.path.join(out_dir, f"{tag}-threads-rank{rank}.json"), "w") as f:
        json.dump(gloo_threads(), f)


def global_batch(epoch: int, i: int, size: int):
    gen = torch.Generator().manual_seed(100 * epoch + i)
    return torch.randn(size, 12, generator=gen), torch.randint(0, 4, (size,), generator=gen)


def _run(
    rank: int,
    world: int,
    init_file: str,
    out_dir: str,
    size: int,
    epochs: range,
    resume: str | None = None,
    tag: str = "run",
) -> None:
    """Train TinySNN with DA-SSDP; each rank takes its contiguous shard of the global batch."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
    torch.manual_seed(0)
    model = TinySNN()
    net = DDP(model) if world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    plast = DASSDP(net, CFG)
    if resume:
        ckpt = torch.load(resume, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        plast.load_state_dict(ckpt["plast"])
    for epoch in epochs:
        plast.set_epoch(epoch)
        for i in range(STEPS):
            x, y = global_batch(epoch, i, size)
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            plast.step(loss)
            dassdp.reset(model)
    plast_state = plast.state_dict()  # a collective under DDP: every rank calls it
    if rank == 0:
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "plast": plast_state},
            os.path.join(out_dir, f"{tag}.pt"),
        )
    torch.save(
        {"model": model.state_dict(), "fits": plast.fits},
        os.path.join(out_dir, f"{tag}-rank{rank}.pt"),
    )


def _run_skips(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Skips decided on the device must hold on every rank: after a warm-up of 2 steps, four
    active steps where one rank has no records, a non-finite loss, a skipped optimizer (a
    device flag), then a normal step. No optimizer: only DA-SSDP changes the weights."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinySNN()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=1, A_plus=0.02, A_minus=0.004))
    snapshots = []
    for epoch, i in ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)):
        plast.set_epoch(epoch)
        x, y = global_batch(epoch, i, 8 * world)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        stepped: bool | torch.Tensor = True
        if (epoch, i) == (1, 0) and rank == 1:
            loss = torch.tensor(1.0)  # this rank ran no forward: its sites have no records
        else:
            loss = F.cross_entropy(model(x), y).detach()
        if (epoch, i) == (1, 1) and rank == 0:
            loss = loss * float("nan")
        if (epoch, i) == (1, 2) and rank == 1:
            stepped = torch.tensor(0.0)
        applied = plast.step(loss, optimizer_stepped=stepped)
        dassdp.reset(model)
        snapshots.append((bool(applied), model.fc2.weight.detach().clone()))
    torch.save(
        {"snapshots": snapshots, "counters": plast.counters},
        os.path.join(out_dir, f"skips-rank{rank}.pt"),
    )


def _run_learned(
    rank: int, world: int, init_file: str, out_dir: str, hyper_step: str = "plain"
) -> None:
    """DDP with learned sigma and amplitude: a warm-up epoch, then two active epochs; at one
    active step rank 1 drops its records (it joins the stacked dW/dsigma all-reduce with
    zeros). The gradients (DDP) and D_t (the learner) are all-reduced, so h must agree, and
    with ``hyper_step="normalized"`` so must its running means and counts."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinySNN()
    net = DDP(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    cfg = CFG.replace(learn=("sigma", "amplitude"), sigma_lr=20.0, amplitude_lr=20.0)
    cfg = cfg.replace(hyper_step=hyper_step, hyper_lr=0.05, hyper_beta=0.9)
    plast = DASSDP(net, cfg)
    history = []
    for epoch in range(3):
        plast.set_epoch(epoch)
        for i in range(STEPS):
            x, y = global_batch(epoch, i, 8 * world)
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (epoch, i) == (1, 2) and rank == 1:
                dassdp.reset(model)  # this rank's sites have no records for this step
            plast.step(loss)
            dassdp.reset(model)
            history.append(plast.learned)
    torch.save(
        {
            "model": model.state_dict(),
            "history": history,
            "counters": plast.counters,
            "learned": plast.state_dict()["learned"],
        },
        os.path.join(out_dir, f"learned-rank{rank}.pt"),
    )


def run(
    rank: int,
    world: int,
    init_file: str,
    out_dir: str,
    size: int,
    epochs: range,
    resume: str | None = None,
    tag: str = "run",
) -> None:
    """:func:`_run`, then leave the group (with more than one rank)."""
    _run(rank, world, init_file, out_dir, size, epochs, resume, tag)
    if world > 1:
        _finish(out_dir, tag, rank)


def run_skips(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _run_skips(rank, world, init_file, out_dir)
    _finish(out_dir, "skips", rank)


def run_learned(
    rank: int, world: int, init_file: str, out_dir: str, hyper_step: str = "plain"
) -> None:
    _run_learned(rank, world, init_file, out_dir, hyper_step)
    _finish(out_dir, "learned", rank)
