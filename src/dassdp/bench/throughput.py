"""``dassdp bench throughput``: training images/s of our model against SpikingJelly neurons.

The same architecture is built with our multi-step LIF (:class:`dassdp.neurons.LIF`, the
fused multi-step kernel) and with SpikingJelly 2.0's ``LIFNode(tau=2., v_threshold=1.,
v_reset=0., detach_reset=True, step_mode='m', surrogate_function=surrogate.ATan())`` (the
same neuron: tau 2, threshold 1, hard reset to 0, ATan surrogate with alpha 2, detached
reset, decayed input), injected through the model's ``neuron_layer``. Both start from the
same weights and see the same random batch. One step = the engine's
(:func:`dassdp.engine.step.train_step`: forward, cross-entropy, backward, AdamW step,
``dassdp.reset``, which resets SpikingJelly's neurons too). The backends run interleaved
(alternating who goes first) after untimed warm-up steps; images/s = batch / median step
time. *ratio* = ours / SpikingJelly's (target >= 1.0); *ratio by min step*: the same from
the fastest step of each (less sensitive to other jobs' load); *logit diff*: max |difference|
of the first-step logits (the same network: 0 up to float rounding). *LIF op*: the neuron
alone, forward + backward on ``[T, B, C, H, W]`` (``--neuron-channels`` C; shape in the
CSV), median of interleaved calls; *LIF op ratio* = SpikingJelly ms / ours (> 1: ours
faster). *kernels / step*: CUDA kernels (profiler) on a GPU, aten ops dispatched on the CPU;
*peak MiB*: ``max_memory_allocated`` on CUDA, the process's peak RSS on the CPU, of one step.

``dassdp-loop`` rows (``--loop-baseline``): the same model with ``LIF(fused=False)``, the
autograd loop over time steps that was our LIF before the fused kernel, in the same
interleaved run (*ratio* columns stay fused / SJ); ``dassdp-torch``: our LIF on its torch
path. SpikingJelly is not a dependency of dassdp; install it for this benchmark only::

    pip install --no-deps spikingjelly==2.0.0 'loguru>=0.7,<1'

(without it: ``--neurons dassdp dassdp-loop``, no ratio columns).
"""

from __future__ import annotations

import argparse
import copy
import functools
from collections.abc import Callable
from typing import Any

from dassdp.bench import harness as H
from dassdp.bench.counters import count_kernels, kernel_unit
from dassdp.bench.syncs import lif_factory

HELP = "training images/s of spikingresformer_cifar: our LIF vs SpikingJelly 2.0's LIFNode"

TARGET_RATIO = 1.0
BACKENDS = ("dassdp", "spikingjelly")
LOOP_BACKEND = "dassdp-loop"  # our LIF with the fused kernel off (--loop-baseline)
TORCH_BACKEND = "dassdp-torch"  # our LIF on its torch path: what "auto" ran on CUDA before Triton
ALL_BACKENDS = (*BACKENDS, LOOP_BACKEND, TORCH_BACKEND)
NEURON_NAMES = {
    "dassdp": "dassdp.neurons.LIF",
    "spikingjelly": "LIFNode (step_mode=m)",
    LOOP_BACKEND: "dassdp.neurons.LIF(fused=False)",
    TORCH_BACKEND: "dassdp.neurons.LIF(backend='torch')",
}
INSTALL_HINT = "pip install --no-deps spikingjelly==2.0.0 'loguru>=0.7,<1'"


def spikingjelly_lif() -> Callable[[], Any]:
    """A ``neuron_layer`` factory for SpikingJelly's multi-step ``LIFNode`` with our LIF's
    settings; a clear ``RuntimeError`` when SpikingJelly (or its ``loguru``) is missing."""
    try:
        from spikingjelly.activation_based import neuron, surrogate
    except ImportError as err:
        raise RuntimeError(
            f"bench throughput needs SpikingJelly 2.0 (not a dassdp dependency): {err}. "
            f"Install it for the benchmark only: {INSTALL_HINT}"
        ) from err

    return functools.partial(
        neuron.LIFNode, tau=2.0, v_threshold=1.0, v_reset=0.0, detach_reset=True,
        step_mode="m", surrogate_function=surrogate.ATan(),
    )  # fmt: skip


def spikingjelly_version() -> str:
    """The installed SpikingJelly version (``"absent"`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spikingjelly")
    except PackageNotFoundError:
        return "absent"


def neuron_layer(backend: str) -> Callable[[], Any]:
    """The neuron factory of ``backend`` (one of :data:`ALL_BACKENDS`)."""
    from dassdp.neurons import LIF

    if backend == "spikingjelly":
        return spikingjelly_lif()
    if backend in (LOOP_BACKEND, TORCH_BACKEND):
        return lif_factory(backend.removeprefix("dassdp-"))
    if backend == "dassdp":
        return LIF
    raise ValueError(f"backend must be one of {ALL_BACKENDS}, got {backend!r}")


def build(model_name: str, backend: str, *, T: int, seed: int, device: Any) -> Any:
    """Model ``model_name`` with ``backend``'s neurons, weights seeded by ``seed``."""
    import torch

    from dassdp import create_model

    layer = neuron_layer(backend)
    torch.manual_seed(seed)
    return create_model(model_name, num_classes=10, T=T, neuron_layer=layer).to(device).train()


def _backends(neurons: tuple[str, ...], loop_baseline: bool) -> tuple[str, ...]:
    """The neuron backends to run, in order (``dassdp-loop`` added by ``loop_baseline``)."""
    bad = [n for n in neurons if n not in ALL_BACKENDS]
    if bad or not neurons:
        raise ValueError(f"--neurons must be among {ALL_BACKENDS}, got {list(neurons)}")
    out = tuple(dict.fromkeys(neurons))
    if loop_baseline and LOOP_BACKEND not in out:
        out = (*out, LOOP_BACKEND)
    return out


def bench_throughput(
    model_name: str = "spikingresformer_cifar",
    *,
    batch: int = 8,
    size: int = 32,
    T: int = 4,
    reps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    loop_baseline: bool = False,
    neurons: tuple[str, ...] = BACKENDS,
    amp: str = "none",
) -> list[dict[str, Any]]:
    """Measure the ``neurons`` backends (and ``dassdp-loop`` with ``loop_baseline``) at one
    batch size; returns one row per backend. Ratios to SpikingJelly need both ``dassdp`` and
    ``spikingjelly`` (else empty)."""
    import torch

    if warmup < 1 or reps < 1:
        raise ValueError("throughput needs >= 1 warm-up step and >= 1 timed step")
    dev = torch.device(device)
    backends = _backends(tuple(neurons), loop_baseline)
    models = {b: build(model_name, b, T=T, seed=seed, device=dev) for b in backends}
    # Identical weights whatever the neuron class did to the RNG stream.
    ref = backends[0]
    for b in backends[1:]:
        models[b].load_state_dict(copy.deepcopy(models[ref].state_dict()))
    in_ch = H.in_channels(models[ref])
    x, y = H.random_batch((batch, in_ch, size, size), seed=seed, device=dev)
    steps = {b: H.engine_step(m, H.adamw(m), device=dev, amp=amp) for b, m in models.items()}
    calls = {b: lambda b=b: steps[b](x, y) for b in backends}
    say = None if log is None else (lambda line: log(f"  batch {batch}{line}"))
    times, first = H.interleaved(calls, warmup=warmup, reps=reps, device=dev, log=say)
    logits = {b: out.logits.float().cpu() for b, out in first.items()}
    kernels, peaks = {}, {}
    for b in backends:  # one more step each: kernels launched, peak memory
        kernels[b] = count_kernels(lambda b=b: steps[b](x, y), dev)[0]
        H.reset_peak_memory(dev)
        steps[b](x, y)
        peaks[b] = H.peak_memory_mib(dev)
    diff = max([float((logits[b] - logits[ref]).abs().max()) for b in backends[1:]], default=0.0)
    setup = {"model": model_name, "batch": batch, "input": f"{in_ch}x{size}x{size}", "T": T,
             "device": device, "amp": amp, "reps": reps}  # fmt: skip
    return _rows(setup, times, kernels, peaks, diff, loop_baseline)


def _rows(
    setup: dict[str, Any],
    times: dict[str, list[float]],
    kernels: dict[str, int],
    peaks: dict[str, float],
    diff: float,
    loop_baseline: bool,
) -> list[dict[str, Any]]:
    """One CSV row per backend, with the ratios to SpikingJelly where it ran."""
    ips = {b: setup["batch"] / H.median(t) for b, t in times.items()}
    with_sj = "dassdp" in ips and "spikingjelly" in ips
    ratio: Any = round(ips["dassdp"] / ips["spikingjelly"], 3) if with_sj else ""
    by_min: Any = round(min(times["spikingjelly"]) / min(times["dassdp"]), 3) if with_sj else ""
    before: dict[str, Any] = {"loop_ratio_over_sj": "", "speedup_fused_over_loop": ""}
    if loop_baseline and with_sj:
        before["loop_ratio_over_sj"] = round(ips[LOOP_BACKEND] / ips["spikingjelly"], 3)
    if loop_baseline and "dassdp" in ips:
        before["speedup_fused_over_loop"] = round(ips["dassdp"] / ips[LOOP_BACKEND], 3)
    rows = []
    for b, t in times.items():
        rows.append(
            {
                "model": setup["model"],
                "backend": b,
                "neuron": NEURON_NAMES[b],
                **{k: setup[k] for k in ("batch", "input", "T", "device", "amp", "reps")},
                "step_s": round(H.median(t), 4),
                "step_s_min": round(min(t), 4),
                "step_s_max": round(max(t), 4),
                "images_per_s": round(ips[b], 3),
                "ratio_ours_over_sj": ratio,
                "ratio_by_min_step": by_min,
                "first_logits_max_abs_diff": f"{diff:.3g}",
                "target_met": ("yes" if ratio >= TARGET_RATIO else "no") if with_sj else "",
                "kernels_per_step": kernels[b],
                "kernel_unit": kernel_unit(setup["device"]),
                "peak_mem_mib": round(peaks[b], 1),
                "mem_kind": H.memory_kind(setup["device"]),
                **before,
            }
        )
    return rows


def bench_neuron(
    shape: tuple[int, ...],
    *,
    reps: int = 20,
    warmup: int = 2,
    device: str = "cpu",
    seed: int = 0,
    loop_baseline: bool = False,
    neurons: tuple[str, ...] = BACKENDS,
) -> dict[str, float]:
    """Forward + backward of the neuron alone on ``x [T, B, C, H, W]`` = ``shape``, the
    backends (with ``loop_baseline`` also ``dassdp-loop``) interleaved; returns the median
    milliseconds per call for each.

    The model around the neurons is identical in both builds, so this isolates the one part
    that differs (less noisy than whole training steps on a shared machine).
    """
    import torch

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = (1.5 * torch.randn(shape, generator=gen)).to(dev).requires_grad_(True)
    grad = torch.randn(shape, generator=gen).to(dev)
    backends = _backends(tuple(neurons), loop_baseline)
    layers = {b: neuron_layer(b)() for b in backends}

    def call(neuron: Any) -> None:
        neuron(x).backward(grad)
        x.grad = None
        if hasattr(neuron, "reset"):
            neuron.reset()

    calls = {b: lambda b=b: call(layers[b]) for b in backends}
    times, _ = H.interleaved(calls, warmup=warmup, reps=reps, device=dev)
    return {b: H.median(times[b]) * 1e3 for b in backends}


def markdown(rows: list[dict[str, Any]], facts: list[str], sj_version: str) -> str:
    """The ``## throughput`` section body: the module docstring, the facts, the table."""
    lines = [
        *H.describe(__doc__),
        "",
        f"- SpikingJelly: {sj_version}",
        *facts,
        "",
        "| model | neurons | batch | input | T | amp | step s (median) | min-max s | images / s "
        "| ratio ours / SJ | ratio by min step | LIF op ms | LIF op ratio | logit diff "
        "| kernels / step | peak MiB | target met |",
        "|---|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['batch']} | {r['input']} | {r['T']} | "
            f"{r['amp']} | {r['step_s']:.3f} | {r['step_s_min']:.3f}-{r['step_s_max']:.3f} | "
            f"{r['images_per_s']:.2f} | {_f3(r['ratio_ours_over_sj'])} | "
            f"{_f3(r['ratio_by_min_step'])} | {r['lif_op_ms']:.1f} | {_f3(r['lif_op_ratio'])} | "
            f"{r['first_logits_max_abs_diff']} | {r['kernels_per_step']} | "
            f"{r['peak_mem_mib']:.0f} | {r['target_met']} |"
        )
    before_after = [r for r in rows if r["backend"] == "dassdp" and r["loop_ratio_over_sj"] != ""]
    if before_after:
        lines += ["", "Before / after the fused LIF (same run, images/s ratios):", ""]
    for r in before_after:
        loop_ms = next(
            x["lif_op_ms"] for x in rows
            if x["backend"] == LOOP_BACKEND and x["batch"] == r["batch"]
        )  # fmt: skip
        lines.append(
            f"- batch {r['batch']}: ours / SJ {r['loop_ratio_over_sj']:.3f} (autograd-loop LIF) "
            f"-> {r['ratio_ours_over_sj']:.3f} (fused LIF); whole step fused / loop "
            f"{r['speedup_fused_over_loop']:.3f}x; LIF op {loop_ms:.1f} ms -> "
            f"{r['lif_op_ms']:.1f} ms ({loop_ms / r['lif_op_ms']:.2f}x)"
        )
    return "\n".join(lines)


def _f3(value: Any) -> str:
    return f"{value:.3f}" if value != "" else "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    H.add_options(
        parser,
        model=("spikingresformer_cifar", "registered model taking neuron_layer="),
        batch=([8], "batch sizes"),
        size=(32, "input height = width"),
        T=(4, "time steps"),
        reps=(3, "timed steps per backend"),
        warmup=(1, "untimed steps first"),
        neuron_channels=(256, "channels C of the neuron-alone timing on [T, B, C, size, size] "
                         "(256: the widest neuron input of spikingresformer_cifar's first stage)"),
        neuron_reps=(20, "timed neuron-alone calls"),
        loop_baseline=(False, "also time our model with the fused LIF off (LIF(fused=False), "
                       "the autograd loop) in the same run, and report the before/after ratio"),
        neurons=(list(BACKENDS), "neuron backends to time (without SpikingJelly installed e.g. "
                 "dassdp dassdp-loop)", {"choices": ALL_BACKENDS}),
        amp=("none", "precision", {"choices": H.AMP_CHOICES}),
    )  # fmt: skip
    H.add_run_arguments(parser)
    H.add_output_arguments(parser, "throughput")


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    names = ("batch", "size", "T", "reps", "warmup", "threads", "neuron_channels", "neuron_reps")
    H.check_positive(args, *names)
    neurons = _backends(tuple(args.neurons), args.loop_baseline)
    if "spikingjelly" in neurons:
        try:
            spikingjelly_lif()
        except RuntimeError as err:
            print(f"dassdp bench throughput: {err}", file=sys.stderr)
            return 3
    device = str(H.device_of(args.device))
    torch.set_num_threads(args.threads)
    load_before = H.load_average()
    rows = [r for batch in args.batch for r in _batch_rows(args, batch, device)]
    version = spikingjelly_version()
    return H.save(
        args, "throughput", rows, lambda facts: markdown(rows, facts, version), device=device,
        load_before=load_before,
    )  # fmt: skip


def _batch_rows(args: argparse.Namespace, batch: int, device: str) -> list[dict[str, Any]]:
    """The rows of one batch size: whole steps, then the neuron alone (printed as they come)."""
    print(f"{args.model}: batch {batch}, {args.size}x{args.size}, T={args.T}", flush=True)
    got = bench_throughput(
        args.model, batch=batch, size=args.size, T=args.T, reps=args.reps,
        warmup=args.warmup, device=device, seed=args.seed,
        log=lambda s: print(s, flush=True), loop_baseline=args.loop_baseline,
        neurons=tuple(args.neurons), amp=args.amp,
    )  # fmt: skip
    shape = (args.T, batch, args.neuron_channels, args.size, args.size)
    lif = bench_neuron(
        shape, reps=args.neuron_reps, device=device, seed=args.seed,
        loop_baseline=args.loop_baseline, neurons=tuple(args.neurons),
    )  # fmt: skip
    both = "spikingjelly" in lif and "dassdp" in lif
    for r in got:
        r["lif_op_shape"] = "x".join(str(d) for d in shape)
        r["lif_op_ms"] = round(lif[r["backend"]], 3)
        r["lif_op_ratio"] = round(lif["spikingjelly"] / lif["dassdp"], 3) if both else ""
        print(
            f"batch {batch:<4} {r['backend']:<12} LIF op {r['lif_op_ms']:8.2f} ms  "
            f"{r['images_per_s']:8.2f} images/s  ratio ours/SJ {_f3(r['ratio_ours_over_sj'])}  "
            f"{r['kernels_per_step']} kernels/step  peak {r['peak_mem_mib']:.0f} MiB  "
            f"logit diff {r['first_logits_max_abs_diff']}",
            flush=True,
        )
    if args.loop_baseline and got[0]["loop_ratio_over_sj"] != "":
        print(
            f"batch {batch:<4} before/after: ours/SJ {got[0]['loop_ratio_over_sj']:.3f} "
            f"(loop) -> {got[0]['ratio_ours_over_sj']:.3f} (fused), fused/loop "
            f"{got[0]['speedup_fused_over_loop']:.3f}x",
            flush=True,
        )
    return got
