"""``dassdp bench ddp``: training images/s with 1 vs N torchrun ranks (gloo on CPU, NCCL on CUDA).

Each setting is a real ``dassdp train`` run (``--nproc N``) of the same small job: the
synthetic dataset, ``spiking_cnn`` at T=4 with DA-SSDP (warm-up 1 epoch, then dW every
step), the same *global* batch split over the ranks (per-rank batch = global / N). The
rate is the training images of the last epoch over that epoch's wall time (which also
holds a short test pass), read back from the run's ``metrics.jsonl``. With ``--device cuda``
every setting, ``--nproc 1`` included, runs under torchrun with NCCL (one GPU per rank), so
one GPU checks the NCCL path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dassdp.bench import harness as H

HELP = "training images/s with 1 vs N DDP ranks (torchrun; gloo on CPU, NCCL on CUDA)"


def job_config(
    global_batch: int, nproc: int, epochs: int, subset: int, device: str = "cpu"
) -> dict[str, Any]:
    """The benchmark's training config for ``nproc`` ranks (per-rank batch = global / N)."""
    if global_batch % nproc:
        raise ValueError(f"--batch {global_batch} is not divisible by {nproc} ranks")
    return {
        "name": f"bench-ddp-{nproc}",
        "dataset": "synthetic",
        "model": "spiking_cnn",
        "model_args": {"channels": [16, 32], "hidden": 128},
        "epochs": epochs,
        "batch_size": global_batch // nproc,
        "T": 4,
        "lr": 2e-3,
        "lr_warmup_epochs": 0,
        "subset": subset,
        "test_subset": 128,
        "threads": 1,
        "progress": False,
        "tensorboard": False,
        "plasticity": {"warmup_epochs": 1},
        "device": device,
    }


def run_setting(
    nproc: int, global_batch: int, epochs: int, subset: int, work: Path, device: str = "cpu"
) -> dict[str, Any]:
    """Train once with ``nproc`` ranks; returns the row for the table."""
    import yaml

    cfg_path = work / f"ddp{nproc}.yaml"
    cfg_path.write_text(yaml.safe_dump(job_config(global_batch, nproc, epochs, subset, device)))
    out = work / f"run{nproc}"
    cmd = [sys.executable, "-m", "dassdp", "train", "--config", str(cfg_path), "--out", str(out)]
    cuda = device.startswith("cuda")
    if nproc > 1 or cuda:  # CUDA: torchrun + NCCL even for one rank
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training with {nproc} rank(s) failed:\n{proc.stderr[-2000:]}")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    images = last["train"]["samples"]
    return {
        "ranks": nproc,
        "device": device,
        "backend": "nccl" if cuda else ("gloo" if nproc > 1 else "none (1 process)"),
        "global_batch": global_batch,
        "per_rank_batch": global_batch // nproc,
        "train_images": images,
        "epoch_s": round(last["epoch_time_s"], 2),
        "images_per_s": round(images / last["epoch_time_s"], 1),
        "replicas_identical": last.get("replicas_identical", ""),
    }


def markdown(rows: list[dict[str, Any]], facts: list[str]) -> str:
    base = rows[0]["images_per_s"]
    lines = [
        "Real `dassdp train` runs of one job (synthetic 16x16 images, `spiking_cnn` 16-32-128,",
        "T=4, DA-SSDP applying dW after a 1-epoch warm-up) with the global batch split over",
        "the ranks; rate = last epoch's training images / its wall time (a 128-image test",
        "pass included). 1 torch thread per rank; gloo on CPU; on CUDA every run (one rank",
        "too) goes through torchrun with NCCL, one GPU per rank.",
        "",
        *facts,
        "",
        "| ranks | device | backend | per-rank batch | epoch s | images / s | speed-up "
        "| replicas identical |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['ranks']} | {r['device']} | {r['backend']} | {r['per_rank_batch']} | "
        f"{r['epoch_s']:.2f} | {r['images_per_s']:.1f} "
        f"| {r['images_per_s'] / base:.2f}x | {r['replicas_identical']} |"
        for r in rows
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    H.add_options(
        parser,
        nproc=([1, 2], "rank counts to compare"),
        batch=(64, "global batch"),
        epochs=(2, "epochs per run"),
        subset=(512, "training images per epoch (512: all synthetic ones)"),
        device=("cpu", "cpu, or cuda (one GPU per rank, NCCL)"),
    )
    H.add_output_arguments(parser, "ddp")


def run(args: argparse.Namespace) -> int:
    if min(args.nproc) < 1 or args.epochs < 2:
        raise ValueError("--nproc values must be >= 1 and --epochs >= 2 (warm-up + one)")
    device = H.device_of(args.device).type  # ranks pick cuda:LOCAL_RANK themselves
    if device == "cuda":
        import torch

        if max(args.nproc) > torch.cuda.device_count():
            raise ValueError(
                f"--nproc {max(args.nproc)}: only {torch.cuda.device_count()} GPU(s) here"
            )
    with tempfile.TemporaryDirectory(prefix="dassdp-bench-ddp-") as tmp:
        rows = []
        for n in args.nproc:
            rows.append(run_setting(n, args.batch, args.epochs, args.subset, Path(tmp), device))
            print(f"{n} rank(s): {rows[-1]['images_per_s']:.1f} images/s", flush=True)
    return H.save(args, "ddp", rows, lambda facts: markdown(rows, facts), device=device)
