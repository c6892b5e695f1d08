"""``dassdp report DIR``: the report of a ``dassdp compare`` folder.

Reads only the result files of ``DIR/<variant>/seed<k>/`` and writes ``DIR/report.md``,
CSV tables and PNG plots (see :mod:`dassdp.experiments.report`); prints the report's path
and its headline table.
"""

from __future__ import annotations

import argparse
import sys

HELP = "write report.md, CSV tables and plots for a `dassdp compare` folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="the comparison folder (compare --out)")


def headline(report: str) -> str:
    """The first table of a report.md (the final-accuracy summary)."""
    lines = report.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| variant")), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def run(args: argparse.Namespace) -> int:
    from dassdp.experiments.report import ReportWriteError, write_report

    try:
        path = write_report(args.dir)
    except ReportWriteError as err:  # a read-only folder, a full disk: one line
        print(f"dassdp report: error: {err}", file=sys.stderr)
        return 1
    print(f"report: {path}\n\n{headline(path.read_text())}")
    return 0
