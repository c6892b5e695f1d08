"""Spiking neurons: multi-step LIF / PLIF over time-major ``[T, B, ...]`` tensors.

Where things live:

* :mod:`dassdp.neurons.lif`: the math (equations, :class:`LIFParams`, :func:`lif_step`, the
  autograd reference :func:`lif_multistep_loop`); :mod:`dassdp.neurons.surrogate`: the
  surrogate gradients.
* :mod:`dassdp.neurons.backends`: one file per implementation (``loop``, ``torch``,
  ``triton``, ``cpu``) behind a registry (``register``, ``resolve``, ``available``), and
  :func:`lif_multistep`, which runs one; :mod:`dassdp._util.native` builds, caches and
  verifies the C library of the ``cpu`` backend.
* :mod:`dassdp.neurons.modules`: :class:`LIF` / :class:`PLIF`, module shells that resolve
  their backend once per kind of call, and :func:`set_backend` / :func:`resolved_backends`
  for a whole model.
* :mod:`dassdp.neurons.saving`: lets autograd save spikes as ``bool``.

``dassdp.neurons.functional`` is kept for older imports (it re-exports the functions above).
"""

from dassdp.neurons.backends import (
    BACKENDS,
    available,
    lif_multistep,
    register,
    resolve,
    resolve_backend,
)
from dassdp.neurons.backends.cpu import lif_multistep_cpu
from dassdp.neurons.backends.torch_fused import fused_supported, lif_multistep_fused
from dassdp.neurons.backends.triton import lif_multistep_triton, triton_available
from dassdp.neurons.lif import LIFParams, lif_multistep_loop, lif_step
from dassdp.neurons.modules import LIF, PLIF, resolved_backends, set_backend
from dassdp.neurons.saving import is_marked_spikes, mark_spikes, observe_saved, spike_saving
from dassdp.neurons.surrogate import SURROGATES, atan_spike, get_surrogate, sigmoid_spike

__all__ = [
    "BACKENDS",
    "LIF",
    "PLIF",
    "SURROGATES",
    "LIFParams",
    "atan_spike",
    "available",
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
    "register",
    "resolve",
    "resolve_backend",
    "resolved_backends",
    "set_backend",
    "sigmoid_spike",
    "spike_saving",
    "triton_available",
]
