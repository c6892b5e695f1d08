"""The memory allocator the ``dassdp`` command chooses (``dassdp._util.allocator``: the choice,
the preload environment, what a process reports it runs with; ``dassdp.commands._launch``:
the glibc settings and the re-execution)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dassdp._util import allocator as _malloc
from dassdp.commands import _launch

SRC = str(Path(__file__).resolve().parents[1] / "src")


def dassdp_version(**env: str) -> subprocess.CompletedProcess[str]:
    """``python -m dassdp --version`` in a fresh process with ``env`` on top of a clean one."""
    base = _malloc.preload_env("system")  # no preload inherited from this process
    for key in (_malloc.ALLOCATOR_ENV, _malloc.ENV, "MALLOC_CONF"):
        base.pop(key, None)
    base.update(PYTHONPATH=SRC, **env)
    return subprocess.run(
        [sys.executable, "-m", "dassdp", "--version"],
        env=base, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def expected_auto() -> str:
    for name in ("jemalloc", "tcmalloc"):
        if _malloc.find_library(name) is not None:
            return name
    return "glibc tuned"


def test_the_choice_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(_malloc.ALLOCATOR_ENV, raising=False)
    monkeypatch.delenv(_malloc.ENV, raising=False)
    assert _malloc.requested_allocator() == "auto"
    monkeypatch.setenv(_malloc.ENV, "0")  # the older opt-out switch
    assert _malloc.requested_allocator() == "system"
    monkeypatch.setenv(_malloc.ALLOCATOR_ENV, " JEmalloc ")
    assert _malloc.requested_allocator() == "jemalloc"
    monkeypatch.setenv(_malloc.ALLOCATOR_ENV, "hoard")
    with pytest.raises(ValueError, match=r"DASSDP_ALLOCATOR='hoard'.*auto, jemalloc, tcmalloc"):
        _malloc.requested_allocator()


def test_glibc_settings_and_their_opt_outs(monkeypatch):
    monkeypatch.delenv(_malloc.ALLOCATOR_ENV, raising=False)
    monkeypatch.setenv(_malloc.ENV, "0")
    assert _launch.tune_allocator() is False
    monkeypatch.setenv(_malloc.ALLOCATOR_ENV, "system")
    assert _launch.tune_allocator() is False
    monkeypatch.setenv(_malloc.ALLOCATOR_ENV, "glibc")
    assert _launch.tune_allocator() is True  # glibc (Linux) runs the tests
    assert _malloc.allocator_tuned()
    assert _malloc.active_allocator() in ("glibc tuned", "jemalloc", "tcmalloc")


def test_find_library_looks_in_the_interpreter_prefix(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libtcmalloc_minimal.so.4").write_bytes(b"")
    (tmp_path / "lib" / "libtcmalloc_minimal_debug.so.4").write_bytes(b"")
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path))
    assert _malloc.find_library("tcmalloc") == str(tmp_path / "lib" / "libtcmalloc_minimal.so.4")
    with pytest.raises(ValueError, match="unknown allocator library 'hoard'"):
        _malloc.find_library("hoard")


def test_preload_env_sets_and_strips_the_library(monkeypatch):
    monkeypatch.setattr(_malloc, "find_library", lambda name: f"/opt/lib/lib{name}.so.2")
    env = {"LD_PRELOAD": "/x/libfoo.so", _malloc.ENV: "0", "HOME": "/h"}
    je = _malloc.preload_env("jemalloc", env)
    assert je["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2 /x/libfoo.so"  # the user's kept
    assert je["MALLOC_CONF"] == _malloc.JEMALLOC_CONF
    assert je[_malloc.ALLOCATOR_ENV] == "jemalloc" and _malloc.ENV not in je
    assert env["LD_PRELOAD"] == "/x/libfoo.so"  # a copy: the argument is unchanged
    # the user's own jemalloc settings win
    assert _malloc.preload_env("jemalloc", {"MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == (
        "narenas:1"
    )
    tc = _malloc.preload_env("tcmalloc", je)  # one allocator at a time
    assert tc["LD_PRELOAD"] == "/opt/lib/libtcmalloc.so.2 /x/libfoo.so"
    assert "MALLOC_CONF" not in tc  # ours, dropped with jemalloc
    for name in ("glibc", "system"):
        plain = _malloc.preload_env(name, je)
        assert plain["LD_PRELOAD"] == "/x/libfoo.so" and plain[_malloc.ALLOCATOR_ENV] == name
    only_ours = {"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}
    assert "LD_PRELOAD" not in _malloc.preload_env("system", only_ours)
    with pytest.raises(ValueError, match="choose one of"):
        _malloc.preload_env("auto", {})


def test_a_missing_library_asked_for_by_name_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(_malloc, "find_library", lambda name: None)
    with pytest.raises(ValueError, match=r"DASSDP_ALLOCATOR=jemalloc.*apt install libjemalloc2"):
        _malloc.preload_env("jemalloc", {})
    with pytest.raises(ValueError, match="apt install libtcmalloc-minimal4"):
        _malloc.preload_env("tcmalloc", {})


def test_setup_reexecutes_once_with_the_library_preloaded(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(_malloc, "find_library", lambda name: f"/opt/lib/lib{name}.so.2")
    monkeypatch.setattr(_malloc, "active_allocator", lambda: "glibc")
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.setattr(_launch, "tune_allocator", lambda: calls.append("tuned"))
    monkeypatch.delenv(_malloc.ALLOCATOR_ENV, raising=False)
    monkeypatch.delenv(_malloc.ENV, raising=False)
    monkeypatch.delenv("_DASSDP_PRELOADED", raising=False)
    _launch.setup_allocator()
    exe, argv, env = calls[0]
    assert exe == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"].split()[0] == "/opt/lib/libjemalloc.so.2"  # auto: jemalloc first
    assert env["MALLOC_CONF"] == _malloc.JEMALLOC_CONF
    assert env[_malloc.ALLOCATOR_ENV] == "auto"  # children choose the same way
    # The re-executed process finds the marker but not the library mapped (the dynamic
    # linker refused it): no second re-execution, glibc tuned, a note on stderr.
    calls.clear()
    monkeypatch.setenv("_DASSDP_PRELOADED", env["_DASSDP_PRELOADED"])
    _launch.setup_allocator()
    assert calls == ["tuned"]
    assert "could not preload /opt/lib/libjemalloc.so.2" in capsys.readouterr().err


def test_setup_with_the_library_loaded_or_glibc_chosen_does_not_reexecute(monkeypatch):
    calls = []
    monkeypatch.setattr(_malloc, "find_library", lambda name: f"/opt/lib/lib{name}.so.2")
    monkeypatch.setattr(os, "execve", lambda *a: calls.append("exec"))
    monkeypatch.setattr(_launch, "tune_allocator", lambda: calls.append("tuned"))
    monkeypatch.setenv(_malloc.ALLOCATOR_ENV, "tcmalloc")
    monkeypatch.setattr(_malloc, "active_allocator", lambda: "tcmalloc")
    _launch.setup_allocator()
    monkeypatch.setenv(_malloc.ALLOCATOR_ENV, "glibc")
    monkeypatch.setattr(_malloc, "active_allocator", lambda: "glibc")
    _launch.setup_allocator()
    assert calls == ["tuned", "tuned"]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("", None), ("glibc", "glibc tuned"), ("system", "glibc"), ("jemalloc", "jemalloc")],
)
def test_the_dassdp_command_runs_with_the_chosen_allocator(choice, expected):
    """A real process: the command re-executes itself with the library and reports it."""
    got = dassdp_version(**({_malloc.ALLOCATOR_ENV: choice} if choice else {}))
    if choice == "jemalloc" and _malloc.find_library("jemalloc") is None:
        # Not installed here: asked for by name, it is a clear error, not a silent fallback.
        assert got.returncode == 2 and "apt install libjemalloc2" in got.stderr, got.stderr
        return
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip().endswith(f"allocator {expected or expected_auto()})"), got.stdout


def test_a_bad_choice_stops_the_command_with_a_clear_error():
    got = dassdp_version(**{_malloc.ALLOCATOR_ENV: "hoard"})
    assert got.returncode == 2
    assert "DASSDP_ALLOCATOR='hoard' is not an allocator" in got.stderr
