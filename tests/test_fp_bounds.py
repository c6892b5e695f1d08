"""The rounding bounds the CUDA gradient checks use (``tests/fp_bounds.py``,
``tests/lif_reference.py``), checked on the CPU: sums in other orders and the CPU LIF backends
stay inside them, wrong values do not, and the GPU check's inputs keep every membrane far
enough from the threshold for float32 to fire exactly where float64 does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dassdp.neurons.functional import lif_multistep
from fp_bounds import assert_within, gamma, pairwise_depth, sum_bound, unit_roundoff
from lif_reference import (
    CONFIGS,
    check_lif,
    error_bounds,
    lif_inputs,
    reference,
    spike_margin,
    triton_gk_depth,
)

U32 = 2.0**-24


def test_unit_roundoff_and_gamma():
    assert unit_roundoff(torch.float32) == U32 and unit_roundoff(torch.float64) == 2.0**-53
    assert gamma(3, U32) == pytest.approx(3 * U32 / (1 - 3 * U32), rel=1e-15)
    with pytest.raises(ValueError, match="unbounded"):
        gamma(2**24, U32)
    with pytest.raises(ValueError, match="floating"):
        unit_roundoff(torch.int32)
    assert [pairwise_depth(n) for n in (1, 2, 3, 4, 5, 1024, 1025)] == [0, 1, 2, 2, 3, 10, 11]


def _sequential(x: np.ndarray) -> float:
    """float32 recursive summation, left to right (numpy's accumulate is sequential)."""
    return float(np.add.accumulate(x, dtype=np.float32)[-1])


def _pairwise(x: np.ndarray) -> float:
    """float32 balanced tree: halve the array level by level (depth ⌈log2 n⌉)."""
    x = x.astype(np.float32)
    while x.size > 1:
        if x.size % 2:
            x = np.append(x, np.float32(0))
        x = x[0::2] + x[1::2]
    return float(x[0])


def _terms(n: int = 41472) -> np.ndarray:
    """Terms of either sign whose sum cancels: |sum| far below sum |terms| (as gk's terms)."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal(n) * rng.uniform(0.1, 4, n)).astype(np.float32)


def _check(value: float, exact: float, bound: float, what: str) -> float:
    return assert_within(torch.tensor(value), torch.tensor(exact), bound, what)


def test_a_sum_in_any_order_is_within_its_bound():
    x = _terms()
    exact, abs_sum, n = math.fsum(x.astype(np.float64)), float(np.abs(x).sum()), x.size
    assert abs_sum > 50 * abs(exact)  # a cancelling sum: relative error far above u
    rng = np.random.default_rng(1)
    orders = {
        "sequential": (_sequential(x), n - 1),
        "reversed": (_sequential(x[::-1]), n - 1),
        "shuffled": (_sequential(rng.permutation(x)), n - 1),
        "pairwise": (_pairwise(x), pairwise_depth(n)),
        "pairwise shuffled": (_pairwise(rng.permutation(x)), pairwise_depth(n)),
    }
    for name, (value, depth) in orders.items():
        _check(value, exact, sum_bound(abs_sum, depth, U32), name)
    # two orders against each other: each side's bound
    (a, da), (b, db) = orders["pairwise"], orders["reversed"]
    _check(a, b, sum_bound(abs_sum, da, U32) + sum_bound(abs_sum, db, U32), "two orders")


def test_a_wrong_sum_fails_the_bound():
    x = _terms()
    exact, abs_sum = math.fsum(x.astype(np.float64)), float(np.abs(x).sum())
    bound = sum_bound(abs_sum, pairwise_depth(x.size), U32)
    dropped = np.delete(x, int(np.abs(x).argmax()))  # one term missing
    with pytest.raises(AssertionError, match="exceeds the rounding bound"):
        _check(_pairwise(dropped), exact, bound, "one term dropped")
    with pytest.raises(AssertionError, match="ratio"):
        _check(exact + 2 * bound, exact, bound, "off by twice the bound")


def test_the_bound_needs_the_right_depth():
    # 1 + n times 0.6 u: each sequential step rounds back to 1, an error of 0.6 n u, within
    # the sequential bound (γ_{n-1} Σ|x|, so that bound is nearly attained) but far beyond the
    # tree depth's.
    n = 4096
    x = np.concatenate([[1.0], np.full(n, 0.6 * U32)]).astype(np.float32)
    exact, abs_sum = math.fsum(x.astype(np.float64)), float(np.abs(x.astype(np.float64)).sum())
    ratio = _check(_sequential(x), exact, sum_bound(abs_sum, n, U32), "sequential")
    assert ratio > 0.5
    with pytest.raises(AssertionError):
        _check(_sequential(x), exact, sum_bound(abs_sum, pairwise_depth(n + 1), U32), "tree")


def _simulated_triton_gk(terms: np.ndarray, block: int) -> float:
    """The Triton backward's gk summation in float32: ``terms`` ``[T, n]``; per lane over T in
    turn, a tree over each block's lanes, then the per-block partials in sequence."""
    T, n = terms.shape
    lanes = np.zeros(n, np.float32)
    for t in range(T):
        lanes = lanes + terms[t]
    pad = (-n) % block
    blocks = np.append(lanes, np.zeros(pad, np.float32)).reshape(-1, block)
    partials = [_pairwise(b) for b in blocks]
    return _sequential(np.asarray(partials, np.float32))


@pytest.mark.parametrize("block", [16, 256, 1024])
def test_the_triton_summation_depth_bounds_its_order(block):
    T, n = 4, 10368
    terms = _terms(T * n).reshape(T, n)
    exact = math.fsum(terms.astype(np.float64).ravel())
    abs_sum = float(np.abs(terms).astype(np.float64).sum())
    depth = triton_gk_depth(T, n, block)
    assert depth == T + int(math.log2(block)) + math.ceil(n / block) - 1
    _check(_simulated_triton_gk(terms, block), exact, sum_bound(abs_sum, depth, U32), "gk")
    with pytest.raises(ValueError, match="block"):
        triton_gk_depth(T, n, 0)


def _run(backend: str, params, learn_k: bool, dtype: torch.dtype, shape=(4, 4, 8, 9, 9)):
    """A CPU run on ``lif_inputs``: ``(spikes, g_x, g_w, k, x, g_s)``."""
    x, g_s = (t.to(dtype) for t in lif_inputs(shape))
    xi = x.clone().requires_grad_(True)
    w = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    k = torch.sigmoid(w) if learn_k else None
    s = lif_multistep(xi, params, k, backend=backend)
    (s * g_s).sum().backward()
    return s.detach(), xi.grad, (w.grad if learn_k else None), k, x, g_s


def _ids(p) -> str:
    return f"{p.v_reset}-{p.surrogate}-{'decay' if p.decay_input else 'nodecay'}"


@pytest.mark.parametrize("params", CONFIGS, ids=_ids)
@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_the_cpu_backends_in_float32_are_within_the_bounds(params, backend):
    for learn_k in (False, True):
        s, g_x, g_w, k, x, g_s = _run(backend, params, learn_k, torch.float32)
        ref = reference(x, g_s, params, k, torch.float32)
        ratios = check_lif(ref, s, g_x, g_w, torch.float32, ref.h.numel() - 1)
        # the bound is not vacuous: float32's actual error is a sizeable part of it
        assert 0.05 < ratios["g_x"] <= 1, ratios


@pytest.mark.parametrize("params", CONFIGS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_triton_interpreter_is_within_the_bounds(monkeypatch, params, dtype):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    s, g_x, g_w, k, x, g_s = _run("triton", params, True, dtype)
    ref = reference(x, g_s, params, k, dtype)
    # numpy reduces the interpreter's blocks in its own order: the unknown-order depth
    ratios = check_lif(ref, s, g_x, g_w, dtype, ref.h.numel() - 1)
    assert ratios["g_x"] <= 1 and ratios["g_w"] <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("params", CONFIGS, ids=_ids)
def test_the_gpu_check_inputs_fire_exactly_as_in_float64(params, dtype):
    # tests/test_cuda.py's inputs (lif_inputs() at its default shape): every |H - V_th| of
    # the float64 run exceeds the float32 bound on H by a wide margin, LIF and PLIF alike
    x, g_s = lif_inputs()
    for k in (None, torch.sigmoid(torch.tensor(0.3, dtype=dtype))):
        s, _ = lif_multistep(x.to(dtype), params, k, return_membrane=True, backend="torch")
        ref = reference(x.to(dtype), g_s, params, k, dtype)
        assert torch.equal(s.double(), ref.spikes)
        assert spike_margin(ref, dtype) > 20


def test_a_wrong_gradient_fails_the_check():
    params = CONFIGS[4]  # sigmoid, hard reset at -0.1, tau 1.7
    s, g_x, g_w, k, x, g_s = _run("torch", params, True, torch.float32)
    ref = reference(x, g_s, params, k, torch.float32)
    depth = ref.h.numel() - 1
    check_lif(ref, s, g_x, g_w, torch.float32, depth)
    # a slightly wrong surrogate sharpness (alpha 4 -> 4.004: 0.1 %) in the computed run
    wrong = type(params)(**{**params.__dict__, "alpha": 4.004})
    s2, g_x2, g_w2, *_ = _run("torch", wrong, True, torch.float32)
    with pytest.raises(AssertionError, match="g_x"):
        check_lif(ref, s2, g_x2, g_w2, torch.float32, depth)
    _, bound_w = error_bounds(ref, unit_roundoff(torch.float32), depth)
    with pytest.raises(AssertionError, match="g_w"):
        check_lif(ref, s, g_x, g_w + 2 * bound_w, torch.float32, depth)
    flipped = s.clone()
    flipped.view(-1)[0] = 1 - flipped.view(-1)[0]
    with pytest.raises(AssertionError, match="spikes differ"):
        check_lif(ref, flipped, g_x, g_w, torch.float32, depth)
