"""Checkpoints: atomic writes, safe loads, clear errors.

A training checkpoint is a dict with ``format``/``version`` and ``model``, ``optimizer``,
``scheduler``, ``scaler``, ``plasticity`` (``DASSDP.state_dict()`` or ``None``), ``rng``
(:func:`dassdp.engine.seed.get_rng_state`), ``loader`` (the data-order generator state),
``epoch`` (epochs completed), ``best_acc1``, ``config`` and ``revision``.

Resume policy: :func:`resume_config` decides which config a resume continues with; only the
keys in :data:`RESUMABLE_CHANGES` may differ from the checkpoint's.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows): a crash mid-write leaves the
previous checkpoint intact, and a failed write (disk full, ``ulimit -f``) is one
:class:`~dassdp._util.io.WriteError` line naming the checkpoint. Loads use
``torch.load(weights_only=True)``, so a checkpoint cannot run code; a truncated or foreign
file is a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dassdp._util.io import write_error
from dassdp.engine.config import (
    ConfigError,
    TrainConfig,
    amp_dtype,
    config_from_dict,
    same_plasticity,
)

__all__ = [
    "FORMAT",
    "RESUMABLE_CHANGES",
    "VERSION",
    "CheckpointError",
    "check_resumable",
    "config_changes",
    "load_checkpoint",
    "load_model_state",
    "resume_config",
    "save_checkpoint",
]

FORMAT = "dassdp-checkpoint"
VERSION = 1
REQUIRED = ("model", "epoch", "config")
# Keys that may differ between a checkpoint's config and the one given with --resume.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "workers",
        "threads",
        "progress",
        "tensorboard",
        "device",
        "data_root",
        "name",
        "pretrained",
        # how fast, not what: float32 results may differ in rounding (see dassdp.engine.train)
        "compile",
        "compile_mode",
        "compile_backend",
        "channels_last",
        "cudnn_benchmark",
        "lif_backend",
    }
)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or is not a dassdp checkpoint; names the file."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save: "unexpected pos" over an OSError
        failure = write_error(err, path)
        if failure is None:
            raise
        raise failure from err
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; not possible (nor needed) on every platform.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors mapped to ``map_location``).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is corrupt, truncated, or not a dassdp checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        others = sorted(p.name for p in path.parent.glob("*.pt") if p != path)
        hint = f"; other checkpoints in {path.parent}: {', '.join(others)}" if others else ""
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is corrupt or truncated "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}){hint}"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dassdp training checkpoint (no '{FORMAT}' tag)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state['version']}; this dassdp reads <= {VERSION}"
        )
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    return state


def load_model_state(model: nn.Module, state: Mapping[str, Any], where: str | os.PathLike) -> None:
    """``model.load_state_dict(state)``, but a mismatch is one :class:`CheckpointError` line
    naming the differing keys (shapes, missing, unexpected), not torch's multi-line error."""
    own = model.state_dict()
    shapes = [
        f"{k} {list(v.shape)} in the checkpoint vs {list(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    parts = shapes
    parts += [f"missing in the checkpoint: {', '.join(missing)}"] if missing else []
    parts += [f"not in the model: {', '.join(unexpected)}"] if unexpected else []
    if parts:
        raise CheckpointError(
            f"{where} does not fit the model built from its config and overrides: "
            + "; ".join(parts)
        )
    model.load_state_dict(state)


def resume_config(saved: dict[str, Any], given: TrainConfig | None) -> TrainConfig:
    """The config to resume with: the checkpoint's, or ``given`` if it differs only in
    :data:`RESUMABLE_CHANGES` (anything else would not continue the same run)."""
    if given is None:
        return config_from_dict(saved)
    bad = config_changes(saved, dataclasses.asdict(given))
    if bad:
        raise ConfigError(
            f"--resume: the config differs from the checkpoint's in {describe_changes(bad)}; "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change (or start a new run folder)"
        )
    return given


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key outside :data:`RESUMABLE_CHANGES` where
    two plain-data configs differ, sorted by key: empty when ``new`` continues the run of
    ``saved``. A key ``saved`` lacks (added to the config since) counts as its default."""
    old = {**_defaults(), **saved}
    keys = sorted(set(old) | set(new))
    return [
        (k, old.get(k), new.get(k))
        for k in keys
        if k not in RESUMABLE_CHANGES and not _same(k, old.get(k), new.get(k))
    ]


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """``"seed: 0 -> 1, lr: 0.1 -> 0.2"`` for :func:`config_changes` (``limit`` keys, then
    ``...``)."""
    text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:limit])
    return text + (" ..." if len(changes) > limit else "")


# What a checkpoint needs beyond REQUIRED to continue a run exactly (a weights-only file
# lacks them); `scaler` and `plasticity` may be None but must be there.
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "plasticity", "rng", "loader", "best_acc1")


def check_resumable(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when ``state`` (from
    :func:`load_checkpoint`) lacks what ``--resume`` restores (optimizer, scheduler, RNG
    states ...): checked before a resume writes anything."""
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{path} cannot be resumed: it lacks {', '.join(missing)} (a checkpoint written "
            "by dassdp train after an epoch holds them); evaluate it with dassdp eval, or "
            f"start a new run from its weights with pretrained={path}"
        )


def _defaults() -> dict[str, Any]:
    """The default value of every :class:`TrainConfig` field (``None`` if it has none)."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def _same(key: str, old: Any, new: Any) -> bool:
    """Equal config values; ``amp: true`` and ``amp: fp16`` are the same setting, and so are
    two ``plasticity`` blocks that configure the same learner (:func:`same_plasticity`)."""
    if key == "plasticity":
        return same_plasticity(old, new)
    if key == "amp":
        try:
            return amp_dtype(old) == amp_dtype(new)
        except ConfigError:
            return False
    return old == new
