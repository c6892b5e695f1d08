"""``dassdp bench train-step``: images/s and peak memory of one training step, per variant.

One step = forward, cross-entropy, ``zero_grad``, backward, AdamW step, ``dassdp.reset``
(forward and loss under ``torch.autocast(..., bfloat16)`` for ``--amp bf16``), on a fixed
random batch. Each *variant* is the same model with other memory options
(:data:`VARIANTS`: spike-aware saved tensors on / off, every stage checkpointed).

* **images/s**: all variants (x amp modes) are built in one process from the same weights
  and timed interleaved (the order alternates every round) after untimed warm-up steps;
  images/s = batch / median step time, and *ratio* = a variant's images/s over the first
  variant's, so the load of other processes hits both sides of a ratio alike.
* **peak RSS**: one fresh subprocess per variant and amp mode builds the model, runs
  ``--rss-steps`` steps and reports its own peak resident set (``VmHWM``), its resident set
  after building (before the first step), and per step the minor page faults and the share
  of CPU time spent in the kernel (``getrusage``: page faults on freshly mapped tensors).
* ``--baseline-src DIR`` adds a ``baseline`` row: the same fresh-process measurement with
  the ``dassdp`` sources of another checkout (e.g. ``/work/main/src``, the code before a
  change) and its default model, for a before / after table (memory is load-independent;
  its images/s come from the fresh process, not the interleaved run).
* ``--profile`` prints ``torch.profiler``'s top operators (self CPU time) of one step of the
  first variant and what autograd saves per module type (bytes saved / kept), and puts
  both tables in the section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dassdp.bench.report import add_output_arguments, add_run_arguments, provenance

HELP = "training-step images/s and peak RSS per memory option (spike saving, checkpointing)"

# variant -> model constructor arguments ("all" stands for every stage index)
VARIANTS: dict[str, dict[str, Any]] = {
    "no-spike-saving": {"spike_saving": False},
    "spike-saving": {"spike_saving": True},
    "checkpoint-all": {"spike_saving": True, "checkpoint_stages": "all"},
}
AMP_MODES = ("fp32", "bf16")
# --allocator name -> dassdp._util.allocator choice (DASSDP_ALLOCATOR)
BENCH_ALLOCATORS = {"jemalloc": "jemalloc", "tcmalloc": "tcmalloc", "tuned": "glibc",
                    "default": "system"}  # fmt: skip


def bench_allocator(active: str) -> str:
    """The ``--allocator`` name of :func:`dassdp._util.allocator.active_allocator`'s answer."""
    return {"glibc tuned": "tuned", "glibc": "default"}.get(active, active)


# Run in a fresh interpreter (``python -c``) with only ``dassdp.create_model`` from the
# sources on its path, so that it also measures another checkout (``--baseline-src``).
_WORKER = r"""
import json, resource, sys, time
cfg = json.loads(sys.argv[1])
import torch
import torch.nn.functional as F
import dassdp
from dassdp import create_model

def rss_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")

if cfg["allocator"] == "tuned":  # as the dassdp command does (commands/_launch.py)
    import ctypes, ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD
torch.set_num_threads(cfg["threads"])
torch.manual_seed(cfg["seed"])
model = create_model(cfg["model"], num_classes=10, T=cfg["T"], **cfg["model_args"]).train()
gen = torch.Generator().manual_seed(cfg["seed"])
x = torch.rand(cfg["batch"], cfg["in_channels"], cfg["size"], cfg["size"], generator=gen)
y = torch.randint(0, 10, (cfg["batch"],), generator=gen)
opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
built = rss_mib("VmRSS")
steps = []
for _ in range(cfg["warmup"] + cfg["steps"]):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["amp"] == "bf16"):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    dassdp.reset(model)
    sec, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    steps.append({"sec": sec, "minflt": r1.ru_minflt - r0.ru_minflt,
                  "sys_share": (r1.ru_stime - r0.ru_stime) / cpu if cpu > 0 else 0.0})
print(json.dumps({"peak_rss_mib": rss_mib("VmHWM"), "built_rss_mib": built,
                  "steps": steps[cfg["warmup"]:], "torch": torch.__version__}))
"""


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

    model = create_model(model_name, num_classes=10)
    return len(getattr(model, "stages", ()))


def source_dir(src: str | None) -> str:
    """The directory holding the ``dassdp`` package: ``src`` (checked: an error naming it
    when it has none) or, for ``None``, this checkout's."""
    if src is None:
        return str(Path(__file__).resolve().parents[2])
    if not (Path(src) / "dassdp" / "__init__.py").is_file():
        raise ValueError(f"--baseline-src {src}: no dassdp package in that directory")
    return str(Path(src).resolve())


def fresh_process(cfg: dict[str, Any], src: str | None = None) -> dict[str, Any]:
    """Run the worker in a fresh interpreter with ``cfg`` (its ``allocator``: a
    :data:`BENCH_ALLOCATORS` name); ``src`` (a directory holding the ``dassdp`` package)
    replaces this checkout's sources on its path."""
    from dassdp._util.allocator import preload_env

    env = preload_env(BENCH_ALLOCATORS[cfg["allocator"]])
    if src is not None:
        env["PYTHONPATH"] = source_dir(src)
    else:
        here = source_dir(None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = str(cfg["threads"])
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"train-step worker failed ({cfg}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _step(model: Any, opt: Any, x: Any, y: Any, amp: str) -> None:
    import torch
    import torch.nn.functional as F

    import dassdp

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    dassdp.reset(model)


def interleaved(
    model_name: str,
    configs: list[tuple[str, str]],
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
    import copy

    import torch

    from dassdp import create_model

    stages = _num_stages(model_name)
    models, opts = {}, {}
    first = None
    for cfg in configs:
        torch.manual_seed(seed)
        model = create_model(model_name, num_classes=10, T=T, **model_args(cfg[0], stages))
        if first is None:
            first = model
        else:
            model.load_state_dict(copy.deepcopy(first.state_dict()))
        models[cfg] = model.train()
        opts[cfg] = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    in_ch = next(m for m in first.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, in_ch, size, size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    for r in range(warmup + steps):
        for cfg in configs if r % 2 == 0 else configs[::-1]:
            start = time.perf_counter()
            _step(models[cfg], opts[cfg], x, y, cfg[1])
            sec = time.perf_counter() - start
            if r >= warmup:
                times[cfg].append(sec)
            if log:
                tag = "warm-up" if r < warmup else f"step {r - warmup + 1}/{steps}"
                log(f"  batch {batch} {tag:<9} {cfg[0]:<16} {cfg[1]:<5} {sec:8.3f} s")
    return times


def profile_step(
    model_name: str, variant: str, amp: str, *, batch: int, size: int, T: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One profiled step (after a warm-up step): the top operators by self CPU time, and the
    bytes autograd saves (and keeps) per module type in the forward."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dassdp import create_model
    from dassdp.neurons import observe_saved

    torch.manual_seed(seed)
    kwargs = model_args(variant, _num_stages(model_name))
    model = create_model(model_name, num_classes=10, T=T, **kwargs).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    in_ch = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, in_ch, size, size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    _step(model, opt, x, y, amp)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, opt, x, y, amp)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": round(e.self_cpu_time_total / 1e3, 1),
            "share": round(e.self_cpu_time_total / total, 4),
        }
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    ]
    # Saved bytes per module type: the innermost module running when a tensor is saved.
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

    with observe_saved(count), torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
        model(x)
    for h in handles:
        h.remove()
    saved = [
        {"module": k[0], "kind": k[1], "tensors": v[2], "saved_mib": v[0] / 2**20,
         "kept_mib": v[1] / 2**20}
        for k, v in sorted(acc.items(), key=lambda kv: -kv[1][1])
    ]  # fmt: skip
    return ops, saved


def markdown(
    rows: list[dict[str, Any]],
    env: dict[str, Any],
    csv_path: Path,
    load: tuple[str, str],
    ops: list[dict[str, Any]] | None,
    saved: list[dict[str, Any]] | None,
    profiled: str,
) -> str:
    """The ``## train-step`` section body."""
    lines = [
        "One training step (forward, cross-entropy, backward, AdamW step, `dassdp.reset`;",
        "bf16: forward and loss under `torch.autocast('cpu', bfloat16)`) on a fixed random",
        "batch. Variants: `spike-saving` (default: autograd keeps spikes as bool,",
        "`dassdp.neurons.spike_saving`), `no-spike-saving` (`model_args.spike_saving: false`),",
        "`checkpoint-all` (every stage checkpointed, `model_args.checkpoint_stages`).",
        "*images/s*: all variants built in one process from the same weights, timed",
        "interleaved after warm-up; batch / median step; *ratio* = images/s over the first",
        "variant's of the same batch and amp (same run, same load). *peak RSS*: a fresh",
        "process per row (`VmHWM` after the steps; *built* = RSS after building the model);",
        "*RSS ratio* and *fresh ratio* over the first row of the same amp (the baseline when",
        "there is one);",
        "*fresh images/s*, *faults/step* and *sys %* (kernel share of CPU time, `getrusage`)",
        "there, over its steps after `--rss-warmup` steps (with `--repeats R`: R fresh",
        "processes per row, run interleaved, every row once per round; medians).",
        "*allocator*: `jemalloc` / `tcmalloc` = that library preloaded (`LD_PRELOAD`; jemalloc",
        "with `MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`), `tuned` = glibc with",
        "`M_MMAP_MAX=0`, `M_TRIM_THRESHOLD=-1`, `default` = glibc's defaults (`_util.allocator`;",
        "the `dassdp` CLI runs with jemalloc where it is installed, else tcmalloc, else glibc",
        "tuned; `DASSDP_ALLOCATOR` chooses); the interleaved timing runs in the `dassdp`",
        "process itself: its images/s sit in the rows of its own allocator.",
        "`baseline` rows: the same fresh-process measurement with another checkout's",
        "sources (`--baseline-src`), its default model; their images/s are that process's",
        "(not interleaved).",
        "",
        *provenance(env, csv_path, load),
        "",
        "| model | variant | amp | allocator | batch | images / s | ratio | fresh images / s "
        "| fresh ratio | peak RSS MiB | RSS ratio | built MiB | faults / step | sys % |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ips = "" if r["images_per_s"] == "" else f"{r['images_per_s']:.2f}"
        ratio = "" if r["ratio"] == "" else f"{r['ratio']:.3f}"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['amp']} | {r['allocator']} | {r['batch']} | "
            f"{ips} | {ratio} | "
            f"{r['fresh_images_per_s']:.2f} | {r['fresh_ratio']:.3f} | {r['peak_rss_mib']:.0f} | "
            f"{r['rss_ratio']:.3f} | {r['built_rss_mib']:.0f} | {r['minflt_per_step']:.0f} | "
            f"{100 * r['sys_share']:.1f} |"
        )
    if ops:
        lines += [
            "",
            f"Top operators of one profiled step ({profiled}; `torch.profiler`, self CPU):",
            "",
            "| operator | calls | self ms | share |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.1f} | {100 * o['share']:.1f} % |"
            for o in ops
        ]
    if saved:
        tot_s = sum(s["saved_mib"] for s in saved)
        tot_k = sum(s["kept_mib"] for s in saved)
        lines += [
            "",
            f"What autograd saves in the forward ({profiled}), per module type and kind "
            "(`weight`: parameters, kept anyway; others: activations by dtype); *kept* is",
            "what stays in memory (spikes packed as bool):",
            "",
            "| module | kind | tensors | saved MiB | kept MiB |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {s['module']} | {s['kind']} | {s['tensors']} | {s['saved_mib']:.1f} | "
            f"{s['kept_mib']:.1f} |"
            for s in saved
        ]
        lines.append(f"| total | | | {tot_s:.1f} | {tot_k:.1f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="spikingresformer_cifar", help="model (default spikingresformer_cifar)"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="batch sizes (16)")
    parser.add_argument("--size", type=int, default=32, help="input height = width (32)")
    parser.add_argument("--T", type=int, default=4, help="time steps (default 4)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["no-spike-saving", "spike-saving"],
        choices=list(VARIANTS),
        help="variants to compare, first = reference of the ratios "
        "(default no-spike-saving spike-saving)",
    )
    parser.add_argument(
        "--amp", nargs="+", default=["fp32"], choices=AMP_MODES, help="precisions (fp32)"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument(
        "--rss-steps", type=int, default=1, help="steps of each fresh RSS process (default 1)"
    )
    parser.add_argument(
        "--rss-warmup",
        type=int,
        default=0,
        help="steps of each fresh process before the ones its times and faults come from "
        "(default 0; its peak RSS covers all)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="fresh processes per row, run interleaved (all rows once, then again, ...); "
        "the table holds medians (default 1)",
    )
    parser.add_argument(
        "--allocator",
        nargs="+",
        default=None,
        choices=list(BENCH_ALLOCATORS),
        help="allocators of the fresh processes: 'jemalloc' / 'tcmalloc' (preloaded), "
        "'tuned' (glibc with the dassdp settings), 'default' (glibc's defaults); default: "
        "the one the dassdp CLI runs with here (dassdp._util.allocator)",
    )
    parser.add_argument(
        "--no-time", action="store_true", help="skip the interleaved timing (memory only)"
    )
    parser.add_argument(
        "--baseline-src",
        default=None,
        metavar="DIR",
        help="also measure (fresh process) the default model of the dassdp sources in DIR",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print and record the top operators and the saved bytes per module type",
    )
    add_run_arguments(parser, "seed of weights and inputs")
    add_output_arguments(parser, "train-step", per_device=False)


def run(args: argparse.Namespace) -> int:
    import torch

    from dassdp._util.allocator import active_allocator
    from dassdp.bench.report import environment, write_csv, write_section
    from dassdp.bench.timing import load_average, median

    allocators = args.allocator or [bench_allocator(active_allocator())]

    if args.device != "cpu":
        raise ValueError(f"--device {args.device}: bench train-step measures the CPU only")
    if min([*args.batch, args.size, args.T, args.steps, args.rss_steps, args.threads,
            args.repeats]) < 1:  # fmt: skip
        raise ValueError(
            "--batch, --size, --T, --steps, --rss-steps, --threads, --repeats must be >= 1"
        )
    if min(args.warmup, args.rss_warmup) < 0:
        raise ValueError("--warmup and --rss-warmup must be >= 0")
    torch.set_num_threads(args.threads)
    stages = _num_stages(args.model)
    configs = [(v, a) for a in args.amp for v in args.variants]
    for v, _ in configs:
        model_args(v, stages)  # validates the variant for this model early
    in_ch = 2 if args.model == "spikingresformer_dvsg" else 1 if args.model == "spiking_cnn" else 3
    load_before = load_average()
    rows: list[dict[str, Any]] = []
    for batch in args.batch:
        print(f"{args.model}: batch {batch}, {args.size}x{args.size}, T={args.T}", flush=True)
        times: dict[tuple[str, str], list[float]] = {}
        if not args.no_time:
            times = interleaved(
                args.model, configs, batch=batch, size=args.size, T=args.T, steps=args.steps,
                warmup=args.warmup, seed=args.seed, log=lambda s: print(s, flush=True),
            )  # fmt: skip
        todo = [(v, a, al, None) for v, a in configs for al in allocators]
        if args.baseline_src:  # first: the reference of the RSS ratios
            base = [("baseline", a, al, args.baseline_src) for a in args.amp for al in allocators]
            todo = base + todo
        ref_rss: dict[str, float] = {}
        ref_ips: dict[str, float] = {}
        ref_fresh: dict[str, float] = {}
        here = bench_allocator(active_allocator())  # the interleaved run's allocator
        fresh: dict[int, list[dict[str, Any]]] = {}
        for _ in range(args.repeats):  # interleaved: each repeat runs every row once
            for i, (variant, amp, allocator, src) in enumerate(todo):
                cfg = {
                    "model": args.model, "batch": batch, "size": args.size, "T": args.T,
                    "steps": args.rss_steps, "warmup": args.rss_warmup, "amp": amp,
                    "threads": args.threads, "allocator": allocator,
                    "seed": args.seed, "in_channels": in_ch,
                    "model_args": {} if src else model_args(variant, stages),
                }  # fmt: skip
                fresh.setdefault(i, []).append(fresh_process(cfg, src))
        for i, (variant, amp, allocator, src) in enumerate(todo):
            got = {
                "steps": [s for g in fresh[i] for s in g["steps"]],
                "peak_rss_mib": median([g["peak_rss_mib"] for g in fresh[i]]),
                "built_rss_mib": median([g["built_rss_mib"] for g in fresh[i]]),
            }
            step_s = median([s["sec"] for s in got["steps"]])
            timed = (variant, amp) in times and allocator == here
            ips = round(batch / median(times[(variant, amp)]), 3) if timed else ""
            row = {
                "model": args.model,
                "variant": variant,
                "amp": amp,
                "allocator": allocator,
                "batch": batch,
                "size": args.size,
                "T": args.T,
                "source": src or "this checkout",
                "images_per_s": ips,
                "ratio": "",
                "repeats": args.repeats,
                "fresh_images_per_s": round(batch / step_s, 3),
                "fresh_ratio": 1.0,
                "peak_rss_mib": round(got["peak_rss_mib"], 1),
                "rss_ratio": 1.0,
                "built_rss_mib": round(got["built_rss_mib"], 1),
                "minflt_per_step": round(median([s["minflt"] for s in got["steps"]])),
                "sys_share": round(median([s["sys_share"] for s in got["steps"]]), 4),
            }
            if ips != "":
                row["ratio"] = round(ips / ref_ips.setdefault(amp, ips), 3)
            fresh_ref = ref_fresh.setdefault(amp, batch / step_s)
            row["fresh_ratio"] = round((batch / step_s) / fresh_ref, 3)
            rss = ref_rss.setdefault(amp, row["peak_rss_mib"])
            row["rss_ratio"] = round(row["peak_rss_mib"] / rss, 3)
            print(
                f"batch {batch:<4} {variant:<16} {amp:<5} {allocator:<7} {ips!s:>8} images/s  "
                f"ratio {row['ratio']!s:>6}  peak RSS {row['peak_rss_mib']:8.0f} MiB "
                f"(x{row['rss_ratio']:.3f})  fresh {row['fresh_images_per_s']:.2f} images/s  "
                f"faults/step {row['minflt_per_step']}  sys {100 * row['sys_share']:.1f} %",
                flush=True,
            )
            rows.append(row)
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
            print(
                f"  {s['module']:<14} {s['kind']:<9} {s['saved_mib']:9.1f} -> {s['kept_mib']:.1f}"
            )
    out = args.out
    write_csv(out, rows)
    body = markdown(rows, environment(), out, (load_before, load_average()), ops, saved, profiled)
    write_section(args, "train-step", body, out)
    return 0
