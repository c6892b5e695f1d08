"""Spiking neurons: multi-step LIF / PLIF over time-major ``[T, B, ...]`` tensors.

The math is in :mod:`dassdp.neurons.functional` (pure functions), the surrogate gradients
in :mod:`dassdp.neurons.surrogate`, the one-kernel Triton LIF in
:mod:`dassdp.neurons.triton_lif` (imported only when used), and :class:`LIF` / :class:`PLIF`
are module shells.
"""

from dassdp.neurons.functional import (
    BACKENDS,
    LIFParams,
    fused_supported,
    lif_multistep,
    lif_multistep_fused,
    lif_multistep_loop,
    lif_multistep_triton,
    lif_step,
    resolve_backend,
    triton_available,
)
from dassdp.neurons.modules import LIF, PLIF
from dassdp.neurons.surrogate import SURROGATES, atan_spike, get_surrogate, sigmoid_spike

__all__ = [
    "BACKENDS",
    "LIF",
    "PLIF",
    "SURROGATES",
    "LIFParams",
    "atan_spike",
    "fused_supported",
    "get_surrogate",
    "lif_multistep",
    "lif_multistep_fused",
    "lif_multistep_loop",
    "lif_multistep_triton",
    "lif_step",
    "resolve_backend",
    "sigmoid_spike",
    "triton_available",
]
