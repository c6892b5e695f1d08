#!/usr/bin/env python3
"""Before/after of ``dassdp bench train-step``: another checkout's sources next to this one.

Every option of ``dassdp bench train-step`` (see its ``--help``), plus:

* ``--baseline-src DIR``: ``baseline`` rows first (the reference of the ratios), one per amp
  and allocator: the default model of the ``dassdp`` in DIR (e.g. an older checkout's
  ``src/``), stepped by *this* checkout's engine step and harness (grafted over DIR's
  library, see ``_checkout.py``) in a fresh process;
* ``--allocator``: the allocators of the fresh processes (``jemalloc`` / ``tcmalloc``
  preloaded, ``tuned`` glibc, ``default`` glibc; default: this process's);
* ``--repeats R``: R fresh processes per row, run interleaved (every row once, then again),
  medians in the table.

Example (the sources of commit 81cbbaa unpacked next to this checkout)::

    mkdir -p ../base && git archive 81cbbaa src | tar -x -C ../base
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --batch 16 --no-time \\
        --variants spike-saving --baseline-src ../base/src --allocator default jemalloc \\
        --rss-warmup 1 --rss-steps 2 --repeats 2 --out docs/bench/train-step-interleaved.csv
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import _checkout

_checkout.use_this_checkout()

from dassdp.bench import harness as H  # noqa: E402
from dassdp.bench import train_step as ts  # noqa: E402

PROGRAM = "python benchmarks/train_step.py"
# this checkout's modules that measure a baseline's step (the worker and what it runs)
GRAFT = ("dassdp.engine.step", "dassdp.bench.harness", "dassdp.bench.train_step")


def fresh(args: argparse.Namespace, batch: int, entry: dict[str, Any]) -> dict[str, Any]:
    """One fresh process of a row: this checkout's (the package's) or the baseline's."""
    if not entry["source"]:
        return ts.fresh_row(args, batch, entry)
    from dassdp._util.allocator import preload_env

    spec = {
        "model": args.model, "batch": batch, "size": args.size, "T": args.T,
        "steps": args.rss_steps, "warmup": args.rss_warmup, "amp": entry["amp"],
        "seed": args.seed, "model_args": {},
    }  # fmt: skip
    env = preload_env(ts.BENCH_ALLOCATORS[entry["allocator"]])
    target = "dassdp.bench.train_step:rss_worker"
    return _checkout.in_checkout(entry["source"], target, spec, GRAFT, env=env)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    ts.add_arguments(p)
    p.add_argument(
        "--baseline-src",
        default=None,
        metavar="DIR",
        help="also measure (fresh process) the default model of the dassdp sources in DIR",
    )
    p.add_argument(
        "--allocator",
        nargs="+",
        default=None,
        choices=list(ts.BENCH_ALLOCATORS),
        help="allocators of the fresh processes: 'jemalloc' / 'tcmalloc' (preloaded), "
        "'tuned' (glibc with the dassdp settings), 'default' (glibc's defaults); default: "
        "this process's",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="fresh processes per row, run interleaved (all rows once, then again, ...); "
        "the table holds medians (default 1)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from dassdp._util.allocator import active_allocator

    configs = ts.check(args)
    H.check_positive(args, "repeats")
    if args.baseline_src:
        _checkout.source_dir(args.baseline_src)  # checked before any run
    torch.set_num_threads(args.threads)
    load = H.load_average()
    allocators = args.allocator or [ts.bench_allocator(active_allocator())]
    todo = [
        {"variant": v, "amp": a, "allocator": al, "source": None}
        for v, a in configs
        for al in allocators
    ]
    if args.baseline_src:  # first: the reference of the ratios
        base = {"variant": "baseline", "source": args.baseline_src}
        todo = [{**base, "amp": a, "allocator": al} for a in args.amp for al in allocators] + todo
    rows = ts.measure(args, configs, todo, fresh, repeats=args.repeats)
    return ts.finish(args, rows, configs, load, program=PROGRAM)


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
