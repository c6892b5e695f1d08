"""``dassdp bench models``: forward+backward throughput (images/s) of every registered model.

One timed iteration = forward on a random batch at ``T`` steps, cross-entropy loss,
backward, ``zero_grad``: the cost of a training step without the optimizer. Models are
measured in train mode (batch-norm batch statistics, DSSA firing-rate updates) on the CPU
with a fixed thread count. Inputs are modest by default so the whole run takes minutes:
CIFAR-size models at 32x32, ImageNet-stem variants at 64x64 (``--imagenet-size``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from dassdp.bench.report import add_output_arguments, provenance

HELP = "forward+backward images/s per model at T=4 on this CPU"

_IMAGENET_STEM = (
    "spikingresformer_ti",
    "spikingresformer_s",
    "spikingresformer_m",
    "spikingresformer_l",
)


def input_shape(name: str, size: int | None = None, imagenet_size: int = 64) -> tuple[int, ...]:
    """Per-sample input shape ``(C, H, W)`` used for model ``name`` (``size`` overrides H = W)."""
    if name == "spikingresformer_dvsg":
        return (2, size or 32, size or 32)
    if name in _IMAGENET_STEM:
        return (3, size or imagenet_size, size or imagenet_size)
    return (3, size or 32, size or 32)


def bench_model(
    name: str,
    *,
    batch: int = 4,
    T: int = 4,
    shape: tuple[int, ...] = (3, 32, 32),
    iters: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``iters`` forward+backward iterations of model ``name``; returns one result row."""
    import torch
    import torch.nn.functional as F

    from dassdp.models import create_model

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"T": T, "in_channels": shape[0]}
    model = create_model(name, num_classes=10, **kwargs).train()
    # Event-frame models take [B, T, C, H, W]; the others static images [B, C, H, W].
    x_shape = (batch, T, *shape) if name == "spikingresformer_dvsg" else (batch, *shape)
    x, y = torch.rand(x_shape), torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "input": "x".join(str(s) for s in shape),
        "batch": batch,
        "T": T,
        "iters": iters,
        "sec_per_iter": round(sec, 4),
        "images_per_s": round(batch / sec, 2),
    }


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], csv_path: Path) -> str:
    """The ``## models`` section body: how it was measured, then one table row per model."""
    lines = [
        "Forward + backward (cross-entropy, no optimizer step) in train mode on random inputs,",
        "models built with 10 classes (params column); median over the timed iterations;",
        "images/s = batch / median seconds. Event-frame models get [B, T, C, H, W] frames.",
        "",
        *provenance(env, csv_path),
        "",
        "| model | params | input (C x H x W) | batch | T | s / iter | images / s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['params']:,} | {r['input']} | {r['batch']} | {r['T']} | "
        f"{r['sec_per_iter']:.3f} | {r['images_per_s']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        default=["*"],
        metavar="PATTERN",
        help="fnmatch patterns of models to measure (default: all)",
    )
    parser.add_argument("--batch", type=int, default=4, help="images per iteration (default 4)")
    parser.add_argument("--T", type=int, default=4, help="time steps (default 4)")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="input height = width for every model (default: per model)",
    )
    parser.add_argument(
        "--imagenet-size",
        type=int,
        default=64,
        help="input size of the ImageNet-stem variants (default 64)",
    )
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed iterations first (default 1)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-size run: batch 2, 1 timed iteration, ImageNet variants at 32x32",
    )
    add_output_arguments(parser, "models", per_device=False)


def _selected(patterns: list[str]) -> list[str]:
    from dassdp.models import list_models

    names = sorted({n for p in patterns for n in list_models(p)})
    if not names:
        raise ValueError(f"no model matches {patterns}; run `dassdp ls models` to see all")
    return names


def run(args: argparse.Namespace) -> int:
    import torch

    from dassdp.bench.report import environment, write_csv, write_section

    if args.quick:
        args.batch, args.iters, args.imagenet_size = 2, 1, 32
    if min(args.batch, args.T, args.iters, args.threads) < 1 or args.warmup < 0:
        raise ValueError("--batch, --T, --iters and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    rows = []
    for name in _selected(args.models):
        shape = input_shape(name, args.size, args.imagenet_size)
        row = bench_model(
            name, batch=args.batch, T=args.T, shape=shape, iters=args.iters, warmup=args.warmup
        )
        print(
            f"{name:<24} {row['input']:>9}  {row['sec_per_iter']:8.3f} s/iter  "
            f"{row['images_per_s']:8.2f} images/s",
            flush=True,
        )
        rows.append(row)
    write_csv(args.out, rows)
    write_section(args, "models", markdown(rows, environment(), args.out), args.out)
    return 0
