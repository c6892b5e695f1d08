"""The ``"loop"`` backend: :func:`~dassdp.neurons.lif.lif_multistep_loop`, the step of
:mod:`dassdp.neurons.lif` looped over ``T`` through autograd. The reference the others are
tested against; runs every call (any surrogate, any broadcastable ``inv_tau``, double
backward), so ``"auto"`` falls back to it for what no fast backend supports."""

from __future__ import annotations

from torch import Tensor

from dassdp.neurons.backends._registry import Backend, Call
from dassdp.neurons.lif import LIFParams, lif_multistep_loop

__all__ = ["BACKEND"]


def _run(
    x: Tensor, params: LIFParams, inv_tau: Tensor | float | None, return_membrane: bool
) -> Tensor | tuple[Tensor, Tensor]:
    return lif_multistep_loop(x, params, inv_tau, return_membrane=return_membrane)


def _any(call: Call) -> bool:
    return True


def _check(call: Call) -> None:
    return None


BACKEND = Backend(name="loop", run=_run, check=_check, pick=_any, auto_rank=100)
