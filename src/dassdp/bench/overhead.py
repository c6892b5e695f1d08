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

On CUDA nothing inside a step synchronises: each step is timed with CUDA events (one
synchronisation per round, after the three steps), DA-SSDP's own time is the device time of
the kernels launched inside ``plast.step`` and the recorder's hooks (``record_function``
ranges read by ``torch.profiler`` in ``--profile-steps`` extra steps per condition), and the
peak memory of one more step per condition is ``torch.cuda.max_memory_allocated`` (on the
CPU: the process's peak RSS, all three models resident). ``--amp fp16|bf16`` runs forward
and loss under autocast (fp16 with a grad scaler whose skip reaches ``plast.step`` as
``optimizer_stepped``, a device tensor).

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

from dassdp.bench.devstats import AMP_CHOICES
from dassdp.bench.report import add_output_arguments, add_run_arguments, provenance

HELP = "training-step overhead of DA-SSDP (warm-up and active) on spikingresformer_cifar"

CONDITIONS = ("off", "warmup", "active")
TARGETS = {"warmup": 0.5, "active": 2.0}  # maximum overhead, percent of the plain step


PLAST_RANGE, HOOK_RANGE = "dassdp::plast.step", "dassdp::recorder_hook"


@contextlib.contextmanager
def _timed_recorder_hooks(acc: dict[int, float], device: Any) -> Iterator[bool]:
    """Time every call of the DA-SSDP recorder's forward hooks, summed per recorder in ``acc``
    (keyed by ``id(recorder)``). Wraps the recorder's hook class for the duration only; yields
    False (and times nothing) if that class is not found. On CUDA nothing is synchronised:
    each call runs inside a ``record_function`` range (:data:`HOOK_RANGE`) whose kernels'
    device time a profiled step reads (``acc`` stays untouched)."""
    import torch

    from dassdp.bench.timing import sync
    from dassdp.plasticity import recorder as rec

    cls = getattr(rec, "_SourceHook", None)
    if cls is None or "__call__" not in vars(cls):
        yield False
        return
    original = cls.__call__
    cuda = torch.device(device).type == "cuda"

    def timed_call(self: Any, x: object) -> None:
        if cuda:
            with torch.profiler.record_function(HOOK_RANGE):
                original(self, x)
            return
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


def _train_step(run: dict[str, Any], x: Any, y: Any, device: Any, amp: str = "none") -> Any:
    """One training step of ``run`` (model, opt, plast, scaler). On the CPU returns ``(step
    seconds, plast.step seconds)``; on CUDA a pair of recorded CUDA events around the step
    (nothing synchronised; ``plast.step`` runs in a :data:`PLAST_RANGE` range)."""
    import torch
    import torch.nn.functional as F

    import dassdp
    from dassdp.bench.devstats import autocast
    from dassdp.bench.timing import sync
    from dassdp.engine.precision import optimizer_stepped

    model, opt, plast, scaler = run["model"], run["opt"], run["plast"], run["scaler"]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        start_ev = torch.cuda.Event(enable_timing=True)
        end_ev = torch.cuda.Event(enable_timing=True)
        start_ev.record()
    else:
        sync(device)
        start = time.perf_counter()
    with autocast(device, amp):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    stepped: Any = True
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        stepped = optimizer_stepped(scaler, opt)  # a device tensor: no host read
        scaler.update()
    else:
        loss.backward()
        opt.step()
    plast_s = 0.0
    if plast is not None:
        if cuda:
            with torch.profiler.record_function(PLAST_RANGE):
                plast.step(loss.detach(), optimizer_stepped=stepped)
        else:
            t0 = time.perf_counter()
            plast.step(loss.detach(), optimizer_stepped=stepped)
            plast_s = time.perf_counter() - t0
    dassdp.reset(model)
    if cuda:
        end_ev.record()
        return start_ev, end_ev
    return time.perf_counter() - start, plast_s


def _profiled_own_ms(run: dict[str, Any], x: Any, y: Any, device: Any, amp: str, steps: int):  # type: ignore[no-untyped-def]
    """CUDA: device milliseconds per step of the kernels launched inside ``plast.step`` and
    the recorder's hooks, from ``steps`` profiled steps; returns ``(plast_ms, hooks_ms)``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dassdp.bench.devstats import range_device_ms

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            _train_step(run, x, y, device, amp)
        torch.cuda.synchronize(device)
    ms = range_device_ms(prof, (PLAST_RANGE, HOOK_RANGE))
    return ms[PLAST_RANGE] / steps, ms[HOOK_RANGE] / steps


def bench_batch(  # noqa: C901
    model_name: str = "spikingresformer_cifar",
    *,
    batch: int = 8,
    size: int = 32,
    T: int = 4,
    reps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
    amp: str = "none",
    profile_steps: int = 2,
    log: Any = None,
) -> list[dict[str, Any]]:
    """Measure the three conditions at one batch size; returns one row per condition."""
    import torch

    from dassdp import DASSDP, DASSDPConfig, create_model
    from dassdp.bench.devstats import grad_scaler, memory_kind, peak_memory_mib, reset_peak_memory
    from dassdp.bench.timing import median

    if warmup < 1 or reps < 1:
        raise ValueError("overhead needs >= 1 warm-up round (the active learner records in it)")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
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
            "model": model, "opt": opt, "plast": plast, "scaler": grad_scaler(dev, amp),
            "step": [], "plast_s": [], "hooks_s": [],
        }  # fmt: skip
    del base

    hook_s: dict[int, float] = {}
    for r in range(warmup + reps):
        order = CONDITIONS[r % 3 :] + CONDITIONS[: r % 3]  # rotate who goes first
        events = {}
        for cond in order:
            run = runs[cond]
            key = id(run["plast"].recorder) if run["plast"] is not None else 0
            hook_s[key] = 0.0
            with _timed_recorder_hooks(hook_s, dev) as hooks_timed:
                got = _train_step(run, x, y, dev, amp)
            if cuda:
                events[cond] = got
                continue
            step_s, plast_s = got
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
        if cuda:  # one synchronisation per round, after all three steps
            torch.cuda.synchronize(dev)
            for cond in order:
                step_s = events[cond][0].elapsed_time(events[cond][1]) / 1e3
                if r >= warmup:
                    runs[cond]["step"].append(step_s)
                if log:
                    tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{reps}"
                    log(f"  batch {batch} {tag:<11} {cond:<7} step {step_s:8.4f} s (CUDA events)")
        if r == warmup - 1:  # the active learner has recorded: leave warm-up, fit the gate
            _leave_warmup(runs["active"]["plast"])

    applied = {c: r["plast"].counters["applied"] if r["plast"] else 0 for c, r in runs.items()}
    if cuda:  # DA-SSDP's own kernel time from profiled steps (not the timed ones)
        for cond in CONDITIONS:
            run = runs[cond]
            if run["plast"] is None:
                run["plast_s"], run["hooks_s"] = [0.0], [0.0]
                continue
            with _timed_recorder_hooks(hook_s, dev):
                plast_ms, hooks_ms = _profiled_own_ms(run, x, y, dev, amp, profile_steps)
            run["plast_s"], run["hooks_s"] = [plast_ms / 1e3], [hooks_ms / 1e3]
            if log:
                log(f"  batch {batch} profiled {cond:<7} plast.step {plast_ms:.3f} ms "
                    f"hooks {hooks_ms:.3f} ms (device time)")  # fmt: skip
    peaks = {}
    for cond in CONDITIONS:  # peak memory of one more step per condition
        reset_peak_memory(dev)
        _train_step(runs[cond], x, y, dev, amp)
        peaks[cond] = peak_memory_mib(dev)

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
        row = {
            "model": model_name,
            "batch": batch,
            "input": f"{in_ch}x{size}x{size}",
            "T": T,
            "device": device,
            "amp": amp,
            "condition": cond,
            "reps": reps,
            "step_s": round(step, 5 if cuda else 4),
            "step_s_min": round(min(run["step"]), 5 if cuda else 4),
            "step_s_max": round(max(run["step"]), 5 if cuda else 4),
            "overhead_pct": round(overhead, 2),
            "plast_step_ms": round(plast_ms, 3),
            "plast_step_pct": round(direct, 4),
            "hooks_ms": round(hooks_ms, 3),
            "own_ms": round(own_ms, 3),
            "own_pct": round(own, 4),
            "own_time": "profiler device time" if cuda else "host wall time",
            "applied": applied[cond],
            "peak_mem_mib": round(peaks[cond], 1),
            "mem_kind": memory_kind(dev),
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
        "with CUDA events and the own time is the device time of the kernels launched in",
        "`plast.step` and the hooks (profiler, `record_function` ranges; no sync added).",
        "*peak MiB*: `max_memory_allocated` of one step on CUDA; process peak RSS on the CPU.",
        "",
        "- targets: <= 0.5 % in warm-up, <= 2 % after warm-up",
        *provenance(env, csv_path, load),
        "",
        "| model | batch | input | T | amp | condition | step s (median) | min-max s | overhead "
        "| plast.step ms | hooks ms | own share | peak MiB | target | met (overhead / own share) |",
        "|---|---:|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        target = f"<= {r['target_pct']} %" if r["target_pct"] != "" else ""
        met = f"{r['met_by_step_diff']} / {r['met_by_own_time']}" if target else ""
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['input']} | {r['T']} | {r['amp']} | "
            f"{r['condition']} | {r['step_s']:.4f} | {r['step_s_min']:.4f}-{r['step_s_max']:.4f} | "
            f"{r['overhead_pct']:+.2f} % | {r['plast_step_ms']:.2f} | {r['hooks_ms']:.2f} | "
            f"{r['own_pct']:.3f} % | {r['peak_mem_mib']:.0f} | {target} | {met} |"
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
    parser.add_argument(
        "--amp", choices=AMP_CHOICES, default="none", help="precision: none, fp16 or bf16"
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=2,
        help="CUDA: profiled steps per condition for DA-SSDP's own device time (default 2)",
    )
    add_run_arguments(parser, "seed of weights and inputs")
    add_output_arguments(parser, "overhead", per_device=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from dassdp.bench.report import environment, write_csv, write_section
    from dassdp.bench.timing import default_csv, device_of, load_average, section_name

    sizes = [*args.batch, args.size, args.T, args.reps, args.threads, args.warmup]
    if min([*sizes, args.profile_steps]) < 1:
        raise ValueError(
            "--batch, --size, --T, --reps, --warmup, --threads and --profile-steps must be >= 1"
        )
    device = str(device_of(args.device))
    out = args.out if args.out is not None else default_csv("overhead", device)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    rows: list[dict[str, Any]] = []
    for batch in args.batch:
        print(f"{args.model}: batch {batch}, {args.size}x{args.size}, T={args.T}", flush=True)
        got = bench_batch(
            args.model, batch=batch, size=args.size, T=args.T, reps=args.reps,
            warmup=args.warmup, device=device, seed=args.seed, amp=args.amp,
            profile_steps=args.profile_steps, log=lambda s: print(s, flush=True),
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
