"""scripts/gpu_check.sh and scripts/gpu_preflight.py on the CPU: the script parses, every step
it would run exists with the arguments it passes, its worst case fits the device lease, a
missing optional package drops only its row and a missing required one stops the check with
its name (so a GPU lease is not spent on a typo or an absent package); `make wheels` fetches
what the check installs offline."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dassdp.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PREFLIGHT = ROOT / "scripts" / "gpu_preflight.py"
SETUP = ("wheels", "nvidia-smi", "preflight")  # timed commands before the check's steps
LEASE_S = 8 * 60  # the worst case must stay under this (one device run, machine start aside)
UNTIMED_S = 15  # allowance for what runs without a limit: date, git describe, cp, tar, mkdir
H200_MEASURED_S = {"bench-rule": 34}  # the steps an H200 ran to their end (docs/benchmarks.md)


def _fake_python(tmp_path: Path, missing: tuple[str, ...]) -> Path:
    """A ``python`` that is this one, except that the packages in ``missing`` fail to import
    (a package of that name earlier on the path raises ModuleNotFoundError)."""
    shadow = tmp_path / "shadow"
    for name in missing:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError({f'No module named {name!r}'!r}, name={name!r})\n"
        )
    fake = tmp_path / "python"
    fake.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(shadow))}${{PYTHONPATH:+:$PYTHONPATH}} "
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    fake.chmod(0o755)
    return fake


def _run_script(out: Path, python: str, dry: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python}
    env.pop("DRY_RUN", None)
    if dry:
        env["DRY_RUN"] = "1"
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, cwd=ROOT
    )


def _steps(stdout: str) -> list[tuple[str, int, list[str]]]:
    steps = []
    for line in stdout.splitlines():
        name, limit, command = line.split("|", 2)
        steps.append((name, int(limit), shlex.split(command)))
    return steps


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[list[tuple[str, int, list[str]]], str]:
    """The dry run with this Python: ``(timed commands, stderr)``."""
    done = _run_script(tmp_path_factory.mktemp("dry") / "out", sys.executable)
    assert done.returncode == 0, done.stderr[-3000:]
    return _steps(done.stdout), done.stderr


def _check_steps(dry) -> list[tuple[str, int, list[str]]]:
    return [s for s in dry[0] if s[0] not in SETUP]


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_every_bench_step_parses_with_the_cli(dry):
    steps = _check_steps(dry)
    names = [name for name, _, _ in steps]
    assert names[0] == "pytest-cuda" and len(set(names)) == len(names)
    assert [name for name, _, _ in dry[0][: len(SETUP)]] == list(SETUP)
    benches = [cmd for _, _, cmd in steps if cmd[1:4] == ["-m", "dassdp", "bench"]]
    assert {cmd[4] for cmd in benches} >= {"syncs", "overhead", "throughput", "rule"}
    parser = build_parser()
    for cmd in benches:
        args = parser.parse_args(cmd[3:])  # exits (SystemExit) on an unknown option or value
        assert args.device == "cuda", cmd


def _constant(name: str) -> int:
    found = re.search(rf"^{name}=(\d+)\b", SCRIPT.read_text(), re.M)
    assert found, f"{name}= not found in {SCRIPT}"
    return int(found.group(1))


def test_the_worst_case_fits_the_lease(dry):
    # every timed command at its limit, then KILL_GRACE more before SIGKILL; the wheels,
    # nvidia-smi and preflight commands count like the steps
    grace = _constant("KILL_GRACE")
    timed = dry[0]
    assert {name for name, _, _ in timed} >= set(SETUP)
    worst = sum(limit + grace for _, limit, _ in timed)
    assert worst + UNTIMED_S < LEASE_S, f"worst case {worst} s + {UNTIMED_S} s untimed"
    assert f"{worst} s" in SCRIPT.read_text()  # the header states the same figure
    # nothing else in the script waits under a limit of its own: one timeout in timed(), one
    # for the dry run's preflight (not run on the device)
    code = [line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert sum(len(re.findall(r"\btimeout\s", line)) for line in code) == 2
    # every LIMIT_ constant is used by a timed command
    limits = re.findall(r"^(LIMIT_\w+)=", SCRIPT.read_text(), re.M)
    assert len(limits) == len(timed)


@pytest.mark.parametrize("step,measured", sorted(H200_MEASURED_S.items()))
def test_measured_steps_have_half_again_as_long(dry, step, measured):
    limit = {name: lim for name, lim, _ in dry[0]}[step]
    assert limit >= 1.5 * measured


def test_the_pytest_step_selects_the_cuda_tests(dry):
    (_, _, cmd), *_ = _check_steps(dry)
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


def _throughput_neurons(steps) -> list[str]:
    (cmd,) = [cmd for name, _, cmd in steps if name == "bench-throughput"]
    return build_parser().parse_args(cmd[3:]).neurons


def test_the_throughput_step_compares_with_spikingjelly_when_it_imports(dry):
    if importlib.util.find_spec("spikingjelly") is None:
        pytest.skip("spikingjelly is not installed here (make install puts it in .venv)")
    assert _throughput_neurons(dry[0]) == ["dassdp", "spikingjelly", "dassdp-torch"]
    assert "note: spikingjelly" not in dry[1]


def test_a_missing_optional_package_drops_only_its_row(tmp_path, dry):
    done = _run_script(tmp_path / "out", str(_fake_python(tmp_path, ("spikingjelly",))))
    assert done.returncode == 0, done.stderr[-3000:]
    steps = _steps(done.stdout)
    assert _throughput_neurons(steps) == ["dassdp", "dassdp-torch"]
    assert "absent   spikingjelly (optional)" in done.stderr
    assert "bench throughput runs without its spikingjelly row" in done.stderr
    status = (tmp_path / "out" / "status.txt").read_text()
    assert "bench-throughput-spikingjelly skipped" in status
    # every other step, and every limit, is as with SpikingJelly
    others = [(n, lim, c) for n, lim, c in steps if n != "bench-throughput"]
    assert [(n, lim) for n, lim, _ in others] == [
        (n, lim) for n, lim, _ in dry[0] if n != "bench-throughput"
    ]


def test_a_missing_required_package_stops_the_check_and_says_which(tmp_path):
    done = _run_script(tmp_path / "out", str(_fake_python(tmp_path, ("pytest", "torch"))))
    assert done.returncode == 1
    assert [name for name, _, _ in _steps(done.stdout)] == list(SETUP)  # no step after it
    assert re.search(r"^MISSING  pytest \(required\): .*make wheels", done.stderr, re.M)
    assert re.search(r"^MISSING  torch \(required\): ModuleNotFoundError", done.stderr, re.M)
    assert "preflight: missing required: torch, timm, torchvision, pytest" in done.stderr
    assert "stopped: the preflight failed" in done.stderr


def test_a_real_run_without_torch_stops_at_the_preflight(tmp_path):
    # not a dry run: the timed commands run and are logged (no GPU needed to get this far)
    out = tmp_path / "out"
    done = _run_script(out, str(_fake_python(tmp_path, ("torch",))), dry=False)
    assert done.returncode == 1, done.stdout[-3000:]
    log = (out / "gpu_check.log").read_text()
    assert "=== [preflight] exit 1" in log and "MISSING  torch (required)" in log
    assert "MISSING  torch (required)" in done.stdout  # said on the console too
    status = (out / "status.txt").read_text().splitlines()
    assert [line.split()[:2] for line in status][-1] == ["preflight", "1"]
    assert "pytest-cuda" not in log


def _preflight_module():
    spec = importlib.util.spec_from_file_location("gpu_preflight", PREFLIGHT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_preflight_needs_a_cuda_device_unless_told_not_to(capsys):
    import torch

    gpu_preflight = _preflight_module()
    status = gpu_preflight.check(need_cuda=True)
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert status == 0 and "ok       CUDA" in out
    else:
        assert status == 1 and "MISSING  a CUDA device (required)" in out
        assert out.rstrip().endswith("preflight: missing required: a CUDA device")
    assert gpu_preflight.check(need_cuda=False) == 0
    assert "skipped  the CUDA device check (--no-cuda)" in capsys.readouterr().out
    assert gpu_preflight.main(["chek"]) == 2 and "check [--no-cuda]" in capsys.readouterr().err


def _wheel(folder: Path, dist: str, module: str) -> Path:
    """A minimal pure-Python wheel: ``module`` with ``VALUE = 42``."""
    info = f"{dist}-1.0.dist-info"
    path = folder / f"{dist}-1.0-py3-none-any.whl"
    files = {
        f"{module}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_wheels_installs_only_what_does_not_import(tmp_path, capsys):
    gpu_preflight = _preflight_module()
    src, target = tmp_path / "whl", tmp_path / "site"
    src.mkdir()
    _wheel(src, "gpucheck_probe", "gpucheck_probe")
    _wheel(src, "pytest", "pytest")  # installed here: must not be shadowed
    assert gpu_preflight.wheels(src, target) == 0
    assert (target / "gpucheck_probe" / "__init__.py").read_text() == "VALUE = 42\n"
    assert not (target / "pytest").exists()
    out = capsys.readouterr().out
    assert "pytest-1.0-py3-none-any.whl: already installed, kept" in out
    assert "gpucheck_probe-1.0-py3-none-any.whl: installing" in out


def test_wheels_unpacks_pure_python_wheels_without_pip(tmp_path, monkeypatch):
    gpu_preflight = _preflight_module()
    src, target = tmp_path / "whl", tmp_path / "site"
    src.mkdir()
    _wheel(src, "gpucheck_probe", "gpucheck_probe")
    failed = subprocess.CompletedProcess([], 1)
    monkeypatch.setattr(gpu_preflight.subprocess, "run", lambda *a, **k: failed)
    assert gpu_preflight.wheels(src, target) == 0
    assert (target / "gpucheck_probe" / "__init__.py").exists()


def test_make_wheels_fetches_pytest_with_its_dependencies_and_spikingjelly():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # under `make test` the outer make's MAKEFLAGS/MAKELEVEL would add "Entering directory"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "wheels"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert dry.returncode == 0, dry.stderr
    words = shlex.split(dry.stdout)
    assert words[1:6] == ["-m", "pip", "download", "--quiet", "--no-deps"]
    assert "--only-binary=:all:" in words and words[words.index("--dest") + 1] == ".whl"
    pins = dict(w.split("==") for w in words if "==" in w)
    assert pins["spikingjelly"] == "2.0.0" and "loguru" in pins and "pytest" in pins
    # pytest's unconditional requirements (no environment marker, no extra) are all fetched
    needed = [
        re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower()
        for req in importlib.metadata.requires("pytest") or []
        if ";" not in req
    ]
    assert needed and set(needed) <= set(pins), (needed, pins)


@pytest.mark.parametrize("name", ["gpu-check-out/", ".whl/"])
def test_its_outputs_are_git_ignored(name):
    assert f"/{name}" in (ROOT / ".gitignore").read_text().splitlines()
