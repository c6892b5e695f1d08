"""``dassdp bench train-step``: images/s and peak memory of the engine's training step, per
memory option.

One step = :func:`dassdp.engine.step.train_step` (forward, cross-entropy, backward, AdamW
step, ``dassdp.reset``; ``bf16``: forward and loss under bfloat16 autocast) on a fixed random
batch. Variants (:data:`VARIANTS`): ``spike-saving`` (default: autograd keeps spikes as bool,
``dassdp.neurons.spike_saving``), ``no-spike-saving`` (``model_args.spike_saving: false``),
``checkpoint-all`` (every stage checkpointed, ``model_args.checkpoint_stages``).

* *images/s*: all variants (x amp modes) built in one process from the same weights, timed
  interleaved (the order alternates every round) after warm-up; batch / median step time;
  *ratio* = over the first variant's of the same batch and amp (same run, same load). They
  sit in the rows of the benchmark process's own allocator.
* *peak RSS*: a fresh process per row (:func:`rss_worker`: ``VmHWM`` after the steps;
  *built* = RSS after building the model); *RSS ratio* and *fresh ratio* over the first row
  of the same amp; *fresh images/s*, *faults/step* and *sys %* (kernel share of CPU time,
  ``getrusage``) over its steps after ``--rss-warmup`` steps (medians over repeated fresh
  processes where there are several).
* *allocator*: ``jemalloc`` / ``tcmalloc`` = that library preloaded (``LD_PRELOAD``),
  ``tuned`` = glibc with ``M_MMAP_MAX=0``, ``M_TRIM_THRESHOLD=-1``, ``default`` = glibc's
  defaults (``dassdp._util.allocator``); each fresh process starts as the ``dassdp`` program
  (``python -m dassdp``), which installs the allocator its environment names.
* ``--profile``: ``torch.profiler``'s top operators (self CPU time) of one step of the first
  variant and what autograd saves per module type (bytes saved / kept).

``baseline`` rows come from the before/after form, ``benchmarks/train_step.py
--baseline-src``: another checkout's sources and default model, stepped by this checkout's
engine step in fresh processes (not interleaved); with several allocators and repeats.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from dassdp.bench import harness as H

HELP = "training-step images/s and peak RSS per memory option (spike saving, checkpointing)"

# variant -> model constructor arguments ("all" stands for every stage index)
VARIANTS: dict[str, dict[str, Any]] = {
    "no-spike-saving": {"spike_saving": False},
    "spike-saving": {"spike_saving": True},
    "checkpoint-all": {"spike_saving": True, "checkpoint_stages": "all"},
}
AMP_MODES = {"fp32": "none", "bf16": "bf16"}  # this bench's name -> the harness's --amp
# allocator name in the rows -> dassdp._util.allocator choice (DASSDP_ALLOCATOR)
BENCH_ALLOCATORS = {"jemalloc": "jemalloc", "tcmalloc": "tcmalloc", "tuned": "glibc",
                    "default": "system"}  # fmt: skip
# a fresh process of a row: the dassdp program (its allocator installed), this bench's worker
WORKER = ("-m", "dassdp", "bench", "train-step", "--rss-worker")


def bench_allocator(active: str) -> str:
    """The row name (:data:`BENCH_ALLOCATORS`) of
    :func:`dassdp._util.allocator.active_allocator`'s answer."""
    return {"glibc tuned": "tuned", "glibc": "default"}.get(active, active)


def model_args(variant: str, num_stages: int) -> dict[str, Any]:
    """Constructor arguments of ``variant`` for a model with ``num_stages`` stages."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    args = dict(VARIANTS[variant])
    if args.get("checkpoint_stages") == "all":
        if num_stages < 1:
            raise ValueError(f"variant {variant!r} needs a model with stages (SpikingResformer)")
        args["checkpoint_stages"] = list(range(num_stages))
    return args


def _num_stages(model_name: str) -> int:
    from dassdp import create_model

    return len(getattr(create_model(model_name, num_classes=10), "stages", ()))


def _built(model_name: str, kwargs: dict[str, Any], T: int, batch: int, size: int, seed: int):  # type: ignore[no-untyped-def]
    """``(model, x, y)``: the model seeded by ``seed`` in train mode and a seeded batch."""
    import torch

    from dassdp import create_model

    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=10, T=T, **kwargs).train()
    x, y = H.random_batch((batch, H.in_channels(model), size, size), seed=seed)
    return model, x, y


def rss_worker(
    *, model: str, model_args: dict[str, Any], batch: int, size: int, T: int, amp: str,
    steps: int, warmup: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """One fresh process's row (``dassdp bench train-step --rss-worker SPEC``, see
    :func:`fresh_row`): build the model, run ``warmup + steps`` engine steps; returns the peak
    RSS (MiB), the RSS after building, per timed step its seconds, minor faults and kernel
    share of CPU time, and the allocator the process runs with."""
    import resource

    from dassdp._util.allocator import active_allocator

    net, x, y = _built(model, model_args, T, batch, size, seed)
    step = H.engine_step(net, H.adamw(net), device="cpu", amp=AMP_MODES[amp])
    built, out = (H.status_kb("VmRSS") or 0) / 1024, []
    for _ in range(warmup + steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step(x, y)
        sec, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        sys_share = (r1.ru_stime - r0.ru_stime) / cpu if cpu > 0 else 0.0
        out.append({"sec": sec, "minflt": r1.ru_minflt - r0.ru_minflt, "sys_share": sys_share})
    return {"peak_rss_mib": H.peak_rss_kb() / 1024, "built_rss_mib": built, "steps": out[warmup:],
            "allocator": bench_allocator(active_allocator())}  # fmt: skip


def interleaved(
    model_name: str,
    configs: Sequence[tuple[str, str]],
    *,
    batch: int,
    size: int,
    T: int,
    steps: int,
    warmup: int,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> dict[tuple[str, str], list[float]]:
    """Step times of every ``(variant, amp)`` in ``configs``, interleaved in this process."""
    stages = _num_stages(model_name)
    run: dict[tuple[str, str], Callable[[], Any]] = {}
    first = None
    for cfg in configs:
        model, x, y = _built(model_name, model_args(cfg[0], stages), T, batch, size, seed)
        if first is None:
            first = model
        model.load_state_dict(first.state_dict())  # the same weights, whatever the variant
        step = H.engine_step(model, H.adamw(model), device="cpu", amp=AMP_MODES[cfg[1]])
        run[cfg] = lambda step=step, x=x, y=y: step(x, y)
    say = None if log is None else (lambda line: log(f"  batch {batch}{line}"))
    return H.interleaved(run, warmup=warmup, reps=steps, device="cpu", log=say)[0]


def profile_step(
    model_name: str, variant: str, amp: str, *, batch: int, size: int, T: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One profiled engine step (after a warm-up step): the top operators by self CPU time,
    and the bytes autograd saves (and keeps) per module type in the forward."""
    from torch.profiler import ProfilerActivity, profile

    kwargs = model_args(variant, _num_stages(model_name))
    model, x, y = _built(model_name, kwargs, T, batch, size, seed)
    step = H.engine_step(model, H.adamw(model), device="cpu", amp=AMP_MODES[amp])
    step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x, y)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = [
        {"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
         "share": round(e.self_cpu_time_total / total, 4)}
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    ]  # fmt: skip
    return ops, saved_by_module(model, x, amp)


def saved_by_module(model: Any, x: Any, amp: str) -> list[dict[str, Any]]:
    """What autograd saves in one forward of ``model`` on ``x``, per (innermost module type,
    kind): bytes saved and kept (``kind``: ``weight`` or the activation dtype)."""
    import torch

    from dassdp.neurons import observe_saved

    stack: list[str] = ["(model)"]
    handles = []
    for m in model.modules():
        if not list(m.children()) or type(m).__name__ in ("DSSA",):
            handles.append(m.register_forward_pre_hook(lambda m, a: stack.append(type(m).__name__)))
            handles.append(m.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]))
    acc: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])

    def count(t: Any, nbytes: int, kept: int) -> None:
        kind = "weight" if isinstance(t, torch.nn.Parameter) else str(t.dtype).split(".")[-1]
        row = acc[(stack[-1], kind)]
        row[0], row[1], row[2] = row[0] + nbytes, row[1] + kept, row[2] + 1

    with observe_saved(count), H.autocast("cpu", AMP_MODES[amp]):
        model(x)
    for h in handles:
        h.remove()
    return [
        {"module": k[0], "kind": k[1], "tensors": v[2], "saved_mib": v[0] / 2**20,
         "kept_mib": v[1] / 2**20}
        for k, v in sorted(acc.items(), key=lambda kv: -kv[1][1])
    ]  # fmt: skip


def markdown(
    rows: list[dict[str, Any]],
    facts: list[str],
    ops: list[dict[str, Any]] | None,
    saved: list[dict[str, Any]] | None,
    profiled: str,
) -> str:
    """The ``## train-step`` section body: the module docstring, the facts, the tables."""
    lines = [
        *H.describe(__doc__),
        "",
        *facts,
        "",
        *H.table(rows, [
            ("model", "---", "{model}"), ("variant", "---", "{variant}"), ("amp", "---", "{amp}"),
            ("allocator", "---", "{allocator}"), ("batch", "--:", "{batch}"),
            ("images / s", "--:", "{ips}"), ("ratio", "--:", "{ratio_s}"),
            ("fresh images / s", "--:", "{fresh_images_per_s:.2f}"),
            ("fresh ratio", "--:", "{fresh_ratio:.3f}"),
            ("peak RSS MiB", "--:", "{peak_rss_mib:.0f}"), ("RSS ratio", "--:", "{rss_ratio:.3f}"),
            ("built MiB", "--:", "{built_rss_mib:.0f}"),
            ("faults / step", "--:", "{minflt_per_step:.0f}"), ("sys %", "--:", "{sys_pct:.1f}"),
        ]),
    ]  # fmt: skip
    if ops:
        lines += ["", f"Top operators of one profiled step ({profiled}; `torch.profiler`, "
                  "self CPU):", ""]  # fmt: skip
        lines += H.table([{**o, "pct": 100 * o["share"]} for o in ops], [
            ("operator", "---", "`{op}`"), ("calls", "--:", "{calls}"),
            ("self ms", "--:", "{self_ms:.1f}"), ("share", "--:", "{pct:.1f} %"),
        ])  # fmt: skip
    if saved:
        total = {"module": "total", "kind": "", "tensors": "",
                 "saved_mib": sum(s["saved_mib"] for s in saved),
                 "kept_mib": sum(s["kept_mib"] for s in saved)}  # fmt: skip
        lines += [
            "", f"What autograd saves in the forward ({profiled}), per module type and kind "
            "(`weight`: parameters, kept anyway; others: activations by dtype); *kept* is",
            "what stays in memory (spikes packed as bool):", "",
        ]  # fmt: skip
        lines += H.table([*saved, total], [
            ("module", "---", "{module}"), ("kind", "---", "{kind}"),
            ("tensors", "--:", "{tensors}"), ("saved MiB", "--:", "{saved_mib:.1f}"),
            ("kept MiB", "--:", "{kept_mib:.1f}"),
        ])  # fmt: skip
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    H.add_options(
        parser,
        model=("spikingresformer_cifar", "model"),
        batch=([16], "batch sizes"),
        size=(32, "input height = width"),
        T=(4, "time steps"),
        variants=(["no-spike-saving", "spike-saving"], "variants to compare, the first is the "
                  "reference of the ratios", {"choices": list(VARIANTS)}),
        amp=(["fp32"], "precisions", {"choices": list(AMP_MODES)}),
        steps=(2, "timed steps per row"),
        warmup=(1, "untimed steps first"),
        rss_steps=(1, "steps of each fresh RSS process"),
        rss_warmup=(0, "steps of each fresh process before the ones its times and faults come "
                    "from (its peak RSS covers all)"),
        no_time=(False, "skip the interleaved timing (memory only)"),
        profile=(False, "print and record the top operators and the saved bytes per module type"),
        rss_worker=(None, argparse.SUPPRESS, {"type": str}),  # fresh_row's processes
    )  # fmt: skip
    H.add_run_arguments(parser)
    H.add_output_arguments(parser, "train-step", per_device=False)


def check(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Validate the arguments; returns the ``(variant, amp)`` pairs of this checkout."""
    if args.device != "cpu":
        raise ValueError(f"--device {args.device}: bench train-step measures the CPU only")
    H.check_positive(args, "batch", "size", "T", "steps", "rss_steps", "threads")
    H.check_positive(args, "warmup", "rss_warmup", least=0)
    stages = _num_stages(args.model)
    configs = [(v, a) for a in args.amp for v in args.variants]
    for v, _ in configs:
        model_args(v, stages)  # validates the variant for this model early
    return configs


def fresh_row(args: argparse.Namespace, batch: int, entry: dict[str, Any]) -> dict[str, Any]:
    """:func:`rss_worker` for one row of this checkout (``entry``: variant, amp, allocator) in
    a fresh ``dassdp`` program, started with that allocator."""
    from dassdp._util.allocator import preload_env

    spec = {
        "model": args.model, "batch": batch, "size": args.size, "T": args.T,
        "steps": args.rss_steps, "warmup": args.rss_warmup, "amp": entry["amp"],
        "seed": args.seed, "model_args": model_args(entry["variant"], _num_stages(args.model)),
    }  # fmt: skip
    env = preload_env(BENCH_ALLOCATORS[entry["allocator"]])
    return H.in_fresh_process(WORKER, spec, env=env)


def measure(
    args: argparse.Namespace,
    configs: list[tuple[str, str]],
    todo: list[dict[str, Any]],
    fresh: Callable[[argparse.Namespace, int, dict[str, Any]], dict[str, Any]],
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """The rows of every batch size: ``configs`` timed interleaved in this process, and one
    row per ``todo`` entry (variant, amp, allocator, source) from ``fresh`` processes, every
    entry once per repeat (interleaved), medians over the repeats."""
    from dassdp._util.allocator import active_allocator

    here = bench_allocator(active_allocator())  # the interleaved run's allocator
    rows: list[dict[str, Any]] = []
    for batch in args.batch:
        print(f"{args.model}: batch {batch}, {args.size}x{args.size}, T={args.T}", flush=True)
        times: dict[tuple[str, str], list[float]] = {}
        if not args.no_time:
            times = interleaved(
                args.model, configs, batch=batch, size=args.size, T=args.T, steps=args.steps,
                warmup=args.warmup, seed=args.seed, log=lambda s: print(s, flush=True),
            )  # fmt: skip
        got = [[fresh(args, batch, e) for e in todo] for _ in range(repeats)]
        refs: dict[str, dict[str, float]] = {"ips": {}, "fresh": {}, "rss": {}}
        for i, entry in enumerate(todo):
            cfg = (entry["variant"], entry["amp"])
            timed = times.get(cfg) if entry["allocator"] == here and not entry["source"] else None
            row = _row(args, batch, entry, [g[i] for g in got], timed, refs)
            rows.append(row)
    return rows


def _row(
    args: argparse.Namespace,
    batch: int,
    entry: dict[str, Any],
    fresh: list[dict[str, Any]],
    times: list[float] | None,
    refs: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """One table row; ``refs`` holds the first row's values per amp (the ratios' reference)."""
    steps = [s for g in fresh for s in g["steps"]]
    step_s = H.median([s["sec"] for s in steps])
    ips = round(batch / H.median(times), 3) if times else ""
    amp = entry["amp"]
    peak = round(H.median([g["peak_rss_mib"] for g in fresh]), 1)
    row = {
        "model": args.model, "variant": entry["variant"], "amp": amp,
        "allocator": fresh[0]["allocator"], "batch": batch, "size": args.size, "T": args.T,
        "source": entry["source"] or "this checkout", "images_per_s": ips,
        "ratio": "" if ips == "" else round(ips / refs["ips"].setdefault(amp, ips), 3),
        "repeats": len(fresh), "fresh_images_per_s": round(batch / step_s, 3),
        "fresh_ratio": round((batch / step_s) / refs["fresh"].setdefault(amp, batch / step_s), 3),
        "peak_rss_mib": peak, "rss_ratio": round(peak / refs["rss"].setdefault(amp, peak), 3),
        "built_rss_mib": round(H.median([g["built_rss_mib"] for g in fresh]), 1),
        "minflt_per_step": round(H.median([s["minflt"] for s in steps])),
        "sys_share": round(H.median([s["sys_share"] for s in steps]), 4),
    }  # fmt: skip
    print(
        f"batch {batch:<4} {row['variant']:<16} {amp:<5} {row['allocator']:<7} {ips!s:>8} "
        f"images/s  ratio {row['ratio']!s:>6}  peak RSS {peak:8.0f} MiB (x{row['rss_ratio']:.3f})"
        f"  fresh {row['fresh_images_per_s']:.2f} images/s  faults/step "
        f"{row['minflt_per_step']}  sys {100 * row['sys_share']:.1f} %",
        flush=True,
    )
    return row


def finish(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    configs: list[tuple[str, str]],
    load: str,
    program: str = "dassdp",
) -> int:
    """Profile (``--profile``) and write the CSV and the section (``program``: the command's
    name in it)."""
    ops = saved = None
    profiled = f"{configs[0][0]}, {configs[0][1]}, batch {args.batch[0]}"
    if args.profile:
        ops, saved = profile_step(
            args.model, configs[0][0], configs[0][1], batch=args.batch[0], size=args.size,
            T=args.T, seed=args.seed,
        )  # fmt: skip
        print(f"top operators ({profiled}):")
        for o in ops:
            print(f"  {o['op']:<40} {o['calls']:>6} {o['self_ms']:>10.1f} ms {o['share']:7.1%}")
        print("saved by autograd per module type (MiB saved -> kept):")
        for s in saved:
            print(f"  {s['module']:<14} {s['kind']:<9} {s['saved_mib']:9.1f} -> "
                  f"{s['kept_mib']:.1f}")  # fmt: skip
    table = [
        {**r, "sys_pct": 100 * r["sys_share"], "ips": _fmt(r["images_per_s"], ".2f"),
         "ratio_s": _fmt(r["ratio"], ".3f")}
        for r in rows
    ]  # fmt: skip
    return H.save(
        args, "train-step", rows, lambda facts: markdown(table, facts, ops, saved, profiled),
        load_before=load, program=program,
    )  # fmt: skip


def _fmt(value: Any, spec: str) -> str:
    return "" if value == "" else format(value, spec)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from dassdp._util.allocator import active_allocator

    if args.rss_worker is not None:  # a fresh process of fresh_row: its row on stdout
        print(json.dumps(rss_worker(**json.loads(args.rss_worker))))
        return 0
    configs = check(args)
    torch.set_num_threads(args.threads)
    load = H.load_average()
    here = bench_allocator(active_allocator())
    todo = [{"variant": v, "amp": a, "allocator": here, "source": None} for v, a in configs]
    return finish(args, measure(args, configs, todo, fresh_row), configs, load)
