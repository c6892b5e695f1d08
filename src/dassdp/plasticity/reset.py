"""``reset(model)`` (public as ``dassdp.reset``): end the sequence a model just ran: reset its
neurons' state and close the DA-SSDP recording windows of that forward.

Only neuron state of known kinds is reset, never any other module that happens to have a
``reset()`` method (a metric inside the model keeps its state):

* ours hold none: our neurons keep their membrane inside one multi-step call;
* snnTorch (``snntorch.SpikingNeuron``: ``Leaky``, ``Synaptic``, ``RLeaky``, ...):
  ``reset_mem()``, which replaces the hidden state by detached zeros. Its ``reset``
  attribute is the reset *signal* tensor, not a method, so without this an
  ``init_hidden=True`` net keeps the last batch's graph and the next backward fails
  ("backward through the graph a second time");
* SpikingJelly (``activation_based.base.MemoryModule``): ``reset()``, as
  ``functional.reset_net`` does;
* a module whose class defines ``dassdp_reset()`` (the hook for neurons you write);
* a kind registered with :func:`register_reset` (for neuron classes you cannot edit)::

      dassdp.register_reset(MyNeuron)                    # calls module.reset()
      dassdp.register_reset(MyNeuron, "clear_state")     # another method
      dassdp.register_reset(MyNeuron, lambda m: m.v.zero_())
      dassdp.register_reset(MyMetric, None)              # never reset (silences the warning)

  A registration wins over the built-in kinds, the most specific registered class first.

A module of no known kind with a ``reset()`` or ``reset_state()`` method is left alone, with
a warning once per class naming it and how to register it (it may be a neuron of an unknown
library; it may be a metric). The libraries are never imported here: a kind counts only once
its library is.

Records: the learner's records of the forwards since its last ``step()`` are *kept* (the
window is closed, so the next forward opens a new one), because ``step()`` consumes them:
with gradient accumulation, ``reset`` after every micro-batch and ``step()`` every k-th
learns from all k forwards (the mean of their ``dW``), and ``reset`` before ``step()`` loses
nothing. ``records=True`` drops them (a forward that must not be learned from).
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable

from torch import nn

from dassdp.plasticity.recorder import clear_model_records, end_model_sequence
from dassdp.plasticity.sites import DASSDPWarning

__all__ = ["ResetRegistration", "register_reset", "reset"]

ResetFn = Callable[[nn.Module], object]
_REGISTRY: dict[type, ResetFn | None] = {}
_LOCK = threading.Lock()
_WARNED: set[type] = set()
_GENERIC = ("reset_state", "reset")  # methods that do not say what they reset


class ResetRegistration:
    """What :func:`register_reset` returns; :meth:`remove` undoes the registration."""

    def __init__(self, kind: type, previous: tuple[bool, ResetFn | None]) -> None:
        self.kind, self._previous = kind, previous

    def remove(self) -> None:
        """Restore what was registered for the kind before (or nothing)."""
        had, fn = self._previous
        with _LOCK:
            if had:
                _REGISTRY[self.kind] = fn
            else:
                _REGISTRY.pop(self.kind, None)


def register_reset(
    kind: type[nn.Module], reset: str | ResetFn | None = "reset"
) -> ResetRegistration:
    """Make :func:`reset` reset every module of class ``kind`` (and its subclasses).

    Args:
        kind: the neuron class.
        reset: the name of a method to call (default ``"reset"``), a function called with the
            module, or ``None``: never reset modules of this kind (also not as a snnTorch or
            SpikingJelly neuron), and no warning about their ``reset()`` method.

    Returns:
        A :class:`ResetRegistration`; its ``remove()`` undoes this registration.
    """
    if not isinstance(kind, type) or not issubclass(kind, nn.Module):
        raise TypeError(f"register_reset: kind must be an nn.Module class, got {kind!r}")
    if isinstance(reset, str):
        name = reset
        if not callable(getattr(kind, name, None)):
            raise ValueError(f"register_reset: {kind.__name__} has no method {name!r}")
        fn: ResetFn | None = lambda module: getattr(module, name)()  # noqa: E731
    elif reset is None or callable(reset):
        fn = reset
    else:
        raise TypeError(
            f"register_reset: reset must be a method name, a function of the module or None, "
            f"got {type(reset).__name__}"
        )
    with _LOCK:
        previous = (kind in _REGISTRY, _REGISTRY.get(kind))
        _REGISTRY[kind] = fn
    return ResetRegistration(kind, previous)


def _registered(module: nn.Module) -> tuple[bool, ResetFn | None]:
    """``(True, fn)`` when the module's class or a base class is registered (most specific)."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return True, _REGISTRY[cls]
    return False, None


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


def neuron_reset(module: nn.Module) -> Callable[[], object] | None:
    """How :func:`reset` resets ``module`` (a function of no argument), or None."""
    registered, fn = _registered(module)
    if registered:
        return None if fn is None else (lambda: fn(module))
    library = _library_reset(module)
    if library is not None:
        return library
    own = getattr(module, "dassdp_reset", None)
    if callable(own):
        return own
    _warn_unknown(module)
    return None


def _warn_unknown(module: nn.Module) -> None:
    cls = type(module)
    method = next((m for m in _GENERIC if callable(getattr(module, m, None))), None)
    if method is None or cls in _WARNED:
        return
    _WARNED.add(cls)
    warnings.warn(
        f"dassdp.reset: {cls.__module__}.{cls.__qualname__} has a {method}() method but is "
        "not a known neuron kind (snnTorch, SpikingJelly, or a class with dassdp_reset()), so "
        "it is not reset; if it holds neuron state, dassdp.register_reset("
        f"{cls.__qualname__}, {method!r}); if not (a metric), dassdp.register_reset("
        f"{cls.__qualname__}, None) silences this",
        DASSDPWarning,
        stacklevel=3,
    )


def reset(model: nn.Module, *, records: bool = False) -> None:
    """Reset the neuron state of ``model``'s modules of known kinds (module docstring) and
    close the DA-SSDP recording windows of the forward that just ran.

    Call it after each sequence (each training forward and its backward, or each micro-batch
    under gradient accumulation), before or after ``plast.step(loss)``.

    Args:
        model: the model (a ``DistributedDataParallel`` or compiled wrapper works too: its
            modules include the wrapped model's).
        records: ``True`` drops the learner's records of the forwards since its last
            ``step()`` instead of keeping them for it.
    """
    for module in model.modules():
        fn = neuron_reset(module)
        if fn is not None:
            fn()
    if records:
        clear_model_records(model)
    else:
        end_model_sequence(model)
