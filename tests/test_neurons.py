"""LIF / PLIF: hand-computed traces, surrogate gradients, functional == module, no state."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from dassdp.neurons import (
    LIF,
    PLIF,
    LIFParams,
    atan_spike,
    fused_supported,
    lif_multistep,
    lif_multistep_fused,
    lif_multistep_loop,
    lif_step,
    sigmoid_spike,
)

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


# --- fused multi-step LIF == the autograd loop ---------------------------------------------

_CONFIGS = [
    dict(v_reset=v_reset, decay_input=decay, detach_reset=detach, surrogate=surrogate)
    for v_reset in (0.0, -0.5, None)
    for decay in (True, False)
    for detach in (True, False)
    for surrogate in ("atan", "sigmoid")
]
_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _config_id(cfg: dict) -> str:
    reset = "soft" if cfg["v_reset"] is None else f"hard{cfg['v_reset']:+g}"
    return (
        f"{reset}-{'decay' if cfg['decay_input'] else 'nodecay'}-"
        f"{'detach' if cfg['detach_reset'] else 'attached'}-{cfg['surrogate']}"
    )


def _input_hitting_threshold(
    params: LIFParams, k: float, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``x`` ``[T, B, N]`` whose first step puts a quarter of the neurons exactly on the
    threshold (``H[0] = V_th`` from ``V = 0``); returns ``(x, mask of those neurons)``."""
    x = (1.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    v_r = 0.0 if params.v_reset is None else params.v_reset
    # H[0] = (X + V_r) k (decay_input) or X + V_r k (not), with V[-1] = 0.
    x0 = params.v_threshold / k - v_r if params.decay_input else params.v_threshold - v_r * k
    mask = torch.rand(shape[1:], generator=gen) < 0.25
    x[0][mask] = x0
    return x, mask


def _run(fn, x, params, inv_tau, g_s, g_v):
    """Spikes, membrane and the gradients of ``<S, g_s> + <V, g_v>`` w.r.t. ``x`` (and
    ``inv_tau`` when it is a tensor)."""
    x = x.detach().clone().requires_grad_(True)
    leaves = [x]
    if isinstance(inv_tau, torch.Tensor):
        inv_tau = inv_tau.detach().clone().requires_grad_(True)
        leaves.append(inv_tau)
    s, v = fn(x, params, inv_tau, return_membrane=True)
    grads = torch.autograd.grad((s * g_s).sum() + (v * g_v).sum(), leaves)
    return s.detach(), v.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", _CONFIGS, ids=_config_id)
@pytest.mark.parametrize("learnable_k", [False, True], ids=["fixed-tau", "tensor-k"])
def test_fused_equals_autograd_loop(cfg, dtype, learnable_k):
    gen = torch.Generator().manual_seed(
        zlib.crc32(f"{_config_id(cfg)}{dtype}{learnable_k}".encode())
    )
    tol = _TOL[dtype]
    for _ in range(3):  # random shapes and T
        T = int(torch.randint(1, 9, (1,), generator=gen))
        shape = (T, *torch.randint(1, 6, (int(torch.randint(1, 4, (1,), generator=gen)),),
                                   generator=gen).tolist())  # fmt: skip
        params = LIFParams(tau=2.0, v_threshold=1.0, **cfg)
        k = 0.5
        inv_tau = torch.tensor(k, dtype=dtype) if learnable_k else None
        assert fused_supported(torch.zeros(1, dtype=dtype), params, inv_tau)
        x, on_threshold = _input_hitting_threshold(params, k, shape, dtype, gen)
        g_s = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        g_v = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        for g_v_used in (torch.zeros_like(g_v), g_v):  # spikes only, then spikes + membrane
            s_ref, v_ref, grads_ref = _run(lif_multistep_loop, x, params, inv_tau, g_s, g_v_used)
            s, v, grads = _run(lif_multistep_fused, x, params, inv_tau, g_s, g_v_used)
            # The loop fired exactly at threshold there (x >= V_th is a spike).
            assert bool(s_ref[0][on_threshold].eq(1).all())
            assert torch.equal(s, s_ref) and torch.equal(v, v_ref)
            assert s.dtype == v.dtype == dtype
            torch.testing.assert_close(grads[0], grads_ref[0], atol=tol, rtol=0)
            if learnable_k:
                # d/dk is one sum over every neuron and step, accumulated in another order
                # than the loop's: in float32 allow 1e-5 relative on top of 1e-6.
                rtol = 1e-5 if dtype == torch.float32 else 0.0
                torch.testing.assert_close(grads[1], grads_ref[1], atol=tol, rtol=rtol)
        # Spikes alone (no membrane output) take the same path.
        xs = x.detach().clone().requires_grad_(True)
        out = lif_multistep(xs, params, inv_tau)
        assert torch.equal(out, s_ref)
        (gx,) = torch.autograd.grad((out * g_s).sum(), xs)
        ref = _run(lif_multistep_loop, x, params, inv_tau, g_s, torch.zeros_like(g_v))[2][0]
        torch.testing.assert_close(gx, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("neuron", [LIF, PLIF])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_modules_use_fused_path_with_loop_gradients(neuron, v_reset):
    torch.manual_seed(1)
    fused, loop = neuron(v_reset=v_reset), neuron(v_reset=v_reset, fused=False)
    loop.load_state_dict(fused.state_dict())
    x = 1.5 * torch.randn(4, 3, 8, 5, 5)
    x[:, 0, 0] = 2.0  # H[0] = X / 2 = V_th exactly
    outs, grads = [], []
    for module in (fused, loop):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        outs.append(out)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([xi.grad, *[p.grad for p in module.parameters()]])
    assert "Fused" in type(outs[0].grad_fn).__name__
    assert "Fused" not in type(outs[1].grad_fn).__name__
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=0)
    for g, g_ref in zip(grads[0][1:], grads[1][1:], strict=True):  # PLIF's w (a float32 sum)
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    assert "backend=loop" in repr(loop) and "backend=auto" in repr(fused)


def test_plif_fused_trains_like_loop():
    torch.manual_seed(0)
    x = torch.rand(4, 8, 16) * 2
    taus = []
    for fused in (True, False):
        plif = PLIF(fused=fused)
        opt = torch.optim.SGD(plif.parameters(), lr=1.0)
        for _ in range(5):
            loss = (plif(x).mean() - 1.0) ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        taus.append(plif.tau)
    assert taus[0] == pytest.approx(taus[1], rel=1e-5)


def test_fused_falls_back_or_refuses_unsupported_calls(monkeypatch):
    from dassdp.neurons import surrogate as surrogate_module

    x = torch.rand(3, 2, 4) * 3
    per_channel = torch.full((4,), 0.5, requires_grad=True)  # a broadcast inv_tau: loop only
    assert not fused_supported(x, LIFParams(), per_channel)
    assert not fused_supported(x.to(torch.int64), LIFParams())
    out = lif_multistep(x, LIFParams(), per_channel)
    assert torch.equal(out, lif_multistep_loop(x, LIFParams(), per_channel))
    assert "Fused" not in type(out.grad_fn).__name__
    with pytest.raises(ValueError, match="fused"):
        lif_multistep_fused(x, LIFParams(), per_channel)
    # A surrogate registered later has no fused backward: the loop runs it.
    monkeypatch.setitem(surrogate_module.SURROGATES, "custom", surrogate_module.SURROGATES["atan"])
    params = LIFParams(surrogate="custom")
    assert not fused_supported(x, params)
    assert torch.equal(lif_multistep(x, params), lif_multistep(x, LIFParams()))


def test_fused_backward_is_not_differentiable_twice_but_loop_is():
    x = (torch.rand(3, 4) * 3).requires_grad_(True)
    (gx,) = torch.autograd.grad(lif_multistep_loop(x, LIFParams()).sum(), x, create_graph=True)
    assert gx.requires_grad
    (gx,) = torch.autograd.grad(lif_multistep_fused(x, LIFParams()).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()
