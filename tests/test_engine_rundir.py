"""Which run folders `dassdp train` may write (issue 23): a new start only into a new or
empty folder, or over what a start of the same run left before its first checkpoint; a
resume only into its own run's folder; a refused start writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dassdp.cli import main
from dassdp.engine import fit, load_checkpoint, read_metrics
from dassdp.engine.rundir import RunFolderError, check_run_folder, write_run_files
from engine_fixtures import tiny, tiny_dict


def write_config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(**changes)))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` (recursively) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_finished_run_whose_last_pt_is_gone_is_not_trained_over(tmp_path, capsys):
    """Regression: with last.pt deleted, `train --out` with another seed replaced best.pt,
    metrics.jsonl and config.yaml of a finished compare run."""
    config, run = write_config(tmp_path), tmp_path / "run"
    assert main(["train", "-c", str(config), "--out", str(run)]) == 0
    (run / "done.json").write_text(json.dumps({"final_test_acc1": 50.0}))
    (run / "last.pt").unlink()
    before = snapshot(run)
    for seed in ("seed=5", "seed=0"):  # another run, and even the same one: no restart
        assert main(["train", "-c", str(config), "--out", str(run), seed]) == 2
        err = one_error_line(capsys)
        assert f"{run} holds a run without its last.pt (best.pt, done.json, " in err
        assert "metrics.jsonl: 2 epoch(s)); it is not trained over" in err
        assert snapshot(run) == before


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"config.yaml": "my: notes\n"}, "config.yaml was not written by dassdp train"),
        ({"run.json": "{}", "notes.txt": "x"}, "holds run.json but no run of dassdp train"),
        ({"metrics.jsonl": '{"epoch": 0}\n{"epoch": 1}\n'}, "metrics.jsonl: 2 epoch(s)"),
    ],
)
def test_user_files_the_run_would_write_are_not_overwritten(tmp_path, capsys, files, named):
    """Regression: a folder holding a config.yaml (or run.json ...) of the user's but no run of
    ours was written over."""
    config, run = write_config(tmp_path), tmp_path / "run"
    run.mkdir()
    for name, text in files.items():
        (run / name).write_text(text)
    before = snapshot(run)
    assert main(["train", "-c", str(config), "--out", str(run)]) == 2
    assert named in one_error_line(capsys)
    assert snapshot(run) == before and not (run / ".lock").exists()


def test_a_folder_of_other_files_or_a_setup_leftover_of_the_same_run_is_used(tmp_path):
    """What may be trained into: files a run does not write (kept), and what a start of the
    same run left before its first checkpoint (a kill in setup or in epoch 1)."""
    cfg = tiny(epochs=1, plasticity=None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    fit(cfg, other)
    assert (other / "notes.txt").read_text() == "mine" and (other / "last.pt").is_file()

    leftover = tmp_path / "leftover"
    write_run_files(leftover, cfg, world_size=1, device="cpu")
    (leftover / "metrics.jsonl").write_text('{"epoch": 0, "partial": true}\n')  # no last.pt
    check_run_folder(leftover, tiny(epochs=3, plasticity=None))  # epochs may change
    with pytest.raises(
        RunFolderError, match=r"holds run 'tiny' with another config \(seed: 0 -> 4"
    ):
        check_run_folder(leftover, tiny(epochs=1, plasticity=None, seed=4))
    fit(cfg, leftover)
    assert [r["epoch"] for r in read_metrics(leftover)] == [0]
    assert "partial" not in read_metrics(leftover)[0]


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    config, out = write_config(tmp_path), tmp_path / "a_file"
    out.write_text("x")
    assert main(["train", "-c", str(config), "--out", str(out)]) == 2
    assert f"run folder {out} is a file, not a folder" in one_error_line(capsys)
    assert out.read_text() == "x"


def test_resume_with_another_models_checkpoint_is_refused_before_writing(tmp_path, capsys):
    """Regression: a last.pt of another model copied into a run folder was trained there with
    --resume, config.yaml replaced, metrics.jsonl holding rows of two models."""
    config, a, b = write_config(tmp_path), tmp_path / "a", tmp_path / "b"
    assert main(["train", "-c", str(config), "--out", str(a), "--stop-after", "1"]) == 0
    argv = ["train", "-c", str(config), "--out", str(b), "--stop-after", "1"]
    assert main([*argv, "model_args.hidden=24"]) == 0
    (a / "last.pt").write_bytes((b / "last.pt").read_bytes())
    before = snapshot(a)
    assert main(["train", "--resume", "--out", str(a)]) == 2
    err = one_error_line(capsys)
    assert f"--resume: the checkpoint is not of the run in {a}: its config differs" in err
    assert "'hidden': 16} -> {'channels': [4, 8], 'hidden': 24}" in err
    assert snapshot(a) == before


def test_a_checkpoint_without_optimizer_state_is_refused_before_writing(tmp_path, capsys):
    """Regression: "error: 'optimizer'", after run.json had gained a resume entry."""
    config, run = write_config(tmp_path), tmp_path / "run"
    assert main(["train", "-c", str(config), "--out", str(run), "--stop-after", "1"]) == 0
    state = load_checkpoint(run / "last.pt")
    del state["optimizer"]
    torch.save(state, run / "last.pt")
    before = snapshot(run)
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = one_error_line(capsys)
    assert f"{run / 'last.pt'} cannot be resumed: it lacks optimizer" in err
    assert snapshot(run) == before


def test_resume_with_a_size_mismatch_is_one_line_naming_the_tensor(tmp_path, capsys):
    config, run = write_config(tmp_path), tmp_path / "run"
    assert main(["train", "-c", str(config), "--out", str(run), "--stop-after", "1"]) == 0
    state = load_checkpoint(run / "last.pt")
    state["model"]["fc1.weight"] = torch.zeros(24, 128)
    torch.save(state, run / "last.pt")
    before = snapshot(run)
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = one_error_line(capsys)
    assert "does not fit the model built from its config" in err
    assert "fc1.weight [24, 128] in the checkpoint vs [16, 128] in the model" in err
    assert snapshot(run) == before


def test_resume_into_a_folder_with_an_unreadable_config_names_its_files(tmp_path, capsys):
    """Regression: run_name() read config.yaml with read_text(): a non-UTF-8 one was a codec
    error ("'utf-8' codec can't decode") that named no file."""
    config, a, b = write_config(tmp_path), tmp_path / "a", tmp_path / "b"
    assert main(["train", "-c", str(config), "--out", str(a), "--stop-after", "1"]) == 0
    b.mkdir()
    (b / "config.yaml").write_bytes(b"name: \xff\xfe\n")
    (b / "last.pt").write_bytes((a / "last.pt").read_bytes())
    assert main(["train", "--resume", str(a / "last.pt"), "--out", str(b)]) == 2
    err = one_error_line(capsys)
    assert f"{b} already holds other files (config.yaml, last.pt)" in err


def test_resume_with_a_damaged_metrics_file_names_the_line_and_writes_nothing(tmp_path, capsys):
    """Regression: a non-UTF-8 line in metrics.jsonl was "'utf-8' codec can't decode" (no file
    named), after run.json had gained a resume entry."""
    config, run = write_config(tmp_path), tmp_path / "run"
    assert main(["train", "-c", str(config), "--out", str(run), "--stop-after", "1"]) == 0
    rows = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe junk\n" + rows)
    before = snapshot(run)
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = one_error_line(capsys)
    assert f"{run / 'metrics.jsonl'}: line 1 is not UTF-8 text" in err
    assert snapshot(run) == before


def test_compare_keeps_resuming_and_restarting_its_folders(tmp_path):
    """`dassdp compare` resumes a run with a checkpoint and restarts one stopped before its
    first checkpoint, through the engine's checks (tests/test_experiments_runner.py has more)."""
    from dassdp.experiments.runner import plan, run_sweep

    config, out = write_config(tmp_path, epochs=2), tmp_path / "cmp"
    specs = plan(config, [0], ["baseline", "dassdp"], out)
    stopped, in_setup = (Path(s.run_dir) for s in specs)
    fit(specs[0].resolve(), stopped, stop_after=1)
    write_run_files(in_setup, specs[1].resolve(), world_size=1, device="cpu")
    result = run_sweep(specs, out, argv=[])
    assert result.ok and set(result.status.values()) == {"trained"}
    for run in (stopped, in_setup):
        assert [r["epoch"] for r in read_metrics(run)] == [0, 1]


def test_compare_refuses_a_folder_holding_a_foreign_config(tmp_path):
    """Regression: runner._read_yaml read config.yaml with read_text(): a non-UTF-8 one failed
    the run with a codec error; now the engine names the file and leaves it as it is."""
    from dassdp.experiments.runner import plan, run_sweep

    config, out = write_config(tmp_path, epochs=1), tmp_path / "cmp"
    specs = plan(config, [0], ["baseline"], out)
    run = Path(specs[0].run_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_bytes(b"mine: \xff\n")
    result = run_sweep(specs, out, argv=[])
    assert "config.yaml was not written by dassdp train" in result.errors["baseline seed0"]
    assert (run / "config.yaml").read_bytes() == b"mine: \xff\n"
