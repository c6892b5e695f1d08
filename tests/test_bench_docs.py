"""Every benchmark command written in docs/benchmarks.md and the README exists: it parses with
``dassdp bench`` or with its script in ``benchmarks/``."""

from __future__ import annotations

import re
import shlex

import pytest

from bench_scripts import ROOT, load
from dassdp.cli import build_parser
from dassdp.commands.bench import BENCHMARKS

DOC = (ROOT / "docs" / "benchmarks.md").read_text()
COMMANDS = re.findall(r"^- command: `(.*?)`(?: \(|$)", DOC, flags=re.M)


def test_the_doc_records_commands_of_both_kinds():
    assert any(c.startswith("dassdp bench ") for c in COMMANDS)
    assert any(c.startswith("python benchmarks/") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_recorded_command_parses(command):
    words = shlex.split(command)
    while "=" in words[0]:  # leading environment assignments (TRITON_INTERPRET=1 ...)
        words.pop(0)
    if words[0] == "dassdp":
        args = build_parser().parse_args(words[1:])  # SystemExit on an unknown option
        assert args.benchmark in BENCHMARKS
    else:
        assert words[0] == "python" and words[1].startswith("benchmarks/"), command
        load(words[1].removeprefix("benchmarks/").removesuffix(".py")).parser().parse_args(
            words[2:]
        )


def test_the_readme_lists_the_benchmarks_that_exist():
    readme = (ROOT / "README.md").read_text()
    listed = {
        name.strip()
        for line in re.findall(r"^dassdp bench (.*?)(?:#|$)", readme, flags=re.M)
        for name in line.split("|")
    }
    assert listed == set(BENCHMARKS)
    for script in re.findall(r"python\s+benchmarks/(\w+)\.py", readme):
        assert (ROOT / "benchmarks" / f"{script}.py").is_file(), script
