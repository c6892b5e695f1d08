"""The library leaves its process alone: ``import dassdp`` and ``dassdp.cli.main`` change no
allocator setting and no environment variable; only the ``dassdp`` program's start
(``dassdp.commands._launch``) installs the allocator, and a run reports what its process
runs with. Environment switches have one meaning each, and one meaning of "off"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dassdp import DASSDP, DASSDPConfig
from dassdp._util import allocator
from dassdp._util.env import env_flag
from dassdp.cli import main
from dassdp.engine import ConfigError
from engine_fixtures import tiny_dict

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Run in a fresh interpreter: whether glibc still serves a 64 MiB block with its own mmap
# (its default; the dassdp settings, M_MMAP_MAX = 0, take it from the heap) before and after
# `import dassdp` and an in-process `dassdp.cli.main(["train", ...])`, and whether the
# environment variables of the allocator and of dassdp changed (torch sets its own, e.g.
# TORCHINDUCTOR_CACHE_DIR).
_PROBE = r"""
import ctypes, json, os, sys

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def large_block_mmapped():
    before = libc.mallinfo2().hblkhd
    block = bytearray(64 << 20)
    grew = libc.mallinfo2().hblkhd - before
    del block
    return grew >= 64 << 20

def ours():
    keys = ("LD_PRELOAD", "MALLOC_CONF")
    return {k: v for k, v in os.environ.items() if k in keys or "DASSDP" in k}

environ = ours()
fresh = large_block_mmapped()
import dassdp
import dassdp.cli
imported = large_block_mmapped()
rc = dassdp.cli.main(["train", "-c", sys.argv[1], "--out", sys.argv[2], "epochs=1"])
after_main = large_block_mmapped()
print(json.dumps({"rc": rc, "fresh": fresh, "imported": imported, "after_main": after_main,
                  "environ_same": ours() == environ}))
"""


def _clean_env(**env: str) -> dict[str, str]:
    """This process's environment without any allocator choice, preload or record."""
    base = allocator.preload_env("system")
    for key in (allocator.ALLOCATOR_ENV, allocator.ENV, "MALLOC_CONF"):
        base.pop(key, None)
    base.update(PYTHONPATH=SRC, OMP_NUM_THREADS="1", **env)
    return base


def _tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(epochs=1, plasticity=None)))
    return path


def _glibc() -> bool:
    try:
        import ctypes

        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="probes glibc's malloc (mallinfo2, glibc >= 2.33)")
@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_import_and_cli_main_leave_the_allocator_and_the_environment_alone(tmp_path):
    """Regression: ``cli.main`` applied the glibc ``mallopt`` settings to its caller's process
    (a script, a notebook, a test run), and the run recorded ``glibc tuned``."""
    config, run = _tiny_config(tmp_path), tmp_path / "run"
    env = _clean_env(**{allocator.ALLOCATOR_ENV: "glibc"})  # asks the program for the settings
    got = subprocess.run(
        [sys.executable, "-c", _PROBE, str(config), str(run)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    probe = json.loads(got.stdout.strip().splitlines()[-1])
    assert probe == {
        "rc": 0, "fresh": True, "imported": True, "after_main": True, "environ_same": True
    }  # fmt: skip
    assert json.loads((run / "run.json").read_text())["allocator"] == "glibc"


@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_the_dassdp_program_installs_the_allocator_and_the_run_records_it(tmp_path):
    config, run = _tiny_config(tmp_path), tmp_path / "run"
    env = _clean_env(**{allocator.ALLOCATOR_ENV: "glibc"})
    cmd = [sys.executable, "-m", "dassdp", "train", "-c", str(config), "--out", str(run)]
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert got.returncode == 0, got.stderr
    assert json.loads((run / "run.json").read_text())["allocator"] == "glibc tuned"


def test_the_record_of_the_glibc_settings_holds_only_in_the_process_that_made_them(monkeypatch):
    if allocator.active_allocator() in allocator.PRELOADED:
        pytest.skip("this test process runs with a preloaded allocator")
    monkeypatch.setenv(allocator.TUNED_ENV, "1")  # another process's pid
    assert allocator.active_allocator() == "glibc"
    monkeypatch.setenv(allocator.TUNED_ENV, str(os.getpid()))
    assert allocator.active_allocator() == "glibc tuned"
    # A process started from this one inherits the record but not the settings.
    code = "from dassdp._util.allocator import active_allocator; print(active_allocator())"
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("LD_PRELOAD", None)
    child = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert child.stdout.strip() == "glibc"
    assert allocator.TUNED_ENV not in allocator.preload_env("system")  # never passed on


@pytest.mark.parametrize(
    ("value", "on"),
    [(None, False), ("", False), ("0", False), (" false ", False), ("No", False),
     ("OFF", False), ("1", True), ("true", True), ("yes", True), ("2", True)],
)  # fmt: skip
def test_env_flag_has_one_meaning_of_off(value, on):
    environ = {} if value is None else {"DASSDP_X": value}
    assert env_flag("DASSDP_X", environ) is on


def _bad_config(tmp_path: Path) -> list[str]:
    config = _tiny_config(tmp_path)
    return ["train", "-c", str(config), "--out", str(tmp_path / "r"), "epohcs=3"]


@pytest.mark.parametrize("value", ["0", "false", "", "off"])
def test_cli_traceback_switch_off_values_keep_the_one_line_error(
    value, tmp_path, monkeypatch, capsys
):
    """Regression: ``DASSDP_DEBUG=0`` (any non-empty value) raised the traceback."""
    monkeypatch.setenv("DASSDP_TRACEBACK", value)
    monkeypatch.setenv("DASSDP_DEBUG", value)
    assert main(_bad_config(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "unknown config key(s) epohcs" in err and "Traceback" not in err


def test_cli_traceback_has_its_own_switch(tmp_path, monkeypatch, capsys):
    """``DASSDP_TRACEBACK=1`` raises the error with its traceback; ``DASSDP_DEBUG=1`` (the
    learner's device checks) does not change what the CLI prints."""
    monkeypatch.delenv("DASSDP_TRACEBACK", raising=False)
    monkeypatch.setenv("DASSDP_DEBUG", "1")
    assert main(_bad_config(tmp_path)) == 2
    assert "unknown config key(s) epohcs" in capsys.readouterr().err
    monkeypatch.delenv("DASSDP_DEBUG")
    monkeypatch.setenv("DASSDP_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="unknown config key"):
        main(_bad_config(tmp_path))


@pytest.mark.parametrize(("value", "on"), [("false", False), ("off", False), ("0", False),
                                           ("1", True), ("true", True)])  # fmt: skip
def test_learner_debug_switch(value, on, monkeypatch):
    """Regression: ``DASSDP_DEBUG=false`` turned the learner's read-back checks on."""
    monkeypatch.setenv("DASSDP_DEBUG", value)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0), sites={"0": "output>0"})
    try:
        assert plast.debug is on
    finally:
        plast.close()
