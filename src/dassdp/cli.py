"""The ``dassdp`` command line: ``dassdp <command> ...``.

Each command lives in its own module under :mod:`dassdp.commands` exposing
``HELP: str``, ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches, so commands import their (heavy) dependencies only when they run.

:func:`main` changes nothing about the process it runs in, so a script or a test may call
it; the ``dassdp`` program itself starts in :func:`dassdp.commands._launch.entry`, which
installs the memory allocator first. A user error (a bad value, a missing file) is one line
on stderr and exit status 2; an ``OSError`` about a path (permissions, a read-only or full
disk) one line naming the path and the reason, exit status 1; Ctrl-C one line, exit status
130; ``DASSDP_TRACEBACK=1`` raises them with their tracebacks instead. A command's
``key=value`` overrides may come anywhere after the command name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dassdp._util.env import env_flag
from dassdp._util.io import WriteError

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
    :mod:`dassdp.commands._launch`).

    Exit status: 2 for a user error (a bad value, a missing file: one line on stderr), 1 for
    a file the system would not read or write (permissions, disk full: one line naming the
    path and the reason), 130 for Ctrl-C. ``DASSDP_TRACEBACK=1`` raises instead.
    """
    args = parse_args(build_parser(), argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, KeyError, TypeError, OSError, KeyboardInterrupt) as err:
        line, status = _one_line(err)
        if line is None or env_flag(TRACEBACK_ENV):
            raise  # a fault, not a user's error; or the traceback was asked for
        print(f"dassdp {args.command}: {line}", file=sys.stderr)
        return status


def _one_line(err: BaseException) -> tuple[str | None, int]:
    """The line and exit status for an error that ends a command; ``None`` for an
    ``OSError`` about no path of the user's (a fault: it keeps its traceback)."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(err, OSError) and (err.filename is not None or isinstance(err, WriteError)):
        return f"error: {describe_os_error(err)}", 2 if isinstance(err, FileNotFoundError) else 1
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        return None, 1
    return f"error: {err}", 2


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError`` about a path: ``<path>: <reason>`` (both paths of a
    rename); a :class:`~dassdp._util.io.WriteError` already is that line."""
    if isinstance(err, WriteError):
        return str(err)
    reason = (err.strerror or str(err)).lower()
    if err.filename2 is not None:
        return f"{err.filename} -> {err.filename2}: {reason}"
    return f"{err.filename}: {reason}"


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that a command's ``key=value`` overrides may come
    anywhere after the command (``train -c f.yaml --out d epochs=3``), not only in one run
    of positionals (argparse's own rule)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = getattr(args, "overrides", None)
        if overrides is None or not all(_is_override(item) for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*overrides, *extra]
    return args


def _is_override(item: str) -> bool:
    return not item.startswith("-") and "=" in item
