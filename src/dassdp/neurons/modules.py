"""LIF and PLIF as thin ``nn.Module`` shells over :mod:`dassdp.neurons.functional`.

Both are multi-step: ``forward`` takes a time-major ``[T, B, ...]`` tensor and returns its
spikes ``[T, B, ...]``. The membrane lives only inside that call, so the modules keep no
state between batches (``dassdp.reset`` has nothing to clear for them). By default they run
the fused multi-step kernel (:func:`dassdp.neurons.functional.lif_multistep_fused`: same
spikes, same gradients, faster and lighter on memory); ``fused=False`` forces the autograd
loop (the reference, used for before/after benchmarks and double backward).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dassdp.neurons.functional import LIFParams, lif_multistep

__all__ = ["LIF", "PLIF"]


class LIF(nn.Module):
    """Multi-step leaky integrate-and-fire neuron with a fixed time constant.

    Defaults: tau 2, threshold 1, hard reset to 0, input decay, detached reset, ATan
    surrogate with alpha 2 (the SpikingResformer neuron). Shapes: ``[T, B, ...] -> [T, B, ...]``.
    ``fused``: use the fused multi-step kernel when the configuration supports it (default).
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        decay_input: bool = True,
        detach_reset: bool = True,
        surrogate: str = "atan",
        alpha: float | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.fused = fused
        self.params = LIFParams(
            tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha
        )

    def forward(self, x: Tensor) -> Tensor:
        return lif_multistep(x, self.params, fused=self.fused)  # type: ignore[return-value]

    def extra_repr(self) -> str:
        p = self.params
        return (
            f"tau={p.tau}, v_threshold={p.v_threshold}, v_reset={p.v_reset}, "
            f"surrogate={p.surrogate}" + ("" if self.fused else ", fused=False")
        )


class PLIF(nn.Module):
    """Multi-step parametric LIF: ``1 / tau = sigmoid(w)`` with a learnable scalar ``w``.

    ``w`` starts at ``-log(init_tau - 1)`` so that ``tau = init_tau`` (> 1). Other arguments
    as :class:`LIF` (the fused kernel also computes ``w``'s gradient). Shapes:
    ``[T, B, ...] -> [T, B, ...]``.
    """

    def __init__(
        self,
        init_tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        decay_input: bool = True,
        detach_reset: bool = True,
        surrogate: str = "atan",
        alpha: float | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.fused = fused
        if not init_tau > 1:
            raise ValueError(f"PLIF init_tau must be > 1, got {init_tau!r}")
        self.params = LIFParams(
            init_tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha
        )
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    @property
    def tau(self) -> float:
        """Current time constant ``1 / sigmoid(w)``."""
        return float(1.0 / torch.sigmoid(self.w.detach()))

    def forward(self, x: Tensor) -> Tensor:
        inv_tau = torch.sigmoid(self.w).to(x.dtype)
        return lif_multistep(x, self.params, inv_tau, fused=self.fused)  # type: ignore[return-value]

    def extra_repr(self) -> str:
        p = self.params
        return (
            f"tau={self.tau:.4g}, v_threshold={p.v_threshold}, v_reset={p.v_reset}, "
            f"surrogate={p.surrogate}" + ("" if self.fused else ", fused=False")
        )
