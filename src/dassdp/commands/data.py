"""``dassdp data prepare NAME [--root DIR] [--force]`` and ``dassdp data list [--root DIR]``.

The default root is ``$DASSDP_DATA``, else ``$XDG_CACHE_HOME/dassdp/data``, else
``~/.cache/dassdp/data``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

HELP = "prepare datasets offline (cifar10, fashion-mnist, mnist) and list what is prepared"
_PREPARABLE = ("cifar10", "fashion-mnist", "mnist")  # = dassdp.data.PREPARABLE (kept import-free)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    prep = sub.add_parser("prepare", help="fetch (registries / local files), verify, convert")
    prep.add_argument("name", choices=_PREPARABLE)
    prep.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    lst = sub.add_parser("list", help="show which datasets are prepared under the root")
    for p in (prep, lst):
        p.add_argument(
            "--root", default=None, help="data root (default: $DASSDP_DATA or ~/.cache/dassdp/data)"
        )


def run(args: argparse.Namespace) -> int:
    from dassdp.data import DataError

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return _prepare(args) if args.action == "prepare" else _list(args)
    except DataError as err:
        print(f"dassdp data {args.action}: error: {err}", file=sys.stderr)
        return 1


def _prepare(args: argparse.Namespace) -> int:
    from dassdp.data import prepare

    start = time.perf_counter()
    root = prepare(args.name, args.root, force=args.force)
    print(f"{args.name}: ready in {root} ({time.perf_counter() - start:.1f} s)")
    return 0


def _list(args: argparse.Namespace) -> int:
    from dassdp.data.prepare import list_prepared, resolve_root

    entries = list_prepared(args.root)  # a bad root: the error, before any output
    print(f"data root: {resolve_root(args.root)}")
    for e in entries:
        print(f"  {e.name:<14} {e.status:<10} {e.path}\n  {'':<14} {e.detail}")
    return 0
