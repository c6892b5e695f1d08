"""The ``dassdp`` command line: ``dassdp <command> ...``.

Each command lives in its own module under :mod:`dassdp.commands` exposing
``HELP: str``, ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches, so commands import their (heavy) dependencies only when they run.

:func:`main` changes nothing about the process it runs in, so a script or a test may call
it; the ``dassdp`` program itself starts in :func:`dassdp.commands._launch.entry`, which
installs the memory allocator first. A user error (a bad value, a missing file) is one line
on stderr and exit status 2; ``DASSDP_TRACEBACK=1`` raises it with its traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dassdp._util.env import env_flag

TRACEBACK_ENV = "DASSDP_TRACEBACK"  # on: user errors raise with their traceback
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
    parser.add_argument(
        "--version", action=_Version, help="print the versions and the memory allocator, and exit"
    )
    add_subcommands(parser, "command", "COMMAND", "dassdp.commands", COMMANDS, "_run")
    return parser


class _Version(argparse.Action):
    """``--version``: dassdp, torch and the allocator this process runs with."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[no-untyped-def]
        import torch

        import dassdp
        from dassdp._util.allocator import active_allocator

        allocator = active_allocator()
        print(f"dassdp {dassdp.__version__} (torch {torch.__version__}, allocator {allocator})")
        parser.exit()


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
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit
    status. The process is left as it is (the allocator too: that is the program's start,
    :mod:`dassdp.commands._launch`)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        # User errors: one clear line, no traceback (DASSDP_TRACEBACK=1 shows it).
        if env_flag(TRACEBACK_ENV):
            raise
        print(f"dassdp {args.command}: error: {err}", file=sys.stderr)
        return 2
