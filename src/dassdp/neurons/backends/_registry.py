"""The backend registry: names -> :class:`Backend`, the ``"auto"`` order, and the per-layer
choice that resolves a layer's backend once per kind of call (:class:`BackendChoice`).

A backend is one way to run the multi-step LIF of :mod:`dassdp.neurons.lif`. It says, from a
:class:`Call` (what a choice may depend on: device, dtype, parameters, the kind of ``inv_tau``,
neurons per sample; no tensor), whether it can run that call when asked by name
(:attr:`Backend.check` raises the error a user sees) and whether ``"auto"`` should take it
(:attr:`Backend.pick`). ``"auto"`` tries the backends in :attr:`Backend.auto_rank` order; the
loop, which runs everything, comes last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dassdp.neurons.lif import LIFParams, check_time_major

__all__ = [
    "AUTO",
    "Backend",
    "BackendChoice",
    "Call",
    "available",
    "backend_names",
    "check_backend",
    "get",
    "register",
    "resolve",
    "resolve_for",
]

AUTO = "auto"

Output = Tensor | tuple[Tensor, Tensor]


class Call(NamedTuple):
    """What a backend choice depends on, taken from one call (hashable, no tensor).

    Attributes:
        device, dtype: of ``x``.
        params: the neuron's :class:`~dassdp.neurons.lif.LIFParams`.
        k_type: ``type(inv_tau).__name__`` (``"NoneType"``, ``"float"``, ``"Tensor"``, ...).
        k_numel: elements of a tensor ``inv_tau`` (1 for a number or ``None``).
        k_device: device of a tensor ``inv_tau``, else ``None``.
        return_membrane: whether the membranes are returned too.
        empty: ``x`` has no elements.
        per_sample: neurons per sample and time step (``x[0, 0].numel()``; ``x[0].numel()``
            for ``[T, N]``).
        compiling: ``torch.compile`` is tracing the call; sizes may then be symbolic, so
            ``empty`` is ``False`` and ``per_sample`` 0 (no backend that depends on them runs
            inside a compiled graph).
    """

    device: torch.device
    dtype: torch.dtype
    params: LIFParams
    k_type: str
    k_numel: int
    k_device: torch.device | None
    return_membrane: bool
    empty: bool
    per_sample: int
    compiling: bool

    @classmethod
    def of(
        cls, x: Tensor, params: LIFParams, inv_tau: Tensor | float | None, return_membrane: bool
    ) -> Call:
        """The :class:`Call` of ``x`` ``[T, B, ...]`` with these arguments."""
        tensor_k = isinstance(inv_tau, Tensor)
        compiling = torch.compiler.is_compiling()
        if compiling:  # sizes may be symbolic (a dynamic batch): not part of a traced choice
            empty, per_sample = False, 0
        else:
            empty = x.numel() == 0
            per_sample = math.prod(x.shape[2:]) if x.dim() >= 2 else math.prod(x.shape[1:])
        return cls(
            x.device,
            x.dtype,
            params,
            type(inv_tau).__name__,
            inv_tau.numel() if tensor_k else 1,  # type: ignore[union-attr]
            inv_tau.device if tensor_k else None,  # type: ignore[union-attr]
            bool(return_membrane),
            empty,
            per_sample,
            compiling,
        )

    @property
    def k_is_tensor(self) -> bool:
        """``inv_tau`` is a tensor (PLIF's learnable ``1 / tau``, or a broadcast one)."""
        return self.k_type == "Tensor"


def _never_unready() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One LIF implementation in the registry.

    Attributes:
        name: what ``backend=`` and ``set_backend`` call it.
        run: ``run(x, params, inv_tau, return_membrane)``; assumes :attr:`check` passed.
        check: ``check(call)`` raises ``ValueError`` (a call it cannot run) or
            ``RuntimeError`` (it cannot run here: package, compiler, device) with the reason.
        pick: ``pick(call)``: whether ``"auto"`` runs this backend for the call (may warn once
            and say no when it turns out unusable here).
        auto_rank: ``"auto"`` asks backends in increasing rank.
        size_class: ``size_class(per_sample)``: what of the call's size its choice depends on
            (part of the per-layer cache key), or ``None``.
        unready: ``unready()``: why it cannot run on this machine at all, or ``None``.
    """

    name: str
    run: Callable[[Tensor, LIFParams, Tensor | float | None, bool], Output]
    check: Callable[[Call], None]
    pick: Callable[[Call], bool]
    auto_rank: int
    size_class: Callable[[int], Hashable] | None = None
    unready: Callable[[], str | None] = _never_unready


_BACKENDS: dict[str, Backend] = {}
_AUTO_ORDER: list[Backend] = []


def register(backend: Backend) -> Backend:
    """Add ``backend`` (or replace the one of that name); returns it."""
    if backend.name == AUTO:
        raise ValueError(f"{AUTO!r} is the automatic choice, not a backend name")
    _BACKENDS[backend.name] = backend
    _AUTO_ORDER[:] = sorted(_BACKENDS.values(), key=lambda b: b.auto_rank)  # stable
    return backend


def backend_names() -> tuple[str, ...]:
    """``"auto"`` and every registered backend, in registration order."""
    return (AUTO, *_BACKENDS)


def check_backend(name: str) -> str:
    """Return ``name`` if it is ``"auto"`` or a registered backend, else raise a ``ValueError``
    listing the allowed names."""
    if name != AUTO and name not in _BACKENDS:
        raise ValueError(f"unknown LIF backend {name!r}; choose one of {list(backend_names())}")
    return name


def get(name: str) -> Backend:
    """The registered backend ``name`` (``ValueError`` listing the names if unknown)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown LIF backend {name!r}; choose one of {list(_BACKENDS)}")
    return _BACKENDS[name]


def available() -> tuple[str, ...]:
    """The registered backends that can run on this machine (``"loop"`` and ``"torch"``
    always; ``"cpu"`` with a working C compiler; ``"triton"`` with a usable Triton and a
    CUDA device, or Triton's interpreter)."""
    return tuple(name for name, b in _BACKENDS.items() if b.unready() is None)


def resolve(name: str, call: Call) -> Backend:
    """The backend that runs ``call`` when ``name`` is asked for: ``"auto"`` takes the first
    backend (by rank) that picks the call; a name is checked against the call (its
    ``check`` raises what it cannot do)."""
    if check_backend(name) == AUTO:
        for backend in _AUTO_ORDER:
            if backend.pick(call):
                return backend
        raise RuntimeError(f"no LIF backend picks {call}")  # the loop picks every call
    backend = _BACKENDS[name]
    backend.check(call)
    return backend


def _size_key(call: Call) -> tuple[Hashable, ...]:
    return tuple(b.size_class(call.per_sample) for b in _AUTO_ORDER if b.size_class is not None)


def cache_key(call: Call) -> tuple[Hashable, ...]:
    """What a layer's cached choice is keyed by: the call without its exact size, plus each
    backend's size class of it."""
    return (*call[:7], call.empty, _size_key(call))


@torch.compiler.assume_constant_result  # run once while torch.compile traces, not traced
def _resolve_fields(name: str, *fields: Any) -> str:
    return resolve(name, Call(*fields)).name


def _resolve_constant(name: str, call: Call) -> str:
    """:func:`resolve` made eagerly while ``torch.compile`` traces (the fields go one by one:
    dynamo passes plain values, and the parameters by identity, to a constant function)."""
    return _resolve_fields(name, *call)


def resolve_for(
    name: str, x: Tensor, params: LIFParams, inv_tau: Tensor | float | None, return_membrane: bool
) -> Backend:
    """:func:`resolve` for this call. While ``torch.compile`` traces, the choice (including
    any self-check it runs) is made eagerly, once, and the traced graph keeps its result."""
    call = Call.of(x, params, inv_tau, return_membrane)
    if call.compiling:
        return _BACKENDS[_resolve_constant(name, call)]
    return resolve(name, call)


class BackendChoice:
    """A layer's backend: the name asked for, and what it resolved to per kind of call.

    :meth:`run` resolves the backend on the first call of each :func:`cache_key` (device,
    dtype, parameters, kind of ``inv_tau``, returned membrane, size class) and reuses it after,
    so the checks, environment reads and self-checks behind a choice happen once per layer,
    not once per call. :attr:`last` is the backend the latest call ran (``None`` before the
    first). The cache is not pickled or copied: a copied model resolves again where it runs.
    """

    def __init__(self, name: str = AUTO) -> None:
        self.name = check_backend(name)
        self.last: str | None = None
        self._cache: dict[tuple[Hashable, ...], Backend] = {}

    def run(
        self,
        x: Tensor,
        params: LIFParams,
        inv_tau: Tensor | float | None = None,
        return_membrane: bool = False,
    ) -> Output:
        """Run the multi-step LIF on ``x`` ``[T, B, ...]`` with this layer's backend."""
        check_time_major(x)
        call = Call.of(x, params, inv_tau, return_membrane)
        if call.compiling:  # the traced graph fixes the choice: no cache to consult
            backend = _BACKENDS[_resolve_constant(self.name, call)]
        else:
            key = cache_key(call)
            backend = self._cache.get(key)  # type: ignore[assignment]
            if backend is None:
                backend = self._cache[key] = resolve(self.name, call)
        self.last = backend.name
        return backend.run(x, params, inv_tau, return_membrane)

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "last": self.last}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])  # type: ignore[misc]
        self.last = state.get("last")

    def __repr__(self) -> str:
        return f"BackendChoice({self.name!r}, last={self.last!r})"
