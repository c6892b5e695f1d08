"""The controls of ``DASSDPConfig(control=...)``: what replaces part of the rule to test
whether spike synchrony carries its effect.

- ``shuffled_latency``: each step, the latencies of a site's pre and post units are permuted
  across units (the firing stays; the timing that pairs them is destroyed).
- ``random_update``: ``dW`` replaced by random signs times its RMS (same norm, no structure).
- ``uniform_drift``: ``dW`` replaced by the constant ``A_plus * mean(G)`` that the released
  code applies to its projection site.

Random draws come from the learner's own CPU generator (the same on every device and in
checkpoints), never the global RNG.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dassdp.plasticity.gate import to_device
from dassdp.plasticity.rule import Activity

__all__ = ["random_update", "randomise", "shuffle", "uniform_drift"]


def shuffle(act: Activity, generator: torch.Generator) -> Activity:
    """``act`` with its latencies (``[B, N]``) permuted across the ``N`` units."""
    perm = torch.randperm(act.latency.shape[1], generator=generator)
    return Activity(act.fired, act.latency.index_select(1, to_device(perm, act.latency.device)))


def uniform_drift(shape: torch.Size, A_plus: float, G: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``uniform_drift`` control's ``dW``: ``A_plus * mean(G)`` everywhere, ``shape``
    ``[C_out, C_in]`` on ``G``'s device."""
    return torch.full(shape, A_plus, dtype=dtype, device=G.device) * G.mean()


def randomise(dw: Tensor, generator: torch.Generator) -> Tensor:
    """The ``random_update`` control: one random sign per entry of ``dw`` (``[C_out, C_in]``,
    or ``[2, C_out, C_in]`` with ``dD/dsigma`` stacked) times its RMS (:func:`random_update`)."""
    signs = torch.randint(0, 2, dw.shape[-2:], generator=generator).mul_(2).sub_(1)
    return random_update(to_device(signs, dw.device).to(dw), dw)


def random_update(signs: Tensor, dw: Tensor) -> Tensor:
    """``signs`` times the RMS of ``dw``. With a stacked ``[2, C_out, C_in]`` (``D``,
    ``dD/dsigma``) also the derivative of that RMS, ``signs <D, dD> / (|D| sqrt(n))`` (0 where
    ``D = 0``)."""
    if dw.dim() == 2:
        return signs * (dw.norm() / math.sqrt(dw.numel()))
    D_t, dD = dw[0], dw[1]
    norm, root = D_t.norm(), math.sqrt(D_t.numel())
    slope = torch.where(norm > 0, (D_t * dD).sum() / (norm * root), 0.0)
    return torch.stack((signs * (norm / root), signs * slope))
