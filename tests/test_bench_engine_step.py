"""The benchmarks time the engine's training step, ``dassdp.engine.step.train_step``, the
step the Trainer runs: a change to that function is seen by every bench that times a
training step (replaced here by a counting wrapper). A bench with a loop of its own would
leave the count at zero."""

from __future__ import annotations

import argparse
import collections

import pytest
import torch

from dassdp.commands import bench
from dassdp.engine import Trainer
from dassdp.engine import step as engine_step
from engine_fixtures import tiny

torch.set_num_threads(1)


@pytest.fixture
def calls(monkeypatch) -> collections.Counter:
    """Calls of the engine's step, by the ``id`` of the model it trained."""
    seen: collections.Counter = collections.Counter()
    real = engine_step.train_step

    def counted(x, y, **kwargs):
        seen[id(kwargs["model"])] += 1
        return real(x, y, **kwargs)

    monkeypatch.setattr(engine_step, "train_step", counted)
    return seen


def _run(argv: list[str], tmp_path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = ["--out", str(tmp_path / "x.csv"), "--doc", str(tmp_path / "b.md")]
    assert bench.run(parser.parse_args([*argv, *out])) == 0


def test_bench_overhead_times_the_engine_step(calls, tmp_path):
    _run(["overhead", "--batch", "1", "--size", "8", "--T", "2", "--reps", "2"], tmp_path)
    # 3 models (off, warm-up, active), each: 1 warm-up round + 2 timed + 1 peak-memory step
    assert sorted(calls.values()) == [4, 4, 4]


def test_bench_throughput_times_the_engine_step(calls, tmp_path):
    argv = ["throughput", "--batch", "1", "--size", "8", "--T", "2", "--reps", "2"]
    argv += ["--neurons", "dassdp", "dassdp-loop", "--neuron-channels", "4", "--neuron-reps", "1"]
    _run(argv, tmp_path)
    # 2 models, each: 1 warm-up + 2 timed + 1 counted (kernels) + 1 peak-memory step
    assert sorted(calls.values()) == [5, 5]


def test_bench_train_step_times_the_engine_step(calls, tmp_path):
    argv = ["train-step", "--model", "spiking_cnn", "--batch", "2", "--size", "16", "--T", "2"]
    argv += ["--steps", "3", "--variants", "no-spike-saving", "spike-saving", "--profile"]
    _run(argv, tmp_path)
    # interleaved: 2 models x (1 warm-up + 3 timed); --profile: 1 model x 2 (warm-up, profiled)
    # (the fresh processes run the same function in another interpreter)
    assert sorted(calls.values()) == [2, 4, 4]


def test_bench_models_and_syncs_time_the_engine_step(calls, tmp_path):
    _run(["models", "--models", "spiking_cnn", "--batch", "1", "--T", "2", "--size", "16",
          "--iters", "2", "--warmup", "1"], tmp_path)  # fmt: skip
    assert list(calls.values()) == [3]
    calls.clear()
    _run(["syncs", "--model", "spiking_cnn", "--backends", "torch", "--T", "2", "--batch", "2",
          "--size", "16", "--lif-channels", "4"], tmp_path)  # fmt: skip
    assert list(calls.values()) == [6]  # per phase: 2 uncounted steps + 1 counted


def test_the_trainer_runs_the_same_step(calls, tmp_path):
    trainer = Trainer(tiny(epochs=1, limit_train_batches=3, plasticity=None), tmp_path)
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert calls == {id(trainer.model): 3}
