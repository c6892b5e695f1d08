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

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import dassdp
from dassdp._util.allocator import active_allocator
from dassdp._util.io import atomic_write_json
from dassdp.engine.config import TrainConfig, save_config

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
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
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
