"""``dassdp bench <benchmark> ...``: one sub-command per benchmark.

Each benchmark is a module under :mod:`dassdp.bench` exposing ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int`` (the same contract as a command), runs on
:mod:`dassdp.bench.harness` (the engine's training step, timing, output) and writes its own
``## <name>`` section of ``docs/benchmarks.md``. The before/after harnesses that run another
checkout's sources are scripts in the top-level ``benchmarks/`` folder.
"""

from __future__ import annotations

import argparse

HELP = "run a benchmark and record it in docs/benchmarks.md"

# benchmark name -> module under dassdp.bench
BENCHMARKS: dict[str, str] = {
    "models": "models",
    "rule": "rule",
    "overhead": "overhead",
    "throughput": "throughput",
    "ddp": "ddp",
    "syncs": "syncs",
    "train-step": "train_step",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dassdp.cli import add_subcommands

    add_subcommands(parser, "benchmark", "BENCHMARK", "dassdp.bench", BENCHMARKS, "_bench_run")


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
