"""``dassdp bench overhead``: what DA-SSDP adds to one training step of a model.

One training step = forward on a random batch ``[B, C, H, W]`` (repeated over ``T``),
cross-entropy, ``zero_grad``, backward, AdamW step, [``plast.step(loss)``], ``dassdp.reset``.
Three conditions, each on its own copy of the same initial model:

* ``off``: no learner attached (the baseline);
* ``warmup``: a learner in its warm-up epoch (recorder hooks + gate statistics);
* ``active``: a learner after warm-up (hooks + gate + dW at every site, applied).

The conditions run interleaved (one step of each per round, rotating the order) so that a
change in the machine's load hits all three alike. Reported per condition: the median step
time over the timed rounds (after ``--warmup`` untimed rounds), the overhead
``(median - median_off) / median_off``, and DA-SSDP's own time: ``plast.step`` and the
recorder's forward hooks (timed by wrapping the recorder's hook class for the run), as a
share of the ``off`` step. On a busy CPU the step times are seconds with noise of several
percent, so the difference of two medians cannot resolve a fraction of a percent; the own
time is the precise measure and both are reported.

The ``active`` learner records during the warm-up rounds (epoch 0), then moves to epoch 1 and
fits its gate from them (one round: every record has the same loss, so the fit falls back to
``G = 1`` with a warning; the cost of computing and applying the update is the same).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dassdp.bench.report import add_output_arguments, add_run_arguments, provenance

HELP = "training-step overhead of DA-SSDP (warm-up and active) on spikingresformer_cifar"

CONDITIONS = ("off", "warmup", "active")
TARGETS = {"warmup": 0.5, "active": 2.0}  # maximum overhead, percent of the plain step


@contextlib.contextmanager
def _timed_recorder_hooks(acc: dict[int, float], device: Any) -> Iterator[bool]:
    """Time every call of the DA-SSDP recorder's forward hooks, summed per recorder in ``acc``
    (keyed by ``id(recorder)``). Wraps the recorder's hook class for the duration only; yields
    False (and times nothing) if that class is not found."""
    from dassdp.bench.timing import sync
    from dassdp.plasticity import recorder as rec

    cls = getattr(rec, "_SourceHook", None)
    if cls is None or "__call__" not in vars(cls):
        yield False
        return
    original = cls.__call__

    def timed_call(self: Any, x: object) -> None:
        sync(device)
        start = time.perf_counter()
        original(self, x)
        sync(device)
        key = id(self.recorder)
        acc[key] = acc.get(key, 0.0) + time.perf_counter() - start

    cls.__call__ = timed_call
    try:
        yield True
    finally:
        cls.__call__ = original


def _train_step(
    model: Any, opt: Any, plast: Any, x: Any, y: Any, device: Any
) -> tuple[float, float]:
    """One training step; returns ``(step seconds, plast.step seconds)`` (0 without a learner).

    On CUDA the step is timed with CUDA events and nothing inside it synchronises (the
    learner's own device time comes from :func:`_profile_own` instead: ``nan`` here)."""
    import torch
    import torch.nn.functional as F

    import dassdp
    from dassdp.bench.timing import sync

    sync(device)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if plast is not None:
            plast.step(loss.detach())
        dassdp.reset(model)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, float("nan") if plast is not None else 0.0
    start_s = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    plast_s = 0.0
    if plast is not None:
        sync(device)
        t0 = time.perf_counter()
        plast.step(loss)
        sync(device)
        plast_s = time.perf_counter() - t0
    dassdp.reset(model)
    sync(device)
    return time.perf_counter() - start_s, plast_s


def _profile_own(run: dict[str, Any], x: Any, y: Any, device: Any) -> dict[str, float]:
    """CUDA: one more step under the profiler; the device milliseconds of the kernels launched
    inside ``plast.step`` and inside the recorder's forward hooks (``record_function`` ranges,
    no synchronisation added), and the step's peak allocated memory."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile, record_function

    import dassdp
    from dassdp.bench.devstats import peak_memory_mib, range_device_ms, reset_peak_memory
    from dassdp.plasticity import recorder as rec

    model, opt, plast = run["model"], run["opt"], run["plast"]
    cls = rec._SourceHook
    original = cls.__call__

    def ranged(self: Any, tensor: object) -> None:
        with record_function("dassdp.hooks"):
            original(self, tensor)

    reset_peak_memory(device)
    cls.__call__ = ranged
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if plast is not None:
                with record_function("dassdp.step"):
                    plast.step(loss.detach())
            dassdp.reset(model)
            torch.cuda.synchronize(device)
    finally:
        cls.__call__ = original
    ms = range_device_ms(prof, ("dassdp.step", "dassdp.hooks"))
    return {"plast_ms": ms["dassdp.step"], "hooks_ms": ms["dassdp.hooks"],
            "peak_mib": peak_memory_mib(device)}  # fmt: skip


def bench_batch(
    model_name: str = "spikingresformer_cifar",
    *,
    batch: int = 8,
    size: int = 32,
    T: int = 4,
    reps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
    log: Any = None,
) -> list[dict[str, Any]]:
    """Measure the three conditions at one batch size; returns one row per condition."""
    import torch

    from dassdp import DASSDP, DASSDPConfig, create_model
    from dassdp.bench.timing import median

    if warmup < 1 or reps < 1:
        raise ValueError("overhead needs >= 1 warm-up round (the active learner records in it)")
    dev = torch.device(device)
    torch.manual_seed(seed)
    base = create_model(model_name, num_classes=10, T=T).to(dev).train()
    in_ch = _in_channels(base)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, in_ch, size, size, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)

    runs: dict[str, dict[str, Any]] = {}
    for cond in CONDITIONS:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
        plast = None
        if cond != "off":
            plast = DASSDP(model, DASSDPConfig(warmup_epochs=1))
            plast.set_epoch(0)
        runs[cond] = {
            "model": model, "opt": opt, "plast": plast, "step": [], "plast_s": [], "hooks_s": [],
        }  # fmt: skip
    del base

    cuda = dev.type == "cuda"
    hook_s: dict[int, float] = {}
    for r in range(warmup + reps):
        order = CONDITIONS[r % 3 :] + CONDITIONS[: r % 3]  # rotate who goes first
        for cond in order:
            run = runs[cond]
            key = id(run["plast"].recorder) if run["plast"] is not None else 0
            hook_s[key] = 0.0
            hooks = _timed_recorder_hooks(hook_s, dev) if not cuda else contextlib.nullcontext()
            with hooks as hooks_timed:
                step_s, plast_s = _train_step(run["model"], run["opt"], run["plast"], x, y, dev)
            if r >= warmup:
                run["step"].append(step_s)
                run["plast_s"].append(plast_s)
                run["hooks_s"].append(hook_s[key] if hooks_timed else float("nan"))
            if log:
                tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{reps}"
                log(
                    f"  batch {batch} {tag:<11} {cond:<7} step {step_s:8.3f} s  plast.step "
                    f"{plast_s * 1e3:8.2f} ms  hooks {hook_s[key] * 1e3:7.2f} ms"
                )
        if r == warmup - 1:  # the active learner has recorded: leave warm-up, fit the gate
            _leave_warmup(runs["active"]["plast"])

    if cuda:  # the learner's own kernels, from the profiler (no sync in the timed steps)
        for cond in CONDITIONS:
            own = _profile_own(runs[cond], x, y, dev)
            runs[cond]["plast_s"] = [own["plast_ms"] / 1e3]
            runs[cond]["hooks_s"] = [own["hooks_ms"] / 1e3]
            runs[cond]["peak_mib"] = own["peak_mib"]
    off = median(runs["off"]["step"])
    rows = []
    for cond in CONDITIONS:
        run = runs[cond]
        step = median(run["step"])
        plast_ms = median(run["plast_s"]) * 1e3
        hooks_ms = median(run["hooks_s"]) * 1e3
        own_ms = median([a + b for a, b in zip(run["plast_s"], run["hooks_s"])]) * 1e3
        overhead = 100.0 * (step - off) / off
        direct = 100.0 * (plast_ms / 1e3) / off
        own = 100.0 * (own_ms / 1e3) / off
        counters = run["plast"].counters if run["plast"] is not None else {}
        row = {
            "model": model_name,
            "batch": batch,
            "input": f"{in_ch}x{size}x{size}",
            "T": T,
            "device": device,
            "condition": cond,
            "reps": reps,
            "step_s": round(step, 4),
            "step_s_min": round(min(run["step"]), 4),
            "step_s_max": round(max(run["step"]), 4),
            "overhead_pct": round(overhead, 2),
            "plast_step_ms": round(plast_ms, 3),
            "plast_step_pct": round(direct, 4),
            "hooks_ms": round(hooks_ms, 3),
            "own_ms": round(own_ms, 3),
            "own_pct": round(own, 4),
            "applied": counters.get("applied", 0),
            "cuda_peak_mib": round(run["peak_mib"], 1) if "peak_mib" in run else "",
            "target_pct": TARGETS.get(cond, ""),
            "met_by_step_diff": _met(cond, overhead),
            "met_by_plast_step": _met(cond, direct),
            "met_by_own_time": _met(cond, own),
        }
        rows.append(row)
    return rows


def _leave_warmup(plast: Any) -> None:
    """Move the ``active`` learner past warm-up and fit its gate now (not inside a timed step)."""
    plast.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one round of records: degenerate fit, G = 1
        plast.fit()


def _met(cond: str, pct: float) -> str:
    if cond not in TARGETS:
        return ""
    return "yes" if pct <= TARGETS[cond] else "no"


def _in_channels(model: Any) -> int:
    """Input channels of the model's first conv (3 for the CIFAR models)."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 3


def markdown(
    rows: list[dict[str, Any]], env: dict[str, Any], csv_path: Path, load: tuple[str, str]
) -> str:
    """The ``## overhead`` section body."""
    lines = [
        "One training step of the model (forward, cross-entropy, backward, AdamW step,",
        "`plast.step(loss)`, `dassdp.reset`) on a random batch, without a learner (`off`), with",
        "DA-SSDP in warm-up (`warmup`: hooks + gate statistics) and after warm-up (`active`:",
        "hooks + dW at the classifier and W_proj sites, applied). The three run interleaved on",
        "copies of one initial model; times are medians of the timed rounds after the warm-up",
        "round. *overhead* = (median step - median `off` step) / median `off` step: on a",
        "shared CPU with steps of seconds its noise (see min-max) is far above the targets.",
        "*own share* = DA-SSDP's own time (`plast.step` + the recorder's forward hooks, each",
        "timed directly) / median `off` step: the precise measure. On CUDA the step is timed",
        "with CUDA events and nothing inside it synchronises; DA-SSDP's own time is then the",
        "device time of the kernels launched inside `plast.step` and the recorder hooks",
        "(`torch.profiler` `record_function` ranges, one extra step per condition), and the",
        "CSV's `cuda_peak_mib` is that step's `torch.cuda.max_memory_allocated`.",
        "",
        "- targets: <= 0.5 % in warm-up, <= 2 % after warm-up",
        *provenance(env, csv_path, load),
        "",
        "| model | batch | input | T | condition | step s (median) | min-max s | overhead "
        "| plast.step ms | hooks ms | own share | target | met (overhead / own share) |",
        "|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        target = f"<= {r['target_pct']} %" if r["target_pct"] != "" else ""
        met = f"{r['met_by_step_diff']} / {r['met_by_own_time']}" if target else ""
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['input']} | {r['T']} | {r['condition']} | "
            f"{r['step_s']:.3f} | {r['step_s_min']:.3f}-{r['step_s_max']:.3f} | "
            f"{r['overhead_pct']:+.2f} % | {r['plast_step_ms']:.2f} | {r['hooks_ms']:.2f} | "
            f"{r['own_pct']:.3f} % | {target} | {met} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="spikingresformer_cifar",
        help="registered model with DA-SSDP sites (default spikingresformer_cifar)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[32, 128],
        help="batch sizes (default 32 128; on a small CPU use e.g. 8 16)",
    )
    parser.add_argument("--size", type=int, default=32, help="input height = width (default 32)")
    parser.add_argument("--T", type=int, default=4, help="time steps (default 4)")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    add_run_arguments(parser, "seed of weights and inputs")
    add_output_arguments(parser, "overhead", per_device=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from dassdp.bench.report import environment, write_csv, write_section
    from dassdp.bench.timing import default_csv, device_of, load_average, section_name

    if min([*args.batch, args.size, args.T, args.reps, args.threads, args.warmup]) < 1:
        raise ValueError("--batch, --size, --T, --reps, --warmup and --threads must be >= 1")
    device = str(device_of(args.device))
    out = args.out if args.out is not None else default_csv("overhead", device)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    rows: list[dict[str, Any]] = []
    for batch in args.batch:
        print(f"{args.model}: batch {batch}, {args.size}x{args.size}, T={args.T}", flush=True)
        got = bench_batch(
            args.model, batch=batch, size=args.size, T=args.T, reps=args.reps,
            warmup=args.warmup, device=device, seed=args.seed,
            log=lambda s: print(s, flush=True),
        )  # fmt: skip
        for r in got:
            print(
                f"batch {batch:<4} {r['condition']:<7} step {r['step_s']:.3f} s "
                f"overhead {r['overhead_pct']:+.2f} %  plast.step {r['plast_step_ms']:.2f} ms "
                f"+ hooks {r['hooks_ms']:.2f} ms = {r['own_pct']:.3f} % of the off step",
                flush=True,
            )
        rows += got
    write_csv(out, rows)
    section = markdown(rows, environment(), out, (load_before, load_average()))
    write_section(args, section_name("overhead", device), section, out)
    return 0
