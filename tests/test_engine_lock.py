"""The run-folder lock with both mechanisms (issue 20): ``flock`` and the ``O_EXCL`` lock file
that works where ``flock`` does not (Lustre without ``-o flock``): one holder at a time, the
holder named in the error, a dead holder's lock taken over (same host: its pid is gone;
another host: its SLURM job has ended; the same job requeued), and ``auto`` falling back
to the file when the file system refuses ``flock``."""

from __future__ import annotations

import errno
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dassdp.engine import rundir
from dassdp.engine.rundir import EXCL_LOCK, LOCK, RunFolderError, RunLock, lock_holder
from fake_slurm import install

POSIX = pytest.mark.skipif(os.name != "posix", reason="needs POSIX processes and fcntl")


def _write_holder(run: Path, **holder) -> None:
    base = {"host": platform.node(), "pid": 1, "start": None, "job": None, "restart": 0}
    (run / EXCL_LOCK).write_text(json.dumps({**base, **holder}))


@POSIX
@pytest.mark.parametrize("mechanism", ["flock", "file"])
def test_one_holder_at_a_time_and_release_frees_it(tmp_path, monkeypatch, mechanism):
    monkeypatch.setenv("DASSDP_LOCK", mechanism)
    first = RunLock(tmp_path)
    assert first.mechanism == mechanism
    with pytest.raises(RunFolderError, match=f"is being trained by pid {os.getpid()}"):
        RunLock(tmp_path)
    assert lock_holder(tmp_path)["pid"] == os.getpid()  # seen without taking it
    first.release()
    assert lock_holder(tmp_path) is None
    if mechanism == "file":
        assert not (tmp_path / EXCL_LOCK).exists()  # removed on release
    RunLock(tmp_path).release()


def _holder_process(run: Path, mechanism: str) -> subprocess.Popen:
    # rundir.py alone (the dassdp.engine package would import torch: seconds per process)
    code = (
        "import importlib.util, time\n"
        f"spec = importlib.util.spec_from_file_location('rundir', {rundir.__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        f"lock = mod.RunLock({str(run)!r}, {mechanism!r})\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@POSIX
@pytest.mark.parametrize("mechanism", ["flock", "file"])
def test_a_killed_holders_lock_is_taken_over(tmp_path, mechanism):
    proc = _holder_process(tmp_path, mechanism)
    try:
        with pytest.raises(RunFolderError, match=f"pid {proc.pid}"):
            RunLock(tmp_path, mechanism)
        assert lock_holder(tmp_path)["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if mechanism == "file":  # nothing removed it: the owner's death makes it stale
        assert json.loads((tmp_path / EXCL_LOCK).read_text())["pid"] == proc.pid
    assert lock_holder(tmp_path) is None
    lock = RunLock(tmp_path, mechanism)
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_file_lock_names_host_and_job_and_holds_while_the_job_runs(tmp_path, monkeypatch):
    """Another machine's holder: only the scheduler can tell whether it is gone."""
    monkeypatch.setenv("DASSDP_LOCK", "file")
    env = install(tmp_path / "bin", tmp_path / "slurm")
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_SLURM_STATE", env["FAKE_SLURM_STATE"])
    run = tmp_path / "run"
    run.mkdir()
    _write_holder(run, host="node017", pid=4321, job="777")
    (tmp_path / "slurm" / "777.state").write_text("RUNNING")
    with pytest.raises(RunFolderError, match=r"pid 4321 on node017 \(SLURM job 777\)"):
        RunLock(run)
    (tmp_path / "slurm" / "777.state").write_text("COMPLETED")  # the job ended: stale
    lock = RunLock(run)
    assert json.loads((run / EXCL_LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    # no job id and another host: nothing can tell it is stale, so it holds
    _write_holder(run, host="node017", pid=4321)
    with pytest.raises(RunFolderError, match=f"remove {run / EXCL_LOCK}"):
        RunLock(run)


def test_file_lock_of_an_earlier_run_of_a_requeued_job_is_stale(tmp_path, monkeypatch):
    """SLURM requeues keep the job id (possibly on another node) and count restarts."""
    monkeypatch.setenv("DASSDP_LOCK", "file")
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue: the restart count decides
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _write_holder(tmp_path, host="node017", pid=99, job="4242", restart=0)
    RunLock(tmp_path).release()
    _write_holder(tmp_path, host="node017", pid=99, job="4242", restart=1)  # same start: held
    with pytest.raises(RunFolderError, match="SLURM job 4242"):
        RunLock(tmp_path)


def test_an_empty_lock_file_is_held_briefly_then_stale(tmp_path, monkeypatch):
    """A process killed between creating the file and writing it leaves it empty."""
    monkeypatch.setenv("DASSDP_LOCK", "file")
    (tmp_path / EXCL_LOCK).write_text("")
    with pytest.raises(RunFolderError, match="being written"):
        RunLock(tmp_path)
    old = time.time() - 120
    os.utime(tmp_path / EXCL_LOCK, (old, old))
    RunLock(tmp_path).release()


@POSIX
def test_auto_falls_back_to_the_lock_file_where_flock_is_refused(tmp_path, monkeypatch):
    """Lustre without -o flock answers flock() with ENOSYS (NFS with nolock: ENOLCK)."""

    def refused(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(rundir.fcntl, "flock", refused)
    monkeypatch.delenv("DASSDP_LOCK", raising=False)
    lock = RunLock(tmp_path)
    assert lock.mechanism == "file" and (tmp_path / EXCL_LOCK).is_file()
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()
    with pytest.raises(RunFolderError, match=r"DASSDP_LOCK=flock: .*-o flock"):
        RunLock(tmp_path, "flock")
    with pytest.raises(ValueError, match="DASSDP_LOCK='nfs': use one of auto, flock, file"):
        RunLock(tmp_path, "nfs")


def test_a_trainer_holds_the_file_lock_while_it_lives(tmp_path, monkeypatch):
    """The engine with DASSDP_LOCK=file: a second trainer of the folder is refused (host and
    pid named) while the first exists; close() removes the lock file."""
    from dassdp.engine import Trainer
    from engine_fixtures import tiny

    monkeypatch.setenv("DASSDP_LOCK", "file")
    first = Trainer(tiny(), tmp_path)
    try:
        holder = json.loads((tmp_path / EXCL_LOCK).read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), platform.node())
        assert not (tmp_path / LOCK).exists()  # the flock mechanism was not used
        with pytest.raises(RunFolderError, match=f"pid {os.getpid()} on {platform.node()}"):
            Trainer(tiny(), tmp_path)
    finally:
        first.close()
    assert not (tmp_path / EXCL_LOCK).exists()
    Trainer(tiny(), tmp_path).close()
