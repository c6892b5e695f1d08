"""Older import path of the LIF functions, kept so that existing code keeps working.

The math is in :mod:`dassdp.neurons.lif`, the implementations and the dispatch in
:mod:`dassdp.neurons.backends`; import from there (or from :mod:`dassdp.neurons`).
"""

from dassdp.neurons.backends import BACKENDS, check_backend, lif_multistep, resolve_backend
from dassdp.neurons.backends.cpu import lif_multistep_cpu
from dassdp.neurons.backends.torch_fused import fused_supported, lif_multistep_fused
from dassdp.neurons.backends.triton import lif_multistep_triton, triton_available
from dassdp.neurons.lif import LIFParams, lif_multistep_loop, lif_step

__all__ = [
    "BACKENDS",
    "LIFParams",
    "check_backend",
    "fused_supported",
    "lif_multistep",
    "lif_multistep_cpu",
    "lif_multistep_fused",
    "lif_multistep_loop",
    "lif_multistep_triton",
    "lif_step",
    "resolve_backend",
    "triton_available",
]
