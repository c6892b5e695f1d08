"""Tiny training configs for the engine tests: the synthetic in-memory dataset, a 4-8 channel
spiking CNN, T=2, 128 training images: about 0.1 s per epoch on one thread."""

from __future__ import annotations

import copy
from typing import Any

import torch

from dassdp.engine import config_from_dict
from dassdp.engine.config import TrainConfig

TINY: dict[str, Any] = {
    "name": "tiny",
    "dataset": "synthetic",
    "model": "spiking_cnn",
    "model_args": {"channels": [4, 8], "hidden": 16},
    "epochs": 2,
    "batch_size": 32,
    "T": 2,
    "lr": 5e-3,
    "lr_warmup_epochs": 0,
    "subset": 128,
    "test_subset": 64,
    "progress": False,
    "tensorboard": False,
    "plasticity": {"warmup_epochs": 1},
}


def tiny_dict(**changes: Any) -> dict[str, Any]:
    """A copy of :data:`TINY` with top-level ``changes`` (``plasticity`` dicts are merged)."""
    data = copy.deepcopy(TINY)
    for key, value in changes.items():
        if key == "plasticity" and isinstance(value, dict):
            data["plasticity"] = {**data["plasticity"], **value}
        else:
            data[key] = value
    return data


def tiny(**changes: Any) -> TrainConfig:
    return config_from_dict(tiny_dict(**changes))


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Every tensor and value in two (nested) state dicts / lists is bit-identical."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where
