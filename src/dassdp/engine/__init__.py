"""Training engine: config (YAML + overrides), builders, the loop, checkpoints, metrics.

Library use::

    from dassdp.engine import fit, load_config
    cfg = load_config("configs/demo.yaml", ["epochs=2"])
    row = fit(cfg, "runs/demo")            # last epoch's metrics row

The command line wraps the same calls: ``dassdp train --config FILE [key=value ...]``.
"""

from dassdp.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resume_config,
    save_checkpoint,
)
from dassdp.engine.config import (
    ConfigError,
    PlasticityConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from dassdp.engine.metrics import read_metrics
from dassdp.engine.seed import get_rng_state, seed_everything, set_rng_state
from dassdp.engine.train import Trainer, evaluate, evaluate_checkpoint, fit

__all__ = [
    "CheckpointError",
    "ConfigError",
    "PlasticityConfig",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "get_rng_state",
    "load_checkpoint",
    "load_config",
    "read_metrics",
    "resume_config",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
