"""Checkpoints: atomic writes, clear errors on damaged files, RNG round trips."""

import random

import numpy as np
import pytest
import torch

from dassdp.engine import (
    CheckpointError,
    Trainer,
    fit,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from dassdp.engine import checkpoint as ckpt_module
from engine_fixtures import assert_same_tensors, tiny


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    state = get_rng_state()
    expected = draws()
    save_checkpoint({"model": {}, "epoch": 0, "config": {}, "rng": state}, tmp_path / "c.pt")
    draws()
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert draws() == expected


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1, "config": {}}, path)
    before = path.read_bytes()

    def crash(obj, f):  # a partial write, then the process "dies"
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2, "config": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
    assert load_checkpoint(path)["epoch"] == 1


def test_a_corrupt_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(1000)}, "epoch": 1, "config": {}}, path)
    save_checkpoint(
        {"model": {"w": torch.ones(1000)}, "epoch": 1, "config": {}}, tmp_path / "best.pt"
    )
    path.write_bytes(path.read_bytes()[:300])  # truncated, e.g. by an interrupted copy
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "best.pt" in str(info.value)
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dassdp training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_crash_while_saving_keeps_the_last_good_epoch_resumable(tmp_path, monkeypatch):
    cfg = tiny(epochs=3)
    fit(cfg, tmp_path, stop_after=1)
    good = load_checkpoint(tmp_path / "last.pt")
    real_save = torch.save

    def crash(obj, f):
        real_save(obj, f)
        raise OSError("killed while writing")

    monkeypatch.setattr(ckpt_module.torch, "save", crash)
    with pytest.raises(OSError, match="killed while writing"):
        fit(cfg, tmp_path, resume=True)  # epoch 2 trains, then its save fails
    monkeypatch.undo()
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["epoch"] == 1
    assert_same_tensors(kept["model"], good["model"])
    fit(cfg, tmp_path, resume=True)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3


def test_resuming_from_a_corrupt_checkpoint_fails_clearly_and_touches_nothing(tmp_path):
    fit(tiny(epochs=2), tmp_path, stop_after=1)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:-100])
    damaged = last.read_bytes()
    best = (tmp_path / "best.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        Trainer(tiny(epochs=2), tmp_path, resume=True)
    assert last.read_bytes() == damaged and (tmp_path / "best.pt").read_bytes() == best
    fit(tiny(epochs=2), tmp_path, resume=tmp_path / "best.pt")  # the intact one works
    assert load_checkpoint(last)["epoch"] == 2
