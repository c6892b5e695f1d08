"""``reset(model)`` (public as ``dassdp.reset``): clear every piece of per-sequence state a
model holds, and the DA-SSDP records of the forward that just ran.

Our neurons keep their membrane inside one multi-step call, so they hold nothing. Neurons of
third-party libraries are reset through those libraries' own API, when the library is
already imported (it is never imported here):

* snnTorch (``snntorch.SpikingNeuron``: ``Leaky``, ``Synaptic``, ...): ``reset_mem()``,
  which replaces the hidden state by detached zeros. Its ``reset`` attribute is the reset
  *signal* tensor, not a method, so without this an ``init_hidden=True`` net keeps the last
  batch's graph and the next backward fails ("backward through the graph a second time").
* SpikingJelly (``activation_based.base.MemoryModule``): ``reset()``, as
  ``functional.reset_net`` does.

Any other module with a ``reset_state()`` or ``reset()`` method is reset through it, and
DA-SSDP recorders attached to the model drop their buffers too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from dassdp.plasticity.recorder import clear_model_records

__all__ = ["reset"]


def _library_reset(module: nn.Module) -> Callable[[], object] | None:
    """The reset function of a snnTorch / SpikingJelly neuron, or None."""
    snntorch = sys.modules.get("snntorch")
    neuron = getattr(snntorch, "SpikingNeuron", None) if snntorch else None
    if neuron is not None and isinstance(module, neuron):
        return getattr(module, "reset_mem", None)
    jelly = sys.modules.get("spikingjelly.activation_based.base")
    memory = getattr(jelly, "MemoryModule", None) if jelly else None
    if memory is not None and isinstance(module, memory):
        return module.reset
    return None


def reset(model: nn.Module, *, records: bool = True) -> None:
    """Reset neuron states and DA-SSDP recorder buffers of ``model`` (and its submodules).

    ``records=False`` keeps the recorders' buffers (gradient accumulation: the forwards of
    one optimizer step are each a window, all learned from at the next ``step()``)."""
    for module in model.modules():
        fn = _library_reset(module)
        if fn is None:
            fn = next(
                (
                    f
                    for f in (getattr(module, a, None) for a in ("reset_state", "reset"))
                    if callable(f)
                ),
                None,
            )
        if fn is not None:
            fn()
    if records:
        clear_model_records(model)
