"""``dassdp bench models``: training throughput (images/s) of every registered model.

One iteration = one step of the engine (:func:`dassdp.engine.step.train_step`: forward,
cross-entropy, backward, AdamW step, ``dassdp.reset``) in train mode (batch-norm batch
statistics, DSSA firing-rate updates) on random inputs at ``T`` steps, models built with 10
classes (*params*); images/s = batch / median seconds over the timed iterations. Event-frame
models get ``[B, T, C, H, W]`` frames. Inputs are modest by default so the whole run takes
minutes: CIFAR-size models at 32x32, ImageNet-stem variants at 64x64 (``--imagenet-size``).
*amp*: ``none`` = float32; ``bf16`` / ``fp16`` = forward and loss under autocast (fp16 with a
grad scaler); several values: one row each. *peak MiB*: ``max_memory_allocated`` on CUDA; on
the CPU the process's peak resident set (``VmHWM``: torch, Python and the model included;
with ``--fresh-process`` each row runs in its own Python process, so it is that row's alone).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dassdp.bench import harness as H

HELP = "training-step images/s per model at T=4 (CPU or CUDA, fp32 / fp16 / bf16)"

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
) -> dict[str, Any]:
    """Time ``iters`` training steps of model ``name``; returns one result row."""
    import torch

    from dassdp.models import create_model

    dev = torch.device(device)
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, T=T, in_channels=shape[0]).to(dev).train()
    step = H.engine_step(model, H.adamw(model), device=dev, amp=amp)
    # Event-frame models take [B, T, C, H, W]; the others static images [B, C, H, W].
    x_shape = (batch, T, *shape) if name == "spikingresformer_dvsg" else (batch, *shape)
    x, y = H.random_batch(x_shape, seed=seed, device=dev)
    H.reset_peak_memory(dev)
    times = [H.timed(lambda: step(x, y), dev)[0] for _ in range(warmup + iters)][warmup:]
    sec = H.median(times)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "input": "x".join(str(s) for s in shape),
        "batch": batch,
        "T": T,
        "device": str(dev),
        "amp": amp,
        "step": "fwd+bwd+adamw",
        "iters": iters,
        "sec_per_iter": round(sec, 4),
        "images_per_s": round(batch / sec, 2),
        "peak_mem_mib": round(H.peak_memory_mib(dev), 1),
        "mem_kind": H.memory_kind(dev),
    }


def markdown(rows: list[dict[str, Any]], facts: list[str]) -> str:
    """The ``## models`` section body: the module docstring, the facts, one row per model."""
    lines = [
        *H.describe(__doc__),
        "",
        *facts,
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
    H.add_options(
        parser,
        models=(["*"], "fnmatch patterns of models to measure", {"metavar": "PATTERN"}),
        batch=(4, "images per iteration"),
        T=(4, "time steps"),
        size=(None, "input height = width for every model (default: per model)", {"type": int}),
        imagenet_size=(64, "input size of the ImageNet-stem variants"),
        iters=(3, "timed iterations"),
        warmup=(1, "untimed iterations first"),
        amp=(["none"], "precisions: none (float32), fp16 (autocast + grad scaler), bf16 "
             "(autocast); one row per model and value", {"choices": H.AMP_CHOICES}),
        fresh_process=(False, "run each model and precision in its own Python process (its "
                       "own peak RSS)"),
        quick=(False, "smoke-size run: batch 2, 1 timed iteration, ImageNet variants at 32x32"),
    )  # fmt: skip
    H.add_run_arguments(parser)
    H.add_output_arguments(parser, "models")


def _selected(patterns: list[str]) -> list[str]:
    from dassdp.models import list_models

    names = sorted({n for p in patterns for n in list_models(p)})
    if not names:
        raise ValueError(f"no model matches {patterns}; run `dassdp ls models` to see all")
    return names


def run(args: argparse.Namespace) -> int:
    import torch

    if args.quick:
        args.batch, args.iters, args.imagenet_size = 2, 1, 32
    H.check_positive(args, "batch", "T", "iters", "threads")
    H.check_positive(args, "warmup", least=0)
    device = str(H.device_of(args.device))
    torch.set_num_threads(args.threads)
    load_before = H.load_average()
    rows = []
    for name in _selected(args.models):
        shape = input_shape(name, args.size, args.imagenet_size)
        for amp in args.amp:
            spec = dict(name=name, batch=args.batch, T=args.T, shape=shape, iters=args.iters,
                        warmup=args.warmup, device=device, amp=amp, seed=args.seed)  # fmt: skip
            if args.fresh_process:  # its own peak RSS
                spec["shape"] = list(shape)
                row = H.in_fresh_process(H.function("dassdp.bench.models:bench_model"), spec)
            else:
                row = bench_model(**spec)  # type: ignore[arg-type]
            print(
                f"{name:<24} {row['input']:>9} {amp:>4}  {row['sec_per_iter']:8.3f} s/iter  "
                f"{row['images_per_s']:8.2f} images/s  peak {row['peak_mem_mib']:.0f} MiB",
                flush=True,
            )
            rows.append(row)
    return H.save(
        args, "models", rows, lambda facts: markdown(rows, facts), device=device,
        load_before=load_before,
    )  # fmt: skip
