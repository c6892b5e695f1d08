"""LIF and PLIF as thin ``nn.Module`` shells over :mod:`dassdp.neurons.functional`.

Both are multi-step: ``forward`` takes a time-major ``[T, B, ...]`` tensor and returns its
spikes ``[T, B, ...]``. The membrane lives only inside that call, so the modules keep no
state between batches (``dassdp.reset`` has nothing to clear for them).

``backend`` picks the implementation (:func:`dassdp.neurons.functional.lif_multistep`):
``"auto"`` (default: the one-kernel Triton LIF for CUDA inputs when Triton is importable, the
fused torch kernel elsewhere), ``"triton"``, ``"torch"`` (fused multi-step torch ops) or
``"loop"`` (the autograd loop: the reference, used for before/after benchmarks and double
backward). All give the same spikes and gradients up to float rounding. ``fused=False`` is a
deprecated alias of ``backend="loop"``.

Both mark their output spikes (:func:`dassdp.neurons.saving.mark_spikes`), so that a model
running under :func:`dassdp.neurons.saving.spike_saving` lets autograd keep them as ``bool``.

Neither module reads a device value back to the host in ``forward`` / ``backward``: PLIF's
``1 / tau = sigmoid(w)`` stays a tensor (only the :attr:`PLIF.tau` property reads it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dassdp.neurons.functional import LIFParams, check_backend, lif_multistep
from dassdp.neurons.saving import mark_spikes

__all__ = ["LIF", "PLIF"]


def _backend(backend: str, fused: bool | None) -> str:
    """``backend`` checked, with the deprecated ``fused=False`` meaning ``"loop"``."""
    return "loop" if fused is False else check_backend(backend)


class LIF(nn.Module):
    """Multi-step leaky integrate-and-fire neuron with a fixed time constant.

    Defaults: tau 2, threshold 1, hard reset to 0, input decay, detached reset, ATan
    surrogate with alpha 2 (the SpikingResformer neuron). Shapes: ``[T, B, ...] -> [T, B, ...]``.
    ``backend``: ``"auto"`` / ``"triton"`` / ``"torch"`` / ``"loop"`` (module docstring);
    ``fused``: deprecated, ``fused=False`` is ``backend="loop"``.
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
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.backend = _backend(backend, fused)
        self.params = LIFParams(
            tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha
        )

    @property
    def fused(self) -> bool:
        """Deprecated: whether a fused backend may run (``backend != "loop"``)."""
        return self.backend != "loop"

    def forward(self, x: Tensor) -> Tensor:
        out = lif_multistep(x, self.params, backend=self.backend)
        return mark_spikes(out)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        p = self.params
        return (
            f"tau={p.tau}, v_threshold={p.v_threshold}, v_reset={p.v_reset}, "
            f"surrogate={p.surrogate}, backend={self.backend}"
        )


class PLIF(nn.Module):
    """Multi-step parametric LIF: ``1 / tau = sigmoid(w)`` with a learnable scalar ``w``.

    ``w`` starts at ``-log(init_tau - 1)`` so that ``tau = init_tau`` (> 1). ``1 / tau`` is
    passed to the neuron as a 0-d tensor in ``w``'s dtype (fp32), so ``w``'s gradient is one
    fp32 sum even for fp16 / bf16 inputs. Other arguments as :class:`LIF` (every backend
    computes ``w``'s gradient). Shapes: ``[T, B, ...] -> [T, B, ...]``.
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
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.backend = _backend(backend, fused)
        if not init_tau > 1:
            raise ValueError(f"PLIF init_tau must be > 1, got {init_tau!r}")
        self.params = LIFParams(
            init_tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha
        )
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    @property
    def fused(self) -> bool:
        """Deprecated: whether a fused backend may run (``backend != "loop"``)."""
        return self.backend != "loop"

    @property
    def tau(self) -> float:
        """Current time constant ``1 / sigmoid(w)`` (reads ``w`` back to the host)."""
        return float(1.0 / torch.sigmoid(self.w.detach()))

    def forward(self, x: Tensor) -> Tensor:
        inv_tau = torch.sigmoid(self.w)  # 0-d, w's dtype: never read on the host
        out = lif_multistep(x, self.params, inv_tau, backend=self.backend)
        return mark_spikes(out)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        # init_tau, not the current tau: printing a model must not read a device value.
        p = self.params
        return (
            f"init_tau={p.tau}, v_threshold={p.v_threshold}, v_reset={p.v_reset}, "
            f"surrogate={p.surrogate}, backend={self.backend}"
        )
