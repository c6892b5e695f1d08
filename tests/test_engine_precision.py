"""Precision, compilation and host reads in the training engine: amp fp16/bf16, compile,
channels_last, the grad-scaler skip flag, and how many host syncs one step makes."""

import collections
import itertools
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dassdp.engine import (
    ConfigError,
    Trainer,
    config_from_dict,
    evaluate_checkpoint,
    fit,
    read_metrics,
    resume_config,
)
from dassdp.engine.config import amp_dtype, apply_overrides, config_to_dict
from dassdp.engine.metrics import LossMeter, PlasticityMeter
from dassdp.engine.precision import optimizer_stepped, resolve_amp
from engine_fixtures import tiny, tiny_dict

CPU = torch.device("cpu")


def error_of(**changes) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(tiny_dict(**changes))
    return str(info.value)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(False, None), (True, torch.float16), ("fp16", torch.float16), ("bf16", torch.bfloat16)],
)
def test_amp_values_mean_autocast_dtypes_and_true_is_still_fp16(value, dtype):
    cfg = tiny(amp=value)
    assert cfg.amp == value and amp_dtype(cfg.amp) == dtype
    assert config_from_dict(apply_overrides(tiny_dict(), [f"amp={value}"])).amp == value


def test_invalid_amp_values_name_the_key_and_the_allowed_ones():
    msg = error_of(amp="fp8")
    assert "amp must be false, true (= fp16), fp16 or bf16, got 'fp8'" in msg
    assert "amp must be bool or str" in error_of(amp=16)
    assert "compile_mode must be null or one of default" in error_of(compile_mode="fast")
    assert "compile_backend must be one of" in error_of(compile_backend="nope")
    msg = error_of(compile_mode="max-autotune", compile_backend="aot_eager")
    assert "compile_mode ('max-autotune') needs compile_backend inductor" in msg


def test_fp16_on_a_cpu_trains_in_float32_with_a_log_line_and_bf16_stays(caplog):
    with caplog.at_level(logging.INFO, logger="dassdp.train"):
        assert resolve_amp("fp16", CPU) is None and resolve_amp(True, CPU) is None
    assert "fp16 (with a grad scaler) is used on CUDA only" in caplog.text
    assert resolve_amp("bf16", CPU) == torch.bfloat16
    assert resolve_amp("fp16", torch.device("cuda")) == torch.float16


def test_resume_allows_speed_settings_refuses_precision_and_reads_old_checkpoints():
    old = config_to_dict(tiny(amp=True))
    for key in ("compile", "compile_mode", "compile_backend", "channels_last", "cudnn_benchmark"):
        del old[key]  # a checkpoint written before these keys existed
    assert resume_config(old, tiny(amp="fp16")).amp == "fp16"  # same setting, new spelling
    fast = tiny(amp=True, compile=True, compile_backend="aot_eager", channels_last=True)
    assert resume_config(old, fast).compile
    with pytest.raises(ConfigError, match=r"amp: True -> 'bf16'"):
        resume_config(old, tiny(amp="bf16"))
    assert resume_config(old, None).compile is False  # the checkpoint's config, completed


# ---------------------------------------------------------------- training


def test_bf16_on_the_cpu_trains_with_bfloat16_activations(tmp_path):
    trainer = Trainer(tiny(epochs=2, amp="bf16"), tmp_path)
    assert trainer.amp == torch.bfloat16 and not trainer.scaler.is_enabled()
    seen = collections.Counter()
    trainer.model.conv1.register_forward_hook(
        lambda m, i, out: seen.update([(m.training, out.dtype)])
    )
    before = trainer.model.conv1.weight.detach().clone()
    trainer.fit()
    trainer.close()
    assert seen[(True, torch.bfloat16)] == 8 and seen[(False, torch.bfloat16)] == 4
    assert set(seen) == {(True, torch.bfloat16), (False, torch.bfloat16)}  # eval too
    assert trainer.model.conv1.weight.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(trainer.model.conv1.weight, before)
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["train"]["loss"]) and r["train"]["samples"] == 128 for r in rows)
    assert rows[1]["plasticity"]["counters"]["applied"] == 4
    # `dassdp eval` evaluates in the checkpoint's precision unless told otherwise
    bf16 = evaluate_checkpoint(tmp_path / "last.pt")["test"]
    fp32 = evaluate_checkpoint(tmp_path / "last.pt", ["amp=false"])["test"]
    assert bf16 == rows[1]["test"] and bf16["loss"] != fp32["loss"]
    assert abs(bf16["loss"] - fp32["loss"]) < 0.1 and fp32["samples"] == 64


@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_a_compiled_run_records_and_applies_dassdp(tmp_path):
    torch._dynamo.reset()
    trainer = Trainer(tiny(epochs=2, compile=True, compile_backend="aot_eager"), tmp_path)
    assert isinstance(trainer.net, torch._dynamo.eval_frame.OptimizedModule)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    row = trainer.fit()
    trainer.close()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames  # it compiled
    p = row["plasticity"]
    assert p["phase"] == "active" and p["counters"]["applied"] == 4
    assert p["counters"]["recorded"] == 4 and p["sites"]["classifier"]["dw_abs_mean"] > 0
    assert read_metrics(tmp_path)[0]["plasticity"]["sites"]["classifier"]["records"] > 0


def test_channels_last_weights_train(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dassdp.train"):
        trainer = Trainer(tiny(epochs=2, channels_last=True, cudnn_benchmark=True), tmp_path)
    assert "cudnn_benchmark: a CUDA setting; ignored on cpu" in caplog.text
    assert not torch.backends.cudnn.benchmark
    weight = trainer.model.conv2.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    row = trainer.fit()
    trainer.close()
    assert math.isfinite(row["train"]["loss"]) and row["train"]["acc1"] > 10


def test_spikingresformer_trains_in_bf16_with_channels_last_and_dassdp(tmp_path):
    # the attention model: 5-D [T, B, C, H, W] activations, 2-D convs on [T*B, C, H, W] views
    cfg = tiny(
        model="spikingresformer_ti",
        model_args={},
        batch_size=8,
        subset=16,
        test_subset=8,
        amp="bf16",
        channels_last=True,
    )
    row = fit(cfg, tmp_path)
    assert math.isfinite(row["train"]["loss"]) and math.isfinite(row["test"]["loss"])
    assert row["plasticity"]["counters"]["applied"] == 2


# ---------------------------------------------------------------- the scaler flag


def _scaled_step(scaler, inf: bool):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.ones(4, 3)).sum() * (float("inf") if inf else 1.0)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    return scaler, opt


@pytest.mark.parametrize("private_api", [True, False])
@pytest.mark.parametrize("inf", [False, True])
def test_optimizer_stepped_reads_the_scaler_flag_without_a_host_read(private_api, inf):
    scaler, opt = _scaled_step(torch.amp.GradScaler("cpu"), inf)
    if not private_api:  # a torch that keeps its found-inf flags elsewhere: check the grads
        scaler._per_optimizer_states = {}
    with HostReads() as reads:
        stepped = optimizer_stepped(scaler, opt)
    assert reads.count == 0
    assert stepped.dtype == torch.bool and stepped.shape == () and bool(stepped) is not inf


# ---------------------------------------------------------------- host reads per step

SYNCS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), bool(), float(), int() ...
    torch.ops.aten.nonzero.default,  # boolean-mask indexing: its size is data-dependent
    torch.ops.aten.masked_select.default,
}


class HostReads(TorchDispatchMode):
    """Counts ops that read device data to the host, except reads of ``skip`` tensors."""

    def __init__(self, skip=lambda t: False):
        super().__init__()
        self.count, self.skip = 0, skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCS and not self.skip(args[0]):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_step_reads(trainer, epochs):
    """Host reads of each ``train_step`` (a list), the optimizer's own CPU step counters not
    counted: AdamW keeps them on the CPU (also with CUDA parameters) and reads them there."""
    opt, counts, step = trainer.optimizer, [], trainer.train_step

    def is_step_counter(t):
        return any(s.get("step") is t for s in opt.state.values())

    def counted(*args):
        with HostReads(is_step_counter) as reads:
            out = step(*args)
        counts.append(reads.count)
        return out

    trainer.train_step = counted
    trainer.fit(stop_after=epochs)
    return counts


def make_trainer(tmp_path, amp, **changes):
    trainer = Trainer(tiny(limit_train_batches=2, **changes), tmp_path)
    if amp == "fp16":  # fp16 is CUDA-only in the config; a CPU scaler runs the same code
        trainer.amp, trainer.scaler = torch.float16, torch.amp.GradScaler("cpu")
    elif amp == "bf16":
        trainer.amp = torch.bfloat16
    return trainer


@pytest.mark.parametrize("amp", ["fp32", "bf16", "fp16"])
def test_one_engine_step_reads_the_host_once(tmp_path, amp):
    # fp32/bf16: _all_finite; fp16: GradScaler.step's found-inf read. Meters: none.
    trainer = make_trainer(tmp_path, amp, epochs=1, plasticity=None)
    counts = count_step_reads(trainer, 1)
    trainer.close()
    assert counts == [1, 1]


def count_learner_reads(trainer):
    """Host reads of each ``learner.step`` (a list that fills as the trainer runs)."""
    counts, step = [], trainer.learner.step

    def counted(*args, **kwargs):
        with HostReads() as reads:
            out = step(*args, **kwargs)
        counts.append(reads.count)
        return out

    trainer.learner.step = counted
    return counts


@pytest.mark.parametrize("apply", ["post_step", "grad"])
def test_plasticity_meter_adds_no_host_read(tmp_path, apply):
    # the engine with a learner attached: its reads are the engine's plus the learner's
    trainer = make_trainer(tmp_path, "fp16", epochs=2, plasticity={"apply": apply})
    learner_reads = count_learner_reads(trainer)
    counts = count_step_reads(trainer, 2)
    trainer.close()
    assert [c - r for c, r in zip(counts, learner_reads)] == [1, 1, 1, 1]


@pytest.mark.parametrize("amp", ["fp32", "fp16"])
def test_a_step_with_dassdp_reads_the_host_once_in_warmup_and_after(tmp_path, amp):
    trainer = make_trainer(tmp_path, amp, epochs=3, plasticity={"warmup_epochs": 1})
    counts = count_step_reads(trainer, 3)
    trainer.close()
    warmup, active = counts[:2], counts[3:]  # counts[2]: the gate fit, once per run
    assert warmup == [1, 1] and all(c == 1 for c in active), counts  # the engine's read alone


@pytest.mark.filterwarnings("ignore:DA-SSDP gate set to G = 1")  # one warm-up batch
def test_a_nan_loss_under_fp16_is_skipped_by_the_scaler_without_a_host_read(tmp_path):
    trainer = make_trainer(tmp_path, "fp16", epochs=2, plasticity={"warmup_epochs": 1})
    criterion, calls = trainer.criterion, itertools.count()

    def poisoned(logits, target):
        loss = criterion(logits, target)
        return loss * float("nan") if next(calls) in (1, 3) else loss  # one per epoch

    trainer.criterion = poisoned
    learner_reads = count_learner_reads(trainer)
    counts = count_step_reads(trainer, 2)
    trainer.close()
    assert [c - r for c, r in zip(counts, learner_reads)] == [1, 1, 1, 1]  # the scaler's
    rows = read_metrics(tmp_path)
    assert [r["nonfinite_steps"] for r in rows] == [1, 1]
    assert [r["plasticity"]["counters"]["skipped_nonfinite"] for r in rows] == [1, 1]
    assert rows[1]["plasticity"]["counters"]["applied"] == 1
    assert all(r["train"]["samples"] == 32 and math.isfinite(r["train"]["loss"]) for r in rows)
    assert trainer.scaler.get_scale() == 2.0**16 / 4  # backed off twice
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_progress_bar_reads_the_loss_every_progress_every_steps(tmp_path, monkeypatch):
    import io

    import tqdm

    import dassdp.engine.train as train_module

    class ShownBar(tqdm.tqdm):  # pytest's stderr is no terminal: force the bar on
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})

    monkeypatch.setattr(tqdm, "tqdm", ShownBar)
    monkeypatch.setattr(train_module, "PROGRESS_EVERY", 2)
    reads = []
    monkeypatch.setattr(LossMeter, "mean_loss", lambda self: reads.append(1) or 1.0)
    trainer = Trainer(tiny(epochs=1, progress=True, plasticity=None), tmp_path)
    trainer.fit()
    trainer.close()
    assert len(reads) == 2  # 4 steps: after steps 2 and 4


# ---------------------------------------------------------------- device-side meters


def test_loss_meter_masks_a_non_finite_loss_on_the_device():
    meter = LossMeter(CPU)
    logits, target = torch.eye(3)[[0, 1, 2, 0]] * 5, torch.tensor([0, 1, 2, 1])  # 3 of 4 right
    with HostReads() as reads:
        meter.update(torch.tensor(2.0), logits, target)
        meter.update(torch.tensor(float("nan")), logits, target)  # a skipped step
        meter.update(torch.tensor(1.0), logits, target)
    assert reads.count == 0
    assert meter.result() == {"loss": 1.5, "acc1": 75.0, "acc5": 100.0, "samples": 8}


class TensorCounterLearner:
    """The learner's meter-facing API (as :class:`dassdp.DASSDP`): counters kept on the
    device and read as ints on request, the last step's metrics as device tensors and a
    0-d flag saying whether that step counted."""

    enabled, in_warmup = True, False

    def __init__(self):
        self._counts = torch.zeros(2, dtype=torch.int64)  # recorded, skipped_optimizer
        self._metrics, self.last_step_recorded = {}, torch.zeros((), dtype=torch.bool)

    @property
    def counters(self):
        recorded, skipped = self._counts.tolist()  # a host read, as the learner's
        return {"recorded": recorded, "skipped_optimizer": skipped}

    def step(self, recorded: bool, synchrony: float):
        flag = torch.full((), recorded)
        self._counts += torch.stack([flag, ~flag]).long()
        self.last_step_recorded = flag
        self._metrics = {"site": {"synchrony": torch.full((), synchrony)}}

    def last_metrics(self, *, as_tensors=False):
        assert as_tensors, "the meter must not read metrics to the host per step"
        return self._metrics

    def gate_summary(self):
        gate = {"k": 0.5, "mu": 0.1, "sd": 0.2, "valid": True, "reason": None, "records": 3}
        return {"site": gate}


def test_plasticity_meter_counts_device_counters_without_host_reads():
    learner = TensorCounterLearner()
    meter = PlasticityMeter(learner)
    with HostReads() as reads:
        for recorded, s in [(True, 0.2), (False, float("nan")), (True, 0.4)]:
            learner.step(recorded, s)
            meter.update()
    assert reads.count == 0
    result = meter.result()
    assert result["counters"] == {"recorded": 2, "skipped_optimizer": 1}
    assert result["sites"]["site"]["synchrony"] == pytest.approx(0.3)  # NaN step left out
    assert result["phase"] == "active" and result["sites"]["site"]["gate_k"] == 0.5
