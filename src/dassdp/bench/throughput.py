"""``dassdp bench throughput``: training images/s of our model against SpikingJelly neurons.

The same architecture is built twice through the model's injectable ``neuron_layer``:

* ``dassdp``: our multi-step :class:`dassdp.neurons.LIF` (the default);
* ``spikingjelly``: ``spikingjelly.activation_based.neuron.LIFNode(tau=2., v_threshold=1.,
  v_reset=0., detach_reset=True, step_mode='m', surrogate_function=surrogate.ATan())``, the
  same neuron (tau 2, threshold 1, hard reset to 0, ATan surrogate with alpha 2, detached
  reset, decayed input) from SpikingJelly 2.0.

Both copies start from the same weights (the neurons have no parameters) and see the same
random batch. One training step = the engine's (:func:`dassdp.engine.step.train_step`:
forward, cross-entropy, backward, AdamW step, ``dassdp.reset``, which calls SpikingJelly's
``reset()`` on its stateful neurons, and the loss meter). The two run interleaved
(alternating who goes first) after untimed warm-up steps; images/s = batch / median step
time, and the ratio is ours / SpikingJelly's (target >= 1.0). As a check that the two are
the same network, the logits of the first (untimed) forward are compared.

With ``--loop-baseline`` a third copy, ``dassdp-loop``, runs our LIF with the fused kernel
off (``LIF(fused=False)``: the autograd loop over time steps, the LIF before the fused
kernel), interleaved with the other two, so the before/after ratio comes from one run.

SpikingJelly is not a dependency of dassdp. Install it for this benchmark only::

    pip install --no-deps spikingjelly==2.0.0 'loguru>=0.7,<1'
"""

from __future__ import annotations

import argparse
import copy
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

    def make() -> Any:
        return neuron.LIFNode(
            tau=2.0,
            v_threshold=1.0,
            v_reset=0.0,
            detach_reset=True,
            step_mode="m",
            surrogate_function=surrogate.ATan(),
        )

    return make


def spikingjelly_version() -> str:
    """The installed SpikingJelly version (``"absent"`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spikingjelly")
    except PackageNotFoundError:
        return "absent"


def build(model_name: str, backend: str, *, T: int, seed: int, device: Any) -> Any:
    """Model ``model_name`` with our neurons or SpikingJelly's, weights seeded by ``seed``."""
    import torch

    from dassdp import create_model

    kwargs: dict[str, Any] = {"num_classes": 10, "T": T}
    if backend == "spikingjelly":
        kwargs["neuron_layer"] = spikingjelly_lif()
    elif backend == LOOP_BACKEND:
        kwargs["neuron_layer"] = lif_factory("loop")
    elif backend == TORCH_BACKEND:
        kwargs["neuron_layer"] = lif_factory("torch")
    elif backend != "dassdp":
        raise ValueError(f"backend must be one of {ALL_BACKENDS}, got {backend!r}")
    torch.manual_seed(seed)
    return create_model(model_name, **kwargs).to(device).train()


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
    times: dict[str, list[float]] = {b: [] for b in backends}
    logits: dict[str, Any] = {}
    for r in range(warmup + reps):
        for b in backends if r % 2 == 0 else backends[::-1]:
            sec, out = H.timed(lambda b=b: steps[b](x, y), dev)
            if r == 0:
                logits[b] = out.logits.float().cpu()
            if r >= warmup:
                times[b].append(sec)
            if log:
                tag = "warm-up" if r < warmup else f"step {r - warmup + 1}/{reps}"
                log(f"  batch {batch} {tag:<9} {b:<12} {sec:8.3f} s")
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

    from dassdp.neurons import LIF

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = (1.5 * torch.randn(shape, generator=gen)).to(dev).requires_grad_(True)
    grad = torch.randn(shape, generator=gen).to(dev)
    backends = _backends(tuple(neurons), loop_baseline)
    makers: dict[str, Callable[[], Any]] = {
        "dassdp": LIF,
        "spikingjelly": lambda: spikingjelly_lif()(),
        LOOP_BACKEND: lif_factory("loop"),
        TORCH_BACKEND: lif_factory("torch"),
    }
    layers = {b: makers[b]() for b in backends}
    times: dict[str, list[float]] = {b: [] for b in backends}

    def call(neuron: Any) -> None:
        out = neuron(x)
        out.backward(grad)
        x.grad = None
        if hasattr(neuron, "reset"):
            neuron.reset()

    for r in range(warmup + reps):
        for b in backends if r % 2 == 0 else backends[::-1]:
            sec, _ = H.timed(lambda b=b: call(layers[b]), dev)
            if r >= warmup:
                times[b].append(sec)
    return {b: H.median(times[b]) * 1e3 for b in backends}


def markdown(rows: list[dict[str, Any]], facts: list[str], sj_version: str) -> str:
    """The ``## throughput`` section body."""
    kernel_note = rows[0]["kernel_unit"] if rows else ""
    mem_note = rows[0]["mem_kind"] if rows else ""
    lines = [
        "Training images/s of the same architecture with our multi-step LIF and with",
        f"SpikingJelly {sj_version}'s `LIFNode(tau=2., v_threshold=1., v_reset=0., "
        "detach_reset=True, step_mode='m', surrogate_function=surrogate.ATan())`, injected",
        "through the model's `neuron_layer`. One step = the engine's (forward, cross-entropy,",
        "backward, AdamW step, `dassdp.reset`); same weights and batch; the two interleaved;",
        "images/s = batch /",
        "median step time over the timed steps after the warm-up step(s). *ratio* = ours /",
        "SpikingJelly's (target >= 1.0). *logit diff*: max |difference| of the two models'",
        "first-step logits (same network: 0 up to float rounding). *ratio by min step*: the",
        "same ratio from the fastest step of each (less sensitive to other jobs' load).",
        "*LIF op*: the neuron alone, forward + backward on `[T, B, C, H, W]` (shape in the CSV;",
        "C = 256, the widest neuron input of the first stage), median of 20 interleaved calls;",
        "*LIF op ratio* = SpikingJelly ms / ours (> 1: ours faster). Our LIF runs the fused",
        "multi-step kernel (`lif_multistep_fused`); `dassdp-loop` rows (`--loop-baseline`) are",
        "the same model with `LIF(fused=False)`, the autograd loop over time steps that was our",
        "LIF before it, timed in the same interleaved run (*ratio* columns stay fused / SJ).",
        "SpikingJelly is installed for this benchmark only (`pip install --no-deps",
        "spikingjelly==2.0.0 'loguru>=0.7,<1'`); it is not a dependency of dassdp; without it",
        "run `--neurons dassdp dassdp-loop` (no ratio columns). *amp*: `none` = float32,",
        "`bf16`/`fp16` = forward and loss under autocast (fp16 with a grad scaler).",
        f"*kernels / step*: {kernel_note} in one training step. *peak MiB*:",
        f"{mem_note} of one training step.",
        "",
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
    parser.add_argument(
        "--model",
        default="spikingresformer_cifar",
        help="registered model taking neuron_layer= (default spikingresformer_cifar)",
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="batch sizes (default 8)")
    parser.add_argument("--size", type=int, default=32, help="input height = width (default 32)")
    parser.add_argument("--T", type=int, default=4, help="time steps (default 4)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per backend (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument(
        "--neuron-channels",
        type=int,
        default=256,
        help="channels C of the neuron-alone timing on [T, B, C, size, size] (default 256, "
        "the widest neuron input of spikingresformer_cifar's first stage)",
    )
    parser.add_argument(
        "--neuron-reps", type=int, default=20, help="timed neuron-alone calls (default 20)"
    )
    parser.add_argument(
        "--loop-baseline",
        action="store_true",
        help="also time our model with the fused LIF off (LIF(fused=False), the autograd loop) "
        "in the same interleaved run, and report the before/after ratio",
    )
    parser.add_argument(
        "--neurons",
        nargs="+",
        choices=ALL_BACKENDS,
        default=list(BACKENDS),
        help="neuron backends to time (default dassdp spikingjelly; without SpikingJelly "
        "installed e.g. dassdp dassdp-loop)",
    )
    parser.add_argument(
        "--amp", choices=H.AMP_CHOICES, default="none", help="precision: none, fp16 or bf16"
    )
    H.add_run_arguments(parser, "seed of weights and inputs")
    H.add_output_arguments(parser, "throughput", per_device=True)


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
