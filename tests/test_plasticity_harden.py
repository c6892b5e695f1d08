"""Hardening round two (issue 23) of the learner and its interop: a state loads only into the
learner of the same run, a model compiled before the learner attached is recorded, recomputed
forwards of torch.utils.checkpoint are not recorded twice, reset touches only neuron state,
gradient accumulation with the README loop learns from every micro-batch, and a layout that
cannot be known is an error at step()."""

import copy

import pytest
import torch
import torch.nn.functional as F

import dassdp
from dassdp import DASSDP, DASSDPConfig
from snn_fixtures import TinySNN, spike

B = 8


def trained(cfg=None, sites="default", steps=2, **model_kw):
    """A learner in warm-up after ``steps`` recorded steps (so its state holds records)."""
    torch.manual_seed(0)
    model = TinySNN(**model_kw)
    plast = DASSDP(model, cfg or DASSDPConfig(warmup_epochs=1), sites)
    for i in range(steps):
        x = torch.randn(B, model.fc1.in_features, generator=torch.Generator().manual_seed(i))
        loss = F.cross_entropy(model(x), torch.zeros(B, dtype=torch.long))
        loss.backward()
        plast.step(loss.detach())
        dassdp.reset(model)
    return model, plast


# ------------------------------------------------------ item 6: load_state_dict
@pytest.mark.parametrize(
    ("other", "match"),
    [
        (dict(hidden=11), r"site 'fc2': its weight is \[C_out, C_in\] = \[4, 10\] in the "),
        (dict(sites="classifier"), r"sites \['fc2', 'fc1'\] do not match .* \['fc2'\]"),
        (dict(cfg=DASSDPConfig(warmup_epochs=1, gate="one")), r"config.gate: 'fitted' in the"),
        (dict(cfg=DASSDPConfig(warmup_epochs=1, A_plus=3e-3)), r"config.A_plus: 0.0015 in "),
        (dict(cfg=DASSDPConfig(warmup_epochs=2)), r"config.warmup_epochs: 1 in the DA-SSDP"),
        (dict(T=5), r"recorded with T=4, this learner has T=5"),
        (
            dict(sites={"fc2": "output>0.5", "fc1": {"pre": "input>0", "post": "act1"}}),
            r"site 'fc2': post='output>0' in the DA-SSDP state, 'output>0.5' in this learner",
        ),
    ],
)
def test_a_state_of_another_learner_is_refused_and_nothing_is_loaded(other, match):
    _, source = trained()
    state = source.state_dict()
    assert state["stats"]["fc2"]["sums"][0] > 0  # warm-up records that must not leak
    kw = dict(other)
    T = kw.pop("T", None)
    torch.manual_seed(1)
    model = TinySNN(**{k: v for k, v in kw.items() if k == "hidden"})
    target = DASSDP(
        model, kw.get("cfg", DASSDPConfig(warmup_epochs=1)), kw.get("sites", "default"), T=T
    )
    before = {n: s.sums.clone() for n, s in target.stats.items()}
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert target.epoch == 0 and target.fits is None and target.counters["steps"] == 0
    assert all(torch.equal(target.stats[n].sums, v) for n, v in before.items())


def test_the_first_difference_is_named_and_debug_may_change():
    _, source = trained()
    state = source.state_dict()
    torch.manual_seed(1)
    twin = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=1, debug=True))
    twin.load_state_dict(state)  # debug changes no value: a resume may switch it
    assert twin.stats["fc2"].n == source.stats["fc2"].n == 2 * B
    other = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=3, gate="one", A_plus=1.0))
    with pytest.raises(ValueError, match=r"config.A_plus: 0.0015 in the DA-SSDP state, 1.0"):
        other.load_state_dict(state)  # A_plus comes first in the config's field order


def test_strict_false_loads_another_config_but_never_another_model():
    _, source = trained()
    state = source.state_dict()
    torch.manual_seed(1)
    other_cfg = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=1, A_plus=0.01))
    other_cfg.load_state_dict(state, strict=False)
    assert other_cfg.stats["fc1"].n == 2 * B and other_cfg.config.A_plus == 0.01
    other_model = DASSDP(TinySNN(d_in=13), DASSDPConfig(warmup_epochs=1))
    with pytest.raises(ValueError, match=r"site 'fc1': its weight is .* \[10, 12\] in the DA"):
        other_model.load_state_dict(state, strict=False)


def test_an_older_state_without_specs_shapes_or_new_config_fields_loads():
    _, source = trained()
    state = source.state_dict()
    for key in ("site_specs", "shapes", "T"):
        del state[key]
    state["config"] = {k: v for k, v in state["config"].items() if k != "amplitude_init"}
    torch.manual_seed(1)
    twin = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=1))
    twin.load_state_dict(state)
    assert twin.stats["fc2"].n == 2 * B


def test_a_model_state_dict_or_a_checkpoint_is_named_as_such():
    model, plast = trained()
    with pytest.raises(ValueError, match=r"this is a model's state_dict \(tensors such as "):
        plast.load_state_dict(model.state_dict())
    ckpt = {"model": model.state_dict(), "plasticity": plast.state_dict(), "epoch": 1}
    with pytest.raises(ValueError, match=r"pass its 'plasticity' entry"):
        plast.load_state_dict(ckpt)
    with pytest.raises(ValueError, match=r"lacks \['sites', 'stats'"):
        plast.load_state_dict({"epoch": 1})
    with pytest.raises(TypeError, match="got a list"):
        plast.load_state_dict([1, 2])


# ------------------------------------------- item 13: a layout that cannot be known
class PlainNet(torch.nn.Module):
    """Stateless: fed [B, D] once per time step by a loop outside its forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(spike(self.fc1(x)))


def test_per_step_calls_outside_the_forward_without_layout_or_T_apply_nothing():
    torch.manual_seed(0)
    model = PlainNet()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0, gate="one"), sites={"fc2": "output>0"})
    w = model.fc2.weight.detach().clone()
    x = torch.randn(3, B, 5) * 2
    sum(model(x[t]).sum() for t in range(3)).backward()  # no error in the forwards
    with pytest.raises(ValueError, match=r"layout is unknown.*pass\s+layout='step'"):
        plast.step(torch.tensor(1.0))
    assert torch.equal(model.fc2.weight, w) and plast.counters["applied"] == 0
    dassdp.reset(model)
    right = DASSDP(model, plast.config, sites={"fc2": {"post": "output>0", "layout": "step"}}, T=3)
    plast.close()
    sum(model(x[t]).sum() for t in range(3)).backward()
    assert right.step(torch.tensor(1.0))  # what the message says to pass


# ----------------------------------------------------- item 11: reset, neurons only
class Accuracy(torch.nn.Module):
    """A torchmetrics-like metric inside the model: state summed over batches, reset()."""

    def __init__(self):
        super().__init__()
        self.register_buffer("correct", torch.zeros(()))
        self.register_buffer("total", torch.zeros(()))

    def forward(self, logits):
        self.correct += (logits.argmax(1) == 0).sum()
        self.total += logits.shape[0]
        return logits

    def reset(self):
        self.correct.zero_()
        self.total.zero_()


class MeteredSNN(TinySNN):
    def __init__(self):
        super().__init__()
        self.metric = Accuracy()

    def forward(self, x):
        return self.metric(super().forward(x))


def readme_steps(model, plast, n, accumulate=1, reset_first=False):
    """The README loop (with ``accumulate`` micro-batches per optimizer step, reset after
    each); returns the micro-batches' inputs."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = []
    for i in range(n * accumulate):
        x = torch.rand(B, model.fc1.in_features, generator=torch.Generator().manual_seed(i)) * 3
        xs.append(x)
        loss = F.cross_entropy(model(x), torch.zeros(B, dtype=torch.long))
        (loss / accumulate).backward()
        if (i + 1) % accumulate:
            dassdp.reset(model)  # between micro-batches: neurons, as in the README
            continue
        opt.step()
        opt.zero_grad()
        if reset_first:
            dassdp.reset(model)
        plast.step(loss.detach())
        if not reset_first:
            dassdp.reset(model)
    return xs


def test_reset_leaves_a_metric_inside_the_model_alone_and_says_so_once(recwarn):
    torch.manual_seed(0)
    model = MeteredSNN()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=1), sites="classifier")
    readme_steps(model, plast, 3)
    assert model.metric.total == 3 * B  # it was wiped after every batch
    [warning] = [w for w in recwarn if "Accuracy" in str(w.message)]
    assert "Accuracy has a reset() method but is not a known neuron kind" in str(warning.message)
    recwarn.clear()
    readme_steps(model, plast, 1)
    assert not [w for w in recwarn if "Accuracy" in str(w.message)]  # once per class
    silenced = dassdp.register_reset(Accuracy, None)
    try:
        readme_steps(model, plast, 1)
    finally:
        silenced.remove()
    assert model.metric.total == 5 * B


class Membrane(torch.nn.Module):
    """A stateful neuron of an unknown library: ``v`` carries over calls until cleared."""

    def __init__(self):
        super().__init__()
        self.v = None

    def forward(self, x):
        self.v = x if self.v is None else 0.5 * self.v + x
        return spike(self.v - 1.0)

    def clear(self):
        self.v = None


class OwnNeuron(Membrane):
    def dassdp_reset(self):
        self.clear()


def test_registered_kinds_and_dassdp_reset_classes_are_reset():
    foreign, own = Membrane(), OwnNeuron()
    net = torch.nn.Sequential(foreign, own)
    handle = dassdp.register_reset(Membrane, "clear")
    try:
        net(torch.ones(2))
        dassdp.reset(net)
        assert foreign.v is None and own.v is None  # own: registered as a Membrane subclass
        inner = dassdp.register_reset(OwnNeuron, lambda m: setattr(m, "v", torch.zeros(2)))
        net(torch.ones(2))
        dassdp.reset(net)
        assert foreign.v is None and torch.equal(own.v, torch.zeros(2))  # the most specific
        inner.remove()
    finally:
        handle.remove()
    net(torch.ones(2))
    dassdp.reset(net)  # no registration: Membrane has no reset()/reset_state(): no warning
    assert foreign.v is not None and own.v is None  # own: its dassdp_reset()
    with pytest.raises(ValueError, match=r"Membrane has no method 'reset'"):
        dassdp.register_reset(Membrane)
    with pytest.raises(TypeError, match=r"kind must be an nn\.Module class"):
        dassdp.register_reset(int)


# -------------------------------------- item 12: the README loop under accumulation
def test_readme_loop_with_accumulation_learns_from_every_micro_batch():
    from oracle import naive_dw_from_activity

    torch.manual_seed(0)
    cfg = DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1, A_minus=0.02)
    model = TinySNN()
    twin = copy.deepcopy(model)
    plast = DASSDP(model, cfg, sites="classifier")
    seen = []
    model.fc2.register_forward_hook(lambda m, a, o: seen.append((a[0] > 0, o > 0)))
    w = model.fc2.weight.detach().clone()
    readme_steps(model, plast, 1, accumulate=2)
    assert plast.counters["applied"] == 1 and len(seen) == 2
    dws = [naive_dw_from_activity(p, q, None, A_plus=0.1, A_minus=0.02, sigma=1.0, clip=None)
           for p, q in seen]  # fmt: skip
    expected = (sum(dws) / 2).clamp(-1, 1)  # the mean over the step's forwards
    change = model.fc2.weight.detach() - w - twin_sgd_change(twin, 2)
    torch.testing.assert_close(change.double(), expected, rtol=1e-5, atol=1e-6)
    plast.set_epoch(0)
    warm = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=1), sites="classifier")
    readme_steps(warm.model, warm, 2, accumulate=2)
    assert warm.stats["fc2"].n == 2 * 2 * B  # one record per sample of every micro-batch


def twin_sgd_change(twin, accumulate):
    """fc2's change by the optimizer alone over one accumulated step (no learner)."""
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    w = twin.fc2.weight.detach().clone()
    for i in range(accumulate):
        x = torch.rand(B, twin.fc1.in_features, generator=torch.Generator().manual_seed(i)) * 3
        (F.cross_entropy(twin(x), torch.zeros(B, dtype=torch.long)) / accumulate).backward()
    opt.step()
    return twin.fc2.weight.detach() - w


def test_reset_before_step_loses_nothing():
    torch.manual_seed(0)
    cfg = DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1, A_minus=0.02)
    model = TinySNN()
    twin = copy.deepcopy(model)
    after = DASSDP(model, cfg, sites="classifier")
    before = DASSDP(twin, cfg, sites="classifier")
    readme_steps(model, after, 2, accumulate=2)
    readme_steps(twin, before, 2, accumulate=2, reset_first=True)
    assert before.counters["applied"] == 2
    assert torch.equal(model.fc2.weight, twin.fc2.weight)
    model(torch.rand(B, 12))
    dassdp.reset(model, records=True)  # asked: this forward is not learned from
    assert not after.step(torch.tensor(1.0)) and after.counters["skipped_no_records"] == 1


def test_an_outer_time_loop_with_layout_step_and_no_T_is_one_window_per_micro_batch():
    from oracle import naive_dw_from_activity

    torch.manual_seed(0)
    model = PlainNet()
    spec = {"fc2": {"post": "output>0", "layout": "step"}}
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1), sites=spec)
    seen = []
    model.fc2.register_forward_hook(lambda m, a, o: seen.append((a[0] > 0, o > 0)))
    w = model.fc2.weight.detach().clone()
    for _ in range(2):  # two micro-batches of 3 time steps, reset after each
        x = torch.randn(3, B, 5) * 2
        sum(model(x[t]).sum() for t in range(3)).backward()
        dassdp.reset(model)
    assert plast.step(torch.tensor(1.0))
    windows = [[torch.stack(z) for z in zip(*seen[i : i + 3])] for i in (0, 3)]
    dws = [naive_dw_from_activity(p, q, None, A_plus=0.1, A_minus=1e-4, sigma=1.0, clip=None)
           for p, q in windows]  # fmt: skip
    torch.testing.assert_close(
        (model.fc2.weight - w).double(), (sum(dws) / 2).clamp(-1, 1), rtol=1e-5, atol=1e-7
    )


# ------------------------------------------- item 10: torch.utils.checkpoint recomputes
class CheckpointedSNN(torch.nn.Module):
    """fc2 (the site) and its neuron inside ``torch.utils.checkpoint``: time-major over the
    whole sequence, or (``per_step``) once per time step on ``[B, C]``."""

    def __init__(self, mode=None, per_step=False, T=4):
        super().__init__()
        self.mode, self.per_step, self.T = mode, per_step, T
        self.fc1, self.fc2, self.fc3 = (
            torch.nn.Linear(12, 10),
            torch.nn.Linear(10, 8),
            torch.nn.Linear(8, 4),
        )

    def block(self, h):
        return spike(self.fc2(h))

    def run(self, h):
        if self.mode is None:
            return self.block(h)
        reentrant = self.mode == "reentrant"
        return torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=reentrant)

    def forward(self, x):
        x = x.unsqueeze(0) * torch.arange(1, self.T + 1).view(-1, 1, 1) / self.T  # [T, B, D]
        h = spike(self.fc1(x))
        s = torch.stack([self.run(h_t) for h_t in h]) if self.per_step else self.run(h)
        return self.fc3(s).mean(0)


def checkpointed_step(mode, per_step, T):
    """fc2's change by one README step (site fc2: input -> output>0), and the number of
    warm-up records of one step."""
    out = []
    for cfg in (
        DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1, A_minus=0.02),
        DASSDPConfig(warmup_epochs=1),
    ):
        torch.manual_seed(0)
        model = CheckpointedSNN(mode, per_step)
        plast = DASSDP(model, cfg, sites={"fc2": "output>0"}, T=T)
        w = model.fc2.weight.detach().clone()
        x = torch.rand(B, 12, generator=torch.Generator().manual_seed(1)) * 3
        F.cross_entropy(model(x), torch.zeros(B, dtype=torch.long)).backward()
        plast.step(torch.tensor(1.0))
        out.append(model.fc2.weight.detach() - w if not plast.in_warmup else plast.stats)
    return out[0], out[1]["fc2"].n


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize(("per_step", "T"), [(False, None), (False, 4), (True, 4), (True, None)])
def test_checkpoint_recomputation_is_not_recorded_again(mode, per_step, T):
    expected, n = checkpointed_step(None, per_step, T)
    assert expected.abs().max() > 0 and n == B
    dw, n = checkpointed_step(mode, per_step, T)
    assert n == B  # one record per sample: the recomputation is not another window
    assert torch.equal(dw, expected)


def test_checkpoint_around_the_whole_model():
    torch.manual_seed(0)
    cfg = DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1, A_minus=0.02)
    model = CheckpointedSNN()
    twin = copy.deepcopy(model)
    x = torch.rand(B, 12) * 3
    checkpoint = torch.utils.checkpoint.checkpoint
    plast, ref = (DASSDP(net, cfg, sites={"fc2": "output>0"}) for net in (model, twin))
    checkpoint(model, x, use_reentrant=False).sum().backward()  # recomputed in the backward
    twin(x).sum().backward()
    assert plast.step(torch.tensor(1.0)) and ref.step(torch.tensor(1.0))
    assert torch.equal(model.fc2.weight, twin.fc2.weight)
    x = x.requires_grad_()  # (a reentrant checkpoint needs an input that requires grad)
    checkpoint(model, x, use_reentrant=True).sum().backward()  # first forward under no_grad
    with pytest.raises(ValueError, match=r"use_reentrant=True.*Use use_reentrant=False"):
        plast.step(torch.tensor(1.0))


# ------------------------------------------- item 9: a model already compiled
def compiled_dw(make, attach_to, calls=2):
    """Site change of ``calls`` README steps on a model that ran ``torch.compile``d before
    the learner attached (``attach_to``: "wrapper" or "model"), and on an eager twin."""
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + AOT autograd, no codegen
    xs = [torch.rand(3, B, 6, generator=torch.Generator().manual_seed(i)) * 3 for i in range(3)]
    compiled(xs[0]).sum().backward()  # compiled without hooks
    cfg = DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1, A_minus=0.02)
    out = []
    for net, call in ((model, compiled), (twin, twin)):
        target = compiled if net is model and attach_to == "wrapper" else net
        plast = DASSDP(target, cfg, sites_of(net))
        site = net.get_submodule(next(iter(sites_of(net))))
        w = site.weight.detach().clone()
        for x in xs[1 : 1 + calls]:
            call(x).sum().backward()
            assert plast.step(torch.tensor(1.0))  # each step learns
            dassdp.reset(net)
        out.append(site.weight.detach() - w)
        plast.close()
    return out, compiled, model


def sites_of(net):
    p = "" if isinstance(net, torch.nn.Sequential) else "layers."
    return {f"{p}2": {"pre": f"{p}1", "post": f"{p}3"}}


class Lif(torch.nn.Module):
    """A stateless multi-step threshold neuron on [T, B, C]."""

    def forward(self, x):
        return spike(x.cumsum(0) / (1 + torch.arange(x.shape[0]).view(-1, 1, 1)))


def layers():
    return [torch.nn.Linear(6, 8), Lif(), torch.nn.Linear(8, 5), Lif(), torch.nn.Linear(5, 3)]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers())

    def forward(self, x):  # [T, B, 6]
        for layer in self.layers:
            x = layer(x)
        return x.mean(0)


def sequential():
    return torch.nn.Sequential(*layers())


@pytest.mark.parametrize(("make", "attach_to"), [(Net, "wrapper"), (sequential, "model")])
def test_a_model_compiled_before_the_learner_attached_is_recorded(make, attach_to):
    (got, expected), compiled, model = compiled_dw(make, attach_to)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    closed = DASSDP(model, DASSDPConfig(warmup_epochs=0), sites_of(model))
    compiled(torch.rand(3, B, 6)).sum().backward()  # compiled with its hooks
    sources = closed.recorder._hooks[next(iter(sites_of(model)))]
    assert all(source.has_records for source in sources)
    closed.close()  # its hooks leave the compiled graph too
    compiled(torch.rand(3, B, 6)).sum().backward()
    assert not any(source.has_records for source in sources)


def test_compiled_code_that_still_skips_the_hooks_is_an_error_at_step(monkeypatch):
    from dassdp.plasticity import learner as learner_mod

    monkeypatch.setattr(learner_mod, "forget_compiled", lambda model: False)  # as if it failed
    torch.manual_seed(0)
    model = Net()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(torch.rand(3, B, 6)).sum().backward()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0), sites_of(model))
    compiled(torch.rand(3, B, 6)).sum().backward()  # the model's pre-hook runs, no site's
    with pytest.raises(RuntimeError, match=r"torch.compile.*Attach DASSDP before compiling"):
        plast.step(torch.tensor(1.0))
