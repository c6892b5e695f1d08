#!/usr/bin/env python3
"""Whole training epochs of a config through ``dassdp train``, before and after a change.

Each row is one fresh ``python -m dassdp train --config CONFIG --out TMP epochs=E
threads=N [amp=...]`` process, exactly what a user runs (the CLI's allocator settings
included), with this checkout's sources or, for the ``baseline`` rows, another checkout's
(``--baseline-src``, e.g. the commit before a change; in the precisions of
``--baseline-amp``). Measured per row: the epoch time the
engine records (``epoch_time_s``: the training pass and the test pass; the median over the
run's epochs), training images per second over that time, the process's wall time (start-up
and data loading included) and its peak resident set (``ru_maxrss`` of that child from
``wait4``). ``--repeats R`` runs every configuration R times, interleaved (baseline, this
checkout, baseline, ...), and reports medians, so a change in the machine's load hits both
sides alike. *ratio*: images/s over the baseline's fp32 images/s at the same thread count
(this checkout's fp32 when there is no baseline); *RSS ratio* likewise for peak RSS.

Example (the sources of commit 81cbbaa unpacked next to this checkout)::

    mkdir -p ../base && git archive 81cbbaa src | tar -x -C ../base
    python benchmarks/epoch.py --baseline-src ../base/src --amp fp32 bf16 --threads 1 2 \\
        --out docs/bench/epoch-cifar10-cpu.csv --section 'epoch (configs/cifar10_cpu.yaml)'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _checkout
from _checkout import source_dir

_checkout.use_this_checkout()

from dassdp.bench import harness as H  # noqa: E402
from dassdp.bench.harness import median  # noqa: E402

PROGRAM = "python benchmarks/epoch.py"
AMP_MODES = ("fp32", "bf16")


def train_process(
    config: str,
    *,
    src: str | None,
    amp: str,
    threads: int,
    epochs: int,
    overrides: list[str],
    workdir: Path,
) -> dict[str, Any]:
    """Run one ``dassdp train`` in a fresh interpreter; its epoch times, wall time, peak RSS."""
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    from dassdp._util.allocator import preload_env

    # This checkout chooses its allocator as `dassdp train` does (DASSDP_ALLOCATOR, else the
    # best installed); another checkout's sources start without this process's preload.
    env = dict(os.environ) if src is None else preload_env("system")
    env.update(PYTHONPATH=source_dir(src), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "dassdp", "train", "--config", config, "--out", str(run_dir)]
    cmd += [f"epochs={epochs}", f"threads={threads}", *overrides]
    if amp != "fp32":
        cmd.append(f"amp={amp}")
    log = run_dir.parent / f"{run_dir.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(
            f"dassdp train failed (exit {proc.returncode}; sources {source_dir(src)}; "
            f"{' '.join(cmd[3:])}): {' | '.join(tail)}"
        )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "epoch_s": [r["epoch_time_s"] for r in rows],
        "train_samples": rows[-1]["train"]["samples"],
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        # what the run recorded (a checkout from before that field ran glibc's defaults)
        "allocator": json.loads((run_dir / "run.json").read_text()).get("allocator", "glibc"),
    }


def measure(args: argparse.Namespace, log: Any = print) -> list[dict[str, Any]]:
    """All rows, each configuration run ``args.repeats`` times interleaved."""
    sides: list[tuple[str, str | None]] = [("this checkout", None)]
    if args.baseline_src:
        sides.insert(0, ("baseline", args.baseline_src))
    configs = [
        (t, a, s)
        for t in args.threads
        for a in args.amp
        for s in sides
        if s[0] != "baseline" or a in args.baseline_amp
    ]
    runs: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="dassdp-bench-epoch-") as tmp:
        for rep in range(args.repeats):
            for threads, amp, (side, src) in configs:
                got = train_process(
                    args.config, src=src, amp=amp, threads=threads, epochs=args.epochs,
                    overrides=list(args.set), workdir=Path(tmp),
                )  # fmt: skip
                runs.setdefault((threads, amp, side), []).append(got)
                log(
                    f"[{rep + 1}/{args.repeats}] {side:<13} {amp:<4} {threads} thread(s): "
                    f"epoch {median(got['epoch_s']):.1f} s, wall {got['wall_s']:.1f} s, "
                    f"peak RSS {got['peak_rss_mib']:.0f} MiB"
                )
    rows = []
    for threads, amp, (side, src) in configs:
        got = runs[(threads, amp, side)]
        epoch_s = median([median(g["epoch_s"]) for g in got])
        rows.append(
            {
                "config": args.config,
                "side": side,
                "source": src or "this checkout",
                "amp": amp,
                "allocator": got[0]["allocator"],
                "threads": threads,
                "repeats": len(got),
                "train_samples": got[0]["train_samples"],
                "epoch_s": round(epoch_s, 4),
                "images_per_s": round(got[0]["train_samples"] / epoch_s, 1),
                "wall_s": round(median([g["wall_s"] for g in got]), 1),
                "peak_rss_mib": round(median([g["peak_rss_mib"] for g in got]), 1),
            }
        )
    ref_side = sides[0][0]
    for r in rows:
        ref = next(
            (x for x in rows if x["side"] == ref_side and x["amp"] == "fp32"
             and x["threads"] == r["threads"]),
            None,
        )  # fmt: skip
        if ref:  # from the epoch times: images/s is rounded for the table
            speed = (r["train_samples"] / r["epoch_s"]) / (ref["train_samples"] / ref["epoch_s"])
        r["ratio"] = round(speed, 3) if ref else ""
        r["rss_ratio"] = round(r["peak_rss_mib"] / ref["peak_rss_mib"], 3) if ref else ""
    return rows


def markdown(rows: list[dict[str, Any]], facts: list[str]) -> str:
    """The ``## epoch`` section body."""
    lines = [
        "Whole epochs of `dassdp train` on the config (the training pass over its training",
        "set and the test pass), one fresh process per row and repeat, as a user runs it",
        "(the CLI's allocator included; *allocator*: from the run's `run.json`; another",
        "checkout's rows start without this process's preload). *epoch s*: the engine's",
        "`epoch_time_s`;",
        "*images/s*: training images over that time; *wall s*: the whole process (start-up",
        "and data loading too); *peak RSS*: the process's `ru_maxrss`. `baseline` rows run",
        "another checkout's sources (`--baseline-src`); with repeats the runs alternate",
        "baseline / this checkout and the table holds medians. *ratio* and *RSS ratio*: over",
        "the first side's fp32 row at the same thread count.",
        "",
        *facts,
        "",
        "| side | amp | allocator | threads | repeats | train images | epoch s | images / s "
        "| ratio | wall s | peak RSS MiB | RSS ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['side']} | {r['amp']} | {r['allocator']} | {r['threads']} | {r['repeats']} | "
            f"{r['train_samples']} | {r['epoch_s']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['ratio']} | {r['wall_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['rss_ratio']} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default="configs/cifar10_cpu.yaml",
        help="training config (default configs/cifar10_cpu.yaml)",
    )
    parser.add_argument(
        "--amp", nargs="+", default=["fp32"], choices=AMP_MODES, help="precisions (fp32)"
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="torch thread counts (1)"
    )
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per configuration, interleaved (1)"
    )
    parser.add_argument(
        "--baseline-src",
        default=None,
        metavar="DIR",
        help="also run the dassdp sources in DIR (e.g. an older checkout's src/), first",
    )
    parser.add_argument(
        "--baseline-amp",
        nargs="+",
        default=["fp32"],
        choices=AMP_MODES,
        help="precisions of the baseline rows (default fp32: a checkout from before `amp: "
        "bf16` existed has no other)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for every run (e.g. subset=5000)",
    )
    H.add_output_arguments(parser, "epoch", per_device=False)
    return parser


def run(args: argparse.Namespace) -> int:
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file")
    if min([*args.threads, args.epochs, args.repeats]) < 1:
        raise ValueError("--threads, --epochs and --repeats must be >= 1")
    if args.baseline_src:
        source_dir(args.baseline_src)  # checked before any run
    load_before = H.load_average()
    rows = measure(args, log=lambda s: print(s, flush=True))
    return H.save(
        args, "epoch", rows, lambda facts: markdown(rows, facts), load_before=load_before,
        program=PROGRAM,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
