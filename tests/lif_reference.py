"""A float64 reference for the multi-step LIF / PLIF gradients, and how far a float32 (or
float64) implementation may lie from it through rounding alone.

The reference is the autograd loop (``backend="loop"``) in float64 on the same inputs, with
the constants the computed side rounds (``1 / tau``, ``v_threshold``, ``v_reset``,
``alpha``) rounded the same way, so that both compute the same function and differ only by
rounding. ``tests/test_cuda.py`` compares the Triton kernels on a GPU with it;
``tests/test_fp_bounds.py`` checks the bounds on the CPU (the torch backend, the fp32 loop and
the Triton interpreter all stay inside them; a perturbed gradient does not).

How the bounds are derived (first order in ``u``, the standard model of
``tests/fp_bounds.py``: each operation adds at most ``u |its result|``; magnitudes are the
reference's exact values). Per neuron and step, with ``k = 1 / tau`` and the names of
``dassdp.neurons.functional``:

* Forward (the computed ``H`` and ``V``): ``H = V + (X - (V - V_r)) k`` rounds 4 times and
  carries the previous error scaled by ``|1 - k|``:
  ``EH[t] = |1-k| EV[t-1] + u (k|V - V_r| + k|X - (V - V_r)| + |(X - (V - V_r)) k| + |H|)``
  (``decay_input=False``: ``H = V - (V - V_r) k + X``, the same count). After the spike
  ``EV = (1 - S) EH`` (hard reset: ``V_r`` is exact) or ``EH + u S |V|`` (soft). The spikes
  are equal when every ``|H - V_th|`` exceeds ``EH`` (checked).
* Surrogate slope ``sg(d)``, ``d = H - V_th`` (error ``Ed = EH + u|d|``): its own rounding
  plus its sensitivity, ``Esg = |sg'(d)| Ed + n_sg u sg_abs``. ATan:
  ``(α/2) / (1 + z²)``, ``z = (π α / 2) d``: ``n_sg = 9`` (constant, ``z``, ``z²`` (twice
  ``z``'s error), ``1 +``, a division counted as 2 ulps, ``α/2``); ``sg_abs = sg``.
  Sigmoid: ``α σ (1 - σ)``, ``σ = 1 / (1 + exp(-α d))``: the rounded argument ``α d`` (and the
  GPU's ``exp`` through ``exp2(x log2 e)``) moves ``σ`` by ``(1 - σ)|α d| u`` each, ``exp``
  itself is counted as 4 ulps, ``1 +`` and the division 3: ``σ``'s relative error is at most
  ``(2|α d| + 7) u``, and ``1 - σ`` cancels, so the bound is taken against
  ``sg_abs = α σ (1 + σ)`` (the expression with absolute values) with
  ``n_sg = 2|α d| + 10`` (the two products and the subtraction add 3).
* Reset derivative ``R``: exact for ``detach_reset`` (``1 - S`` or 1); otherwise
  ``(1 - S) + (V_r - H) sg`` (3 roundings) or ``1 - V_th sg`` (2), with the errors of ``H`` and
  ``sg`` carried through.
* Backward recursion ``gH[t] = gS[t] sg[t] + (1 - k) R[t] gH[t+1]``: ``1 - k``, two products,
  ``gS sg`` and the sum round once each, and the carried error is scaled by ``|(1-k) R|``:
  ``EgH[t] = |gS| Esg + u|gS sg| + |(1-k)R| EgH[t+1] + (|1-k| ER + u|1-k||R|) |gH[t+1]|
  + 2u |(1-k) R gH[t+1]| + u |gH[t]|``; ``gX = k gH`` adds ``u |gX|``.
* ``gk = Σ_t Σ_i gH[t,i] D[t,i]``, ``D = X - (V[t-1] - V_r)`` (or ``V_r - V[t-1]``): each term
  errs by ``EgH |D| + |gH| ED + u |gH D|`` (``ED = EV[t-1] + u(|V[t-1] - V_r| + |D|)``), and
  adding the ``T N`` terms adds ``γ_depth Σ |gH D|`` (``fp_bounds.sum_bound``: the sum of the
  absolute elementwise products of the float64 reference, with the depth of the
  implementation's summation: :func:`triton_gk_depth` for the Triton kernel, ``n - 1`` for an
  unknown order). PLIF's ``gw = gk k (1 - k)`` adds 3 roundings.

The float32 result must then lie within its bound (``u = 2^-24``) plus the reference's own
(``u = 2^-53``, counted :data:`REF_ROUNDINGS` times per modelled operation because autograd's
backward of the loop forms each product through up to that many, and an unknown summation
order): ``|computed - reference| <= bound_32 + bound_64``. A float64 run is checked the same
way, with ``u = 2^-53`` on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dassdp.neurons import LIFParams
from dassdp.neurons.functional import lif_multistep
from dassdp.neurons.surrogate import atan_grad, get_surrogate, sigmoid_grad
from fp_bounds import assert_within, gamma, pairwise_depth, sum_bound, unit_roundoff

# Roundings the float64 loop's autograd backward spends per operation of the model above.
REF_ROUNDINGS = 4

__all__ = [
    "CONFIGS",
    "LIFReference",
    "check_lif",
    "error_bounds",
    "lif_inputs",
    "reference",
    "spike_margin",
    "triton_gk_depth",
]

# The neuron configurations the GPU check compares (every reset / decay / detach / surrogate
# branch of the kernels is taken by at least one).
CONFIGS = [
    LIFParams(),
    LIFParams(v_reset=None),
    LIFParams(decay_input=False, detach_reset=False),
    LIFParams(v_reset=None, detach_reset=False, surrogate="sigmoid", alpha=3.0),
    LIFParams(tau=1.7, v_threshold=0.6, v_reset=-0.1, surrogate="sigmoid"),
]


def lif_inputs(
    shape: tuple[int, ...] = (4, 8, 16, 9, 9), seed: int = 0, scale: float = 1.5
) -> tuple[Tensor, Tensor]:
    """``(x, g_s)``: a float32 input ``[T, B, ...]`` (``scale`` times standard normal) and an
    upstream spike gradient of the same shape, from a CPU generator (the same values on every
    machine, so that the spike-margin check made here holds on the GPU too)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * scale
    return x, torch.randn(shape, generator=gen)


def _rounded(value: float | None, dtype: torch.dtype) -> float | None:
    return None if value is None else float(torch.tensor(value, dtype=dtype))


@dataclass
class LIFReference:
    """The float64 loop's results and intermediates (all ``[T, ...]`` float64 unless noted).

    ``k``: 0-d; ``learn_k``: whether ``g_w`` (the gradient of the logit ``w``, ``k =
    sigmoid(w)``) was computed; ``v_prev``: the membrane before each step (``V[-1] = 0``).
    """

    params: LIFParams
    k: Tensor
    learn_k: bool
    x: Tensor
    g_s: Tensor
    spikes: Tensor
    v_prev: Tensor
    h: Tensor
    g_h: Tensor
    g_x: Tensor
    g_w: Tensor | None


def reference(
    x: Tensor, g_s: Tensor, params: LIFParams, k: Tensor | None, dtype: torch.dtype
) -> LIFReference:
    """The float64 reference of a LIF (``k`` None: ``1 / tau``, rounded to ``dtype`` as the
    computed side rounds it) or PLIF (``k``: the one-element ``sigmoid(w)`` tensor the computed
    side used) run on ``x`` with the loss ``<spikes, g_s>``; ``dtype``: the computed side's."""
    p = replace(
        params,
        v_threshold=_rounded(params.v_threshold, dtype),
        v_reset=_rounded(params.v_reset, dtype),
        alpha=_rounded(params.alpha, dtype),
    )
    x64 = x.detach().to("cpu", torch.float64).requires_grad_(True)
    g64 = g_s.detach().to("cpu", torch.float64)
    if k is None:
        k64 = torch.tensor(_rounded(1.0 / params.tau, dtype), dtype=torch.float64)
        k_arg: Tensor | float = float(k64)
    else:
        k64 = k.detach().to("cpu", torch.float64).reshape(()).requires_grad_(True)
        k_arg = k64
    s, v = lif_multistep(x64, p, k_arg, return_membrane=True, backend="loop")
    (s * g64).sum().backward()
    kd = k64.detach()
    v_r = 0.0 if p.v_reset is None else p.v_reset
    v_prev = torch.cat([torch.zeros_like(v[:1]), v[:-1]]).detach()
    xd = x64.detach()
    if p.decay_input:
        h = v_prev + (xd - (v_prev - v_r)) * kd
        g_h = x64.grad / kd
    else:
        h = v_prev - (v_prev - v_r) * kd + xd
        g_h = x64.grad.clone()
    g_w = k64.grad * kd * (1 - kd) if k is not None else None
    return LIFReference(p, kd, k is not None, xd, g64, s.detach(), v_prev, h, g_h, x64.grad, g_w)


def _forward_errors(ref: LIFReference, u: float) -> tuple[Tensor, Tensor]:
    """``(EH, EV_prev)``: bounds on the computed side's error in ``H[t]`` and in ``V[t-1]``."""
    p, k = ref.params, float(ref.k)
    v_r = 0.0 if p.v_reset is None else p.v_reset
    eh, ev_prev = torch.empty_like(ref.h), torch.empty_like(ref.h)
    ev = torch.zeros_like(ref.h[0])
    for t in range(ref.h.shape[0]):
        v, x, h, s = ref.v_prev[t], ref.x[t], ref.h[t], ref.spikes[t]
        a1 = (v - v_r).abs()
        if p.decay_input:
            a2 = (x - (v - v_r)).abs()
            rounding = k * a1 + k * a2 + k * a2 + h.abs()
        else:
            rounding = k * a1 + k * a1 + (v - (v - v_r) * k).abs() + h.abs()
        ev_prev[t] = ev
        eh[t] = abs(1 - k) * ev + u * rounding
        # soft: V = H - V_th S rounds where it spiked; hard: V = V_r (exact) there, else H
        soft = p.v_reset is None
        ev = eh[t] + u * s * (h - p.v_threshold * s).abs() if soft else (1 - s) * eh[t]
    return eh, ev_prev


def _surrogate_errors(ref: LIFReference, eh: Tensor, u: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(sg, |sg'|, Esg)``: the surrogate slope at ``d = H - V_th``, its derivative's
    magnitude and the bound on the computed slope's error."""
    p = ref.params
    alpha = float(get_surrogate(p.surrogate)[1] if p.alpha is None else p.alpha)
    d = ref.h - p.v_threshold
    e_d = eh + u * d.abs()
    if p.surrogate == "atan":
        sg = atan_grad(d, alpha)
        z = math.pi / 2 * alpha * d
        slope = sg * 2 * z.abs() * (math.pi / 2 * alpha) / (1 + z * z)
        own = 9 * u * sg
    else:
        sg = sigmoid_grad(d, alpha)
        sig = torch.sigmoid(alpha * d)
        slope = alpha * sg * (1 - 2 * sig).abs()
        own = (2 * (alpha * d).abs() + 10) * u * alpha * sig * (1 + sig)
    return sg, slope, slope * e_d + own


def _reset_derivative(
    ref: LIFReference, sg: Tensor, slope: Tensor, e_sg: Tensor, eh: Tensor, u: float
) -> tuple[Tensor, Tensor]:
    """``(R, ER)``: ``dV/dH`` and the bound on its computed error."""
    p, s, h = ref.params, ref.spikes, ref.h
    if p.detach_reset:
        r = (1 - s) if p.v_reset is not None else torch.ones_like(s)
        return r, torch.zeros_like(s)
    if p.v_reset is not None:
        diff = p.v_reset - h
        r = (1 - s) + diff * sg
        er = diff.abs() * e_sg + sg * (eh + u * diff.abs()) + u * (diff * sg).abs() + u * r.abs()
        return r, er
    r = 1 - p.v_threshold * sg
    return r, abs(p.v_threshold) * e_sg + u * abs(p.v_threshold) * sg + u * r.abs()


def error_bounds(ref: LIFReference, u: float, gk_depth: int) -> tuple[Tensor, float | None]:
    """``(bound on |gX - ref.g_x| per element, bound on |gw - ref.g_w| or None)`` for a side
    computing in unit roundoff ``u`` whose ``gk`` sum has depth ``gk_depth`` (module
    docstring)."""
    eh, ev_prev = _forward_errors(ref, u)
    sg, slope, e_sg = _surrogate_errors(ref, eh, u)
    r, e_r = _reset_derivative(ref, sg, slope, e_sg, eh, u)
    k = float(ref.k)
    decay = abs(1 - k)
    e_gh = torch.empty_like(ref.h)
    carried = torch.zeros_like(ref.h[0])  # EgH[t + 1]
    g_next = torch.zeros_like(ref.h[0])  # gH[t + 1]
    for t in range(ref.h.shape[0] - 1, -1, -1):
        source = ref.g_s[t] * sg[t]
        carry = (1 - k) * r[t] * g_next
        carried = (
            ref.g_s[t].abs() * e_sg[t]
            + u * source.abs()
            + decay * r[t].abs() * carried
            + (decay * e_r[t] + u * decay * r[t].abs()) * g_next.abs()
            + 2 * u * carry.abs()
            + u * ref.g_h[t].abs()
        )
        e_gh[t] = carried
        g_next = ref.g_h[t]
    bound_x = k * e_gh + u * ref.g_x.abs() if ref.params.decay_input else e_gh
    if not ref.learn_k:
        return bound_x, None
    v_r = 0.0 if ref.params.v_reset is None else ref.params.v_reset
    dh_dk = ref.x - (ref.v_prev - v_r) if ref.params.decay_input else v_r - ref.v_prev
    e_d = ev_prev + u * ((ref.v_prev - v_r).abs() + dh_dk.abs())
    terms = ref.g_h * dh_dk
    e_terms = e_gh * dh_dk.abs() + ref.g_h.abs() * e_d + u * terms.abs()
    e_gk = float(e_terms.sum() + sum_bound(terms.abs().sum(), gk_depth, u))
    sig_slope = k * (1 - k)
    return bound_x, sig_slope * e_gk + gamma(3, u) * abs(float(ref.g_w))


def triton_gk_depth(T: int, n: int, block: int) -> int:
    """Summation depth of the Triton backward's ``gk`` over ``T`` steps of ``n`` neurons in
    programs of ``block`` lanes: each lane adds its ``T`` terms in turn, each program adds its
    lanes as a tree (``tl.reduce``), and the per-program partials are added by ``torch.sum``
    in an order taken as unknown: ``T + ⌈log2 block⌉ + ⌈n / block⌉ - 1``."""
    if T < 1 or n < 1 or block < 1:
        raise ValueError(f"triton_gk_depth needs T, n, block >= 1, got {T}, {n}, {block}")
    return T + pairwise_depth(min(block, n)) + math.ceil(n / block) - 1


def spike_margin(ref: LIFReference, dtype: torch.dtype) -> float:
    """The smallest ``|H - V_th|`` of the reference over the bound on a ``dtype`` run's error
    in ``H``: above 1, every spike of a run within the bounds is the reference's."""
    eh, _ = _forward_errors(ref, unit_roundoff(dtype))
    return float(((ref.h - ref.params.v_threshold).abs() / eh.clamp_min(1e-300)).min())


def check_lif(
    ref: LIFReference,
    spikes: Tensor,
    g_x: Tensor,
    g_w: Tensor | None,
    dtype: torch.dtype,
    gk_depth: int,
) -> dict[str, float]:
    """Assert that a run in ``dtype`` matches the float64 reference: the same spikes (every
    ``|H - V_th|`` of the reference must exceed the computed side's bound on ``H``, else the
    inputs, not the implementation, are at fault), ``g_x`` within its bound per element and
    ``g_w`` within its bound. Returns the worst error-to-bound ratios (``<= 1``)."""
    u, u_ref = unit_roundoff(dtype), unit_roundoff(torch.float64)
    margin = spike_margin(ref, dtype)
    if margin <= 1:
        raise AssertionError(f"inputs too close to the threshold for {dtype}: margin {margin:.3g}")
    got = spikes.detach().to("cpu", torch.float64)
    if not torch.equal(got, ref.spikes):
        n_diff = int((got != ref.spikes).sum())
        raise AssertionError(f"{n_diff} spikes differ from the float64 reference")
    bx, bw = error_bounds(ref, u, gk_depth)
    # The reference's own rounding: the loop's autograd reaches each modelled product through
    # up to 4 roundings (the charge's and reset's gradients are formed and summed as separate
    # ops), and its sum over the neurons and steps has an unknown order.
    bx_ref, bw_ref = error_bounds(ref, REF_ROUNDINGS * u_ref, ref.h.numel() - 1)
    ratios = {"margin": margin, "g_x": assert_within(g_x, ref.g_x, bx + bx_ref, "g_x")}
    if ref.learn_k:
        if g_w is None or bw is None or bw_ref is None or ref.g_w is None:
            raise AssertionError("g_w: missing (PLIF run)")
        ratios["g_w"] = assert_within(g_w.reshape(()), ref.g_w, bw + bw_ref, "g_w")
    return ratios
