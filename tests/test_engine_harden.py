"""Run-folder safety and failure modes of `dassdp train` / `dassdp eval` (issue 13):
resume into another run's folder, two trainers on one folder, divergence, run.json history,
train.log without a logging setup, --stop-after, a state-dict mismatch in eval."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dassdp.cli import main
from dassdp.engine import Trainer, fit, load_checkpoint, read_metrics
from dassdp.engine.rundir import RunFolderError
from dassdp.engine.train import TrainingDiverged
from engine_fixtures import tiny, tiny_dict


def write_config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(**changes)))
    return path


def test_resume_into_another_runs_folder_is_refused(tmp_path, capsys):
    """Regression: --resume runs/a/last.pt --out runs/b overwrote the finished run b."""
    config = write_config(tmp_path)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["train", "-c", str(config), "--out", str(a), "--stop-after", "1"]) == 0
    assert main(["train", "-c", str(config), "--out", str(b), "name=other"]) == 0
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    argv = ["train", "--resume", str(a / "last.pt"), "--out", str(b), "epochs=3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"belongs to run 'tiny' in {a}" in err and f"{b} already holds run 'other'" in err
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    # the checkpoint's own folder and an empty new folder are fine
    assert main(["train", "--resume", str(a / "last.pt"), "--out", str(c)]) == 0
    assert [r["epoch"] for r in read_metrics(c)] == [1]
    assert main(["train", "--resume", str(a / "last.pt"), "--out", str(a)]) == 0
    assert [r["epoch"] for r in read_metrics(a)] == [0, 1]


def test_run_json_keeps_every_resume(tmp_path):
    """Regression: run.json was overwritten on resume (the first start was lost)."""
    cfg = tiny(epochs=3)
    fit(cfg, tmp_path, stop_after=1)
    first = json.loads((tmp_path / "run.json").read_text())
    fit(cfg, tmp_path, resume=True, stop_after=2)
    fit(cfg, tmp_path, resume=str(tmp_path / "last.pt"))
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["started"] == first["started"] and meta["argv"] == first["argv"]
    assert len(meta["resumes"]) == 2
    assert {"started", "revision", "argv", "host", "checkpoint"} <= set(meta["resumes"][0])
    assert meta["resumes"][1]["checkpoint"] == str(tmp_path / "last.pt")


def _child_train(config: Path, run: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dassdp", "train", "-c", str(config), "--out", str(run), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} did not appear (exit {proc.poll()})"


def test_two_processes_cannot_train_one_folder_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    """Regression: two processes trained the same folder at once (epochs [0, 0, 1, 1])."""
    config, run = write_config(tmp_path, epochs=500), tmp_path / "run"
    proc = _child_train(config, run)
    try:
        _wait_for(run / "last.pt", proc)
        assert main(["train", "--resume", "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"run folder {run} is being trained by pid {proc.pid}" in err
        with pytest.raises(RunFolderError, match=f"pid {proc.pid}"):
            Trainer(tiny(epochs=500), run, resume=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the holder died: its lock (the file still names it) is stale and taken over
    assert (run / ".lock").read_text().strip() == str(proc.pid)
    epochs = load_checkpoint(run / "last.pt")["epoch"]
    assert main(["train", "--resume", "--out", str(run), f"epochs={epochs + 1}"]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == list(range(epochs + 1))


def test_a_diverged_run_stops_with_an_error_and_keeps_the_last_finite_checkpoint(tmp_path):
    """Regression: lr=1e30 ended with exit 0 and NaN weights in best.pt."""
    trainer = Trainer(tiny(epochs=3, plasticity=None), tmp_path)
    trainer.fit(stop_after=1)
    step = trainer.optimizer.step

    def poisoning_step(*args, **kwargs):  # an update that leaves NaN in a weight
        out = step(*args, **kwargs)
        with torch.no_grad():
            trainer.model.fc1.weight[0, 0] = float("nan")
        return out

    trainer.optimizer.step = poisoning_step
    with pytest.raises(
        TrainingDiverged, match=r"diverged in epoch 2: non-finite values in .*last.pt keeps epoch 1"
    ):
        trainer.fit()
    trainer.close()
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / name)
        assert state["epoch"] == 1, name
        assert all(
            torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()
        )
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0]
    assert "diverged in epoch 2" in (tmp_path / "train.log").read_text()


def test_the_issue_divergence_command_exits_non_zero(tmp_path, capsys):
    config, run = write_config(tmp_path), tmp_path / "run"
    argv = ["train", "-c", str(config), "--out", str(run), "lr=1e30", "optimizer=sgd"]
    assert main([*argv, "weight_decay=0"]) == 1
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()
    assert "training diverged in epoch 1" in (run / "train.log").read_text()


def test_train_log_gets_the_epoch_lines_without_a_logging_setup(tmp_path, monkeypatch):
    """Regression: with logging unconfigured (compare, library use) train.log stayed empty."""
    logger = logging.getLogger("dassdp.train")
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)  # Python's default
    assert logger.level == logging.NOTSET and logger.getEffectiveLevel() == logging.WARNING
    fit(tiny(epochs=1, plasticity=None), tmp_path)
    assert "epoch 1/1" in (tmp_path / "train.log").read_text()
    assert logger.level == logging.NOTSET  # restored


def test_a_trainer_leaves_the_loggers_level_as_it_found_it(tmp_path, caplog):
    """Regression: a Trainer built under `caplog.at_level(INFO)` and closed after it put back
    the INFO it had seen, so every later test ran with `dassdp.train` at INFO (and
    test_train_log_gets_the_epoch_lines_without_a_logging_setup failed after the precision
    tests). Two trainers open at once keep train.log fed until the last closes."""
    logger = logging.getLogger("dassdp.train")
    assert logger.level == logging.NOTSET
    with caplog.at_level(logging.INFO, logger="dassdp.train"):
        trainer = Trainer(tiny(epochs=1, plasticity=None), tmp_path / "a")
    trainer.close()
    assert logger.level == logging.NOTSET
    caplog.set_level(logging.WARNING)  # the root at Python's default: the engine raises ours
    first = Trainer(tiny(epochs=1, plasticity=None), tmp_path / "b")
    second = Trainer(tiny(epochs=1, plasticity=None), tmp_path / "c")
    first.close()
    assert logger.level == logging.INFO  # `second` still writes its train.log
    second.fit()
    second.close()
    assert logger.level == logging.NOTSET
    assert "epoch 1/1" in (tmp_path / "c" / "train.log").read_text()


def test_stop_after_must_be_positive(tmp_path, capsys):
    config = write_config(tmp_path)
    for bad in ("0", "-1"):
        argv = ["train", "-c", str(config), "--out", str(tmp_path / "r"), "--stop-after", bad]
        assert main(argv) == 2
        assert f"--stop-after must be >= 1 (the epochs to complete before stopping), got {bad}" in (
            capsys.readouterr().err
        )
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="stop_after must be >= 1"):
        fit(tiny(), tmp_path / "r", stop_after=0)


def test_eval_with_a_mismatched_model_is_one_line_naming_the_keys(tmp_path, capsys):
    fit(tiny(epochs=1, plasticity=None), tmp_path)
    argv = ["eval", "--checkpoint", str(tmp_path / "last.pt"), "model_args.hidden=24"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "does not fit the model built from its config and overrides" in err
    assert "fc1.weight [16, 128] in the checkpoint vs [24, 128] in the model" in err
