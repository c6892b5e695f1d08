"""Spiking neurons: multi-step LIF / PLIF over time-major ``[T, B, ...]`` tensors.

The math is in :mod:`dassdp.neurons.functional` (pure functions), the surrogate gradients
in :mod:`dassdp.neurons.surrogate`, the one-kernel Triton LIF in
:mod:`dassdp.neurons.triton_lif` and the compiled C LIF for the CPU in
:mod:`dassdp.neurons.cpu_lif` (both imported only when used), and :class:`LIF` / :class:`PLIF`
are module shells; :mod:`dassdp.neurons.saving` lets autograd save spikes as ``bool``.
"""

from dassdp.neurons.functional import (
    BACKENDS,
    LIFParams,
    fused_supported,
    lif_multistep,
    lif_multistep_cpu,
    lif_multistep_fused,
    lif_multistep_loop,
    lif_multistep_triton,
    lif_step,
    resolve_backend,
    triton_available,
)
from dassdp.neurons.modules import LIF, PLIF
from dassdp.neurons.saving import is_marked_spikes, mark_spikes, observe_saved, spike_saving
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
    "is_marked_spikes",
    "lif_multistep",
    "lif_multistep_cpu",
    "lif_multistep_fused",
    "lif_multistep_loop",
    "lif_multistep_triton",
    "lif_step",
    "mark_spikes",
    "observe_saved",
    "resolve_backend",
    "sigmoid_spike",
    "spike_saving",
    "triton_available",
]
