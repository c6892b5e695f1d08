"""Whether a forward is an activation-checkpointing recomputation (not a new forward).

:func:`dassdp.models.layers.checkpointed` recomputes a checkpointed stage's forward inside
the backward; forward hooks that record activity (the DA-SSDP recorder, the engine's
firing rates) check :func:`is_recomputing` and skip, so nothing is recorded twice.

Any other activation checkpointing (``torch.utils.checkpoint`` with ``use_reentrant`` true or
false, around layers of a user's model) recomputes inside the backward too: a forward that
runs while the autograd engine executes a backward (:func:`in_backward`) is a recomputation
as well, whoever checkpointed it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["in_backward", "is_recomputing", "recomputing"]

_STATE = threading.local()  # autograd may run a backward on another thread


def is_recomputing() -> bool:
    """True inside :func:`recomputing` on this thread, or inside a backward
    (:func:`in_backward`)."""
    return getattr(_STATE, "depth", 0) > 0 or in_backward()


def in_backward() -> bool:
    """True while the autograd engine runs a backward on this thread (a forward run now is a
    checkpoint's recomputation). False while ``torch.compile`` traces (the check is a host
    call it cannot trace; a compiled forward is recomputed by the compiled backward, which
    runs no forward hook)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark the forwards run in this context (on this thread) as recomputations."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1
