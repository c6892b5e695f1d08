"""The DASSDP learner on small models: schedule, parity, state, hooks and errors."""

import copy
import dataclasses
import gc
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dassdp
from dassdp import DASSDP, DASSDPConfig, SiteSpec
from dassdp.plasticity.gate import gate_values
from dassdp.plasticity.rule import Activity
from oracle import naive_dw, naive_dw_from_activity, naive_latency
from snn_fixtures import ConvSNN, StepSNN, TinySNN, spike

B = 8


def make(seed=0, cls=TinySNN, **kw):
    torch.manual_seed(seed)
    model = cls(**kw)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def batch(epoch, i, model):
    gen = torch.Generator().manual_seed(1000 * epoch + i)
    if isinstance(model, ConvSNN):
        x = torch.randn(B, 3, 4, 4, generator=gen)
    else:
        x = torch.randn(B, model.fc1.in_features, generator=gen)
    return x, torch.randint(
        0, model.fc2.out_features if hasattr(model, "fc2") else 3, (B,), generator=gen
    )


def train(model, opt, plast, epochs, steps=4, start=0, nan_at=None):
    losses = []
    for epoch in range(start, epochs):
        if plast is not None:
            plast.set_epoch(epoch)
        for i in range(steps):
            x, y = batch(epoch, i, model)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if plast is not None:
                plast.step(loss * float("nan") if (epoch, i) == nan_at else loss)
            dassdp.reset(model)
            losses.append(loss.item())
    return losses


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b, keys=None):
    for k in keys or a:
        assert torch.equal(a[k], b[k]), k


def test_warmup_changes_no_weight_and_disabled_equals_baseline():
    base, opt = make()
    train(base, opt, None, epochs=3)
    warm, opt = make()
    plast = DASSDP(warm, DASSDPConfig(warmup_epochs=3))
    train(warm, opt, plast, epochs=3)
    assert_same(params(base), params(warm))
    assert plast.stats["fc2"].n == 3 * 4 * B and plast.fits is None
    off, opt = make()
    plast_off = DASSDP(off, DASSDPConfig(warmup_epochs=1, enabled=False))
    train(off, opt, plast_off, epochs=3)
    assert_same(params(base), params(off))
    assert plast_off.counters["applied"] == 0


def test_after_warmup_only_site_weights_change_by_the_rule():
    model, opt = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=1, A_plus=0.05, A_minus=0.01))
    train(model, opt, plast, epochs=1)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    twin_opt.load_state_dict(opt.state_dict())
    # one post-warm-up step on both; the twin has no plasticity
    plast.set_epoch(1)
    x, y = batch(1, 0, model)
    captured = {}
    hooks = [
        model.fc1.register_forward_hook(lambda m, a, o: captured.update(fc1_in=a[0])),
        model.act1.register_forward_hook(lambda m, a, o: captured.update(act1=o)),
        model.fc2.register_forward_hook(lambda m, a, o: captured.update(fc2=o)),
    ]
    for m, o in ((model, opt), (twin, twin_opt)):
        loss = F.cross_entropy(m(x), y)
        o.zero_grad()
        loss.backward()
        o.step()
    assert plast.step(loss)
    for h in hooks:
        h.remove()
    after, ref = params(model), params(twin)
    assert_same(after, ref, ["fc1.bias", "fc2.bias"])
    assert not torch.equal(after["fc2.weight"], ref["fc2.weight"])
    # the change equals the naive oracle on the same activity, gated by the fitted gate
    s_pre, s_post = captured["act1"] > 0, captured["fc2"] > 0
    p, q = s_pre.any(0), s_post.any(0)
    S = q.double().mean(1) * p.double().mean(1)
    G = gate_values(S, plast.fits["fc2"])
    expected = naive_dw(
        p,
        q,
        naive_latency(s_pre, "first"),
        naive_latency(s_post, "first"),
        G,
        A_plus=0.05,
        A_minus=0.01,
        sigma=1.0,
        clip=1.0,
    )
    torch.testing.assert_close(
        (after["fc2.weight"] - ref["fc2.weight"]).double(), expected, rtol=1e-5, atol=1e-7
    )
    s_in = captured["fc1_in"] > 0
    p1, q1 = s_in.any(0), s_pre.any(0)
    S1 = q1.double().mean(1) * p1.double().mean(1)
    expected1 = naive_dw(
        p1,
        q1,
        naive_latency(s_in, "first"),
        naive_latency(s_pre, "first"),
        gate_values(S1, plast.fits["fc1"]),
        A_plus=0.05,
        A_minus=0.01,
        sigma=1.0,
        clip=1.0,
    )
    torch.testing.assert_close(
        (after["fc1.weight"] - ref["fc1.weight"]).double(), expected1, rtol=1e-5, atol=1e-7
    )
    metrics = plast.last_metrics()["fc2"]
    assert metrics["dw_abs_mean"] == pytest.approx(expected.abs().mean().item(), rel=1e-4)
    assert metrics["synchrony"] == pytest.approx(S.mean().item(), rel=1e-5)


@pytest.mark.parametrize("stop_after", [1, 3])  # mid-warm-up, and after the gate fit
def test_state_dict_round_trip_continues_identically(stop_after):
    cfg = DASSDPConfig(warmup_epochs=2, A_plus=0.02, A_minus=0.005, control="shuffled_latency")
    full, opt = make()
    plast = DASSDP(full, cfg)
    train(full, opt, plast, epochs=5)

    first, opt1 = make()
    p1 = DASSDP(first, cfg)
    train(first, opt1, p1, epochs=stop_after)
    ckpt = copy.deepcopy(
        {"model": first.state_dict(), "opt": opt1.state_dict(), "plast": p1.state_dict()}
    )
    p1.close()
    resumed, opt2 = make(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    p2 = DASSDP(resumed, cfg)
    p2.load_state_dict(ckpt["plast"])
    train(resumed, opt2, p2, epochs=5, start=stop_after)
    assert_same(params(full), params(resumed))
    assert p2.fits == plast.fits and p2.counters == plast.counters


def test_close_removes_every_hook_and_records_hold_no_graph():
    model, _ = make()
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0))
    assert plast.recorder.num_hooks == 4 and len(model._forward_pre_hooks) == 1
    model(torch.randn(B, 12, requires_grad=True)).sum().backward()
    for pre, post in plast.recorder._hooks.values():
        for hook in (pre, post):
            assert hook.tensors()
            assert all(not t.requires_grad and t.grad_fn is None for t in hook.tensors())
    plast.close()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == before
    model(torch.randn(B, 12))
    assert plast.recorder.collect() == {}


def test_no_leak_over_repeated_construct_and_close():
    model, _ = make()
    x = torch.randn(B, 12)

    def cycle():
        plast = DASSDP(model, DASSDPConfig(warmup_epochs=0))
        model(x)
        plast.close()

    cycle()
    gc.collect()
    n_tensors = sum(type(o) is torch.Tensor for o in gc.get_objects())
    for _ in range(20):
        cycle()
    gc.collect()
    assert sum(type(o) is torch.Tensor for o in gc.get_objects()) <= n_tensors
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_eval_mode_and_reset_record_nothing():
    model, _ = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0))
    model.eval()
    model(torch.randn(B, 12))
    assert plast.recorder.collect() == {}
    model.train()
    model(torch.randn(B, 12))
    dassdp.reset(model, records=True)  # drops the window
    assert plast.recorder.collect() == {}
    with pytest.warns(dassdp.DASSDPWarning, match="without a training forward"):
        assert not plast.step(torch.tensor(1.0))
    assert plast.counters["skipped_no_records"] == 1


def test_nonfinite_loss_is_counted_and_skipped():
    ref, opt = make()
    p_ref = DASSDP(ref, DASSDPConfig(warmup_epochs=1, A_plus=0.05))
    model, opt2 = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=1, A_plus=0.05))
    train(model, opt2, plast, epochs=3, nan_at=(2, 1))
    train(ref, opt, p_ref, epochs=3)
    assert plast.counters["skipped_nonfinite"] == 1
    assert plast.counters["applied"] == p_ref.counters["applied"] - 1
    assert all(torch.isfinite(v).all() for v in params(model).values())
    # a NaN in warm-up never reaches the gate
    model, opt3 = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=1))
    train(model, opt3, plast, epochs=2, nan_at=(0, 2))
    assert plast.fits["fc2"].valid and math.isfinite(plast.fits["fc2"].k)
    assert plast.stats["fc2"].n == 3 * B


def test_optimizer_skip_skips_the_update():
    model, _ = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0, gate="one"))
    w = model.fc2.weight.detach().clone()
    F.cross_entropy(model(torch.randn(B, 12)), torch.zeros(B, dtype=torch.long)).backward()
    assert not plast.step(torch.tensor(1.0), optimizer_stepped=False)
    assert torch.equal(model.fc2.weight, w) and plast.counters["skipped_optimizer"] == 1


def test_conv_site_with_flattened_layout_matches_oracle():
    model, _ = make(cls=ConvSNN)
    cfg = DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1, A_minus=0.02, latency="last")
    plast = DASSDP(model, cfg, sites={"proj": SiteSpec(pre="input", post="act2")})
    seen = {}
    model.act.register_forward_hook(lambda m, a, o: seen.update(pre=o))
    model.act2.register_forward_hook(lambda m, a, o: seen.update(post=o))
    w = model.proj.weight.detach().clone()
    x, _ = batch(0, 0, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gate="one" must not warn about the degenerate fit
        model(x)
        assert plast.step(torch.tensor(0.5))

    def activity(t):  # [T*B, C, H, W] -> [T, B, C]: any position
        return (t > 0).view(model.T, B, *t.shape[1:]).flatten(3).any(3)

    s_pre, s_post = activity(seen["pre"]), activity(seen["post"])
    expected = naive_dw_from_activity(
        s_pre,
        s_post,
        None,
        latency="last",
        A_plus=0.1,
        A_minus=0.02,
        sigma=1.0,
        clip=1.0,
    )
    torch.testing.assert_close(
        (model.proj.weight - w).double().view(8, 8), expected, rtol=1e-5, atol=1e-7
    )


def test_per_step_calls_accumulate_over_time():
    model, _ = make(cls=StepSNN)
    cfg = DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1, A_minus=0.02)
    plast = DASSDP(model, cfg, sites={"fc2": {"pre": "lif1", "post": "output>0"}})
    steps = []
    model.fc2.register_forward_hook(lambda m, a, o: steps.append((a[0] > 0, o > 0)))
    w = model.fc2.weight.detach().clone()
    model(torch.randn(B, 6))
    plast.step(torch.tensor(1.0))
    s_pre = torch.stack([s for s, _ in steps])
    s_post = torch.stack([o for _, o in steps])
    assert s_pre.shape == (3, B, 5)
    expected = naive_dw_from_activity(
        s_pre,
        s_post,
        None,
        A_plus=0.1,
        A_minus=0.02,
        sigma=1.0,
        clip=1.0,
    )
    torch.testing.assert_close((model.fc2.weight - w).double(), expected, rtol=1e-5, atol=1e-7)


def test_compat_fired_indicator_is_mean_over_time():
    model, _ = make()
    plast = DASSDP(
        model,
        DASSDPConfig.compat(warmup_epochs=0),
        sites={"fc2": SiteSpec(pre="input", post="output>0", fired="mean")},
    )
    assert plast.config.latency == "last" and plast.config.A_minus == 5e-4
    seen = {}
    model.fc2.register_forward_hook(lambda m, a, o: seen.update(o=o.detach()))
    model(torch.randn(B, 12))
    rec = plast.recorder.collect()["fc2"]
    assert torch.equal(rec.post.fired, seen["o"].mean(0) > 0)
    assert torch.equal(rec.post.latency, naive_latency(seen["o"] > 0, "last"))


def test_uniform_drift_and_random_update_controls():
    model, _ = make()
    plast = DASSDP(
        model,
        DASSDPConfig(warmup_epochs=0, gate="one", control="uniform_drift"),
        sites={"fc2": "output>0"},
    )
    w = model.fc2.weight.detach().clone()
    model(torch.randn(B, 12))
    plast.step(torch.tensor(1.0))
    assert torch.allclose(model.fc2.weight - w, torch.full_like(w, 1.5e-3), atol=1e-9)
    plast.close()
    cfg = DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1, A_minus=0.02)
    norms = {}
    for control in ("none", "random_update"):
        m, _ = make()
        pl = DASSDP(m, cfg.replace(control=control), sites={"fc2": "output>0"})
        w = m.fc2.weight.detach().clone()
        m(batch(0, 0, m)[0])
        pl.step(torch.tensor(1.0))
        norms[control] = (m.fc2.weight - w).detach()
    assert norms["random_update"].norm() == pytest.approx(norms["none"].norm().item(), rel=1e-5)
    magnitude = norms["none"].norm().item() / math.sqrt(norms["none"].numel())
    torch.testing.assert_close(
        norms["random_update"].abs(), torch.full_like(norms["none"], magnitude)
    )


def test_grad_apply_mode_subtracts_dw_from_grad():
    model, _ = make()
    twin = copy.deepcopy(model)
    cfg = DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1, apply="grad")
    plast = DASSDP(model, cfg, sites={"fc2": "output>0"})
    ref = DASSDP(twin, cfg.replace(apply="post_step"), sites={"fc2": "output>0"})
    x, y = batch(0, 0, model)
    for m in (model, twin):
        F.cross_entropy(m(x), y).backward()
    g = model.fc2.weight.grad.clone()
    w = twin.fc2.weight.detach().clone()
    plast.step(torch.tensor(1.0))
    ref.step(torch.tensor(1.0))
    torch.testing.assert_close(g - model.fc2.weight.grad, twin.fc2.weight - w)
    with pytest.raises(RuntimeError, match="apply='grad'"):
        model.zero_grad(set_to_none=True)
        model(x)
        plast.step(torch.tensor(1.0))


def test_rule_constants_are_not_model_parameters():
    model, _ = make()
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    DASSDP(model, DASSDPConfig(warmup_epochs=0))
    assert names == (
        {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "sigma must be > 0"),
        ({"sigma": -1.0}, "sigma must be > 0"),
        ({"A_plus": -1e-3}, "A_plus must be a finite number >= 0"),
        ({"A_minus": -1e-4}, "A_minus must be a finite number >= 0"),
        ({"gate": "dopamine"}, "gate must be one of"),
        ({"latency": "middle"}, "latency must be one of"),
        ({"apply": "before"}, "apply must be one of"),
        ({"warmup_epochs": -1}, "warmup_epochs must be an int >= 0"),
        ({"control": "magic"}, "control must be one of"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DASSDPConfig(**kwargs)


def test_site_errors_are_named():
    model, _ = make()
    with pytest.raises(ValueError, match=r"no module named 'fc3'.*close matches.*fc2"):
        DASSDP(model, sites={"fc3": "output>0"})
    with pytest.raises(ValueError, match=r"site 'act1' is a .*Spike; DA-SSDP sites must be"):
        DASSDP(model, sites={"act1": "output>0"})
    conv = ConvSNN()
    with pytest.raises(ValueError, match=r"site 'conv' is an nn.Conv2d with kernel_size \(3, 3\)"):
        DASSDP(conv, sites={"conv": "output>0"})
    with pytest.raises(ValueError, match="declares no DA-SSDP sites"):
        DASSDP(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="unknown key"):
        DASSDP(model, sites={"fc2": {"post": "output>0", "pre_source": "input"}})
    with pytest.raises(ValueError, match="threshold 'x' after '>' is not a number"):
        DASSDP(model, sites={"fc2": "output>x"})
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # failures leave no hooks


def test_activity_errors_are_named():
    model, _ = make()
    plast = DASSDP(model, sites={"fc2": "output>0"}, T=3)  # model runs T=4
    with pytest.raises(ValueError, match="has T=4 steps, the learner expects T=3"):
        model(torch.randn(B, 12))
    plast.close()

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    flat = Flat()
    plast = DASSDP(flat, sites={"fc": {"pre": "input", "post": "output>0", "layout": "time_major"}})
    with pytest.raises(ValueError, match=r"cannot read a tensor of shape \(5, 4\)"):
        flat(torch.randn(5, 4))
    plast.close()
    plast = DASSDP(flat, sites={"fc": {"post": "output>0", "layout": "flat"}}, T=2)
    with pytest.raises(ValueError, match="leading dim 5 is not T\\*B with T=2"):
        flat(torch.randn(5, 4))
    plast.close()
    plast = DASSDP(flat, sites={"fc": "output>0"}, T=2)
    flat(torch.randn(5, 4))  # auto: decided when the window ends
    with pytest.raises(ValueError, match="leading dim 5 is the model's input batch"):
        plast.step(torch.tensor(1.0))


def test_spike_helper_has_a_surrogate_gradient():
    x = torch.tensor([-1.0, 0.5], requires_grad=True)
    spike(x).sum().backward()
    assert (x.grad > 0).all()


def one_step(plast, model, **kw):
    x, y = batch(0, 0, model)
    F.cross_entropy(model(x), y).backward()
    return plast.step(torch.tensor(0.7), **kw)


@pytest.mark.parametrize(
    ("stepped", "applied"),
    [
        (True, True),
        (False, False),
        (torch.tensor(1.0), True),
        (torch.tensor(0.0), False),
        (torch.tensor([True]), True),
        (torch.tensor(False), False),
        (1 - torch.tensor(1.0), False),  # 1 - found_inf of a grad scaler that found an inf
    ],
)
def test_optimizer_stepped_may_be_a_device_flag(stepped, applied):
    model, _ = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1))
    w = model.fc2.weight.detach().clone()
    out = one_step(plast, model, optimizer_stepped=stepped)
    assert isinstance(out, torch.Tensor) and out.shape == () and out.dtype == torch.bool
    assert bool(out) is applied
    assert torch.equal(model.fc2.weight, w) is not applied
    assert plast.counters == {
        "steps": 1,
        "recorded": int(applied),
        "applied": int(applied),
        "skipped_nonfinite": 0,
        "skipped_optimizer": int(not applied),
        "skipped_no_records": 0,
    }
    assert bool(plast.last_step_recorded) is applied


def test_optimizer_stepped_errors_are_named():
    model, _ = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0))
    with pytest.raises(ValueError, match=r"one-element tensor, got a tensor of shape \(2,\)"):
        one_step(plast, model, optimizer_stepped=torch.ones(2))
    with pytest.raises(TypeError, match=r"optimizer_stepped must be a bool .* got str"):
        one_step(plast, model, optimizer_stepped="yes")


def test_a_skipped_step_keeps_the_metrics_of_the_last_counted_one():
    model, _ = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1))
    assert one_step(plast, model)
    before = plast.last_metrics()
    tensors = plast.last_metrics(as_tensors=True)
    assert all(isinstance(v, torch.Tensor) for m in tensors.values() for v in m.values())
    x, y = batch(0, 1, model)  # another batch: other metrics if it counted
    F.cross_entropy(model(x), y).backward()
    assert not plast.step(torch.tensor(float("inf")))
    assert plast.last_metrics() == before and not bool(plast.last_step_recorded)
    assert plast.counters["skipped_nonfinite"] == 1


def test_skip_reasons_count_the_first_that_holds():
    model, _ = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0, gate="one"))
    model(torch.randn(B, 12))
    plast.step(torch.tensor(float("nan")), optimizer_stepped=False)  # both: non-finite first
    model(torch.randn(B, 12))
    plast.step(torch.tensor(1.0), optimizer_stepped=torch.tensor(0.0))
    plast.step(torch.tensor(float("nan")))  # no records and non-finite: non-finite first
    plast.step(torch.tensor(1.0))  # no records
    assert plast.counters == {
        "steps": 4,
        "recorded": 0,
        "applied": 0,
        "skipped_nonfinite": 2,
        "skipped_optimizer": 1,
        "skipped_no_records": 1,
    }


def test_counters_round_trip_and_unknown_counters_are_named():
    model, _ = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0, gate="one"))
    one_step(plast, model)
    state = plast.state_dict()
    assert state["counters"]["applied"] == 1
    twin = DASSDP(copy.deepcopy(model), DASSDPConfig(warmup_epochs=0, gate="one"))
    twin.load_state_dict(state)
    assert twin.counters == plast.counters
    with pytest.raises(ValueError, match=r"counters \['bogus'\] unknown"):
        twin.load_state_dict({**state, "counters": {"bogus": 1}})


class BadLatency:
    """Wraps a recorder's collect: the post latencies of every site shifted out of range."""

    def __init__(self, collect):
        self.collect = collect

    def __call__(self):
        records = self.collect()
        return {
            n: dataclasses.replace(r, post=Activity(r.post.fired, r.post.latency + r.T + 1))
            for n, r in records.items()
        }


@pytest.mark.parametrize("how", ["config", "env"])
def test_debug_mode_checks_latency_ranges(how, monkeypatch):
    model, _ = make()
    debug = how == "config"
    if how == "env":
        monkeypatch.setenv("DASSDP_DEBUG", "1")
    cfg = DASSDPConfig(warmup_epochs=0, gate="one", debug=debug)
    plast = DASSDP(model, cfg)
    assert plast.debug
    plast.recorder.collect = BadLatency(plast.recorder.collect)
    model(torch.randn(B, 12))
    with pytest.raises(ValueError, match="post latency out of range"):
        plast.step(torch.tensor(1.0))
    monkeypatch.delenv("DASSDP_DEBUG", raising=False)
    quiet = DASSDP(make()[0], cfg.replace(debug=False))
    assert not quiet.debug  # without debug the range is not read back (no host sync)
    with pytest.raises(ValueError, match="must be true or false"):
        DASSDPConfig(debug="yes")


def test_shuffled_latencies_do_not_use_the_fixed_states():
    # Shuffling breaks "fired iff latency < T": the learner must not assume the T + 1 states.
    model, opt = make()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=1, control="shuffled_latency", debug=True))
    train(model, opt, plast, epochs=3)
    assert plast.counters["applied"] == 2 * 4
