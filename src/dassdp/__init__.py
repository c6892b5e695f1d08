"""dassdp: DA-SSDP (dopamine-modulated spike-synchrony-dependent plasticity) for PyTorch SNNs.

Public API (imported lazily so that ``import dassdp`` stays cheap)::

    DASSDP, DASSDPConfig, SiteSpec          the plasticity learner, its config, site declarations
    DASSDPWarning                            warned (once) for a probable misuse of the learner
    create_model, list_models, register_model   the model registry
    reset                                    clear neuron states and recorder buffers of a model
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "DASSDP": "dassdp.plasticity.learner",
    "DASSDPConfig": "dassdp.plasticity.config",
    "SiteSpec": "dassdp.plasticity.sites",
    "DASSDPWarning": "dassdp.plasticity.sites",
    "reset": "dassdp.plasticity.reset",
    "create_model": "dassdp.models.registry",
    "list_models": "dassdp.models.registry",
    "register_model": "dassdp.models.registry",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dassdp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
