"""The sweep runner: pairing by seed, resume after a kill without redoing finished runs,
no overwrite of a folder that holds a different run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from dassdp.engine import fit as engine_fit
from dassdp.engine import read_metrics
from dassdp.experiments import runner
from dassdp.experiments.runner import DONE, parse_seeds, plan, run_sweep
from engine_fixtures import tiny_dict

VARIANTS = ["baseline", "dassdp"]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(epochs=3)))
    return path


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in read_metrics(run_dir)]


def _stamps(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}


def test_parse_seeds() -> None:
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("3,0-1,3") == [3, 0, 1]
    for bad in ("a", "", "2-x"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    # regression: a reversed range said "give seeds >= 0"
    with pytest.raises(ValueError, match="the range '3-1' is reversed; write 1-3"):
        parse_seeds("3-1")


def test_resume_after_kill_skips_finished_runs(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cmp"
    specs = plan(config_file, [0], VARIANTS, out)
    calls: list[tuple[str, Any]] = []

    def killed_in_second_run(cfg: Any, run_dir: Any, resume: Any = False) -> Any:
        calls.append((Path(run_dir).parent.name, resume))
        if len(calls) == 2:  # the 2nd run dies after its first epoch (checkpoint written)
            engine_fit(cfg, run_dir, resume=resume, stop_after=1)
            raise KeyboardInterrupt
        return engine_fit(cfg, run_dir, resume=resume)

    monkeypatch.setattr(runner, "fit", killed_in_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(specs, out, argv=[])
    first, second = out / "baseline" / "seed0", out / "dassdp" / "seed0"
    assert (first / DONE).is_file() and not (second / DONE).is_file()
    assert (second / "last.pt").is_file() and len(read_metrics(second)) == 1
    before, epoch0 = _stamps(first), _rows(second)[0]

    calls.clear()
    result = run_sweep(specs, out, argv=[])
    assert result.ok and result.status == {"baseline seed0": "done", "dassdp seed0": "trained"}
    assert calls == [("dassdp", True)]  # only the interrupted run, resumed from last.pt
    assert _stamps(first) == before  # the finished run was not touched
    assert (second / DONE).is_file() and _rows(second)[0] == epoch0

    # the resumed run ends exactly as an uninterrupted one
    ref = tmp_path / "ref"
    engine_fit(specs[1].resolve(), ref)
    assert _rows(second) == _rows(ref)

    # pairing: same seed -> same init and data; the warm-up epoch only records (no change)
    base = _rows(first)
    assert base[0]["train"] == epoch0["train"] and base[0]["test"] == epoch0["test"]
    assert base[0]["firing_rate"] == epoch0["firing_rate"]
    assert base[-1]["train"] != _rows(second)[-1]["train"]  # DA-SSDP acted afterwards

    calls.clear()
    assert run_sweep(specs, out, argv=[]).status == {
        "baseline seed0": "done",
        "dassdp seed0": "done",
    }
    assert calls == []


def test_a_folder_with_another_config_is_not_overwritten(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    specs = plan(config_file, [1], ["baseline"], out, ["epochs=1"])
    assert run_sweep(specs, out, argv=[]).ok
    run_dir = out / "baseline" / "seed1"
    before = _stamps(run_dir)
    other = plan(config_file, [1], ["baseline"], out, ["epochs=1", "lr=0.1"])
    result = run_sweep(other, out, argv=[])
    assert not result.ok and "different config (lr" in result.errors["baseline seed1"]
    longer = plan(config_file, [1], ["baseline"], out, ["epochs=2"])  # finished, but shorter
    assert "different config (epochs" in run_sweep(longer, out, argv=[]).errors["baseline seed1"]
    assert _stamps(run_dir) == before


def test_a_folder_from_before_a_learner_key_was_added_is_kept(
    config_file: Path, tmp_path: Path
) -> None:
    """A finished run whose saved plasticity block lacks a key added since (it takes the
    preset's value, so the same learner) is done, not a conflict."""
    out = tmp_path / "cmp"
    specs = plan(config_file, [1], ["dassdp"], out, ["epochs=1", "plasticity.warmup_epochs=0"])
    assert run_sweep(specs, out, argv=[]).ok
    saved = out / "dassdp" / "seed1" / "config.yaml"
    lines = saved.read_text().splitlines(keepends=True)
    data = yaml.safe_load("".join(lines))
    del data["plasticity"]["eps"]  # as an older version wrote it
    saved.write_text("".join(x for x in lines if x.startswith("#")) + yaml.safe_dump(data))
    before = _stamps(out / "dassdp" / "seed1")
    result = run_sweep(specs, out, argv=[])
    assert result.ok and result.status["dassdp seed1"] == "done"
    assert _stamps(out / "dassdp" / "seed1") == before


def test_sigkill_mid_sweep_then_continue(config_file: Path, tmp_path: Path) -> None:
    """A real kill (SIGKILL of the CLI process) at an arbitrary moment after the first run."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "dassdp", "compare", "--config", str(config_file)]
    cmd += ["--seeds", "0", "--variants", ",".join(VARIANTS), "--out", str(out), "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "baseline" / "seed0"
    deadline = time.monotonic() + 120
    while not (first / DONE).is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (first / DONE).is_file()
    before = _stamps(first)
    specs = plan(config_file, [0], VARIANTS, out)
    result = run_sweep(specs, out, argv=[])
    assert result.ok and result.status["baseline seed0"] == "done"
    assert _stamps(first) == before
    assert len(read_metrics(out / "dassdp" / "seed0")) == 3


def test_a_truncated_config_from_a_kill_during_setup_starts_afresh(
    config_file: Path, tmp_path: Path
) -> None:
    """Regression: a kill while the engine wrote config.yaml left it empty; that folder holds
    nothing to keep (no checkpoint), so the run starts, instead of a config-mismatch error."""
    out = tmp_path / "cmp"
    run_dir = out / "baseline" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("# dassdp train (revision x): resolved config\nna")
    specs = plan(config_file, [0], ["baseline"], out, ["epochs=1"])
    assert run_sweep(specs, out, argv=[]).status == {"baseline seed0": "trained"}


def test_compare_prints_epoch_lines_and_fills_each_train_log(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Regression: compare printed no per-epoch lines and left every train.log empty."""
    out = tmp_path / "cmp"
    assert run_sweep(plan(config_file, [0], ["baseline"], out, ["epochs=2"]), out, argv=[]).ok
    printed = capsys.readouterr().out
    assert "[compare] baseline seed0: epoch 1/2  lr" in printed
    assert "[compare] baseline seed0: epoch 2/2  lr" in printed
    log = (out / "baseline" / "seed0" / "train.log").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log
    done = json.loads((out / "baseline" / "seed0" / DONE).read_text())
    last = read_metrics(out / "baseline" / "seed0")[-1]["test"]
    assert done["final_test"] == last and done["final_test_acc1"] == last["acc1"]


def _gone(pid: int) -> bool:
    """No such process, or a zombie (a container's init may not reap orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_sigkilled_parallel_compare_takes_its_workers_with_it(
    config_file: Path, tmp_path: Path
) -> None:
    """Regression: after SIGKILL of `compare --workers 2` its workers kept training (and took
    queued runs), so a rerun trained the same folders twice at once."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "dassdp", "compare", "--config", str(config_file)]
    cmd += ["--seeds", "0", "--variants", "baseline,dassdp", "--out", str(out), "--workers", "2"]
    cmd += ["--no-report", "epochs=500"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    locks = [out / v / "seed0" / ".lock" for v in ("baseline", "dassdp")]
    deadline = time.monotonic() + 180
    pids: list[int] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None and len(pids) < 2:
            pids = [int(t) for p in locks if p.is_file() and (t := p.read_text().strip())]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(pids) == 2 and proc.pid not in pids, pids  # both workers were training
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in pids), [pid for pid in pids if not _gone(pid)]


def _wait_for_worker(run_dir: Path, proc: subprocess.Popen, timeout: float) -> int | None:
    """The pid of the worker training ``run_dir`` once it has a checkpoint (None if the
    sweep ended first or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        lock = run_dir / ".lock"
        text = lock.read_text().strip() if lock.is_file() else ""
        if text and (run_dir / "last.pt").is_file() and not (run_dir / DONE).is_file():
            return int(text)
        time.sleep(0.02)
    return None


@pytest.mark.slow  # end to end, minutes; CI runs it (.ci/run: pytest -m slow)
def test_a_killed_worker_ends_only_its_run(config_file: Path, tmp_path: Path) -> None:
    """Regression (issue 23): SIGKILL of one `compare --workers 2` worker broke the pool: a
    28-line BrokenProcessPool traceback, the other worker's run stopped and the queued runs
    never ran. Now: one line naming the run, its folder and the signal; every other run
    finishes; exit status 1; a rerun resumes the killed run."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "dassdp", "compare", "--config", str(config_file)]
    cmd += ["--seeds", "0-1", "--variants", "baseline,dassdp", "--out", str(out)]
    cmd += ["--workers", "2", "--no-report", "epochs=12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim, other = out / "baseline" / "seed0", out / "dassdp" / "seed0"
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen(cmd, env=env, stdout=so, stderr=se)
        try:
            pid = _wait_for_worker(victim, proc, timeout=120)
            assert pid is not None and pid != proc.pid
            assert not (other / DONE).is_file()  # the other worker is mid-run
            os.kill(pid, signal.SIGKILL)
            rc = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "SIGKILL" in line]
    assert lines and all("baseline seed0" in line and str(victim) in line for line in lines)
    assert f"pid {pid}" in lines[0], lines
    for run_dir in (other, out / "baseline" / "seed1", out / "dassdp" / "seed1"):
        assert (run_dir / DONE).is_file(), run_dir
        assert len(read_metrics(run_dir)) == 12
    assert not (victim / DONE).is_file() and (victim / "last.pt").is_file()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert "[compare] baseline seed0: resuming in" in again.stdout
    assert "1 trained, 3 already done, 0 failed" in again.stdout
    assert (victim / DONE).is_file() and len(read_metrics(victim)) == 12
