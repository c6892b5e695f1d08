"""``reset(model)``: clear every piece of per-sequence state a model holds.

Our neurons keep their membrane inside one multi-step call, so they hold nothing; modules
that do keep state (a user's stateful neuron, SpikingJelly's ``MemoryModule``) expose
``reset_state()`` or ``reset()``. DA-SSDP recorders attached to the model drop their
buffers too.
"""

from __future__ import annotations

from torch import nn


def reset(model: nn.Module) -> None:
    """Reset neuron states and DA-SSDP recorder buffers of ``model`` (and its submodules)."""
    from dassdp.plasticity.recorder import clear_model_records

    for module in model.modules():
        for attr in ("reset_state", "reset"):
            fn = getattr(module, attr, None)
            if callable(fn):
                fn()
                break
    clear_model_records(model)
