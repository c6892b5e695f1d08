"""The backend registry, a layer's choice resolved once per kind of call, ``set_backend`` on a
whole model and the record of what each layer ran (``lif_backend`` in the engine)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn

from dassdp.models import create_model
from dassdp.neurons import (
    BACKENDS,
    LIF,
    PLIF,
    LIFParams,
    available,
    backends,
    resolve,
    resolved_backends,
    set_backend,
)
from dassdp.neurons.backends import _registry, cpu
from engine_fixtures import tiny

torch.set_num_threads(1)


def test_registry_names_order_and_errors():
    assert BACKENDS == ("auto", "loop", "torch", "triton", "cpu")
    assert {"loop", "torch"} <= set(available())
    with pytest.raises(ValueError, match=r"unknown LIF backend 'fast'.*'loop', 'torch'"):
        backends.get("fast")
    call = _registry.Call.of(torch.zeros(2, 3), LIFParams(), None, False)
    assert resolve("torch", call).name == "torch"
    per_channel = _registry.Call.of(torch.zeros(2, 3), LIFParams(), torch.ones(3), False)
    assert resolve("auto", per_channel).name == "loop"  # only the loop takes a broadcast k
    with pytest.raises(ValueError, match="one-element"):
        resolve("torch", per_channel)


def test_a_registered_backend_is_usable_by_name_and_by_auto(monkeypatch):
    monkeypatch.setattr(_registry, "_BACKENDS", dict(_registry._BACKENDS))
    monkeypatch.setattr(_registry, "_AUTO_ORDER", list(_registry._AUTO_ORDER))
    ran = []

    def run(x, params, inv_tau, return_membrane):
        ran.append(x.shape)
        return backends.get("torch").run(x, params, inv_tau, return_membrane)

    def check(call):
        if call.dtype != torch.float64:
            raise ValueError("float64 only")

    mine = _registry.Backend(
        "mine", run, check, pick=lambda call: call.dtype == torch.float64, auto_rank=0
    )
    backends.register(mine)
    assert "mine" in backends.backend_names() and "mine" in available()
    x = torch.rand(3, 2, 5, dtype=torch.float64) * 2
    assert torch.equal(LIF(backend="mine")(x), LIF(backend="torch")(x))
    assert torch.equal(LIF()(x), LIF(backend="torch")(x)) and len(ran) == 2  # auto took it
    with pytest.raises(ValueError, match="float64 only"):
        LIF(backend="mine")(x.float())
    with pytest.raises(ValueError, match="not a backend name"):
        backends.register(_registry.Backend("auto", run, check, check, 0))


def test_a_layer_resolves_once_per_kind_of_call(monkeypatch):
    """The env read, size test and checks behind a choice run once per layer and kind of
    call, not once per forward (they ran twice per call on every LIF before)."""
    calls = []
    real = _registry.resolve
    monkeypatch.setattr(_registry, "resolve", lambda *a: calls.append(a[1]) or real(*a))
    lif, plif = LIF(), PLIF()
    x = torch.rand(4, 2, 8)
    for _ in range(5):
        lif(x), plif(x)
    assert len(calls) == 2
    lif(torch.rand(4, 7, 8))  # another batch size: the same kind of call
    assert len(calls) == 2
    lif(x.double())  # another dtype: resolved again, once
    lif(x.double())
    assert len(calls) == 3
    big = torch.rand(2, 1, cpu.MIN_NEURONS)  # another size class (cpu's threshold)
    lif(big), lif(big)
    assert len(calls) == 4
    assert lif.resolved_backend in ("cpu", "torch") and plif.resolved_backend == "torch"


def test_auto_env_switch_is_read_at_resolution_not_per_call(monkeypatch):
    reads = []
    real = cpu.usable
    monkeypatch.setattr(cpu, "usable", lambda: reads.append(1) or real())
    lif = LIF()
    x = torch.rand(2, 2, cpu.MIN_NEURONS)
    for _ in range(4):
        lif(x)
    assert len(reads) == 1


def test_set_backend_sets_every_neuron_of_any_module_tree():
    model = create_model("spiking_cnn", num_classes=4, T=2, channels=[4, 8], hidden=16)
    layers = [m for m in model.modules() if isinstance(m, LIF | PLIF)]
    assert len(layers) >= 3 and all(m.backend == "auto" for m in layers)
    assert set_backend(model, "loop") == len(layers)
    assert all(m.backend == "loop" for m in layers)
    wrapped = nn.Sequential(nn.Identity(), nn.ModuleDict({"net": model, "extra": PLIF()}))
    assert set_backend(wrapped, "torch") == len(layers) + 1
    assert all(m.backend == "torch" for m in wrapped.modules() if isinstance(m, LIF | PLIF))
    assert set_backend(nn.Linear(2, 2), "triton") == 0  # nothing to set: no error
    for bad in ("cuda", "", "Torch"):
        with pytest.raises(ValueError, match=r"unknown LIF backend.*'auto', 'loop', 'torch'"):
            set_backend(model, bad)
    assert all(m.backend == "torch" for m in layers)  # a bad name changes nothing


def test_set_backend_drops_the_resolved_choice_and_records_what_ran():
    model = create_model("spiking_cnn", num_classes=4, T=2, channels=[4, 8], hidden=16)
    x = torch.rand(3, 1, 28, 28)
    n = sum(isinstance(m, LIF | PLIF) for m in model.modules())
    assert resolved_backends(model) == {"not run": n}
    set_backend(model, "torch")
    model(x)
    assert resolved_backends(model) == {"torch": n}
    set_backend(model, "loop")
    assert resolved_backends(model) == {"not run": n}
    out = model(x)
    assert resolved_backends(model) == {"loop": n}
    assert "Fused" not in type(out.grad_fn).__name__


def test_copies_keep_the_name_and_resolve_again():
    lif = LIF(backend="torch")
    lif(torch.rand(2, 3))
    for other in (copy.deepcopy(lif), pickle.loads(pickle.dumps(lif))):
        assert other.backend == "torch" and other._choice._cache == {}
        assert torch.equal(other(torch.ones(2, 3)), lif(torch.ones(2, 3)))


def test_engine_lif_backend_key_is_applied_and_recorded(tmp_path):
    from dassdp.engine import ConfigError, Trainer

    with pytest.raises(ConfigError, match=r"lif_backend must be one of auto, loop, torch"):
        tiny(lif_backend="fast")
    trainer = Trainer(tiny(epochs=1, plasticity=None, lif_backend="loop"), tmp_path)
    try:
        layers = [m for m in trainer.model.modules() if isinstance(m, LIF | PLIF)]
        assert layers and all(m.backend == "loop" for m in layers)
        trainer.fit()
    finally:
        trainer.close()
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["lif_backends"] == {"requested": "loop", "layers": {"loop": len(layers)}}
    assert (
        f"LIF backends (lif_backend=loop): loop {len(layers)}"
        in (tmp_path / "train.log").read_text()
    )


def test_engine_records_the_backend_of_a_resume_in_its_entry(tmp_path):
    from dassdp.engine import Trainer

    trainer = Trainer(tiny(epochs=1, plasticity=None), tmp_path)
    try:
        trainer.fit()
    finally:
        trainer.close()
    first = json.loads((tmp_path / "run.json").read_text())["lif_backends"]
    assert first["requested"] == "auto" and set(first["layers"]) <= {"torch", "cpu"}
    trainer = Trainer(tiny(epochs=2, plasticity=None, lif_backend="torch"), tmp_path, resume=True)
    try:
        trainer.fit()
    finally:
        trainer.close()
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["lif_backends"] == first  # the first start's record stays
    assert meta["resumes"][-1]["lif_backends"]["layers"] == {"torch": sum(first["layers"].values())}
