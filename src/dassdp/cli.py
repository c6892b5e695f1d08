"""The ``dassdp`` command line: ``dassdp <command> ...``.

Each command lives in its own module under :mod:`dassdp.commands` exposing
``HELP: str``, ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches, so commands import their (heavy) dependencies only when they run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command name -> module under dassdp.commands
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "train": "train",
    "eval": "eval",
    "ls": "ls",
    "bench": "bench",
    "data": "data",
    "compare": "compare",
    "report": "report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dassdp",
        description="DA-SSDP: dopamine-modulated spike-synchrony-dependent plasticity for SNNs.",
    )
    add_subcommands(parser, "command", "COMMAND", "dassdp.commands", COMMANDS, "_run")
    return parser


def add_subcommands(
    parser: argparse.ArgumentParser,
    dest: str,
    metavar: str,
    package: str,
    modules: dict[str, str],
    run_attr: str,
) -> None:
    """One required sub-command per ``{name: module}`` of ``package``; each module exposes
    ``HELP``, ``add_arguments(parser)`` and ``run(args)``, stored as ``args.<run_attr>``."""
    sub = parser.add_subparsers(dest=dest, metavar=metavar)
    sub.required = True
    for name, module_name in modules.items():
        module = importlib.import_module(f"{package}.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(**{run_attr: module.run})


def main(argv: Sequence[str] | None = None) -> int:
    from dassdp._malloc import tune_allocator

    tune_allocator()  # glibc: reuse heap for large tensors (opt out: DASSDP_MALLOC_TUNE=0)
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        # User errors: one clear line, no traceback (set DASSDP_DEBUG=1 to see it).
        import os

        if os.environ.get("DASSDP_DEBUG"):
            raise
        print(f"dassdp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
