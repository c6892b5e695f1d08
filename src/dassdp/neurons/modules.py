"""LIF and PLIF as thin ``nn.Module`` shells over :mod:`dassdp.neurons.lif` and its backends.

Both are multi-step: ``forward`` takes a time-major ``[T, B, ...]`` tensor and returns its
spikes ``[T, B, ...]``. The membrane lives only inside that call, so the modules keep no
state between batches (``dassdp.reset`` has nothing to clear for them).

``backend`` picks the implementation (:mod:`dassdp.neurons.backends`):

* ``"auto"`` (default): ``"triton"`` for CUDA inputs when Triton is usable and has passed its
  self-check on that device (else ``"torch"``, with one warning saying why); on the CPU
  ``"cpu"`` for layers of at least 4096 neurons per sample when the C kernels build (else
  ``"torch"``, with one warning); ``"torch"`` for other calls; ``"loop"`` for what no fast
  backend supports.
* ``"loop"``: the autograd loop, the reference (any surrogate, double backward).
* ``"torch"``: the fused multi-step in torch ops with a hand-written backward (any device).
* ``"triton"``: one Triton kernel per direction (CUDA, or ``TRITON_INTERPRET=1`` on the CPU).
* ``"cpu"``: one compiled C loop per direction (CPU, fp32 / fp64; PLIF's learnable tau runs
  on ``"torch"`` under ``"auto"``).

All give the same spikes and gradients up to float rounding. A module resolves its backend on
the first call of each kind (device, dtype, size class) and keeps it; :attr:`LIF.resolved_backend`
says what the last call ran. :func:`set_backend` sets every LIF / PLIF of a model at once.
``fused=False`` is a deprecated alias of ``backend="loop"``.

Both mark their output spikes (:func:`dassdp.neurons.saving.mark_spikes`), so that a model
running under :func:`dassdp.neurons.saving.spike_saving` lets autograd keep them as ``bool``.

Neither module reads a device value back to the host in ``forward`` / ``backward``: PLIF's
``1 / tau = sigmoid(w)`` stays a tensor (only the :attr:`PLIF.tau` property reads it).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor, nn

from dassdp.neurons.backends import AUTO, BackendChoice, check_backend
from dassdp.neurons.lif import LIFParams
from dassdp.neurons.saving import mark_spikes

__all__ = ["LIF", "PLIF", "resolved_backends", "set_backend"]


def _choice(backend: str, fused: bool | None) -> BackendChoice:
    """``backend`` checked, with the deprecated ``fused=False`` meaning ``"loop"``."""
    return BackendChoice("loop" if fused is False else backend)


class _Neuron(nn.Module):
    """What LIF and PLIF share: the backend choice and its properties."""

    _choice: BackendChoice
    params: LIFParams

    @property
    def backend(self) -> str:
        """The backend asked for (``"auto"``, ``"loop"``, ``"torch"``, ``"triton"``, ``"cpu"``);
        setting it checks the name and drops what was resolved."""
        return self._choice.name

    @backend.setter
    def backend(self, name: str) -> None:
        self._choice = BackendChoice(name)

    @property
    def resolved_backend(self) -> str | None:
        """The backend the last forward ran (``None`` before the first)."""
        return self._choice.last

    @property
    def fused(self) -> bool:
        """Deprecated: whether a fused backend may run (``backend != "loop"``)."""
        return self.backend != "loop"

    def _describe(self, tau_name: str) -> str:
        p = self.params
        return (
            f"{tau_name}={p.tau}, v_threshold={p.v_threshold}, v_reset={p.v_reset}, "
            f"surrogate={p.surrogate}, backend={self.backend}"
        )


class LIF(_Neuron):
    """Multi-step leaky integrate-and-fire neuron with a fixed time constant.

    Defaults: tau 2, threshold 1, hard reset to 0, input decay, detached reset, ATan
    surrogate with alpha 2 (the SpikingResformer neuron). Shapes: ``[T, B, ...] -> [T, B, ...]``.
    ``backend``: ``"auto"`` / ``"loop"`` / ``"torch"`` / ``"triton"`` / ``"cpu"`` (module
    docstring); ``fused``: deprecated, ``fused=False`` is ``backend="loop"``.
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
        backend: str = AUTO,
    ) -> None:
        super().__init__()
        self._choice = _choice(backend, fused)
        self.params = LIFParams(
            tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self._choice.run(x, self.params)
        return mark_spikes(out)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return self._describe("tau")


class PLIF(_Neuron):
    """Multi-step parametric LIF: ``1 / tau = sigmoid(w)`` with a learnable scalar ``w``.

    ``w`` starts at ``-log(init_tau - 1)`` so that ``tau = init_tau`` (> 1). ``1 / tau`` is
    passed to the neuron as a 0-d tensor in ``w``'s dtype (fp32), so ``w``'s gradient is one
    fp32 sum even for fp16 / bf16 inputs. Other arguments as :class:`LIF` (every backend
    but ``"cpu"``, which takes a fixed tau only, computes ``w``'s gradient). Shapes:
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
        fused: bool | None = None,
        backend: str = AUTO,
    ) -> None:
        super().__init__()
        self._choice = _choice(backend, fused)
        if not init_tau > 1:
            raise ValueError(f"PLIF init_tau must be > 1, got {init_tau!r}")
        self.params = LIFParams(
            init_tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha
        )
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    @property
    def tau(self) -> float:
        """Current time constant ``1 / sigmoid(w)`` (reads ``w`` back to the host)."""
        return float(1.0 / torch.sigmoid(self.w.detach()))

    def forward(self, x: Tensor) -> Tensor:
        inv_tau = torch.sigmoid(self.w)  # 0-d, w's dtype: never read on the host
        out = self._choice.run(x, self.params, inv_tau)
        return mark_spikes(out)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        # init_tau, not the current tau: printing a model must not read a device value.
        return self._describe("init_tau")


def _neurons(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that holds a :class:`BackendChoice` (LIF, PLIF, subclasses,
    and any neuron built on the choice), wrappers (DDP, ``torch.compile``) seen through."""
    return [m for m in model.modules() if isinstance(getattr(m, "_choice", None), BackendChoice)]


def set_backend(model: nn.Module, name: str) -> int:
    """Set the backend of every LIF / PLIF in ``model`` (any module tree holding them) to
    ``name``: ``"auto"``, ``"loop"``, ``"torch"``, ``"triton"`` or ``"cpu"``; an unknown name
    is a ``ValueError`` listing these. What each layer resolved before is dropped. Returns the
    number of layers set (0: the model has none)."""
    check_backend(name)
    layers = _neurons(model)
    for layer in layers:
        layer.backend = name  # type: ignore[attr-defined]
    return len(layers)


def resolved_backends(model: nn.Module) -> dict[str, int]:
    """How many LIF / PLIF layers of ``model`` ran each backend in their latest forward,
    e.g. ``{"cpu": 10, "torch": 2}``; layers that have not run yet count as ``"not run"``."""
    counts = Counter(getattr(m, "resolved_backend", None) or "not run" for m in _neurons(model))
    return dict(sorted(counts.items()))
