"""Shared helpers for benchmark reports: environment facts and atomic section replacement.

``docs/benchmarks.md`` holds one ``## <name>`` section per benchmark; each benchmark
rewrites only its own section, so the others survive.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dassdp._util.io import atomic_write_text

__all__ = [
    "add_output_arguments",
    "add_run_arguments",
    "cpu_model",
    "environment",
    "provenance",
    "replace_section",
    "write_csv",
    "write_section",
]

DEFAULT_HEADER = (
    "# Benchmarks\n\nEach section is written by `dassdp bench <name>`; rerun it to refresh.\n"
)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Facts a benchmark number needs next to it: command, torch, threads, CPU, date."""
    import torch

    from dassdp._util.allocator import active_allocator

    args = sys.argv[1:] if argv is None else list(argv)
    return {
        "command": "dassdp " + " ".join(shlex.quote(a) for a in args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": active_allocator(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def replace_section(path: Path, name: str, body: str) -> None:
    """Set the ``## <name>`` section of the Markdown file ``path`` to ``body``; keep the rest.

    The section runs from its heading to the next ``## `` heading (or the end). A missing
    file is created with a short header; a missing section is appended.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else DEFAULT_HEADER
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        new = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        new = text.rstrip() + "\n\n" + section
    atomic_write_text(path, new)


def provenance(
    env: Mapping[str, Any], csv_path: Any, load: Sequence[str] | None = None
) -> list[str]:
    """The section's bullet lines for the exact command, the machine and the date (with the
    load averages before and after the run when ``load`` is given) and the CSV path."""
    when = f"- date: {env['date']}; "
    if load is not None:
        when += (
            f"load average (1, 5, 15 min) before: {load[0]}, after: {load[1]} (a shared machine); "
        )
    return [
        f"- command: `{env['command']}`",
        f"- torch {env['torch']}, {env['threads']} thread(s), CPU: {env['cpu']} "
        f"({env['cores']} cores), Python {env['python']}"
        + (f", allocator {env['allocator']}" if env.get("allocator") else ""),
        when + f"CSV: `{csv_path}`",
    ]


def write_section(args: Any, name: str, body: str, csv_path: Path) -> None:
    """Write ``body`` as the ``args.section`` (default ``name``) section of ``args.doc`` and
    say where the CSV and the section went."""
    heading = args.section or name
    note = getattr(args, "note", None)
    if note:
        body = body.rstrip() + f"\n\nNote: {note}\n"
    replace_section(args.doc, heading, body)
    print(f"wrote {csv_path} and the '## {heading}' section of {args.doc}")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys) as CSV, atomically."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())


def add_run_arguments(parser: Any, seed_help: str = "seed of weights and inputs") -> None:
    """``--device``, ``--threads`` and ``--seed``, shared by the device-aware benchmarks."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")


def add_output_arguments(parser: Any, name: str, *, per_device: bool = True) -> None:
    """``--out`` (the CSV) and ``--doc`` (the Markdown file whose ``## name`` section is
    replaced). With ``per_device`` the CSV defaults by device (``docs/bench/name[-cuda].csv``,
    resolved at run time from ``None``)."""
    default = None if per_device else Path(f"docs/bench/{name}.csv")
    where = f"docs/bench/{name}.csv" + (f", or {name}-cuda.csv on a GPU" if per_device else "")
    parser.add_argument("--out", type=Path, default=default, help=f"CSV output (default {where})")
    parser.add_argument(
        "--doc",
        type=Path,
        default=Path("docs/benchmarks.md"),
        help=f"Markdown file whose '## {name}' section is replaced",
    )
    parser.add_argument(
        "--section",
        default=None,
        help=f"heading of the section to write instead (default '{name}'"
        + (f", or '{name} (cuda)' on a GPU)" if per_device else ")")
        + ": keeps the default section, e.g. for a run with other batch sizes",
    )
    parser.add_argument(
        "--note",
        default=None,
        help="a sentence appended to the section (e.g. what else loaded the machine)",
    )
