"""Rounding-error bounds for comparing a computed result with a more exact reference.

The standard model of floating-point arithmetic (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., §2.2): every operation returns the exact result of its rounded operands
times ``(1 + δ)`` with ``|δ| <= u``, the unit roundoff (``2^-24`` in float32, ``2^-53`` in
float64). A value that passes through ``m`` such roundings in a row is off by at most a factor
``(1 + δ_1) ... (1 + δ_m)``, whose distance from 1 is at most ``γ_m = m u / (1 - m u)``
(Higham, Lemma 3.1).

**Sums.** Any order of adding ``n`` terms is a binary tree whose leaves are the terms; a term
that sits ``d`` additions below the root is multiplied by at most ``d`` factors
``(1 + δ)``, so the computed sum of the (exact) terms ``t_i`` is off by at most
``γ_d Σ |t_i|``, where ``d`` is the depth of the deepest leaf (Higham, §4.2, eq. 4.4 for
recursive summation, and §4.3 for other orders). The bound scales with the sum of the
*absolute* terms, not with the sum: where the terms cancel (a gradient summed over many
neurons of either sign) the relative error of the sum can be far larger than ``u`` without
anything being wrong. Recursive summation has ``d = n - 1`` (``γ_{n-1} ≈ n u``, the bound
for an unknown order); a balanced pairwise tree has ``d = ⌈log2 n⌉``; a GPU reduction that
adds ``s`` terms in each lane, combines the lanes of a block as a tree and then adds the
per-block partials in some order has ``d = s + ⌈log2 lanes⌉ + blocks - 1``.

A check "within the bound" is therefore ``|computed - reference| <= bound(computed) +
bound(reference)``: each side's own rounding, with its own ``u``. This module has the
arithmetic; ``tests/lif_reference.py`` applies it to the LIF gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["assert_within", "gamma", "pairwise_depth", "sum_bound", "unit_roundoff"]


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u`` of a floating dtype: half the distance from 1 to the next number (``eps / 2``)."""
    if not dtype.is_floating_point:
        raise ValueError(f"unit_roundoff needs a floating dtype, got {dtype}")
    return torch.finfo(dtype).eps / 2


def gamma(m: float, u: float) -> float:
    """``γ_m = m u / (1 - m u)``: the relative error bound after ``m`` roundings of size ``u``.

    ``m`` may be fractional (an operation known to err by a few ulps counts as a few
    roundings). ``m u >= 1`` means no bound exists: an error.
    """
    if m < 0 or u <= 0:
        raise ValueError(f"gamma needs m >= 0 and u > 0, got m={m}, u={u}")
    if m * u >= 1:
        raise ValueError(f"gamma_m is unbounded for m u >= 1 (m={m}, u={u})")
    return m * u / (1 - m * u)


def pairwise_depth(n: int) -> int:
    """Depth of a balanced binary tree over ``n >= 1`` leaves: ``⌈log2 n⌉``."""
    if n < 1:
        raise ValueError(f"pairwise_depth needs n >= 1, got {n}")
    return math.ceil(math.log2(n)) if n > 1 else 0


def sum_bound(abs_sum: float | Tensor, depth: int, u: float) -> float | Tensor:
    """Bound on the rounding error of adding terms whose absolute values sum to ``abs_sum``
    when no term passes through more than ``depth`` additions: ``γ_depth · abs_sum``.

    ``depth``: ``n - 1`` for recursive summation (or an unknown order) of ``n`` terms,
    :func:`pairwise_depth` for a balanced tree. ``abs_sum`` may be a tensor (one bound per
    element, for sums taken elementwise).
    """
    return gamma(depth, u) * abs_sum


def assert_within(computed: Tensor, reference: Tensor, bound: Tensor | float, what: str) -> float:
    """Assert ``|computed - reference| <= bound`` elementwise (compared in float64); return
    the largest ratio of the error to its bound (``<= 1`` when it holds; 0 for an exact match
    with a zero bound). The failure message names ``what``, the worst element, its error,
    bound and ratio."""
    got = computed.detach().to("cpu", torch.float64)
    ref = reference.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    lim = torch.as_tensor(bound, dtype=torch.float64).detach().cpu().expand_as(ref)
    err = (got - ref).abs()
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: non-finite values in the computed result")
    ratio = torch.where(lim > 0, err / lim.clamp_min(1e-300), (err > 0) * math.inf)
    worst = int(ratio.argmax())
    top = float(ratio.flatten()[worst])
    if top > 1:
        raise AssertionError(
            f"{what}: |computed - reference| exceeds the rounding bound at flat index {worst}: "
            f"computed {float(got.flatten()[worst])!r}, reference {float(ref.flatten()[worst])!r}, "
            f"error {float(err.flatten()[worst]):.3e} > bound {float(lim.flatten()[worst]):.3e} "
            f"(ratio {top:.3g}; {int((ratio > 1).sum())} of {ratio.numel()} elements over)"
        )
    return top
