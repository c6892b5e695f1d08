"""Surrogate gradients for the Heaviside spike function.

Forward, every surrogate is the same step ``S = Θ(x) = 1[x >= 0]`` of the distance to
threshold ``x = H - V_th``; backward replaces ``dΘ/dx`` (zero almost everywhere) by a
smooth bump:

``atan``     ``dS/dx = (alpha / 2) / (1 + (pi / 2 * alpha * x)^2)``      (alpha = 2 by default)
``sigmoid``  ``dS/dx = alpha * sig(alpha x) * (1 - sig(alpha x))``       (alpha = 4 by default)

Both are the SpikingJelly conventions, so a model trained with either library sees the
same gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "SURROGATES",
    "atan_grad",
    "atan_spike",
    "get_surrogate",
    "sigmoid_grad",
    "sigmoid_spike",
]


def atan_grad(x: Tensor, alpha: float) -> Tensor:
    """Surrogate derivative of the ATan spike function at ``x`` (same shape as ``x``)."""
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * x) ** 2)


def sigmoid_grad(x: Tensor, alpha: float) -> Tensor:
    """Surrogate derivative of the Sigmoid spike function at ``x`` (same shape as ``x``)."""
    sg = torch.sigmoid(alpha * x)
    return alpha * sg * (1 - sg)


class _HeavisideSpike(torch.autograd.Function):
    """``1[x >= 0]`` forward; backward ``grad * surrogate_grad(x, alpha)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, alpha: float, surrogate_grad: Callable[[Tensor, float], Tensor]
    ) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha, ctx.surrogate_grad = alpha, surrogate_grad
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * ctx.surrogate_grad(x, ctx.alpha), None, None


def atan_spike(x: Tensor, alpha: float = 2.0) -> Tensor:
    """``1[x >= 0]`` forward, ATan surrogate backward. ``x``: any shape."""
    return _HeavisideSpike.apply(x, float(alpha), atan_grad)


def sigmoid_spike(x: Tensor, alpha: float = 4.0) -> Tensor:
    """``1[x >= 0]`` forward, Sigmoid surrogate backward. ``x``: any shape."""
    return _HeavisideSpike.apply(x, float(alpha), sigmoid_grad)


# name -> (spike function, default alpha)
SURROGATES: dict[str, tuple[Callable[[Tensor, float], Tensor], float]] = {
    "atan": (atan_spike, 2.0),
    "sigmoid": (sigmoid_spike, 4.0),
}


def get_surrogate(name: str) -> tuple[Callable[[Tensor, float], Tensor], float]:
    """Return ``(spike_fn, default_alpha)`` for a surrogate name; unknown names are errors."""
    try:
        return SURROGATES[name]
    except KeyError:
        raise ValueError(
            f"unknown surrogate {name!r}; choose one of {sorted(SURROGATES)}"
        ) from None
