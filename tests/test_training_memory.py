"""Training memory: spike-aware saved tensors and per-stage activation checkpointing.

Both must leave the math alone: the same outputs and bit-identical gradients, with less
kept for the backward; checkpointing must not record DA-SSDP activity twice.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dassdp
from dassdp import DASSDP, DASSDPConfig
from dassdp._util.recompute import is_recomputing, recomputing
from dassdp.engine.metrics import FiringRates
from dassdp.models import create_model, spikingresformer
from dassdp.models.layers import check_stage_indices, checkpointed
from dassdp.neurons import LIF, is_marked_spikes, mark_spikes, observe_saved, spike_saving
from test_models import CASES, NUM_CLASSES, PARAMS, T

torch.set_num_threads(1)


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def _step(model: nn.Module, x: torch.Tensor, *, dtype: torch.dtype):
    """One train-mode forward + backward; returns (output, grads, saved bytes, kept bytes)."""
    model.zero_grad(set_to_none=True)
    saved = [0, 0]

    def count(t, nbytes, kept):
        if not isinstance(t, nn.Parameter):  # activations only (weights are kept anyway)
            saved[0] += nbytes
            saved[1] += kept

    with observe_saved(count):
        out = model(x.to(dtype))
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads, saved[0], saved[1]


def _today_scaled(product, scale):  # DSSA's scaling before the in-place change
    return product * scale


@pytest.mark.parametrize("name", list(CASES))
def test_spike_saving_is_exact_and_keeps_less(name, monkeypatch):
    kwargs, shape = CASES[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, T=T, **kwargs).double().train()
    assert model.spike_saving is True  # on by default
    n_params = sum(p.numel() for p in model.parameters())
    default = create_model(name)
    assert sum(p.numel() for p in default.parameters()) == PARAMS[name]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2
    start = _buffers(model)

    runs = {}
    for label, saving, scaled in [
        ("today", False, _today_scaled),
        ("off", False, spikingresformer._scaled),
        ("on", True, spikingresformer._scaled),
    ]:
        monkeypatch.setattr(spikingresformer, "_scaled", scaled)
        model.load_state_dict(start, strict=False)
        model.spike_saving = saving
        runs[label] = _step(model, x, dtype=torch.float64)
    assert sum(p.numel() for p in model.parameters()) == n_params
    (o_today, g_today, *_), (o_off, g_off, b_off, k_off), (o_on, g_on, b_on, k_on) = (
        runs["today"],
        runs["off"],
        runs["on"],
    )
    torch.testing.assert_close(o_on, o_today, rtol=0, atol=1e-12)
    for n in g_today:
        torch.testing.assert_close(g_on[n], g_today[n], rtol=1e-6, atol=1e-12, msg=n)
    assert torch.equal(o_on, o_off)
    for n in g_off:
        assert torch.equal(g_on[n], g_off[n]), n  # bit-identical
    assert b_on == b_off and k_off == b_off  # the same tensors are saved
    assert k_on < 0.9 * k_off, (k_on, k_off)  # spikes kept as bool


@pytest.mark.parametrize("name", ["spiking_cnn", "spikingresformer_cifar"])
def test_spike_saving_gradients_bit_identical_in_fp32(name):
    kwargs, shape = CASES[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, T=T, **kwargs).train()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(2)) * 2
    start = _buffers(model)
    model.spike_saving = False
    o_off, g_off, _, k_off = _step(model, x, dtype=torch.float32)
    model.load_state_dict(start, strict=False)
    model.spike_saving = True
    o_on, g_on, _, k_on = _step(model, x, dtype=torch.float32)
    assert torch.equal(o_on, o_off)
    assert all(torch.equal(g_on[n], g_off[n]) for n in g_off)
    assert k_on < k_off


def test_marks_views_versions_and_the_pack_round_trip():
    s = (torch.rand(3, 4) > 0.5).float()
    assert not is_marked_spikes(s)
    mark_spikes(s)
    assert is_marked_spikes(s) and is_marked_spikes(s.view(12)) and is_marked_spikes(s.t())
    view = torch.zeros(3, 4)[1:]
    mark_spikes(view)  # a view is not marked: its base may hold other values
    assert not is_marked_spikes(view)
    s.mul_(3)  # modified in place: no longer known to be 0/1
    assert not is_marked_spikes(s)

    w = torch.randn(4, 5, requires_grad=True)
    spikes = mark_spikes((torch.rand(6, 4) > 0.5).float())
    kept = []
    with observe_saved(lambda t, n, k: kept.append((n, k))), spike_saving():
        (spikes.t().t() @ w).sum().backward()  # mm saves the spike input for w's gradient
    assert (spikes.numel() * 4, spikes.numel()) in kept
    assert torch.equal(w.grad, spikes.t() @ torch.ones(6, 5))
    with spike_saving(False):  # off: nothing installed
        assert torch.autograd.graph.saved_tensors_hooks is not None


def test_lif_spike_mask_is_kept_without_a_copy():
    from dassdp.neurons import saving

    x = torch.randn(4, 2, 3, 5, 5) * 2
    s = LIF()(x)  # the fused (torch) backend hands its bool mask over
    bits = getattr(s, saving._BITS)
    assert bits.dtype == torch.bool and torch.equal(bits.to(s.dtype), s)
    for view in (s, s.flatten(0, 1), s[1]):  # the tensor itself and contiguous views
        packed = saving._pack(view)
        assert isinstance(packed, saving._PackedSpikes)
        assert packed.bits.untyped_storage().data_ptr() == bits.untyped_storage().data_ptr()
        rebuilt = saving._unpack(packed)
        assert torch.equal(rebuilt, view) and rebuilt.stride() == view.stride()
    strided = s.transpose(3, 4)  # not contiguous: converted as before (its own bool copy)
    packed = saving._pack(strided)
    assert packed.bits.untyped_storage().data_ptr() != bits.untyped_storage().data_ptr()
    assert torch.equal(saving._unpack(packed), strided)
    s.mul_(2)  # modified in place: neither the mark nor the mask is used any more
    assert not isinstance(saving._pack(s), saving._PackedSpikes)
    # a mask of another layout is not attached
    t = (torch.rand(3, 4) > 0.5).float()
    saving.attach_spike_bits(t, t.t().contiguous().t().bool())
    assert not hasattr(t, saving._BITS)
    saving.attach_spike_bits(t[1:], t[1:].bool())  # nor to a view
    assert not hasattr(t[1:], saving._BITS)


def test_lif_outputs_are_marked():
    x = torch.randn(2, 3, 4, requires_grad=True)
    assert is_marked_spikes(LIF()(x))
    assert is_marked_spikes(LIF(backend="loop")(x))


def test_spike_saving_is_validated():
    with pytest.raises(ValueError, match="spike_saving must be true or false"):
        create_model("spiking_cnn", spike_saving="yes")
    with pytest.raises(ValueError, match="spike_saving must be true or false"):
        create_model("spikingresformer_cifar", spike_saving=1)


# ------------------------------------------------------------------- checkpointing
def _small_resformer(**kw):
    torch.manual_seed(0)
    return create_model(
        "spikingresformer_cifar", dims=(16, 48, 96), group_size=16, T=T, **kw
    ).train()


def test_check_stage_indices_errors():
    assert check_stage_indices([2, 0], 3, "k") == (0, 2)
    for bad, msg in [
        ([3], "not a stage index"),
        ([-1], "not a stage index"),
        (["0"], "not a stage index"),
        ([True], "not a stage index"),
        ([1, 1], "twice"),
        (1, "list of stage indices"),
        ("0", "list of stage indices"),
    ]:
        with pytest.raises(ValueError, match=msg):
            check_stage_indices(bad, 3, "checkpoint_stages")
    with pytest.raises(ValueError, match="checkpoint_stages"):
        _small_resformer(checkpoint_stages=[5])


def test_checkpointed_stages_give_the_same_outputs_gradients_and_buffers():
    plain = _small_resformer()
    ckpt = _small_resformer(checkpoint_stages=[0, 1, 2])
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2
    for _ in range(2):  # the second step starts from once-updated running statistics
        outs, grads = [], []
        for model in (plain, ckpt):
            model.zero_grad(set_to_none=True)
            out = model(x)
            F.cross_entropy(out, torch.tensor([1, 2, 3])).backward()
            outs.append(out.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert torch.equal(outs[0], outs[1])
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=0, msg=n)
        b0, b1 = _buffers(plain), _buffers(ckpt)
        for n in b0:  # updated once per forward, not again by the recomputation
            assert torch.equal(b0[n], b1[n]), n


def test_checkpointing_keeps_less_and_runs_plainly_without_grad():
    x = torch.rand(2, 3, 32, 32)
    kept = {}
    for stages in ((), (0, 1, 2)):
        model = _small_resformer(checkpoint_stages=stages)
        total = [0]
        with observe_saved(lambda t, n, k, total=total: total.__setitem__(0, total[0] + k)):
            model(x)
        kept[stages] = total[0]
    assert kept[(0, 1, 2)] < 0.5 * kept[()]
    model = _small_resformer(checkpoint_stages=[1]).eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_recompute_flag_and_firing_rates_skip_recomputation():
    assert not is_recomputing()
    with recomputing():
        assert is_recomputing()
    assert not is_recomputing()
    seen = []
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    net[0].register_forward_hook(lambda m, a, o: seen.append(is_recomputing()))
    x = torch.randn(2, 3, requires_grad=True)
    checkpointed(net, x).sum().backward()
    assert seen == [False, True]  # the recomputation ran, flagged

    model = _small_resformer(checkpoint_stages=[0, 1, 2])
    rates = FiringRates(model)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    plain = _small_resformer()
    plain_rates = FiringRates(plain)
    plain(torch.rand(2, 3, 32, 32)).sum().backward()
    assert rates.counts == plain_rates.counts  # each layer counted once


def _dassdp_run(checkpoint_stages):
    model = _small_resformer(checkpoint_stages=checkpoint_stages)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=1, A_plus=0.05, A_minus=0.02))
    gen = torch.Generator().manual_seed(5)
    for epoch in range(2):
        plast.set_epoch(epoch)
        for _ in range(2):
            x = torch.rand(4, 3, 32, 32, generator=gen) * 2
            y = torch.randint(0, 10, (4,), generator=gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            plast.step(loss)
            dassdp.reset(model)
    counters, stats = plast.counters, copy.deepcopy(plast.stats)
    plast.close()
    return model, counters, stats


def test_checkpointed_model_learns_the_same_dassdp_update():
    plain, c_plain, s_plain = _dassdp_run(())
    ckpt, c_ckpt, s_ckpt = _dassdp_run([0, 1, 2])
    assert c_plain == c_ckpt and c_plain["applied"] > 0
    for name in s_plain:  # recorded once per step (a double record doubles the count)
        assert s_plain[name].n == s_ckpt[name].n
    site = f"{plain.projection_block}.proj.weight"
    p, c = plain.state_dict(), ckpt.state_dict()
    for n in p:
        torch.testing.assert_close(c[n], p[n], rtol=1e-6, atol=1e-7, msg=n)
    assert not torch.equal(p[site], _small_resformer().state_dict()[site])


def test_config_model_args_carry_the_memory_options():
    from dassdp.engine import ConfigError, config_from_dict
    from engine_fixtures import tiny_dict

    cfg = config_from_dict(tiny_dict(model_args={"spike_saving": False}))
    assert cfg.model_args == {"spike_saving": False}
    ok = tiny_dict(model="spikingresformer_cifar", model_args={"checkpoint_stages": [0, 2]})
    assert config_from_dict(ok).model_args["checkpoint_stages"] == [0, 2]
    for bad, msg in [
        ({"checkpoint_stages": [3]}, "checkpoint_stages: 3 is not a stage index"),
        ({"spike_saving": "yes"}, "spike_saving must be true or false"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(tiny_dict(model="spikingresformer_cifar", model_args=bad))
