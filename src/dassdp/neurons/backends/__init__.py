"""LIF backends: one file per implementation behind a small registry.

=========  ====================================================================================
``loop``   :mod:`~dassdp.neurons.backends.loop`: the step looped through autograd; the
           reference, runs everything (any surrogate, broadcast ``inv_tau``, double backward).
``torch``  :mod:`~dassdp.neurons.backends.torch_fused`: the fused multi-step in torch ops with
           a hand-written backward; any device.
``triton`` :mod:`~dassdp.neurons.backends.triton`: one Triton kernel per direction (CUDA, or
           Triton's interpreter); trusted only after a self-check on the device.
``cpu``    :mod:`~dassdp.neurons.backends.cpu`: one compiled C loop per direction (CPU, fp32 /
           fp64, fixed tau), built with :mod:`dassdp._util.native`.
=========  ====================================================================================

``"auto"`` takes, per call, the first that picks it: ``triton`` for a CUDA input when Triton
is usable and passed its self-check there; ``cpu`` for a CPU layer of at least
``cpu.MIN_NEURONS`` neurons per sample when the C kernels build; ``torch`` for any other call
the fused math supports; else ``loop``. A layer resolves once per kind of call and keeps it
(:class:`BackendChoice`). A new backend is one file defining a :class:`Backend` and one
:func:`register` call here.
"""

from __future__ import annotations

from torch import Tensor

from dassdp.neurons.backends import cpu, loop, torch_fused, triton
from dassdp.neurons.backends._registry import (
    AUTO,
    Backend,
    BackendChoice,
    Call,
    available,
    backend_names,
    check_backend,
    get,
    register,
    resolve,
    resolve_for,
)
from dassdp.neurons.lif import LIFParams, check_time_major

__all__ = [
    "AUTO",
    "BACKENDS",
    "Backend",
    "BackendChoice",
    "Call",
    "available",
    "backend_names",
    "check_backend",
    "get",
    "lif_multistep",
    "register",
    "resolve",
    "resolve_backend",
]

for _module in (loop, torch_fused, triton, cpu):  # the order of BACKENDS
    register(_module.BACKEND)

BACKENDS = backend_names()  # ("auto", "loop", "torch", "triton", "cpu")


def resolve_backend(
    backend: str,
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> str:
    """The backend that :func:`lif_multistep` runs for this call: ``"auto"`` becomes the first
    backend that picks it (module docstring); a name is checked against the call (its error
    if it cannot run it) and returned."""
    check_time_major(x)
    return resolve_for(backend, x, params, inv_tau, return_membrane).name


def lif_multistep(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
    backend: str = AUTO,
    fused: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run LIF over a time-major input ``x`` ``[T, B, ...]`` starting from ``V = 0``.

    Returns the spikes ``[T, B, ...]`` (in {0, 1}, dtype of ``x``), and with
    ``return_membrane`` also the membrane after each step's reset ``[T, B, ...]``.
    ``inv_tau`` overrides ``1 / params.tau`` (a one-element tensor for a learnable time
    constant, which gets its gradient). ``backend``: ``"auto"`` (default), ``"loop"``,
    ``"torch"``, ``"triton"`` or ``"cpu"`` (module docstring); resolved on every call here
    (the neuron modules resolve once per kind of call). ``fused`` is a deprecated alias:
    ``fused=False`` means ``backend="loop"``; ``fused=True`` changes nothing.
    """
    check_time_major(x)
    if fused is False:
        backend = "loop"
    chosen = resolve_for(backend, x, params, inv_tau, return_membrane)
    return chosen.run(x, params, inv_tau, return_membrane)
