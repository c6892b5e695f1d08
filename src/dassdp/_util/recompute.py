"""Whether a forward is an activation-checkpointing recomputation (not a new forward).

:func:`dassdp.models.layers.checkpointed` recomputes a checkpointed stage's forward inside
the backward; forward hooks that record activity (the DA-SSDP recorder, the engine's
firing rates) check :func:`is_recomputing` and skip, so nothing is recorded twice.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["is_recomputing", "recomputing"]

_STATE = threading.local()  # autograd may run a backward on another thread


def is_recomputing() -> bool:
    """True inside :func:`recomputing` on this thread."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark the forwards run in this context (on this thread) as recomputations."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1
