"""Spiking neurons: multi-step LIF / PLIF over time-major ``[T, B, ...]`` tensors.

The math is in :mod:`dassdp.neurons.functional` (pure functions), the surrogate gradients
in :mod:`dassdp.neurons.surrogate`, and :class:`LIF` / :class:`PLIF` are module shells.
"""

from dassdp.neurons.functional import (
    LIFParams,
    fused_supported,
    lif_multistep,
    lif_multistep_fused,
    lif_multistep_loop,
    lif_step,
)
from dassdp.neurons.modules import LIF, PLIF
from dassdp.neurons.surrogate import SURROGATES, atan_spike, get_surrogate, sigmoid_spike

__all__ = [
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
    "lif_step",
    "sigmoid_spike",
]
