"""The training loop: learning, exact resume, plasticity-off parity, non-finite losses."""

import itertools
import json
import math

import pytest
import torch

from dassdp.engine import Trainer, fit, load_checkpoint, read_metrics
from engine_fixtures import assert_same_tensors, tiny

# All RNG consumers at once: RandAugment (python random), crops/flips (torch), Mixup and
# CutMix (numpy), a shuffled loader (its generator), DA-SSDP (its own generator: control).
RNG_HEAVY = dict(augment="rand-m7-n1-mstd0.5-inc1", mixup=True, cutmix_alpha=1.0, cutout=4)


def final_state(run_dir):
    return load_checkpoint(run_dir / "last.pt")


def without_times(rows):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def test_two_epochs_on_a_tiny_subset_lower_the_loss(tmp_path):
    fit(tiny(epochs=2, subset=256, plasticity=None), tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[1]["train"]["loss"] < rows[0]["train"]["loss"]
    assert rows[1]["train"]["loss"] < math.log(10)  # below chance level
    assert {"config.yaml", "run.json", "metrics.jsonl", "last.pt", "best.pt"} <= {
        p.name for p in tmp_path.iterdir()
    }
    from dassdp._util.allocator import active_allocator

    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["allocator"] == active_allocator()  # recorded next to the numbers


def test_metrics_rows_hold_the_documented_fields(tmp_path):
    fit(tiny(epochs=2), tmp_path)
    row = read_metrics(tmp_path)[-1]
    for split in ("train", "test"):
        assert set(row[split]) == {"loss", "acc1", "acc5", "samples"}
    assert row["test"]["samples"] == 64 and row["lr"] > 0 and row["epoch_time_s"] > 0
    assert set(row["firing_rate"]) == {"lif1", "lif2", "lif3"}
    assert all(0 <= r <= 1 for r in row["firing_rate"].values())
    p = row["plasticity"]
    assert p["phase"] == "active" and p["counters"]["applied"] == 4
    site = p["sites"]["classifier"]
    for key in ("synchrony", "gate_mean", "gate_k", "gate_mu", "gate_sd", "dw_abs_mean"):
        assert math.isfinite(site[key]), key
    assert site["gate_valid"] and site["dw_abs_mean"] > 0
    assert read_metrics(tmp_path)[0]["plasticity"]["phase"] == "warmup"


def test_stop_mid_warmup_and_after_the_gate_fit_then_resume_is_bit_identical(tmp_path):
    cfg = tiny(epochs=4, plasticity={"warmup_epochs": 2, "control": "random_update"}, **RNG_HEAVY)
    fit(cfg, tmp_path / "straight")

    trainer = Trainer(cfg, tmp_path / "stopped")
    trainer.fit(stop_after=1)  # epoch 1 done: mid-warm-up, the gate is not fitted
    trainer.close()
    assert final_state(tmp_path / "stopped")["plasticity"]["fits"] is None
    trainer = Trainer(cfg, tmp_path / "stopped", resume=True)
    assert trainer.start_epoch == 1
    trainer.fit(stop_after=3)  # epoch 3 done: the gate was fitted at the start of epoch 3
    trainer.close()
    assert final_state(tmp_path / "stopped")["plasticity"]["fits"] is not None
    fit(cfg, tmp_path / "stopped", resume=True)

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    for key in ("model", "optimizer", "plasticity", "rng", "loader", "scheduler"):
        if key == "rng":
            a[key][0]["cuda"], b[key][0]["cuda"] = [], []  # absent on CPU either way
        assert_same_tensors({key: a[key]}, {key: b[key]})
    assert a["epoch"] == b["epoch"] == 4
    rows_a = without_times(read_metrics(tmp_path / "straight"))
    rows_b = without_times(read_metrics(tmp_path / "stopped"))
    assert rows_a == rows_b  # same losses, accuracies, gate, |dW|, firing rates


def test_resume_with_loader_workers_is_bit_identical(tmp_path):
    cfg = tiny(epochs=2, workers=2, augment="standard", plasticity={"warmup_epochs": 1})
    fit(cfg, tmp_path / "straight")
    fit(cfg, tmp_path / "stopped", stop_after=1)
    fit(cfg, tmp_path / "stopped", resume=True)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    assert_same_tensors(a["model"], b["model"])


def test_plasticity_disabled_is_bit_identical_to_no_learner(tmp_path):
    base = tiny(epochs=2, plasticity=None, **RNG_HEAVY)
    off = tiny(epochs=2, plasticity={"enabled": False}, **RNG_HEAVY)
    on = tiny(epochs=2, plasticity={"warmup_epochs": 1}, **RNG_HEAVY)
    fit(base, tmp_path / "base")
    fit(off, tmp_path / "off")
    assert_same_tensors(
        final_state(tmp_path / "base")["model"], final_state(tmp_path / "off")["model"]
    )
    # warm-up only records: after epoch 1 an enabled learner has changed nothing either
    fit(base, tmp_path / "base1", stop_after=1)
    fit(on, tmp_path / "on", stop_after=1)
    assert_same_tensors(
        final_state(tmp_path / "base1")["model"], final_state(tmp_path / "on")["model"]
    )
    # ... and once the gate is fitted it does change the weights (the test is not vacuous)
    fit(on, tmp_path / "on", resume=True)
    w_on = final_state(tmp_path / "on")["model"]["classifier.weight"]
    assert not torch.equal(w_on, final_state(tmp_path / "base")["model"]["classifier.weight"])


def test_injected_nan_losses_are_counted_skipped_and_training_continues(tmp_path):
    cfg = tiny(epochs=2, plasticity={"warmup_epochs": 1})
    trainer = Trainer(cfg, tmp_path)
    criterion, calls = trainer.criterion, itertools.count()
    nan_calls = {1, 5}  # one step in warm-up (epoch 1), one after the gate fit (epoch 2)

    def poisoned(logits, target):
        loss = criterion(logits, target)
        return loss * float("nan") if next(calls) in nan_calls else loss

    trainer.criterion = poisoned
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    counters = trainer.learner.counters
    trainer.close()
    rows = read_metrics(tmp_path)
    assert [r["nonfinite_steps"] for r in rows] == [1, 1]
    assert [r["plasticity"]["counters"]["skipped_nonfinite"] for r in rows] == [1, 1]
    assert counters["skipped_nonfinite"] == 2 and counters["applied"] == 3
    state = final_state(tmp_path)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not torch.equal(state["model"]["fc1.weight"], before["fc1.weight"])
    fit = state["plasticity"]["fits"]["classifier"]
    assert fit["valid"] and math.isfinite(fit["k"])  # the bad record did not poison the gate
    assert all(math.isfinite(r["train"]["loss"]) for r in rows)
    assert rows[1]["train"]["samples"] == 128 - 32  # the skipped batch is not averaged in


def test_sgd_label_smoothing_and_grad_clip_run(tmp_path):
    cfg = tiny(epochs=2, optimizer="sgd", lr=0.05, label_smoothing=0.1, grad_clip=1.0)
    row = fit(cfg, tmp_path)
    assert math.isfinite(row["train"]["loss"]) and row["lr"] > 0


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: what overflows an fp16 grad scaler."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("apply", ["post_step", "grad"])
def test_a_step_the_grad_scaler_skips_is_skipped_by_dassdp_too(tmp_path, apply):
    # apply="grad" runs the learner between unscale_ and the optimizer step: it must learn
    # about the skip from the scaler's found-inf flag (it used to count the step as applied)
    trainer = Trainer(tiny(epochs=2, plasticity={"warmup_epochs": 1, "apply": apply}), tmp_path)
    trainer.fit(stop_after=1)  # warm-up in fp32
    # fp16 AMP is a CUDA feature here; CPU autocast + a CPU grad scaler exercise the same path
    trainer.amp, trainer.scaler = torch.float16, torch.amp.GradScaler("cpu")
    criterion, calls = trainer.criterion, itertools.count()

    def overflowing(logits, target):
        return criterion(_InfGrad.apply(logits) if next(calls) == 1 else logits, target)

    trainer.criterion = overflowing
    before = trainer.model.classifier.weight.detach().clone()
    row = trainer.fit()
    trainer.close()
    counters = row["plasticity"]["counters"]
    assert counters["skipped_optimizer"] == 1 and counters["applied"] == 3
    assert row["nonfinite_steps"] == 0  # the loss was finite; only the gradients were not
    assert trainer.scaler.get_scale() < 2.0**16  # the scaler backed off once
    weight = trainer.model.classifier.weight
    assert torch.isfinite(weight).all() and not torch.equal(weight, before)


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    import builtins

    from dassdp.engine.metrics import MetricsWriter

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    writer = MetricsWriter(tmp_path, tensorboard=True)
    assert writer.tb is None
    writer.write({"epoch": 0, "train": {"loss": 1.0}})
    monkeypatch.undo()
    assert read_metrics(tmp_path) == [{"epoch": 0, "train": {"loss": 1.0}}]
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return
    fit(tiny(epochs=2, tensorboard=True), tmp_path / "tb")
    assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_pretrained_loads_matching_tensors_and_keeps_the_rest(tmp_path):
    fit(tiny(epochs=2), tmp_path / "source")
    source = load_checkpoint(tmp_path / "source" / "last.pt")["model"]
    cfg = tiny(
        epochs=2,
        model_args={"channels": [4, 8], "hidden": 24},  # a new head: fc1, bn3, classifier
        pretrained=str(tmp_path / "source" / "last.pt"),
    )
    trainer = Trainer(cfg, tmp_path / "target")
    state = trainer.model.state_dict()
    trainer.close()
    assert torch.equal(state["conv1.weight"], source["conv1.weight"])
    assert torch.equal(state["bn2.running_mean"], source["bn2.running_mean"])
    assert state["fc1.weight"].shape != source["fc1.weight"].shape


def test_grad_apply_mode_goes_through_the_optimizer(tmp_path):
    # apply="grad": the learner runs between backward() and optimizer.step(), so its dW is
    # part of the gradient the optimizer uses (and is scaled by its learning rate).
    base = tiny(epochs=2, plasticity=None)
    grad = tiny(
        epochs=2, plasticity={"warmup_epochs": 1, "apply": "grad", "A_plus": 0.05}, grad_clip=1.0
    )
    fit(base, tmp_path / "base")
    fit(grad, tmp_path / "grad")
    state = final_state(tmp_path / "grad")
    assert state["plasticity"]["counters"]["applied"] > 0
    assert not torch.equal(
        state["model"]["classifier.weight"],
        final_state(tmp_path / "base")["model"]["classifier.weight"],
    )
