"""Leaky integrate-and-fire dynamics as pure functions (norse style: step first, module later).

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dassdp.neurons.surrogate import get_surrogate

__all__ = ["LIFParams", "lif_multistep", "lif_step"]


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


def lif_multistep(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run LIF over a time-major input ``x`` ``[T, B, ...]`` starting from ``V = 0``.

    Returns the spikes ``[T, B, ...]`` (in {0, 1}, dtype of ``x``), and with
    ``return_membrane`` also the membrane after each step's reset ``[T, B, ...]``.
    """
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(
            f"expected a time-major tensor [T, B, ...] with T >= 1, got {tuple(x.shape)}"
        )
    v = torch.zeros_like(x[0])
    spikes, membrane = [], []
    for t in range(x.shape[0]):
        s, v = lif_step(x[t], v, params, inv_tau)
        spikes.append(s)
        if return_membrane:
            membrane.append(v)
    out = torch.stack(spikes)
    return (out, torch.stack(membrane)) if return_membrane else out
