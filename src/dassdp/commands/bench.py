"""``dassdp bench <benchmark> ...``: one sub-command per benchmark.

Each benchmark is a module under :mod:`dassdp.bench` exposing ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int`` (the same contract as a command), and
writes its own ``## <name>`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import importlib

HELP = "run a benchmark and record it in docs/benchmarks.md"

# benchmark name -> module under dassdp.bench
BENCHMARKS: dict[str, str] = {
    "models": "models",
    "rule": "rule",
    "overhead": "overhead",
    "throughput": "throughput",
    "ddp": "ddp",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.required = True
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(f"dassdp.bench.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
