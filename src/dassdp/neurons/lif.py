"""Leaky integrate-and-fire dynamics: the equations, one step, and the autograd reference.

One step, with input current ``X[t]``, membrane ``V[t-1]`` (``V[-1] = 0``), time constant
``tau`` (or ``k = 1 / tau`` given directly, as PLIF does), threshold ``V_th`` and reset
value ``V_r``:

charge (decay_input=True)   ``H[t] = V[t-1] + (X[t] - (V[t-1] - V_r)) / tau``
charge (decay_input=False)  ``H[t] = V[t-1] - (V[t-1] - V_r) / tau + X[t]``
fire                        ``S[t] = Θ(H[t] - V_th)``  (surrogate gradient backward)
hard reset (V_r a number)   ``V[t] = H[t] (1 - S'[t]) + V_r S'[t]``
soft reset (V_r None)       ``V[t] = H[t] - V_th S'[t]``   (and ``V_r = 0`` in the charge)

where ``S' = S.detach()`` when ``detach_reset`` (the reset path carries no gradient) and
``S' = S`` otherwise. The multi-step form runs the step over a time-major ``[T, B, ...]``
tensor inside one call, so no membrane state outlives that call.

The backward that the fast backends write by hand
--------------------------------------------------
With ``k = 1 / tau``, surrogate ``σ'[t] = sg(H[t] - V_th)``, incoming gradients ``gS[t]``
(and ``gV_out[t]`` for the returned membrane, else 0) and the reset derivative
``R[t] = dV[t] / dH[t]``::

    R[t] = 1 - S[t]                         hard reset, detach_reset
         = 1                                soft reset, detach_reset
         = 1 - S[t] + (V_r - H[t]) σ'[t]    hard reset, no detach
         = 1 - V_th σ'[t]                   soft reset, no detach

    gH[T-1] = gS[T-1] σ'[T-1] + R[T-1] gV_out[T-1]
    gH[t]   = gS[t] σ'[t] + R[t] (gV_out[t] + (1 - k) gH[t + 1])        (t = T-2 ... 0)
    gX[t]   = k gH[t]   (decay_input)    or    gH[t]   (not decay_input)
    gk      = Σ_t Σ gH[t] dH[t]/dk,   dH[t]/dk = X[t] - (V[t-1] - V_r)   (decay_input)
                                               = V_r - V[t-1]            (not decay_input)

since ``dH[t] / dV[t-1] = 1 - k`` in both charge forms; ``V[t-1]`` for ``gk`` is rebuilt
from ``H`` and ``S``, so the forward keeps only ``H`` (spikes are ``H >= V_th``).

Where the implementations live: this module holds the math (:class:`LIFParams`,
:func:`lif_step`, :func:`lif_multistep_loop`, the autograd reference); the fast kernels are
in :mod:`dassdp.neurons.backends` (``torch``, ``triton``, ``cpu``) behind a registry, and
:func:`dassdp.neurons.lif_multistep` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dassdp.neurons.surrogate import get_surrogate

__all__ = [
    "LIFParams",
    "check_time_major",
    "dense_time_major",
    "lif_multistep_loop",
    "lif_step",
    "split_k",
]


@dataclass(frozen=True)
class LIFParams:
    """Parameters of a LIF neuron. Defaults are the LIF that SpikingResformer uses.

    Attributes:
        tau: membrane time constant in time steps (> 1 for a leak in (0, 1)); ignored by
            the step when ``inv_tau`` is given.
        v_threshold: firing threshold.
        v_reset: value the membrane is set to after a spike (hard reset), or ``None`` for a
            soft reset (subtract the threshold).
        decay_input: whether the input is scaled by ``1 / tau`` too.
        detach_reset: whether the reset path is cut from the autograd graph.
        surrogate: ``"atan"`` or ``"sigmoid"``.
        alpha: surrogate sharpness; ``None`` means the surrogate's default (2 or 4).
    """

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    decay_input: bool = True
    detach_reset: bool = True
    surrogate: str = "atan"
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        get_surrogate(self.surrogate)  # validates the name


def lif_step(
    x: Tensor, v: Tensor, params: LIFParams, inv_tau: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """One step. ``x``, ``v``: ``[B, ...]``; returns ``(spikes, v_next)``, both ``[B, ...]``.

    ``inv_tau`` overrides ``1 / params.tau`` (a tensor for a learnable time constant).
    """
    k = 1.0 / params.tau if inv_tau is None else inv_tau
    v_r = 0.0 if params.v_reset is None else params.v_reset
    h = v + (x - (v - v_r)) * k if params.decay_input else v - (v - v_r) * k + x
    spike_fn, default_alpha = get_surrogate(params.surrogate)
    s = spike_fn(h - params.v_threshold, default_alpha if params.alpha is None else params.alpha)
    s_reset = s.detach() if params.detach_reset else s
    if params.v_reset is None:
        v_next = h - params.v_threshold * s_reset
    else:
        v_next = h * (1 - s_reset) + params.v_reset * s_reset
    return s, v_next


def check_time_major(x: Tensor) -> None:
    """Raise a ``ValueError`` unless ``x`` is a time-major ``[T, B, ...]`` tensor, ``T >= 1``."""
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(
            f"expected a time-major tensor [T, B, ...] with T >= 1, got {tuple(x.shape)}"
        )


def lif_multistep_loop(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The reference multi-step LIF (the ``"loop"`` backend): :func:`lif_step` looped over
    ``T`` through autograd.

    Arguments and results as :func:`dassdp.neurons.lif_multistep`; works for every
    configuration (any surrogate in the registry, any broadcastable ``inv_tau``) and for
    double backward.
    """
    check_time_major(x)
    v = torch.zeros_like(x[0])
    spikes, membrane = [], []
    for t in range(x.shape[0]):
        s, v = lif_step(x[t], v, params, inv_tau)
        spikes.append(s)
        if return_membrane:
            membrane.append(v)
    out = torch.stack(spikes)
    return (out, torch.stack(membrane)) if return_membrane else out


def split_k(params: LIFParams, inv_tau: Tensor | float | None) -> tuple[Tensor | None, float]:
    """``(k_tensor, k_number)``: a one-element ``inv_tau`` tensor stays a tensor (no host
    read); else ``k`` is the number ``1 / tau`` or ``inv_tau``."""
    if isinstance(inv_tau, Tensor):
        return inv_tau, 0.0
    return None, 1.0 / params.tau if inv_tau is None else float(inv_tau)


def dense_time_major(x: Tensor) -> bool:
    """Whether ``x`` ``[T, ...]`` can be read as ``[T, N]`` rows of its own storage: each step
    ``x[t]`` is one dense block of ``N = numel / T`` elements (any order of the dims inside:
    contiguous, channels-last, ...) and the steps follow each other (time outermost, stride
    ``N``). Kernels that treat every neuron alike then run on the storage as it is, and
    outputs made with ``torch.empty_like(x)`` get the same layout."""
    if x.is_contiguous():
        return True
    if x.numel() == 0 or any(st < 0 for st in x.stride()):
        return False
    n = x.numel() // x.shape[0]
    if x.shape[0] > 1 and x.stride(0) != n:
        return False
    expected = 1  # the dims of one step, by stride, must tile the block exactly
    for size, stride in sorted(
        ((s, st) for s, st in zip(x.shape[1:], x.stride()[1:]) if s > 1), key=lambda p: p[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True
