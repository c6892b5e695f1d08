"""scripts/gpu_check.sh on the CPU: it parses, and every step it would run exists with the
arguments it passes (so a GPU lease is not spent on a typo)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dassdp.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def dry_run(tmp_path: Path) -> list[tuple[str, int, list[str]]]:
    env = {**os.environ, "DRY_RUN": "1"}
    out = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    steps = []
    for line in out.splitlines():
        name, limit, command = line.split("|", 2)
        steps.append((name, int(limit), shlex.split(command)))
    return steps


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_bench_step_parses_with_the_cli(tmp_path):
    steps = dry_run(tmp_path)
    names = [name for name, _, _ in steps]
    assert names[0] == "pytest-cuda" and len(set(names)) == len(names)
    benches = [cmd for _, _, cmd in steps if cmd[1:4] == ["-m", "dassdp", "bench"]]
    assert {cmd[4] for cmd in benches} >= {"syncs", "overhead", "throughput", "rule"}
    parser = build_parser()
    for cmd in benches:
        args = parser.parse_args(cmd[3:])  # exits (SystemExit) on an unknown option or value
        assert args.device == "cuda", cmd


def test_the_time_limits_fit_the_lease(tmp_path):
    # one device run is at most 9 minutes, machine start included: the steps get under 8
    assert sum(limit for _, limit, _ in dry_run(tmp_path)) <= 8 * 60


def test_the_pytest_step_selects_the_cuda_tests(tmp_path):
    (_, _, cmd), *_ = dry_run(tmp_path)
    assert "-m" in cmd and cmd[cmd.index("-m", 2) + 1] == "cuda"
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *cmd[3:]],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert collected.returncode == 0, collected.stdout[-2000:]
    found = re.search(r"tests/test_cuda.py: (\d+)", collected.stdout)  # -q -q: count per file
    assert found and int(found.group(1)) >= 20, collected.stdout


@pytest.mark.parametrize("name", ["gpu-check-out/", ".whl/"])
def test_its_outputs_are_git_ignored(name):
    assert f"/{name}" in (ROOT / ".gitignore").read_text().splitlines()
