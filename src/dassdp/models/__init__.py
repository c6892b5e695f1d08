"""Spiking models and their registry.

Importing this package registers the built-in models: ``spiking_cnn`` and the
SpikingResformer family (``spikingresformer_{ti,s,m,l,cifar,dvsg}``).
"""

from dassdp.models import spiking_cnn as _spiking_cnn  # noqa: F401  (registers)
from dassdp.models import spikingresformer as _spikingresformer  # noqa: F401  (registers)
from dassdp.models.registry import (
    create_model,
    is_model,
    list_models,
    model_entrypoint,
    register_model,
)
from dassdp.models.spiking_cnn import SpikingCNN
from dassdp.models.spikingresformer import SpikingResformer

__all__ = [
    "SpikingCNN",
    "SpikingResformer",
    "create_model",
    "is_model",
    "list_models",
    "model_entrypoint",
    "register_model",
]
