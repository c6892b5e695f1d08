"""Model registry (timm style): ``@register_model`` on a 3-line entry function.

``create_model("spikingresformer_cifar", num_classes=10, T=4)`` builds a registered model;
``list_models("spikingresformer_*")`` lists names (fnmatch patterns).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_model", "is_model", "list_models", "model_entrypoint", "register_model"]

F = TypeVar("F", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: F | None = None, *, name: str | None = None) -> Any:
    """Register ``fn`` (a function returning an ``nn.Module``) under ``name`` or its own name.

    Usable bare (``@register_model``) or with a name (``@register_model(name="x")``).
    Registering a name twice is an error.
    """

    def wrap(f: F) -> F:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise ValueError(f"model {key!r} is already registered")
        _MODELS[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def _ensure_builtin() -> None:
    # The built-in models register themselves on import of dassdp.models.
    import dassdp.models  # noqa: F401


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by an fnmatch pattern."""
    _ensure_builtin()
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    _ensure_builtin()
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The entry function of ``name``; an unknown name is a ``ValueError`` naming close matches."""
    _ensure_builtin()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (known: {', '.join(sorted(_MODELS))})")
    return _MODELS[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with its constructor keyword arguments."""
    return model_entrypoint(name)(**kwargs)
