"""The run folder: what a run writes about itself, and its safety (one trainer per folder,
a lock file; no resume into another run's folder; a ``run.json`` that keeps every start and
resume).

:func:`write_run_files` writes ``config.yaml`` (the resolved config, the code revision in its
header) and ``run.json`` (:func:`run_metadata`: revision, versions, command line, host,
world size, device, memory allocator, start time; after a resume, the first start's fields
and a ``resumes`` list).

The lock has two mechanisms, chosen by ``DASSDP_LOCK`` (``auto``, the default; ``flock``;
``file``):

* ``flock``: ``<run>/.lock`` holds the pid of the process training the folder, under an
  exclusive ``fcntl.flock``. The kernel releases it when that process dies (even by
  SIGKILL), so a stale lock is simply taken over. On NFS the Linux client maps ``flock`` to
  the server's byte-range locks, which hold across machines (not with ``-o nolock`` or
  ``local_lock=flock``); on Lustre ``flock`` works across nodes only when the clients mount
  with ``-o flock`` (``-o localflock`` makes it node-local; without either it fails).
* ``file``: ``<run>/.lock.excl``, created with ``O_CREAT | O_EXCL`` (atomic on local file
  systems, NFSv3+ and Lustre), holds the owner's host, pid, process start time and SLURM
  job id and restart count, and is removed on release. Nothing frees it when the owner
  dies, so it is *stale*, and taken over, when the owner's process is gone (same host),
  when its SLURM job has ended (``squeue``), or when it is an earlier run of this same job
  (a requeued job has the same id and a higher ``SLURM_RESTART_COUNT``).

``auto`` uses ``flock`` and falls back to ``file`` where the file system refuses ``flock``
(Lustre without ``-o flock``); set ``DASSDP_LOCK=file`` where ``flock`` succeeds but is
local to one machine. Every process on one folder must use the same mechanism. On
platforms without ``fcntl`` (Windows) ``auto`` does not lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
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
    "EXCL_LOCK",
    "LOCK",
    "LOCK_ENV",
    "RunFolderError",
    "RunLock",
    "add_to_run_json",
    "check_resume_target",
    "check_run_folder",
    "code_revision",
    "lock_holder",
    "read_json",
    "run_metadata",
    "run_name",
    "slurm_job_active",
    "with_resume",
    "write_run_files",
]


LOCK = ".lock"
EXCL_LOCK = ".lock.excl"
LOCK_ENV = "DASSDP_LOCK"
MECHANISMS = ("auto", "flock", "file")
# flock refused by the file system (not "held by another process")
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
# squeue states of a job that still runs or will run
_ACTIVE = {
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED",
}  # fmt: skip
_UNWRITTEN_S = 60.0  # an empty lock file older than this was left by a crash while writing it


class RunFolderError(ValueError):
    """The run folder cannot be used: another process trains it, or it holds another run."""


def lock_mechanism(value: str | None = None) -> str:
    """``value`` or ``$DASSDP_LOCK`` (default ``auto``), checked."""
    mech = (value or os.environ.get(LOCK_ENV) or "auto").strip().lower()
    if mech not in MECHANISMS:
        raise ValueError(f"{LOCK_ENV}={mech!r}: use one of {', '.join(MECHANISMS)}")
    return mech


class RunLock:
    """An exclusive lock on a run folder (see the module doc for the two mechanisms).

    Raises :class:`RunFolderError` naming the folder and the owner (pid; host and SLURM job
    for the ``file`` lock) when a live process holds it. ``release()`` frees it; the
    ``flock`` is also freed by the owner's death, the ``file`` lock is then found stale.
    """

    def __init__(self, run_dir: str | os.PathLike, mechanism: str | None = None) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.file: Path | None = None
        self._text = ""
        mech = lock_mechanism(mechanism)
        if mech != "file" and fcntl is not None and self._flock(strict=mech == "flock"):
            self.mechanism = "flock"
            return
        if mech == "auto" and fcntl is None:
            self.mechanism = "none"
            return
        self.mechanism = "file"
        self._take_file(Path(run_dir) / EXCL_LOCK)

    def _flock(self, strict: bool) -> bool:
        """Take the ``flock``; False where the file system does not support it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno not in _NO_FLOCK:
                raise RunFolderError(
                    f"run folder {self.path.parent} is being trained by pid {owner}; wait for "
                    "it to finish, stop it, or use another --out"
                ) from None
            if strict:
                raise RunFolderError(
                    f"{LOCK_ENV}=flock: the file system of {self.path.parent} does not "
                    f"support flock ({err.strerror}); on Lustre mount it with -o flock, or "
                    f"set {LOCK_ENV}=file (or auto)"
                ) from None
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return True

    def _take_file(self, path: Path) -> None:
        """Create ``path`` exclusively, taking over a stale one (at most twice)."""
        me = holder_info()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                text = _read_text(path)
                holder = _parse_holder(text)
                if not _is_stale(holder, path, me):
                    raise RunFolderError(_held_message(path, holder)) from None
                _remove_if_unchanged(path, text)
                continue
            self._text = json.dumps(me, sort_keys=True)
            with os.fdopen(fd, "w") as f:
                f.write(self._text + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.file = path
            return
        raise RunFolderError(f"could not take {path}: other processes keep taking it over")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
        if self.file is not None:
            if _read_text(self.file).strip() == self._text:  # never remove another's lock
                self.file.unlink(missing_ok=True)
            self.file = None


def holder_info() -> dict[str, Any]:
    """Who this process is, as the ``file`` lock records it."""
    return {
        "host": platform.node(),
        "pid": os.getpid(),
        "start": _process_start(os.getpid()),
        "job": os.environ.get("SLURM_JOB_ID"),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def lock_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The live owner of a run folder's lock (``{"pid", "host", ...}``), else None; never
    takes the lock. The ``flock`` is seen through ``/proc/locks`` (Linux, holders on this
    machine), the ``file`` lock through its contents."""
    path = Path(run_dir) / EXCL_LOCK
    if path.is_file():
        holder = _parse_holder(_read_text(path))
        if holder is not None and not _is_stale(holder, path, holder_info()):
            return holder
    pid = _flock_owner(Path(run_dir) / LOCK)
    return None if pid is None else {"pid": pid, "host": platform.node()}


def _flock_owner(path: Path) -> int | None:
    """The pid holding a ``flock`` on ``path`` on this machine (``/proc/locks``), or None."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    ident = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[4] == "->":
            continue
        major, minor, inode = fields[5].split(":")
        if (int(major, 16), int(minor, 16), int(inode)) == ident:
            return int(fields[4])
    return None


def slurm_job_active(job: str) -> bool | None:
    """Whether SLURM job ``job`` is pending or running (``squeue``); None if unknown."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job), "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # squeue forgets ended jobs: "Invalid job id specified"
        return False if "invalid job id" in out.stderr.lower() else None
    return any(state.strip() in _ACTIVE for state in out.stdout.split())


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _parse_holder(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "pid" in data else None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None


def _pid_alive(pid: int, start: str | None) -> bool:
    """Whether ``pid`` (started at ``start``, if known) still runs on this host."""
    if os.name != "posix":
        return True  # no safe probe (os.kill(pid, 0) terminates the process on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    now = _process_start(pid)
    return start is None or now is None or now == start


def _is_stale(holder: dict[str, Any] | None, path: Path, me: dict[str, Any]) -> bool:
    """Whether a ``file`` lock's owner is gone (see the module doc)."""
    if holder is None:  # being written right now, or a crash left it empty
        try:
            return time.time() - path.stat().st_mtime > _UNWRITTEN_S
        except OSError:
            return True
    job = holder.get("job")
    if job and job == me.get("job") and int(holder.get("restart") or 0) < me["restart"]:
        return True  # an earlier run of this requeued job: SLURM ended it before the restart
    if holder.get("host") == me["host"]:
        return not _pid_alive(int(holder["pid"]), holder.get("start"))
    return bool(job) and slurm_job_active(job) is False


def _remove_if_unchanged(path: Path, text: str) -> None:
    """Remove a stale lock file, unless another process replaced it meanwhile."""
    aside = path.with_name(f"{path.name}.stale-{platform.node()}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if _read_text(aside) != text:  # a fresh lock, taken after we read the stale one
        with contextlib.suppress(OSError):  # put it back (fails if yet another one exists)
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def _held_message(path: Path, holder: dict[str, Any] | None) -> str:
    folder = path.parent
    if holder is None:
        return f"run folder {folder} is being locked right now ({path} is being written)"
    job = f" (SLURM job {holder['job']})" if holder.get("job") else ""
    return (
        f"run folder {folder} is being trained by pid {holder['pid']} on "
        f"{holder.get('host')}{job}; wait for it to finish, stop it, or use another --out; "
        f"if that process no longer runs, remove {path}"
    )


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
    held = sorted(p.name for p in run_dir.iterdir() if p.name not in (LOCK, EXCL_LOCK))
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
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``run_dir/config.yaml`` and ``run_dir/run.json`` for a start of ``cfg``
    (``resumed_from``: the checkpoint a resume continues; the history is kept, see
    :func:`with_resume`; ``extra``: more fields of this start, e.g. a launcher's job)."""
    revision = code_revision()
    header = f"dassdp train (revision {revision or 'unknown'}): resolved config"
    save_config(cfg, run_dir / "config.yaml", header=header)
    meta = {**run_metadata(revision, world_size, device), **(extra or {})}
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
