"""The run folder: what a run writes about itself, and its safety (one trainer per folder,
a lock file; no resume into another run's folder; a ``run.json`` that keeps every start and
resume).

:func:`write_run_files` writes ``config.yaml`` (the resolved config, the code revision in its
header) and ``run.json`` (:func:`run_metadata`: revision, versions, command line, host,
world size, device, memory allocator, start time; after a resume, the first start's fields
and a ``resumes`` list).

``<run>/.lock`` holds the pid of the process training the folder, under an exclusive
``fcntl.flock``: the kernel releases it when that process dies (even by SIGKILL), so a
stale lock is simply taken over and never needs cleaning up. On platforms without
``fcntl`` (Windows) the folder is not locked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dassdp
from dassdp._util.allocator import active_allocator
from dassdp._util.io import atomic_write_json
from dassdp._util.yamlfile import YAMLInputError, read_yaml_file
from dassdp.engine.checkpoint import config_changes, describe_changes
from dassdp.engine.config import TrainConfig, save_config
from dassdp.engine.metrics import read_metrics

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK",
    "RunFolderError",
    "RunLock",
    "add_to_run_json",
    "check_resume_target",
    "check_run_folder",
    "code_revision",
    "read_json",
    "run_metadata",
    "run_name",
    "with_resume",
    "write_run_files",
]

LOCK = ".lock"


class RunFolderError(ValueError):
    """The run folder cannot be used: another process trains it, or it holds another run."""


class RunLock:
    """An exclusive lock on a run folder (``<run>/.lock`` with the owner's pid).

    Raises :class:`RunFolderError` naming the folder and the pid when a live process
    holds it. ``release()`` (or the process's death) frees it.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(
                f"run folder {self.path.parent} is being trained by pid {owner}; wait for it "
                "to finish, stop it, or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def run_name(run_dir: Path) -> str | None:
    """The ``name`` in a run folder's ``config.yaml`` (None if absent or unreadable)."""
    try:
        data = read_yaml_file(run_dir / "config.yaml")
    except (OSError, YAMLInputError):
        return None
    return data.get("name") if isinstance(data, dict) else None


def check_resume_target(checkpoint: Path, run_dir: Path) -> None:
    """Resuming ``checkpoint`` into ``run_dir`` is allowed when ``run_dir`` is the checkpoint's
    own folder, or empty, or absent; otherwise it would overwrite (and mix metrics with)
    another run, so :class:`RunFolderError` names both runs."""
    own = checkpoint.parent
    if not run_dir.exists() or _same_folder(own, run_dir):
        return
    held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    if not held:
        return
    mine, theirs = run_name(own) or own.name, run_name(run_dir)
    theirs_text = f"run {theirs!r}" if theirs else f"other files ({', '.join(held[:5])})"
    raise RunFolderError(
        f"--resume: {checkpoint} belongs to run {mine!r} in {own}, but "
        f"{run_dir} already holds {theirs_text}; resuming there would overwrite it. Resume "
        f"into {own} (leave out --out), or give an empty or new --out folder"
    )


# What a run writes in its folder (dassdp compare and dassdp eval --out add the last two).
RUN_FILES = (
    "config.yaml",
    "run.json",
    "train.log",
    "metrics.jsonl",
    "tensorboard",
    "last.pt",
    "best.pt",
    "done.json",
    "robustness.json",
)
HEADER = "dassdp train (revision"  # how config.yaml starts when write_run_files wrote it


def check_run_folder(
    run_dir: str | os.PathLike, cfg: TrainConfig, *, resume: bool | str | os.PathLike = False
) -> None:
    """Whether ``cfg`` may train in ``run_dir`` (``resume``: as for :class:`Trainer`); read
    only, so that a refused start writes nothing. Raises :class:`RunFolderError` naming what
    the folder holds unless it is one of:

    * new, or holding none of the files a run writes (:data:`RUN_FILES`);
    * for a new start: what a start of the same run (same config, up to
      :data:`~dassdp.engine.checkpoint.RESUMABLE_CHANGES`) left before its first checkpoint;
    * for ``resume``: the folder of the same run (its ``config.yaml`` agrees with ``cfg``), or
      an empty or new folder for a checkpoint taken from elsewhere.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file, not a folder; give another --out")
    if not run_dir.is_dir():
        return
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not held:
        return
    checkpoint = None if resume in (False, True) else Path(resume)  # type: ignore[arg-type]
    if checkpoint is not None and not _same_folder(checkpoint.parent, run_dir):
        try:  # a checkpoint from elsewhere: as a new start of its run here
            _check_new_start(run_dir, held)
            _check_same_config(run_dir, cfg, resume=False)
        except RunFolderError:
            check_resume_target(checkpoint, run_dir)  # the message names both runs
            raise
        return
    if not resume:
        _check_new_start(run_dir, held)
    elif "metrics.jsonl" in held:  # a resume keeps its rows: they must be readable
        try:
            read_metrics(run_dir)
        except (OSError, ValueError) as err:
            raise RunFolderError(
                f"--resume: {err}; the run's metrics cannot be continued: repair or remove "
                "that line"
            ) from None
    _check_same_config(run_dir, cfg, resume=bool(resume))


def _check_new_start(run_dir: Path, held: list[str]) -> None:
    """A new start may only replace what a start of this run left before its first
    checkpoint: ``config.yaml``, ``run.json``, ``train.log``, an epoch-0 metrics row."""
    if "last.pt" in held:
        raise RunFolderError(
            f"{run_dir} already holds a run (last.pt); pass --resume to continue it "
            "or --out DIR for a new run folder"
        )
    epochs = _metric_epochs(run_dir) if "metrics.jsonl" in held else []
    finished = [n for n in ("best.pt", "done.json", "robustness.json") if n in held]
    if finished or epochs is None or set(epochs) - {0}:  # a row of epoch 0: see Trainer.fit
        rows = "unreadable" if epochs is None else f"{len(epochs)} epoch(s)"
        what = ", ".join(finished + ([f"metrics.jsonl: {rows}"] if "metrics.jsonl" in held else []))
        raise RunFolderError(
            f"{run_dir} holds a run without its last.pt ({what}); it is not trained over: "
            "give another --out, or remove that folder to start afresh"
        )
    if "config.yaml" not in held:
        raise RunFolderError(
            f"{run_dir} holds {', '.join(held)} but no run of dassdp train (no config.yaml); "
            "they are not overwritten: give another --out, or an empty folder"
        )


def _metric_epochs(run_dir: Path) -> list[Any] | None:
    """The distinct epochs of the rows in ``metrics.jsonl`` (None when it cannot be read)."""
    try:
        rows = read_metrics(run_dir)
    except (OSError, ValueError):
        return None
    return list(dict.fromkeys(row.get("epoch") if isinstance(row, dict) else None for row in rows))


def _check_same_config(run_dir: Path, cfg: TrainConfig, resume: bool) -> None:
    """The folder's ``config.yaml`` is the same run as ``cfg``, or a leftover of ours that
    cannot be read (a start stopped while writing it); a file dassdp did not write, or
    another run's config, is refused (``resume``: ``cfg`` is a checkpoint's run)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    saved = _run_config(path)
    if saved is None:
        if _has_header(path):
            return  # ours, unreadable: what a start killed while writing it may leave
        raise RunFolderError(
            f"{path} was not written by dassdp train (a file of yours?); it is not "
            "overwritten: give another --out, or move that file"
        )
    changes = config_changes(saved, dataclasses.asdict(cfg))
    if not changes:
        return
    name = saved.get("name", run_dir.name)
    if resume:
        raise RunFolderError(
            f"--resume: the checkpoint is not of the run in {run_dir}: its config differs "
            f"from {path} in {describe_changes(changes)}; resuming would mix two runs in one "
            "folder (metrics.jsonl, best.pt): resume it into a new --out folder"
        )
    raise RunFolderError(
        f"{run_dir} holds run {name!r} with another config ({describe_changes(changes)}); "
        "it is not trained over: give another --out, or continue it with --resume"
    )


def _run_config(path: Path) -> dict[str, Any] | None:
    """A run folder's ``config.yaml`` as a mapping of :class:`TrainConfig` keys (``model``
    among them), or None for anything else (unreadable, not YAML, not a config)."""
    try:
        data = read_yaml_file(path)
    except (OSError, YAMLInputError):
        return None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(data, dict) or "model" not in data or not set(data) <= fields:
        return None
    return data


def _has_header(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(HEADER) + 2).decode("utf-8", "replace") == f"# {HEADER}"
    except OSError:
        return False


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def with_resume(previous: dict[str, Any] | None, entry: dict[str, Any]) -> dict[str, Any]:
    """``run.json`` after a resume: the first start's fields kept, ``entry`` (this resume's
    revision, command line, host, time, checkpoint) appended to ``resumes``."""
    if not isinstance(previous, dict):  # resumed into a new folder: this start is the resume
        return {**entry, "resumes": [entry]}
    history = previous.get("resumes")
    return {**previous, "resumes": [*(history if isinstance(history, list) else []), entry]}


def code_revision() -> str | None:
    """``git describe --always --dirty`` of the dassdp source tree, or None outside git."""
    src = Path(dassdp.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "describe", "--always", "--dirty", "--tags"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def read_json(path: Path) -> Any:
    """A JSON file's contents, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_metadata(revision: str | None, world_size: int, device: str) -> dict[str, Any]:
    """The ``run.json`` entry of one start: code ``revision``, dassdp / torch / Python
    versions, host, command line, ``world_size``, ``device``, the memory allocator this
    process runs with (as the ``dassdp`` command installed it) and the start time."""
    return {
        "revision": revision,
        "dassdp": dassdp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "argv": sys.argv,
        "world_size": world_size,
        "device": device,
        "allocator": active_allocator(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_run_files(
    run_dir: Path,
    cfg: TrainConfig,
    *,
    world_size: int,
    device: str,
    resumed_from: Path | None = None,
) -> None:
    """Write ``run_dir/config.yaml`` and ``run_dir/run.json`` for a start of ``cfg``
    (``resumed_from``: the checkpoint a resume continues; the history is kept, see
    :func:`with_resume`)."""
    revision = code_revision()
    header = f"dassdp train (revision {revision or 'unknown'}): resolved config"
    save_config(cfg, run_dir / "config.yaml", header=header)
    meta = run_metadata(revision, world_size, device)
    if resumed_from is not None:  # keep the history: the first start's fields, then every resume
        meta["checkpoint"] = str(resumed_from)
        meta = with_resume(read_json(run_dir / "run.json"), meta)
    atomic_write_json(run_dir / "run.json", meta)


def add_to_run_json(run_dir: Path, fields: dict[str, Any], *, resumed: bool) -> None:
    """Add ``fields`` to this start's entry of ``run_dir/run.json`` (the latest resume's
    entry after a resume, else the top level), for what is known only once training runs
    (the LIF backends each layer resolved to). A missing or unreadable file is left alone."""
    meta = read_json(run_dir / "run.json")
    if not isinstance(meta, dict):
        return
    resumes = meta.get("resumes")
    entry = resumes[-1] if resumed and isinstance(resumes, list) and resumes else meta
    if isinstance(entry, dict):
        entry.update(fields)
        atomic_write_json(run_dir / "run.json", meta)
