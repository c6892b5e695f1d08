"""``dassdp bench models``: forward+backward throughput (images/s) of every registered model.

One timed iteration = forward on a random batch at ``T`` steps, cross-entropy loss,
backward, ``zero_grad`` (with ``--optimizer``: and an AdamW step): the cost of a training
step. Models are measured in train mode (batch-norm batch statistics, DSSA firing-rate
updates) on ``--device`` (the CPU with a fixed thread count, or CUDA), in float32 or under
autocast (``--amp fp16`` with a grad scaler, ``--amp bf16``; several values: one row each).
Inputs are modest by default so the whole run takes minutes: CIFAR-size models at 32x32,
ImageNet-stem variants at 64x64 (``--imagenet-size``). Peak memory per row:
``max_memory_allocated`` on CUDA, the peak RSS on the CPU (with ``--fresh-process`` each
row runs in its own Python process, so the peak RSS is that configuration's alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dassdp.bench.devstats import AMP_CHOICES
from dassdp.bench.report import add_output_arguments, provenance

HELP = "forward+backward images/s per model at T=4 (CPU or CUDA, fp32 / fp16 / bf16)"

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
    device: str = "cpu",
    amp: str = "none",
    optimizer: bool = False,
) -> dict[str, Any]:
    """Time ``iters`` training iterations of model ``name``; returns one result row."""
    import torch
    import torch.nn.functional as F

    from dassdp.bench.devstats import (
        autocast,
        grad_scaler,
        memory_kind,
        peak_memory_mib,
        reset_peak_memory,
    )
    from dassdp.bench.timing import sync
    from dassdp.models import create_model

    dev = torch.device(device)
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"T": T, "in_channels": shape[0]}
    model = create_model(name, num_classes=10, **kwargs).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4) if optimizer else None
    scaler = grad_scaler(dev, amp)
    # Event-frame models take [B, T, C, H, W]; the others static images [B, C, H, W].
    x_shape = (batch, T, *shape) if name == "spikingresformer_dvsg" else (batch, *shape)
    x, y = torch.rand(x_shape).to(dev), torch.randint(0, 10, (batch,)).to(dev)
    reset_peak_memory(dev)
    times = []
    for i in range(warmup + iters):
        sync(dev)
        start = time.perf_counter()
        with autocast(dev, amp):
            loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if opt is not None:
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        model.zero_grad(set_to_none=True)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "input": "x".join(str(s) for s in shape),
        "batch": batch,
        "T": T,
        "device": str(dev),
        "amp": amp,
        "step": "fwd+bwd+adamw" if optimizer else "fwd+bwd",
        "iters": iters,
        "sec_per_iter": round(sec, 4),
        "images_per_s": round(batch / sec, 2),
        "peak_mem_mib": round(peak_memory_mib(dev), 1),
        "mem_kind": memory_kind(dev),
    }


def bench_model_subprocess(name: str, **kwargs: Any) -> dict[str, Any]:
    """:func:`bench_model` in a fresh Python process (its own peak RSS); same row."""
    import torch

    spec = {"name": name, "threads": torch.get_num_threads(), **kwargs}
    code = "from dassdp.bench.models import _child_main; _child_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(spec), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench models: the process for {name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _child_main() -> None:
    """Entry of :func:`bench_model_subprocess`: a JSON spec on stdin, the row on stdout."""
    import torch

    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec.pop("threads"))
    spec["shape"] = tuple(spec["shape"])
    print(json.dumps(bench_model(spec.pop("name"), **spec)))


def markdown(
    rows: list[dict[str, Any]],
    env: dict[str, Any],
    csv_path: Path,
    load: tuple[str, str] | None = None,
) -> str:
    """The ``## models`` section body: how it was measured, then one table row per model."""
    steps = sorted({r["step"] for r in rows})
    what = "forward + backward (cross-entropy" + (
        ", AdamW step" if "fwd+bwd+adamw" in steps else ", no optimizer step"
    )
    lines = [
        f"One iteration = {what}) in train mode on random inputs,",
        "models built with 10 classes (params column); median over the timed iterations;",
        "images/s = batch / median seconds. Event-frame models get [B, T, C, H, W] frames.",
        "*amp*: `none` = float32; `bf16` / `fp16` = forward and loss under `torch.autocast`",
        "(fp16 with a grad scaler). *peak MiB*: `torch.cuda.max_memory_allocated` on CUDA;",
        "on the CPU the process's peak resident set (`VmHWM`: torch, Python and the model",
        "included; a fresh process per row with `--fresh-process`).",
        "",
        *provenance(env, csv_path, load),
        *([f"- CPU bfloat16 support: {cpu_bf16_support()}"] if _cpu_bf16_rows(rows) else []),
        "",
        "| model | params | input (C x H x W) | batch | T | device | amp | step | s / iter "
        "| images / s | peak MiB |",
        "|---|---:|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['params']:,} | {r['input']} | {r['batch']} | {r['T']} | "
        f"{r['device']} | {r['amp']} | {r['step']} | {r['sec_per_iter']:.3f} | "
        f"{r['images_per_s']:.2f} | {r['peak_mem_mib']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines)


def cpu_bf16_support() -> str:
    """Which bfloat16 instructions the CPU has (``/proc/cpuinfo`` flags): without
    ``avx512_bf16`` / ``amx_bf16`` oneDNN emulates bf16 and autocast is slower than fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    have = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if have:
        return ", ".join(have) + " (native bf16 dot products)"
    return "no avx512_bf16 / amx_bf16 flag: bf16 is emulated (converted to fp32), expect it slower"


def _cpu_bf16_rows(rows: list[dict[str, Any]]) -> bool:
    return any(r["amp"] == "bf16" and r["device"] == "cpu" for r in rows)


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
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument(
        "--amp",
        nargs="+",
        choices=AMP_CHOICES,
        default=["none"],
        help="precision(s): none (float32), fp16 (autocast + grad scaler), bf16 (autocast); "
        "one row per model and value (default none)",
    )
    parser.add_argument(
        "--optimizer",
        action="store_true",
        help="include an AdamW step in each iteration (a whole training step)",
    )
    parser.add_argument(
        "--fresh-process",
        action="store_true",
        help="run each model and precision in its own Python process (its own peak RSS)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-size run: batch 2, 1 timed iteration, ImageNet variants at 32x32",
    )
    add_output_arguments(parser, "models", per_device=True)


def _selected(patterns: list[str]) -> list[str]:
    from dassdp.models import list_models

    names = sorted({n for p in patterns for n in list_models(p)})
    if not names:
        raise ValueError(f"no model matches {patterns}; run `dassdp ls models` to see all")
    return names


def run(args: argparse.Namespace) -> int:
    import torch

    from dassdp.bench.report import environment, write_csv, write_section
    from dassdp.bench.timing import default_csv, device_of, load_average, section_name

    if args.quick:
        args.batch, args.iters, args.imagenet_size = 2, 1, 32
    if min(args.batch, args.T, args.iters, args.threads) < 1 or args.warmup < 0:
        raise ValueError("--batch, --T, --iters and --threads must be >= 1, --warmup >= 0")
    device = str(device_of(args.device))
    out = args.out if args.out is not None else default_csv("models", device)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    rows = []
    for name in _selected(args.models):
        shape = input_shape(name, args.size, args.imagenet_size)
        for amp in args.amp:
            kwargs = dict(
                batch=args.batch, T=args.T, shape=shape, iters=args.iters, warmup=args.warmup,
                device=device, amp=amp, optimizer=args.optimizer,
            )  # fmt: skip
            if args.fresh_process:
                row = bench_model_subprocess(name, **kwargs)
            else:
                row = bench_model(name, **kwargs)  # type: ignore[arg-type]
            print(
                f"{name:<24} {row['input']:>9} {amp:>4}  {row['sec_per_iter']:8.3f} s/iter  "
                f"{row['images_per_s']:8.2f} images/s  peak {row['peak_mem_mib']:.0f} MiB",
                flush=True,
            )
            rows.append(row)
    write_csv(out, rows)
    section = markdown(rows, environment(), out, (load_before, load_average()))
    write_section(args, section_name("models", device), section, out)
    return 0
