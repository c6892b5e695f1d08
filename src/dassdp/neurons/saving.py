"""Spike-aware saved tensors: autograd keeps spike tensors as ``bool``, not as floats.

A spike tensor holds only 0 and 1. When one feeds a conv, a linear layer or a matmul,
autograd saves it for the weight gradient in the input's float dtype (4 bytes per element in
fp32). Under :func:`spike_saving` every saved tensor goes through a
:func:`torch.autograd.graph.saved_tensors_hooks` pack hook that stores a *marked* spike
tensor as ``bool`` (1 byte per element) and rebuilds the float tensor, with the same
shape, strides and values, when the backward needs it. Converting {0, 1} to ``bool`` and
back is exact, so every gradient is bit-identical with and without it.

Which tensors are spikes is never guessed from their values (no scan): the neuron modules
call :func:`mark_spikes` on their outputs (:class:`dassdp.neurons.LIF` / ``PLIF``), and so
may a model on a tensor it knows to be 0/1 (a max pool of spikes). A saved tensor is packed
when it, or the tensor it is a view of, is marked and has not been modified in place since
(its version counter is unchanged); anything else is saved as it is. A neuron that already
holds its spikes as ``bool`` (the fused LIF's spike mask) hands them over with
:func:`attach_spike_bits`: then a saved spike tensor, or a contiguous view of it, is kept as
a view of that mask (no conversion, and every view saved shares one mask) instead of a new
``bool`` copy.

:func:`observe_saved` reports every saved tensor with the bytes it would take and the bytes
it takes (tests and ``dassdp bench train-step`` measure the saving with it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "attach_spike_bits",
    "is_marked_spikes",
    "mark_spikes",
    "observe_saved",
    "spike_saving",
]

_MARK = "_dassdp_spikes_version"  # attribute on a marked tensor: its version when marked
_BITS = "_dassdp_spike_bits"  # attribute: the same values as a bool tensor, same strides

# Callbacks (tensor, its bytes, the bytes actually kept) told about every saved tensor.
_OBSERVERS: list[Callable[[Tensor, int, int], None]] = []


def mark_spikes(t: Tensor) -> Tensor:
    """Mark ``t`` (values in {0, 1}) as spikes so that :func:`spike_saving` may save it, and
    every view of it, as ``bool``; returns ``t``. The mark lapses if ``t`` is later modified
    in place. Only a tensor that owns its memory is marked: a view (``t._base`` set) is left
    unmarked, since its base may hold other values (mark the tensor it is a view of)."""
    if t._base is None and not torch.compiler.is_compiling():
        setattr(t, _MARK, t._version)
    return t


def attach_spike_bits(t: Tensor, bits: Tensor) -> None:
    """Give ``t`` (values in {0, 1}, owning its memory) its values as the ``bool`` tensor
    ``bits`` (same shape and strides; the caller guarantees equal values), for
    :func:`spike_saving` to keep instead of converting ``t``. Used only while ``t`` is marked
    and unmodified (:func:`mark_spikes`); ignored if the layouts differ."""
    if torch.compiler.is_compiling():  # a traced graph plans its own saved tensors
        return
    if (
        t._base is None
        and bits.dtype == torch.bool
        and bits.shape == t.shape
        and bits.stride() == t.stride()
        and bits.storage_offset() == t.storage_offset() == 0
    ):
        setattr(t, _BITS, bits)


def _bits_of(t: Tensor) -> Tensor | None:
    """The attached ``bool`` values of ``t`` as a view with ``t``'s geometry, if ``t`` (or
    its base) has them and ``t`` is contiguous or the base itself (so that rebuilding the
    float tensor with ``.to`` gives ``t``'s strides back)."""
    base = t._base if t._base is not None else t
    bits = getattr(base, _BITS, None)
    if bits is None or not (t is base or t.is_contiguous()):
        return None
    return bits.as_strided(t.shape, t.stride(), t.storage_offset())


def is_marked_spikes(t: Tensor) -> bool:
    """Whether ``t`` or its base is marked by :func:`mark_spikes` and unmodified since."""
    base = t._base if t._base is not None else t
    mark = getattr(base, _MARK, None)
    return mark is not None and mark == base._version


class _PackedSpikes:
    """A saved spike tensor kept as ``bool`` with the dtype to rebuild."""

    __slots__ = ("bits", "dtype")

    def __init__(self, bits: Tensor, dtype: torch.dtype) -> None:
        self.bits, self.dtype = bits, dtype


def _pack(t: Tensor) -> Any:
    kept: Any = t.detach()  # detach: no reference from the graph back to itself
    if t.is_floating_point() and is_marked_spikes(t):
        bits = _bits_of(t)
        if bits is None:
            bits = t.detach().to(torch.bool)
        if bits.stride() == t.stride():  # dense layouts keep their strides; others stay float
            kept = _PackedSpikes(bits, t.dtype)
    if _OBSERVERS:
        stored = kept.bits.nbytes if isinstance(kept, _PackedSpikes) else t.nbytes
        for fn in _OBSERVERS:
            fn(t, t.nbytes, stored)
    return kept


def _unpack(kept: Any) -> Tensor:
    if isinstance(kept, _PackedSpikes):
        return kept.bits.to(kept.dtype)
    return kept  # type: ignore[no-any-return]


@contextlib.contextmanager
def spike_saving(enabled: bool = True) -> Iterator[None]:
    """Within this context autograd saves marked spike tensors as ``bool`` (see the module
    docstring). With ``enabled=False``, with grad disabled, or while ``torch.compile``
    traces (the compiled graph plans its own saved tensors) nothing changes."""
    if not enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


@contextlib.contextmanager
def observe_saved(fn: Callable[[Tensor, int, int], None]) -> Iterator[None]:
    """Call ``fn(tensor, nbytes, stored_nbytes)`` for every tensor that autograd saves
    within this context: ``stored_nbytes`` is what is kept (less for a packed spike tensor).

    Saved tensors are seen through :func:`spike_saving`'s hook, so the context installs
    that hook with packing off (a model's own ``spike_saving`` context inside still packs).
    """
    _OBSERVERS.append(fn)
    try:
        with torch.autograd.graph.saved_tensors_hooks(_observe_only, _unpack):
            yield
    finally:
        _OBSERVERS.remove(fn)


def _observe_only(t: Tensor) -> Any:
    for fn in _OBSERVERS:
        fn(t, t.nbytes, t.nbytes)
    return t.detach()
