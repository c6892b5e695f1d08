"""``dassdp bench overhead``: what DA-SSDP adds to one training step of a model.

One training step = the engine's (:func:`dassdp.engine.step.train_step`: forward on a random
batch ``[B, C, H, W]`` repeated over ``T``, cross-entropy, backward, AdamW step,
``DASSDP.step``, ``dassdp.reset``, meters). Three conditions, each on its own copy of the same
initial model:

* ``off``: no learner attached (the baseline);
* ``warmup``: a learner in its warm-up epoch (recorder hooks + gate statistics);
* ``active``: a learner after warm-up (hooks + gate + dW at every site, applied).

The conditions run interleaved (one step of each per round, rotating the order) so that a
change in the machine's load hits all three alike. Reported per condition: the median step
time over the timed rounds (after ``--warmup`` untimed rounds), the overhead
``(median - median_off) / median_off``, and DA-SSDP's own time: ``DASSDP.step`` and the
recorder's forward hooks (timed by wrapping them for the step), as a share of the ``off``
step. On a busy CPU the step times are seconds with noise of several percent, so the
difference of two medians cannot resolve a fraction of a percent; the own time is the
precise measure and both are reported.

On CUDA nothing inside a step synchronises: each step is timed with CUDA events (one
synchronisation per round), DA-SSDP's own time is the device time of the kernels launched
inside ``DASSDP.step`` and the hooks (``record_function`` ranges read by ``torch.profiler``
in ``--profile-steps`` extra steps per condition), and the peak memory of one more step per
condition is ``torch.cuda.max_memory_allocated`` (on the CPU: the process's peak RSS, all
three models resident). The ``active`` learner records during the warm-up rounds, then
leaves warm-up and fits its gate from them (a degenerate fit, ``G = 1``; the cost of
computing and applying the update is the same).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from typing import Any

from dassdp.bench import harness as H

HELP = "training-step overhead of DA-SSDP (warm-up and active) on spikingresformer_cifar"

CONDITIONS = ("off", "warmup", "active")
TARGETS = {"warmup": 0.5, "active": 2.0}  # maximum overhead, percent of the plain step
PLAST_RANGE, HOOK_RANGE = "dassdp::plast.step", "dassdp::recorder_hook"


class _Condition:
    """One condition: its model copy, learner and engine step, and the times measured."""

    def __init__(self, name: str, base: Any, device: Any, amp: str) -> None:
        from dassdp import DASSDP, DASSDPConfig

        self.name, self.device = name, device
        self.cuda = device.type == "cuda"
        self.model = copy.deepcopy(base)
        self.plast = None
        if name != "off":
            self.plast = DASSDP(self.model, DASSDPConfig(warmup_epochs=1))
            self.plast.set_epoch(0)
        opt = H.adamw(self.model)
        self.step = H.engine_step(self.model, opt, device=device, amp=amp, learner=self.plast)
        self.times: dict[str, list[float]] = {"step": [], "plast": [], "hooks": []}
        self.applied = 0  # DA-SSDP updates applied by the end of the timed rounds

    def own_time(self, plast_s: list[float], hooks_s: list[float]) -> contextlib.ExitStack:
        """Time ``DASSDP.step`` and the recorder's hooks into the lists (CUDA: ranges)."""
        from dassdp.plasticity.recorder import _SourceHook

        stack = contextlib.ExitStack()
        if self.plast is not None:
            timed = H.timed_calls
            stack.enter_context(timed(self.plast, "step", plast_s, self.device, PLAST_RANGE))
            stack.enter_context(timed(_SourceHook, "__call__", hooks_s, self.device, HOOK_RANGE))
        return stack

    def run(self, x: Any, y: Any) -> tuple[Any, float, float]:
        """One step. CPU: ``(step s, DASSDP.step s, hooks s)``; CUDA: ``((start, end) CUDA
        events, 0, 0)`` with nothing synchronised."""
        import torch

        plast_s: list[float] = []
        hooks_s: list[float] = []
        with self.own_time(plast_s, hooks_s):
            if self.cuda:
                events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                events[0].record()
                self.step(x, y)
                events[1].record()
                return events, 0.0, 0.0
            sec, _ = H.timed(lambda: self.step(x, y), self.device)
        return sec, sum(plast_s), sum(hooks_s)

    def profiled_own_s(self, x: Any, y: Any, steps: int) -> None:
        """CUDA: DASSDP.step's and the hooks' device seconds per step from ``steps`` profiled
        steps (the timed steps stay unprofiled)."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        from dassdp.bench.counters import range_device_ms

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                self.run(x, y)
            torch.cuda.synchronize(self.device)
        ms = range_device_ms(prof, (PLAST_RANGE, HOOK_RANGE))
        self.times["plast"] = [ms[PLAST_RANGE] / steps / 1e3]
        self.times["hooks"] = [ms[HOOK_RANGE] / steps / 1e3]


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
    amp: str = "none",
    profile_steps: int = 2,
    log: Any = None,
) -> list[dict[str, Any]]:
    """Measure the three conditions at one batch size; returns one row per condition."""
    import torch

    from dassdp import create_model

    if warmup < 1 or reps < 1:
        raise ValueError("overhead needs >= 1 warm-up round (the active learner records in it)")
    dev = torch.device(device)
    torch.manual_seed(seed)
    base = create_model(model_name, num_classes=10, T=T).to(dev).train()
    in_ch = H.in_channels(base)
    x, y = H.random_batch((batch, in_ch, size, size), seed=seed, device=dev)
    runs = {c: _Condition(c, base, dev, amp) for c in CONDITIONS}
    del base
    for r in range(warmup + reps):
        order = CONDITIONS[r % 3 :] + CONDITIONS[: r % 3]  # rotate who goes first
        got = {c: runs[c].run(x, y) for c in order}
        if dev.type == "cuda":  # one synchronisation per round, after all three steps
            torch.cuda.synchronize(dev)
        tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{reps}"
        for c in order:
            step_s, plast_s, hooks_s = got[c]
            if dev.type == "cuda":
                step_s = step_s[0].elapsed_time(step_s[1]) / 1e3
            if r >= warmup:
                for key, value in zip(("step", "plast", "hooks"), (step_s, plast_s, hooks_s)):
                    runs[c].times[key].append(value)
            if log:
                log(f"  batch {batch} {tag:<11} {c:<7} step {step_s:8.4f} s  plast.step "
                    f"{plast_s * 1e3:8.2f} ms  hooks {hooks_s * 1e3:7.2f} ms")  # fmt: skip
        if r == warmup - 1:  # the active learner has recorded: leave warm-up, fit the gate
            H.leave_warmup(runs["active"].plast)
    for run in runs.values():  # the updates applied in the timed rounds
        run.applied = run.plast.counters["applied"] if run.plast is not None else 0
    if dev.type == "cuda":  # DA-SSDP's own kernel time from profiled steps
        for c in CONDITIONS[1:]:
            runs[c].profiled_own_s(x, y, profile_steps)
    peaks = {}
    for c in CONDITIONS:  # peak memory of one more step per condition
        H.reset_peak_memory(dev)
        runs[c].run(x, y)
        peaks[c] = H.peak_memory_mib(dev)
    setup = {"model": model_name, "batch": batch, "input": f"{in_ch}x{size}x{size}", "T": T,
             "device": device, "amp": amp}  # fmt: skip
    off = H.median(runs["off"].times["step"])
    return [_row(setup, runs[c], off, peaks[c], reps) for c in CONDITIONS]


def _row(setup: dict[str, Any], run: _Condition, off: float, peak: float, reps: int) -> dict:
    """The CSV row of one condition (times in the units of the column names)."""
    t = run.times
    step = H.median(t["step"])
    plast_ms, hooks_ms = H.median(t["plast"]) * 1e3, H.median(t["hooks"]) * 1e3
    own_ms = H.median([a + b for a, b in zip(t["plast"], t["hooks"])]) * 1e3
    overhead = 100.0 * (step - off) / off
    direct, own = 100.0 * plast_ms / 1e3 / off, 100.0 * own_ms / 1e3 / off
    digits = 5 if run.cuda else 4
    return {
        **setup,
        "condition": run.name,
        "reps": reps,
        "step_s": round(step, digits),
        "step_s_min": round(min(t["step"]), digits),
        "step_s_max": round(max(t["step"]), digits),
        "overhead_pct": round(overhead, 2),
        "plast_step_ms": round(plast_ms, 3),
        "plast_step_pct": round(direct, 4),
        "hooks_ms": round(hooks_ms, 3),
        "own_ms": round(own_ms, 3),
        "own_pct": round(own, 4),
        "own_time": "profiler device time" if run.cuda else "host wall time",
        "applied": run.applied,
        "peak_mem_mib": round(peak, 1),
        "mem_kind": H.memory_kind(run.device),
        "target_pct": TARGETS.get(run.name, ""),
        "met_by_step_diff": _met(run.name, overhead),
        "met_by_plast_step": _met(run.name, direct),
        "met_by_own_time": _met(run.name, own),
    }


def _met(cond: str, pct: float) -> str:
    if cond not in TARGETS:
        return ""
    return "yes" if pct <= TARGETS[cond] else "no"


def markdown(rows: list[dict[str, Any]], facts: list[str]) -> str:
    """The ``## overhead`` section body: the module docstring, the facts, the table."""
    lines = [
        *H.describe(__doc__),
        "",
        "- targets: <= 0.5 % in warm-up, <= 2 % after warm-up; *met*: by the overhead / by "
        "the own share",
        *facts,
        "",
        "| model | batch | input | T | amp | condition | step s (median) | min-max s | overhead "
        "| plast.step ms | hooks ms | own share | peak MiB | target | met |",
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
    H.add_options(
        parser,
        model=("spikingresformer_cifar", "registered model with DA-SSDP sites"),
        batch=([32, 128], "batch sizes (on a small CPU e.g. 8 16)"),
        size=(32, "input height = width"),
        T=(4, "time steps"),
        reps=(3, "timed rounds"),
        warmup=(1, "untimed rounds first"),
        amp=("none", "precision", {"choices": H.AMP_CHOICES}),
        profile_steps=(2, "CUDA: profiled steps per condition for DA-SSDP's own device time"),
    )
    H.add_run_arguments(parser)
    H.add_output_arguments(parser, "overhead")


def run(args: argparse.Namespace) -> int:
    import torch

    names = ("batch", "size", "T", "reps", "warmup", "threads", "profile_steps")
    H.check_positive(args, *names)
    device = str(H.device_of(args.device))
    torch.set_num_threads(args.threads)
    load_before = H.load_average()
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
    return H.save(
        args, "overhead", rows, lambda facts: markdown(rows, facts), device=device,
        load_before=load_before,
    )  # fmt: skip
