"""``dassdp train`` / ``dassdp eval`` end to end on a tiny config."""

import json

import yaml

from dassdp.cli import main
from dassdp.engine import load_checkpoint, read_metrics
from engine_fixtures import tiny_dict


def write_config(tmp_path, **changes):
    path = tmp_path / "tiny.yaml"
    path.write_text("# dassdp train --config tiny.yaml\n" + yaml.safe_dump(tiny_dict(**changes)))
    return path


def test_train_then_eval_end_to_end(tmp_path, capsys):
    config, run = write_config(tmp_path), tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "epochs=2"]) == 0
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out and "test acc@1" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["plasticity"]["warmup_epochs"] == 1
    assert "revision" in (run / "config.yaml").read_text().splitlines()[0]

    rows = read_metrics(run)
    best = max(rows, key=lambda r: r["test"]["acc1"])
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test"] == best["test"]  # the same numbers the run logged
    assert result["epoch"] == best["epoch"] + 1
    assert set(result["gate"]) == {"classifier", "fc1"}

    assert main(["eval", "--checkpoint", str(run / "last.pt")]) == 0
    text = capsys.readouterr().out
    assert "acc@1" in text and "DA-SSDP gate classifier: k" in text


def test_a_used_run_folder_needs_resume_and_resume_continues(tmp_path, capsys):
    config, run = write_config(tmp_path), tmp_path / "run"
    assert main(["train", "-c", str(config), "--out", str(run), "--stop-after", "1"]) == 0
    assert main(["train", "-c", str(config), "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run)]) == 0  # config from the checkpoint
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1]
    assert main(["train", "--resume", "--out", str(run), "lr=0.5"]) == 2
    assert "differs from the checkpoint's in lr" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "epochs=3"]) == 0  # extend the run
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


def test_config_errors_are_one_line_naming_the_key(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["train", "-c", str(config), "--out", str(tmp_path / "r"), "epohcs=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key(s) epohcs" in err and "Traceback" not in err
    assert main(["train", "-c", str(config), "plasticity.sigma=0"]) == 2
    assert "plasticity.sigma must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
