"""Learned sigma and amplitude (``DASSDPConfig(learn=...)``): the one-step hypergradients are
the derivatives of the next step's loss, the values move downhill, bounds, resume, errors."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import dassdp
from dassdp import DASSDP, DASSDPConfig
from dassdp.plasticity.controls import random_update as _random_update
from dassdp.plasticity.gate import gate_values
from dassdp.plasticity.rule import delta_w, synchrony
from snn_fixtures import TinySNN

B = 8
SITE = {"fc2": {"pre": "input", "post": "output>0"}}  # the readout: L is smooth in its weight
LEARN = ("sigma", "amplitude")


def batch(step, model, size=B):
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(size, model.fc1.in_features, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, model.fc2.out_features, (size,), generator=gen)


class Tape:
    """Wraps ``recorder.collect``: keeps the records of every step."""

    def __init__(self, collect):
        self.collect, self.records = collect, []

    def __call__(self):
        records = self.collect()
        self.records.append(records)
        return records


def model64(seed=0):
    torch.manual_seed(seed)
    return TinySNN(hidden=16, classes=5).double()


def loss_at(params, fc2_weight, x, y):
    """``L`` of a batch for the parameters ``params`` with ``fc2.weight`` replaced."""
    twin = TinySNN(hidden=16, classes=5).double()  # no hooks: records nothing
    twin.load_state_dict({**params, "fc2.weight": fc2_weight})
    with torch.no_grad():
        return F.cross_entropy(twin(x), y).item()


def run_to_step(cfg, steps, seed=0):
    """Warm-up epoch of 3 steps, then ``steps`` active steps (SGD, post_step). Returns the
    model, the learner, the tape and, per active step, (weight before the update, params
    after it)."""
    model = model64(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plast = DASSDP(model, cfg, sites=SITE)
    tape = Tape(plast.recorder.collect)
    plast.recorder.collect = tape
    snaps = []
    for step in range(3 + steps):
        plast.set_epoch(0 if step < 3 else 1)
        x, y = batch(step, model)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = model.fc2.weight.detach().clone()
        assert plast.step(loss) or step < 3
        dassdp.reset(model)
        snaps.append((before, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    return model, opt, plast, tape, snaps


@pytest.mark.parametrize("clip", [None, "binding"])
def test_hypergradients_equal_central_differences_of_the_next_loss(clip):
    # L_{t+1}(sigma, a) = loss of batch t+1 at the weights step t left, with fc2.weight =
    # W'_t + clip(a D_t(sigma)). Held fixed: W'_t (after the optimizer step t), the activity
    # and the gate of step t (recorded before the update, so independent of sigma and a), and
    # every other parameter. Only the kernel width inside D_t and the scale a vary.
    base = DASSDPConfig(
        warmup_epochs=1, A_plus=0.05, A_minus=0.02, dtype="float64", learn=LEARN,
        sigma_lr=0.5, amplitude_lr=2.0, sigma=1.3, hyper_step="plain",
    )  # fmt: skip
    t = 3  # three active steps: sigma and a have moved away from their start
    if clip == "binding":  # a bound between the smallest and the largest |a D| of step t
        _, _, plast, tape, _ = run_to_step(base, t + 1)
        D_t = plast._prev["fc2"][1]
        clip = float(D_t.abs().quantile(0.8))
    cfg = base.replace(clip=clip)
    model, opt, plast, tape, snaps = run_to_step(cfg, t + 1)
    assert plast._prev["fc2"][0] == plast._step_index  # the last step's D is kept
    # rerun to step t, read sigma_t, a_t (they made D_t), then take step t+1 by hand
    model, opt, plast, tape, snaps = run_to_step(cfg, t)
    sigma, amp = plast.learned["fc2"]["sigma"], plast.learned["fc2"]["amplitude"]
    assert sigma != 1.3 and amp != 1.0
    rec = tape.records[-1]["fc2"]
    S = synchrony(rec.pre.fired, rec.post.fired, torch.float64)
    G = gate_values(S, plast.fits["fc2"], "fitted")
    W_opt, params = snaps[-1]  # W'_t and all weights after step t

    def weight(s, a):
        D_t = delta_w(
            rec.pre, rec.post, G, T=rec.T, A_plus=0.05, A_minus=0.02, sigma=s,
            dtype=torch.float64, post_states="all",
        )  # fmt: skip
        upd = a * D_t
        return W_opt + (upd if clip is None else upd.clamp(-clip, clip))

    torch.testing.assert_close(weight(sigma, amp), params["fc2.weight"], rtol=0, atol=1e-15)
    if clip is not None:
        binds = (amp * plast._prev["fc2"][1]).abs() >= clip
        assert 0 < int(binds.sum()) < binds.numel()
    x, y = batch(3 + t, model)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    plast.step(loss)
    m = plast.last_metrics()["fc2"]

    def L(s, a):
        return loss_at(params, weight(s, a), x, y)

    es, ea = 1e-5 * sigma, 1e-5 * amp
    fd_sigma = (L(sigma + es, amp) - L(sigma - es, amp)) / (2 * es)
    fd_amp = (L(sigma, amp + ea) - L(sigma, amp - ea)) / (2 * ea)
    assert abs(fd_sigma) > 1e-6 and abs(fd_amp) > 1e-6  # a real test, not 0 == 0
    assert m["hypergrad_sigma"] == pytest.approx(fd_sigma, rel=1e-6)
    assert m["hypergrad_amplitude"] == pytest.approx(fd_amp, rel=1e-6)
    # the log-space steps of the issue, and they lower L_{t+1}
    new_sigma = math.exp(math.log(sigma) - 0.5 * sigma * m["hypergrad_sigma"])
    new_amp = math.exp(math.log(amp) - 2.0 * amp * m["hypergrad_amplitude"])
    assert m["sigma"] == pytest.approx(new_sigma, rel=1e-12)
    assert m["amplitude"] == pytest.approx(new_amp, rel=1e-12)
    assert L(new_sigma, amp) < L(sigma, amp) and L(sigma, new_amp) < L(sigma, amp)


def test_grad_mode_reads_the_task_gradient_before_subtracting_dw():
    cfg = DASSDPConfig(
        warmup_epochs=0, gate="one", A_plus=0.05, A_minus=0.02, dtype="float64",
        learn=LEARN, apply="grad", clip=0.02,
    )  # fmt: skip
    model = model64()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plast = DASSDP(model, cfg, sites=SITE)
    grads, kept = [], []
    for step in range(3):
        x, y = batch(step, model)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads.append(model.fc2.weight.grad.clone())
        a_used = plast.learned["fc2"]["amplitude"]
        prev = plast._prev.get("fc2")
        plast.step(loss)
        opt.step()
        dassdp.reset(model)
        D_t = plast._prev["fc2"][1]
        kept.append((D_t, plast._prev["fc2"][2]))
        # .grad now holds the task gradient minus the applied clip(a D_t)
        applied = (plast.learned["fc2"]["amplitude"] * D_t).clamp(-0.02, 0.02)
        torch.testing.assert_close(grads[-1] - model.fc2.weight.grad, applied)
        if prev is None:
            continue
        D_prev, dD_prev = prev[1], prev[2]
        keep = (a_used * D_prev).abs() < 0.02
        g = grads[-1] * keep  # the task gradient, not the one with dW subtracted
        m = plast.last_metrics()["fc2"]
        assert m["hypergrad_amplitude"] == pytest.approx(float((g * D_prev).sum()), rel=1e-12)
        h_sigma = a_used * float((g * dD_prev).sum())
        assert m["hypergrad_sigma"] == pytest.approx(h_sigma, rel=1e-12)
        assert m["hypergrad_amplitude"] != 0 and m["hypergrad_sigma"] != 0


def test_learned_values_move_downhill_on_a_constructed_case_and_respect_bounds():
    # The loss rewards larger readout outputs: L = -mean(out). With A_minus = 0 every entry of
    # D_t and of dD_t/dsigma is >= 0, and dL/dW = -mean(spikes) <= 0, so a wider kernel and a
    # larger amplitude lower the next loss: both must grow, until their upper bounds.
    torch.manual_seed(0)
    model = TinySNN(hidden=16, classes=5)
    cfg = DASSDPConfig(
        warmup_epochs=0, gate="one", A_plus=0.01, A_minus=0.0, sigma=0.8, learn=LEARN,
        sigma_lr=20.0, amplitude_lr=5.0, sigma_range=(0.5, 1.2), amplitude_range=(0.25, 1.5),
        hyper_step="plain",
    )  # fmt: skip
    plast = DASSDP(model, cfg, sites=SITE)
    history = []
    for step in range(12):
        x, _ = batch(step, model)
        loss = -model(x.float()).mean()
        model.zero_grad()
        loss.backward()
        plast.step(loss)
        dassdp.reset(model)
        m = plast.last_metrics()["fc2"]
        if step:
            assert m["hypergrad_sigma"] <= 0 and m["hypergrad_amplitude"] < 0
        history.append((m["sigma"], m["amplitude"]))
    sigmas, amps = zip(*history)
    assert all(b >= a for a, b in itertools.pairwise(sigmas)) and sigmas[-1] > 0.8
    assert all(b >= a for a, b in itertools.pairwise(amps)) and amps[-1] > 1.0
    assert sigmas[-1] == pytest.approx(1.2) and amps[-1] == pytest.approx(1.5)  # clamped
    assert max(sigmas) <= 1.2 * (1 + 1e-12) and max(amps) <= 1.5 * (1 + 1e-12)


def train(model, opt, plast, epochs, start=0, steps=3, nan_at=None):
    for epoch in range(start, epochs):
        plast.set_epoch(epoch)
        for i in range(steps):
            gen = torch.Generator().manual_seed(100 * epoch + i)
            x = torch.randn(B, 12, generator=gen)
            y = torch.randint(0, 4, (B,), generator=gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            plast.step(loss * float("nan") if (epoch, i) == nan_at else loss)
            dassdp.reset(model)


def make(seed=0):
    torch.manual_seed(seed)
    model = TinySNN()
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CFG = DASSDPConfig(warmup_epochs=1, A_plus=0.02, A_minus=0.005, learn=LEARN, sigma_lr=20.0,
                   amplitude_lr=20.0, hyper_step="plain")  # fmt: skip


def test_learning_changes_the_run_and_zero_rates_change_nothing():
    runs = {}
    for name, cfg in (
        ("fixed", DASSDPConfig(warmup_epochs=1, A_plus=0.02, A_minus=0.005)),
        ("amp0", CFG.replace(learn=("amplitude",), amplitude_lr=0.0)),
        ("both0", CFG.replace(sigma_lr=0.0, amplitude_lr=0.0)),
        ("learned", CFG),
    ):
        model, opt = make()
        plast = DASSDP(model, cfg)
        train(model, opt, plast, epochs=3)
        runs[name] = (weights(model), plast)
    fixed, amp0 = runs["fixed"][0], runs["amp0"][0]
    assert all(torch.equal(fixed[k], amp0[k]) for k in fixed)  # a = 1 exactly: same bits
    for k in fixed:  # sigma through the stacked GEMM: same values up to rounding
        torch.testing.assert_close(runs["both0"][0][k], fixed[k], rtol=1e-5, atol=1e-7)
    assert not torch.equal(runs["learned"][0]["fc2.weight"], fixed["fc2.weight"])
    learned = runs["learned"][1].learned
    assert all(v["sigma"] != 1.0 and v["amplitude"] != 1.0 for v in learned.values())
    assert runs["fixed"][1].learned == {}
    assert "learned" not in runs["fixed"][1].state_dict()
    assert set(runs["fixed"][1].last_metrics()["fc2"]) == {
        "synchrony", "gate_mean", "dw_abs_mean", "dw_abs_max", "pre_fired", "post_fired",
    }  # fmt: skip


def test_metrics_report_the_learned_values_as_device_tensors():
    model, opt = make()
    plast = DASSDP(model, CFG.replace(learn=("amplitude",)))
    train(model, opt, plast, epochs=1)
    assert "sigma" not in plast.last_metrics()["fc2"]  # warm-up: nothing learned yet
    train(model, opt, plast, epochs=2, start=1)
    tensors = plast.last_metrics(as_tensors=True)
    for site in ("fc1", "fc2"):
        m = tensors[site]
        assert {"sigma", "amplitude", "hypergrad_amplitude"} <= set(m)
        assert "hypergrad_sigma" not in m  # only for what is learned
        assert all(isinstance(v, torch.Tensor) and v.shape == () for v in m.values())
        assert float(m["sigma"]) == pytest.approx(1.0)
        assert float(m["amplitude"]) == pytest.approx(plast.learned[site]["amplitude"])


@pytest.mark.parametrize("stop_after", [1, 2])  # right after warm-up, and mid-run
def test_resume_with_learning_is_bit_identical(stop_after):
    cfg = CFG.replace(control="shuffled_latency", clip=0.01)
    full, opt = make()
    plast = DASSDP(full, cfg)
    train(full, opt, plast, epochs=4)
    first, opt1 = make()
    p1 = DASSDP(first, cfg)
    train(first, opt1, p1, epochs=stop_after)
    ckpt = copy.deepcopy(
        {"model": first.state_dict(), "opt": opt1.state_dict(), "plast": p1.state_dict()}
    )
    p1.close()
    if stop_after == 2:
        assert ckpt["plast"]["learned"]["fc2"]["D"] is not None
        assert ckpt["plast"]["learned"]["fc2"]["dD_dsigma"] is not None
    resumed, opt2 = make(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    p2 = DASSDP(resumed, cfg)
    p2.load_state_dict(ckpt["plast"])
    train(resumed, opt2, p2, epochs=4, start=stop_after)
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert p2.learned == plast.learned
    assert p2.last_metrics() == plast.last_metrics()


def test_a_checkpoint_without_learned_values_loads():
    model, opt = make()
    old = DASSDP(model, DASSDPConfig(warmup_epochs=1, A_plus=0.02))
    train(model, opt, old, epochs=2)
    state = old.state_dict()
    assert "learned" not in state
    old.close()
    learning = DASSDP(model, CFG.replace(sigma=1.5))
    # an older checkpoint, loaded into another config: the learned values start fresh
    learning.load_state_dict(state, strict=False)
    assert learning.learned["fc2"] == {"sigma": pytest.approx(1.5), "amplitude": 1.0}
    assert learning._prev == {} and learning.fits == old.fits
    train(model, opt, learning, epochs=3, start=2)
    assert learning.learned["fc2"]["sigma"] != pytest.approx(1.5)
    with pytest.warns(RuntimeWarning, match="config.learn is empty: they are ignored"):
        DASSDP(model, DASSDPConfig()).load_state_dict(learning.state_dict(), strict=False)
    bad = learning.state_dict()
    del bad["learned"]["fc1"]
    with pytest.raises(ValueError, match=r"learned values lack the site\(s\) \['fc1'\]"):
        DASSDP(model, CFG).load_state_dict(bad, strict=False)


def test_a_skipped_step_moves_neither_sigma_nor_amplitude():
    model, opt = make()
    plast = DASSDP(model, CFG)
    train(model, opt, plast, epochs=2)
    before = plast.learned
    train(model, opt, plast, epochs=3, start=2, steps=1, nan_at=(2, 0))
    assert plast.learned == before and plast.counters["skipped_nonfinite"] == 1
    assert plast.last_metrics()["fc2"]["hypergrad_sigma"] != 0  # the last counted step's
    # the step after a skipped one has no update to learn from: h = 0, values unchanged
    train(model, opt, plast, epochs=4, start=3, steps=1)
    metrics = plast.last_metrics(as_tensors=True)["fc2"]
    assert float(metrics["hypergrad_sigma"]) == 0 and float(metrics["hypergrad_amplitude"]) == 0
    assert plast.learned == before
    w = model.fc2.weight.detach().clone()
    loss = F.cross_entropy(model(torch.randn(B, 12)), torch.zeros(B, dtype=torch.long))
    model.fc2.weight.grad = torch.full_like(w, float("inf"))  # a grad scaler found an inf
    plast.step(loss.detach(), optimizer_stepped=torch.tensor(0.0))
    dassdp.reset(model)
    assert plast.learned == before and torch.equal(model.fc2.weight, w)


def test_random_update_control_differentiates_its_norm():
    gen = torch.Generator().manual_seed(0)
    D0, dD = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    signs = torch.randint(0, 2, (3, 4), generator=gen).double() * 2 - 1
    both = _random_update(signs, torch.stack((D0, dD)))
    torch.testing.assert_close(both[0], _random_update(signs, D0), rtol=0, atol=0)
    eps = 1e-6
    up, down = (_random_update(signs, D0 + e * dD) for e in (eps, -eps))
    torch.testing.assert_close(both[1], (up - down) / (2 * eps), rtol=1e-7, atol=1e-10)
    zero = _random_update(signs, torch.zeros(2, 3, 4, dtype=torch.float64))
    assert torch.isfinite(zero).all() and not zero.any()


@pytest.mark.parametrize("control", ["random_update", "uniform_drift"])
def test_controls_run_with_learning(control):
    model, opt = make()
    plast = DASSDP(model, CFG.replace(control=control))
    train(model, opt, plast, epochs=3)
    learned = plast.learned["fc2"]
    assert learned["amplitude"] != 1.0
    assert (learned["sigma"] == 1.0) is (control == "uniform_drift")  # dW has no sigma there


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learn": "sigma"}, r"learn must be a tuple of names from \('sigma', 'amplitude'\)"),
        ({"learn": ("sigma", "tau")}, r"learn must name each of .* got \('sigma', 'tau'\)"),
        ({"learn": ("sigma", "sigma")}, "at most once"),
        ({"sigma_lr": -1.0}, "sigma_lr must be a finite number >= 0, got -1.0"),
        ({"amplitude_lr": float("nan")}, "amplitude_lr must be a finite number >= 0"),
        ({"sigma_range": (0.5,)}, r"sigma_range must be None or \(lo, hi\)"),
        ({"sigma_range": (2.0, 1.0)}, "sigma_range must satisfy 0 < lo <= hi"),
        ({"amplitude_range": (0.0, 1.0)}, "amplitude_range must satisfy 0 < lo <= hi"),
        ({"sigma_range": (2.0, 3.0)}, r"sigma_range=\(2.0, 3.0\) must contain sigma=1.0"),
        ({"amplitude_range": (2.0, 3.0)}, "must contain the initial amplitude 1"),
        ({"sigma": float("inf")}, "needs a finite sigma to start from"),
    ],
)
def test_learning_config_errors_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DASSDPConfig(**{"learn": LEARN, **kwargs})


def test_learning_config_normalises_lists():
    cfg = DASSDPConfig(learn=["amplitude"], amplitude_range=[0.5, 2])
    assert cfg.learn == ("amplitude",) and cfg.amplitude_range == (0.5, 2.0)
    assert DASSDPConfig.from_dict(cfg.to_dict()) == cfg
    no_kernel = DASSDP(make()[0], DASSDPConfig(sigma=float("inf"), learn=("amplitude",)))
    assert no_kernel.learned["fc2"] == {"sigma": math.inf, "amplitude": 1.0}  # a alone: fine


def test_engine_runs_log_the_learned_values_and_resume_bit_identically(tmp_path):
    from dassdp.engine import fit, load_checkpoint, read_metrics
    from engine_fixtures import assert_same_tensors, tiny

    learn = {
        "warmup_epochs": 1,
        "learn": ["sigma", "amplitude"],
        "sigma_lr": 50.0,
        "amplitude_lr": 50.0,
        "hyper_step": "plain",
        "sigma_range": [0.5, 2.0],
    }
    cfg = tiny(epochs=3, plasticity=learn)
    assert cfg.plasticity.learn == ["sigma", "amplitude"]
    fit(cfg, tmp_path / "straight")
    fit(cfg, tmp_path / "stopped", stop_after=2)  # one active epoch done
    fit(cfg, tmp_path / "stopped", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["plasticity"], b["plasticity"])
    rows = read_metrics(tmp_path / "straight")
    assert "sigma" not in rows[0]["plasticity"]["sites"]["classifier"]  # warm-up
    for row in rows[1:]:  # the PlasticityMeter's epoch means of the learner's metrics
        site = row["plasticity"]["sites"]["classifier"]
        for key in ("sigma", "amplitude", "hypergrad_sigma", "hypergrad_amplitude"):
            assert math.isfinite(site[key]), key
        assert 0.5 <= site["sigma"] <= 2.0
    assert rows[2]["plasticity"]["sites"]["classifier"]["amplitude"] != 1.0
    strip = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]
    resumed = read_metrics(tmp_path / "stopped")
    assert strip == [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in resumed]


@pytest.mark.parametrize(
    ("plasticity", "match"),
    [
        ({"learn": "sigma"}, "plasticity.learn must be a list of str or null, got 'sigma'"),
        ({"learn": [1]}, r"plasticity.learn\[0\] must be str, got 1"),
        ({"learn": ["tau"]}, r"plasticity: learn must name each of \('sigma', 'amplitude'\)"),
        ({"learn": ["sigma"], "sigma_lr": -1}, "plasticity: sigma_lr must be a finite number"),
        ({"learn": ["sigma"], "sigma_range": [1]}, "plasticity: sigma_range must be None or"),
        ({"learn": ["amplitude"], "amplitude_range": [2, 3]}, "must contain the initial ampl"),
        ({"learn": ["sigma"], "sigma": math.inf}, "needs a finite sigma"),
        ({"debug": "yes"}, "plasticity.debug must be bool"),
    ],
)
def test_engine_config_errors_name_the_learning_keys(plasticity, match):
    from dassdp.engine.config import ConfigError
    from engine_fixtures import tiny

    with pytest.raises(ConfigError, match=match):
        tiny(plasticity=plasticity)


def test_engine_config_builds_the_learning_learner_config(tmp_path):
    import yaml

    from dassdp.engine import load_config
    from dassdp.engine.config import dassdp_config
    from engine_fixtures import tiny_dict

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_dict()))
    overrides = ["plasticity.learn=[sigma, amplitude]", "plasticity.sigma_lr=1e-2"]
    overrides += ["plasticity.amplitude_range=[0.5, 2]", "plasticity.debug=true"]
    learner = dassdp_config(load_config(path, overrides).plasticity)
    assert learner.learn == ("sigma", "amplitude") and learner.sigma_lr == 0.01
    assert learner.amplitude_range == (0.5, 2.0) and learner.debug is True
    assert learner.amplitude_lr == DASSDPConfig().amplitude_lr  # unset: the default
    assert dassdp_config(load_config(path).plasticity).learn == ()


# ------------------------------------------------ hyper_step="normalized", amplitude_init


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.999])
def test_normalized_step_moves_at_the_rate_for_a_constant_hypergradient_of_any_scale(beta):
    from dassdp.plasticity.learned import normalized_step

    lr, yes, no = 0.01, torch.tensor(True), torch.tensor(False)
    paths = {}
    for h in (1e-8, 1e3, -1e-8, -1e3, 0.37):
        log_v, h2, n = (torch.zeros((), dtype=torch.float64) for _ in range(3))
        h_t = torch.tensor(h, dtype=torch.float64)
        path = []
        for step in range(60):
            if step == 30:  # a step without a hypergradient moves nothing and counts nothing
                before = (log_v, h2, n)
                log_v, h2, n = normalized_step(log_v, h_t * 0, h2, n, no, lr=lr, beta=beta)
                assert all(torch.equal(a, b) for a, b in zip(before, (log_v, h2, n)))
            new, h2, n = normalized_step(log_v, h_t, h2, n, yes, lr=lr, beta=beta)
            assert float(new - log_v) == pytest.approx(-lr * math.copysign(1, h), rel=1e-9)
            log_v = new
            path.append(float(log_v))
        assert float(n) == 60
        paths[h] = path
    assert paths[1e-8] == pytest.approx(paths[1e3], rel=1e-12)  # the scale is gone
    assert paths[-1e-8] == pytest.approx([-x for x in paths[1e3]], rel=1e-12)
    assert paths[0.37][-1] == pytest.approx(-0.6, rel=1e-9)  # 60 steps of lr


def test_normalized_step_starts_from_zero_and_respects_bounds():
    from dassdp.plasticity.learned import normalized_step

    zero, yes = torch.zeros((), dtype=torch.float64), torch.tensor(True)
    log_v, h2, n = normalized_step(zero, zero, zero, zero, yes, lr=0.1, beta=0.0)
    assert float(log_v) == 0 and float(h2) == 0 and float(n) == 1  # h = 0: no 0/0
    h = torch.tensor(-5.0, dtype=torch.float64)
    for _ in range(10):
        log_v, h2, n = normalized_step(log_v, h, h2, n, yes, lr=0.1, beta=0.5, bounds=(0.5, 1.2))
    assert float(log_v) == pytest.approx(math.log(1.2))


def run_scaled(hyper_step, scale, steps=12, **changes):
    """Learned sigma and a with the task gradient scaled by ``scale`` (a power of 2) and the
    SGD rate by 1/scale: the weights move exactly as for scale 1, every h is scale times."""
    torch.manual_seed(0)
    model = TinySNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05 / scale)
    cfg = CFG.replace(hyper_step=hyper_step, hyper_lr=0.02, hyper_beta=0.9, **changes)
    plast = DASSDP(model, cfg)
    history = []
    for step in range(3 + steps):
        plast.set_epoch(0 if step < 3 else 1)
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(B, 12, generator=gen), torch.randint(0, 4, (B,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        (loss * scale).backward()
        opt.step()
        plast.step(loss)  # the unscaled loss: the gate sees the same statistics
        dassdp.reset(model)
        history.append(plast.learned)
    return history, plast.last_metrics()


def test_normalized_learning_is_the_same_at_any_gradient_scale():
    normalized = {k: run_scaled("normalized", 2.0**k) for k in (-27, 0, 10)}
    ref, metrics = normalized[0]
    assert ref[-1]["fc2"]["sigma"] != 1.0 and ref[-1]["fc2"]["amplitude"] != 1.0
    for k, (history, m) in normalized.items():
        assert history == ref, k  # bit-identical: h / RMS(h) does not see the scale
        assert m["fc2"]["hypergrad_amplitude"] == metrics["fc2"]["hypergrad_amplitude"] * 2.0**k
    # the first step with a hypergradient (the 2nd after warm-up) moves each log by hyper_lr
    for site in ("fc1", "fc2"):
        for key in ("sigma", "amplitude"):
            change = math.log(ref[4][site][key]) - math.log(ref[3][site][key])
            assert abs(change) == pytest.approx(0.02, rel=1e-9), (site, key)
    plain = {k: run_scaled("plain", 2.0**k)[0] for k in (0, 10)}
    assert plain[0] != plain[10]  # the plain step scales with the task's gradients


@pytest.mark.parametrize("nan_at", [None, (1, 2)])  # (1, 2): the step before the checkpoint
def test_resume_with_normalized_learning_is_bit_identical(nan_at):
    from engine_fixtures import assert_same_tensors

    cfg = CFG.replace(hyper_step="normalized", hyper_lr=0.05, hyper_beta=0.9, clip=0.01)
    full, opt = make()
    plast = DASSDP(full, cfg)
    train(full, opt, plast, epochs=4, nan_at=nan_at)
    first, opt1 = make()
    p1 = DASSDP(first, cfg)
    train(first, opt1, p1, epochs=2, nan_at=nan_at)
    ckpt = copy.deepcopy(
        {"model": first.state_dict(), "opt": opt1.state_dict(), "plast": p1.state_dict()}
    )
    p1.close()
    item = ckpt["plast"]["learned"]["fc2"]
    assert {"h2_sigma", "steps_sigma", "h2_amplitude", "steps_amplitude", "D_counted"} <= set(item)
    # the first active step has no hypergradient, nor has a skipped one
    assert item["steps_amplitude"] == (2 if nan_at is None else 1)
    assert item["D_counted"] is (nan_at is None)
    resumed, opt2 = make(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    p2 = DASSDP(resumed, cfg)
    p2.load_state_dict(ckpt["plast"])
    train(resumed, opt2, p2, epochs=4, start=2, nan_at=nan_at)
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert p2.learned == plast.learned
    assert_same_tensors(p2.state_dict()["learned"], plast.state_dict()["learned"])
    assert p2.last_metrics() == plast.last_metrics()


def test_a_frozen_amplitude_init_is_the_fixed_rule_with_scaled_amplitudes():
    """a_0 = 1/4 with the amplitude learned at rate 0 is the fixed rule at A+-/4."""
    frozen = CFG.replace(learn=("amplitude",), amplitude_lr=0.0, amplitude_init=0.25)
    scaled = DASSDPConfig(warmup_epochs=1, A_plus=0.005, A_minus=0.00125)
    runs = []
    for cfg in (frozen, scaled):
        model, opt = make()
        plast = DASSDP(model, cfg)
        train(model, opt, plast, epochs=3)
        runs.append(weights(model))
        if cfg is frozen:
            assert plast.learned["fc2"]["amplitude"] == pytest.approx(0.25, rel=1e-15)
    assert not torch.equal(runs[0]["fc2.weight"], make()[0].fc2.weight)  # it did learn
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_small_amplitude_init_grows_when_the_hypergradient_says_so():
    # The constructed case of test_learned_values_move_downhill...: h_a < 0 at every step.
    torch.manual_seed(0)
    model = TinySNN(hidden=16, classes=5)
    cfg = DASSDPConfig(
        warmup_epochs=0, gate="one", A_plus=0.01, A_minus=0.0, learn=("amplitude",),
        amplitude_init=0.1, hyper_step="normalized", hyper_lr=0.05, hyper_beta=0.9,
    )  # fmt: skip
    plast = DASSDP(model, cfg, sites=SITE)
    assert plast.learned["fc2"]["amplitude"] == pytest.approx(0.1)
    amps = []
    for step in range(10):
        x, _ = batch(step, model)
        loss = -model(x.float()).mean()
        model.zero_grad()
        loss.backward()
        plast.step(loss)
        dassdp.reset(model)
        amps.append(plast.last_metrics()["fc2"]["amplitude"])
    assert amps[0] == pytest.approx(0.1)  # the first step has no hypergradient yet
    assert amps[1] == pytest.approx(0.1 * math.exp(0.05))  # then exactly hyper_lr
    assert all(b > a for a, b in itertools.pairwise(amps[1:])) and amps[-1] < 0.1 * math.exp(0.5)


@pytest.mark.parametrize(
    ("kwargs", "key", "match"),
    [
        ({"hyper_step": "adam"}, "hyper_step", r"hyper_step must be one of \('plain', 'norm"),
        ({"hyper_beta": 1.0}, "hyper_beta", r"hyper_beta must be in \[0, 1\), got 1.0"),
        ({"hyper_beta": -0.1}, "hyper_beta", r"hyper_beta must be in \[0, 1\)"),
        ({"hyper_beta": float("nan")}, "hyper_beta", r"hyper_beta must be in \[0, 1\)"),
        ({"hyper_lr": 0.0}, "hyper_lr", r"hyper_lr must be a finite number > 0 \[log-change"),
        ({"hyper_lr": -1e-3}, "hyper_lr", "hyper_lr must be a finite number > 0"),
        ({"hyper_lr": float("inf")}, "hyper_lr", "hyper_lr must be a finite number > 0"),
        ({"amplitude_init": 0.0}, "amplitude_init", "amplitude_init must be a finite number > 0"),
        ({"amplitude_init": -1.0}, "amplitude_init", "amplitude_init must be a finite number"),
        ({"amplitude_init": 0.1, "learn": ("sigma",)}, "amplitude_init", "needs 'amplitude' in"),
        (
            {"amplitude_init": 0.1, "amplitude_range": (0.5, 2.0)},
            "amplitude_range",
            r"must contain the initial amplitude 0.1",
        ),
    ],
)
def test_hyper_step_and_amplitude_init_errors_are_named(kwargs, key, match):
    from dassdp.plasticity.config import DASSDPConfigError

    with pytest.raises(DASSDPConfigError, match=match) as info:
        DASSDPConfig(**{"learn": LEARN, **kwargs})
    assert info.value.key == key


def test_the_engine_passes_hyper_step_and_amplitude_init_through(tmp_path):
    import yaml

    from dassdp.engine import load_config
    from dassdp.engine.config import ConfigError, dassdp_config
    from engine_fixtures import tiny_dict

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_dict()))
    overrides = ["plasticity.learn=[sigma, amplitude]", "plasticity.hyper_step=normalized"]
    overrides += ["plasticity.hyper_lr=0.01", "plasticity.amplitude_init=0.1"]
    learner = dassdp_config(load_config(path, overrides).plasticity)
    assert (learner.hyper_step, learner.hyper_lr, learner.amplitude_init) == (
        "normalized",
        0.01,
        0.1,
    )
    with pytest.raises(ConfigError, match=r"^override 'plasticity.hyper_beta=1': plasticity: hy"):
        load_config(path, ["plasticity.hyper_beta=1"])
