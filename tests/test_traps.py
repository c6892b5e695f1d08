"""API traps with third-party-style SNNs (issue 13, items 6-10): layouts come from how a site
is called, forgotten T warns, snnTorch/SpikingJelly neurons reset, gradient accumulation is
one window per forward, and misplaced step()/set_epoch() calls are loud."""

import copy

import numpy as np
import pytest
import snntorch as snn
import torch
import torch.nn.functional as F
from torch import nn

import dassdp
from dassdp import DASSDP, DASSDPConfig, DASSDPWarning
from dassdp.plasticity import learner as learner_mod
from oracle import naive_dw_from_activity
from snn_fixtures import StepSNN, TinySNN, spike

CFG = DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.1, A_minus=0.02)
B = 6


class PlainNet(nn.Module):
    """A plain (stateless) net: fed [T*B, D] it sees flattened tensors; fed [B, D] once per
    time step by an outer loop, one step per forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(spike(self.fc1(x)))


def oracle(s_pre, s_post):  # [T, B, C] spikes -> dW with CFG's amplitudes, G = 1
    return naive_dw_from_activity(
        s_pre, s_post, None, A_plus=0.1, A_minus=0.02, sigma=1.0, clip=1.0
    )


def capture(layer):
    seen = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append((a[0] > 0, o > 0)))
    return seen, handle


def stacked(seen):
    return torch.stack([p for p, _ in seen]), torch.stack([q for _, q in seen])


# ---------------------------------------------------------------- item 6: layout
@pytest.mark.parametrize("batch", [6, 7])  # B % T == 0 was silently wrong, else a vague error
def test_per_step_site_with_T_given_is_read_per_step(batch):
    torch.manual_seed(0)
    model = StepSNN(steps=3)
    plast = DASSDP(model, CFG, sites={"fc2": {"pre": "lif1", "post": "output>0"}}, T=3)
    seen, _ = capture(model.fc2)
    w = model.fc2.weight.detach().clone()
    model(torch.randn(batch, 6) * 2)
    assert plast.step(torch.tensor(1.0))
    expected = oracle(*stacked(seen))
    torch.testing.assert_close((model.fc2.weight - w).double(), expected, rtol=1e-5, atol=1e-7)


def test_single_flattened_call_with_T_is_unflattened():
    torch.manual_seed(0)
    T, model = 3, PlainNet()
    plast = DASSDP(model, CFG, sites={"fc2": {"post": "output>0", "layout": "flat"}}, T=T)
    seen, _ = capture(model.fc2)
    w = model.fc2.weight.detach().clone()
    model(torch.randn(T * B, 5) * 2)
    assert plast.step(torch.tensor(1.0))
    s_pre, s_post = (t.view(T, B, -1) for t in seen[0])
    torch.testing.assert_close(
        (model.fc2.weight - w).double(), oracle(s_pre, s_post), rtol=1e-5, atol=1e-7
    )


def test_ambiguous_single_call_is_an_error_naming_the_layout():
    model = PlainNet()
    plast = DASSDP(model, CFG, sites={"fc2": "output>0"}, T=3)
    model(torch.randn(3 * B, 5))  # [T*B, D] fed to the model itself, or B=18 one step?
    with pytest.raises(ValueError, match=r"ambiguous.*layout='step'.*layout='flat'"):
        plast.step(torch.tensor(1.0))


def test_outer_time_loop_with_layout_step_accumulates_over_forwards():
    torch.manual_seed(0)
    T, model = 3, PlainNet()
    plast = DASSDP(model, CFG, sites={"fc2": {"post": "output>0", "layout": "step"}}, T=T)
    seen, _ = capture(model.fc2)
    w = model.fc2.weight.detach().clone()
    x = torch.randn(T, B, 5) * 2
    sum(model(x[t]).sum() for t in range(T)).backward()
    assert plast.step(torch.tensor(1.0))
    torch.testing.assert_close(
        (model.fc2.weight - w).double(), oracle(*stacked(seen)), rtol=1e-5, atol=1e-7
    )


# ------------------------------------------------------- item 7: forgotten T
def test_forgotten_T_for_flattened_tensors_is_an_error_at_every_step():
    # issue 23 item 13: this was a warning, after which a wrong dW was applied
    model = PlainNet()
    plast = DASSDP(model, CFG, sites={"fc2": "output>0"})
    w = model.fc2.weight.detach().clone()
    for _ in range(2):
        model(torch.randn(12, 5))
        with pytest.raises(ValueError, match=r"single per-step call.*pass T="):
            plast.step(torch.tensor(1.0))
    assert torch.equal(model.fc2.weight, w)


def test_site_batch_unlike_the_model_batch_warns():
    class Doubling(nn.Module):  # the site sees 2B samples per step: not the model's batch
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = torch.cat([x, -x])
            return self.fc(x) + self.fc(2 * x)

    model = Doubling()
    plast = DASSDP(model, CFG, sites={"fc": "output>0"})
    with pytest.warns(DASSDPWarning, match=r"its batch is 8 but the model's input has"):
        model(torch.randn(4, 4))
        plast.step(torch.tensor(1.0))


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", DASSDPWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ------------------------------------------------------------- item 8: reset
class HiddenLeakyNet(nn.Module):
    """snnTorch with init_hidden=True: the neurons keep their membrane between calls."""

    def __init__(self, steps=4):
        super().__init__()
        self.steps = steps
        self.fc1, self.lif1 = nn.Linear(10, 12), snn.Leaky(beta=0.8, init_hidden=True)
        self.fc2 = nn.Linear(12, 4)
        self.lif2 = snn.Leaky(beta=0.8, threshold=0.3, init_hidden=True, output=True)

    def forward(self, x):
        return torch.stack(
            [self.lif2(self.fc2(self.lif1(self.fc1(x))))[0] for _ in range(self.steps)]
        ).sum(0)


def test_readme_loop_on_snntorch_init_hidden_net_runs_three_steps():
    torch.manual_seed(0)
    model = HiddenLeakyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plast = DASSDP(model, CFG, sites={"fc2": {"pre": "lif1", "post": "lif2"}})
    w = model.fc2.weight.detach().clone()
    for _ in range(3):  # failed on the 2nd backward: "backward through the graph a second time"
        loss = F.cross_entropy(model(torch.rand(8, 10) * 3), torch.zeros(8, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        plast.step(loss)
        dassdp.reset(model)
    assert plast.counters["applied"] == 3 and not torch.equal(model.fc2.weight, w)
    assert torch.equal(model.lif1.mem, torch.zeros_like(model.lif1.mem))
    assert model.lif1.mem.grad_fn is None


# ------------------------------------------- item 9: several forwards per step
def test_gradient_accumulation_is_one_window_per_forward():
    torch.manual_seed(0)
    model = TinySNN()
    twins = [copy.deepcopy(model) for _ in range(2)]
    plast = DASSDP(model, CFG, sites={"fc2": "output>0"})
    singles = [DASSDP(t, CFG, sites={"fc2": "output>0"}) for t in twins]
    xs = [torch.randn(8, 12), torch.randn(5, 12)]  # different batch sizes
    w = model.fc2.weight.detach().clone()
    for x in xs:
        model(x).sum().backward()
    assert plast.step(torch.tensor(1.0))
    for twin, single, x in zip(twins, singles, xs):
        twin(x)
        single.step(torch.tensor(1.0))
    mean_dw = sum(t.fc2.weight - w for t in twins) / 2
    torch.testing.assert_close(model.fc2.weight - w, mean_dw, rtol=1e-5, atol=1e-7)
    warm = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=1), sites={"fc2": "output>0"})
    for x in xs:
        warm.model(x)
    warm.step(torch.tensor(1.0))
    assert warm.stats["fc2"].n == 8 + 5  # one (S, L) record per sample of every window


def test_no_grad_forwards_are_not_recorded():
    torch.manual_seed(0)
    model = TinySNN()
    twin = copy.deepcopy(model)
    plast = DASSDP(model, CFG, sites={"fc2": "output>0"})
    ref = DASSDP(twin, CFG, sites={"fc2": "output>0"})
    x = torch.randn(8, 12)
    model(x)
    with torch.no_grad():
        model(torch.randn(3, 12))  # a train-mode metrics pass
    with torch.inference_mode():
        model(torch.randn(3, 12))
    twin(x)
    plast.step(torch.tensor(1.0))
    ref.step(torch.tensor(1.0))
    assert torch.equal(model.fc2.weight, twin.fc2.weight)


# ----------------------------------------------------- item 10: silent no-ops
def test_step_in_eval_mode_warns_once():
    model = TinySNN()
    plast = DASSDP(model, CFG)
    model.eval()
    model(torch.randn(4, 12))
    with pytest.warns(DASSDPWarning, match=r"eval\(\) mode"):
        assert not plast.step(torch.tensor(1.0))
    with warnings_as_errors():
        plast.step(torch.tensor(1.0))


def test_step_twice_without_a_forward_warns():
    model = TinySNN()
    plast = DASSDP(model, CFG)
    model(torch.randn(4, 12))
    assert plast.step(torch.tensor(1.0))
    with pytest.warns(DASSDPWarning, match="without a training forward"):
        assert not plast.step(torch.tensor(1.0))


def test_step_after_close_is_an_error():
    model = TinySNN()
    plast = DASSDP(model, CFG)
    plast.close()
    model(torch.randn(4, 12))
    with pytest.raises(RuntimeError, match=r"after close\(\)"):
        plast.step(torch.tensor(1.0))


def test_grad_apply_after_optimizer_step_is_an_error():
    model = TinySNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plast = DASSDP(model, CFG.replace(apply="grad"), sites={"fc2": "output>0"})
    model(torch.randn(4, 12)).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) already ran"):
        plast.step(torch.tensor(1.0))
    opt.zero_grad()
    model(torch.randn(4, 12)).sum().backward()
    assert plast.step(torch.tensor(1.0))  # the right place: between backward and opt.step


def test_warmup_without_set_epoch_warns_after_1000_steps(monkeypatch):
    assert learner_mod.WARMUP_NOTICE_STEPS == 1000
    monkeypatch.setattr(learner_mod, "WARMUP_NOTICE_STEPS", 3)
    model = TinySNN()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=2))
    with warnings_as_errors():
        for _ in range(2):
            model(torch.randn(4, 12))
            plast.step(torch.tensor(1.0))
    model(torch.randn(4, 12))
    with pytest.warns(DASSDPWarning, match="set_epoch.*never called.*still in warm-up"):
        plast.step(torch.tensor(1.0))
    called = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=2))
    called.set_epoch(0)
    with warnings_as_errors():
        for _ in range(4):
            called.model(torch.randn(4, 12))
            called.step(torch.tensor(1.0))


@pytest.mark.parametrize(
    "epoch", [np.int64(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32)]
)
def test_set_epoch_accepts_integer_likes(epoch):
    plast = DASSDP(TinySNN(), CFG)
    plast.set_epoch(epoch)
    assert plast.epoch == 3 and type(plast.epoch) is int


@pytest.mark.parametrize("epoch", [2.0, True, torch.tensor(2.0), torch.tensor(True), -1, "2"])
def test_set_epoch_rejects_non_integers(epoch):
    plast = DASSDP(TinySNN(), CFG)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        plast.set_epoch(epoch)
