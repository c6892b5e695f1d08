"""LIF / PLIF: hand-computed traces, surrogate gradients, functional == module, no state."""

from __future__ import annotations

import math

import pytest
import torch

from dassdp.neurons import LIF, PLIF, LIFParams, atan_spike, lif_multistep, lif_step, sigmoid_spike

torch.set_num_threads(1)


def _trace(x: list[float], **kw) -> tuple[list[float], list[float]]:
    s, v = lif_multistep(torch.tensor(x).view(-1, 1), LIFParams(**kw), return_membrane=True)
    return s.flatten().tolist(), v.flatten().tolist()


def test_hard_reset_trace_by_hand():
    # tau 2, V_th 1, V_r 0, decay input: H = V + (X - V) / 2
    # t0: H = 0.5 -> V 0.5; t1: H = 0.5 + (1.6 - 0.5)/2 = 1.05 spike -> V 0
    # t2: H = 2.5/2 = 1.25 spike -> V 0; t3: H = 0.2 -> V 0.2
    s, v = _trace([1.0, 1.6, 2.5, 0.4])
    assert s == [0.0, 1.0, 1.0, 0.0]
    assert v == pytest.approx([0.5, 0.0, 0.0, 0.2])


def test_soft_reset_trace_by_hand():
    # soft reset subtracts V_th: t1 H = 1.05 -> V 0.05; t2 H = 0.05 + (2.5 - 0.05)/2 = 1.275
    # -> V 0.275; t3 H = 0.275 + (0.4 - 0.275)/2 = 0.3375
    s, v = _trace([1.0, 1.6, 2.5, 0.4], v_reset=None)
    assert s == [0.0, 1.0, 1.0, 0.0]
    assert v == pytest.approx([0.5, 0.05, 0.275, 0.3375])


def test_no_decay_input_trace_by_hand():
    # H = V - V/2 + X: t0 0.6; t1 0.3 + 0.8 = 1.1 spike -> 0; t2 0.1; t3 0.05 + 0.9 = 0.95
    s, v = _trace([0.6, 0.8, 0.1, 0.9], decay_input=False)
    assert s == [0.0, 1.0, 0.0, 0.0]
    assert v == pytest.approx([0.6, 0.0, 0.1, 0.95])


def test_reset_to_nonzero_value_and_threshold():
    # V_r = -0.5, V_th = 0.5: t0 H = 0 + (1.2 - 0.5)/2 = 0.35; t1 H = 0.35 + (2 - 0.85)/2 = 0.925
    # spike -> V -0.5
    s, v = _trace([1.2, 2.0], v_reset=-0.5, v_threshold=0.5)
    assert s == [0.0, 1.0]
    assert v == pytest.approx([0.35, -0.5])


@pytest.mark.parametrize(
    ("fn", "alpha", "formula"),
    [
        (atan_spike, 2.0, lambda x, a: (a / 2) / (1 + (math.pi / 2 * a * x) ** 2)),
        (atan_spike, 3.5, lambda x, a: (a / 2) / (1 + (math.pi / 2 * a * x) ** 2)),
        (sigmoid_spike, 4.0, lambda x, a: a * torch.sigmoid(a * x) * (1 - torch.sigmoid(a * x))),
    ],
)
def test_surrogate_backward_equals_formula(fn, alpha, formula):
    x = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    g = torch.rand(41, dtype=torch.float64)
    out = fn(x, alpha)
    assert torch.equal(out, (x >= 0).to(x.dtype))
    out.backward(g)
    assert torch.allclose(x.grad, g * formula(x.detach(), alpha))


def test_lif_step_gradient_is_surrogate_times_input_scale():
    x = torch.tensor([0.3, 1.0, 2.6], dtype=torch.float64, requires_grad=True)
    s, _ = lif_step(x, torch.zeros_like(x), LIFParams())
    s.sum().backward()
    h = x.detach() / 2  # H = X / tau from V = 0
    expected = (1.0 / (1 + (math.pi * (h - 1)) ** 2)) / 2  # atan(alpha=2) * dH/dX
    assert torch.allclose(x.grad, expected)


def test_detach_reset_changes_gradient():
    x = torch.tensor([[1.6], [1.5], [0.9]], requires_grad=True)
    grads = []
    for detach in (True, False):
        x.grad = None
        lif_multistep(x, LIFParams(detach_reset=detach)).sum().backward()
        grads.append(x.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
def test_lif_module_equals_functional(surrogate):
    x = torch.randn(3, 2, 4, 5, 5)  # [T, B, C, H, W]
    module = LIF(tau=3.0, v_threshold=0.7, v_reset=None, surrogate=surrogate)
    expected = lif_multistep(x, LIFParams(3.0, 0.7, None, surrogate=surrogate))
    out = module(x)
    assert out.shape == x.shape
    assert torch.equal(out, expected)
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_plif_module_equals_functional_and_starts_at_init_tau():
    plif = PLIF(init_tau=3.0)
    assert plif.tau == pytest.approx(3.0)
    x = torch.randn(4, 2, 6)
    expected = lif_multistep(x, LIFParams(tau=3.0), inv_tau=torch.sigmoid(plif.w))
    assert torch.equal(plif(x), expected)


def test_plif_tau_changes_under_training():
    torch.manual_seed(0)
    plif = PLIF()
    opt = torch.optim.SGD(plif.parameters(), lr=1.0)
    x = torch.rand(4, 8, 16) * 2  # [T, B, C]
    tau0 = plif.tau
    for _ in range(5):
        loss = (plif(x).mean() - 1.0) ** 2  # push towards firing more
        opt.zero_grad()
        loss.backward()
        assert plif.w.grad is not None and plif.w.grad.abs() > 0
        opt.step()
    assert plif.tau != pytest.approx(tau0, abs=1e-3)


@pytest.mark.parametrize("neuron", [LIF, PLIF])
def test_no_state_survives_between_calls(neuron):
    module = neuron()
    a, b = torch.rand(4, 3, 7) * 3, torch.rand(4, 3, 7) * 3
    first = module(b)
    module(a)  # a different batch in between must not change b's spikes
    assert torch.equal(module(b), first)
    assert not [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
    assert not list(module.buffers())


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="surrogate"):
        LIF(surrogate="nope")
    with pytest.raises(ValueError, match="init_tau"):
        PLIF(init_tau=1.0)
    with pytest.raises(ValueError, match="time-major"):
        lif_multistep(torch.zeros(0, 2), LIFParams())
