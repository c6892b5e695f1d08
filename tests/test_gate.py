"""Streaming gate statistics, the fit and the gate."""

import math

import pytest
import torch

from dassdp.plasticity.gate import GateStats, fit_gate, gate_values
from oracle import naive_gate


def records(n_batches=7, B=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        base = torch.rand((), generator=gen, dtype=torch.float64) * 0.3
        S = base + 0.02 * torch.rand(B, generator=gen, dtype=torch.float64)
        L = float(2.0 - 3.0 * S.mean() + 0.1 * torch.randn((), generator=gen, dtype=torch.float64))
        out.append((S, L))
    return out


def feed(stats, recs):
    for S, L in recs:
        stats.update(S, L)


def test_streaming_fit_equals_batch_fit():
    recs = records()
    stats = GateStats()
    feed(stats, recs)
    fit = fit_gate(stats.sums)
    assert fit.valid and stats.n == 7 * 16
    S_all = torch.cat([S for S, _ in recs])
    L_all = torch.cat([torch.full_like(S, L) for S, L in recs])
    assert fit.mu == pytest.approx(S_all.mean().item(), abs=1e-14)
    assert fit.sd == pytest.approx(S_all.std(unbiased=False).item() + 1e-8, abs=1e-14)
    probe = torch.linspace(0, 0.4, 9, dtype=torch.float64)
    torch.testing.assert_close(
        gate_values(probe, fit), naive_gate(S_all, L_all, probe), rtol=0, atol=1e-10
    )
    assert fit.k > 0.5  # loss falls as synchrony rises: positive k, gate rewards synchrony


def test_nonfinite_records_are_skipped_and_counted():
    recs = records()
    clean, dirty = GateStats(), GateStats()
    feed(clean, recs)
    feed(dirty, recs[:3])
    dirty.update(torch.tensor([0.1, float("nan"), 0.2], dtype=torch.float64), 1.0)
    dirty.update(torch.tensor([0.1, 0.2], dtype=torch.float64), float("inf"))
    feed(dirty, recs[3:])
    assert dirty.skipped == 1 + 2
    # the two finite records of the NaN batch count; remove them to compare with clean
    dirty.update(torch.tensor([0.1, 0.2], dtype=torch.float64), -1.0)  # cancels L sums
    assert dirty.n == clean.n + 4
    assert math.isfinite(fit_gate(dirty.sums).k)


def test_degenerate_fits_give_one_with_a_reason():
    stats = GateStats()
    with pytest.warns(RuntimeWarning, match="need >= 2"):
        fit = fit_gate(stats.sums)
    assert not fit.valid
    stats.update(torch.full((8,), 0.25, dtype=torch.float64), 1.0)
    stats.update(torch.full((8,), 0.25, dtype=torch.float64), 2.0)
    with pytest.warns(RuntimeWarning, match="synchrony is constant"):
        fit = fit_gate(stats.sums)
    S = torch.tensor([0.0, 0.25, 0.9])
    assert torch.equal(gate_values(S, fit), torch.ones(3))
    bad = torch.tensor([4.0, float("inf"), 1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert not fit_gate(bad).valid


def test_gate_is_clipped_and_mode_one_is_one():
    recs = records()
    stats = GateStats()
    feed(stats, recs)
    fit = fit_gate(stats.sums)
    S = torch.tensor([-10.0, fit.mu, 10.0], dtype=torch.float64)
    G = gate_values(S, fit)
    assert G.tolist() == [0.0, 1.0, 2.0]
    assert torch.equal(gate_values(S, fit, "one"), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate must be one of"):
        gate_values(S, fit, "dopamine")


def test_stats_state_round_trip():
    stats = GateStats()
    feed(stats, records(3))
    other = GateStats()
    other.load_state_dict(stats.state_dict())
    assert torch.equal(other.sums, stats.sums)
    with pytest.raises(ValueError, match="7 sums"):
        other.load_state_dict({"sums": [1.0, 2.0]})
