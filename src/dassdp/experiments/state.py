"""What a comparison folder holds and what is running on it.

``compare.json`` keeps every ``dassdp compare`` invocation: its command line, the config,
the revision, and for the ``local`` and ``slurm`` launchers the submitting host and pid,
the job of each run (``jobs``: label -> job id; ``None`` while a local run waits for a free
slot) and the submission time. From it and the run folders this module tells, per run:
done / running / queued / failed (the first line of its error) / interrupted / not started
(``dassdp compare --status``), and whether an earlier invocation's jobs still run (a second
``compare`` on the folder is refused until they end).

Job states come from the scheduler: ``squeue`` (pending and running jobs, one line per
array task with ``-r``), then ``sacct`` for jobs ``squeue`` no longer lists; a local job is
alive while its submitit controller process (its id is that pid) runs on this host.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dassdp._util.io import atomic_write_json
from dassdp.engine.rundir import code_revision, lock_holder

__all__ = [
    "MANIFEST",
    "active_jobs",
    "local_job_alive",
    "read_manifest",
    "record_invocation",
    "run_status",
    "slurm_states",
    "update_invocation",
]

MANIFEST = "compare.json"
PENDING = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    """``compare.json`` of ``out`` (``{"invocations": []}`` when there is none)."""
    path = Path(out) / MANIFEST
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("invocations", [])
    return data


def record_invocation(
    out: str | os.PathLike, specs: Sequence[Any], argv: Sequence[str], **fields: Any
) -> int:
    """Append this invocation (argv, config, revision, start time, ``fields``) to
    ``compare.json``; seeds and variants accumulate. Returns its index."""
    data = read_manifest(out)
    variants = list(dict.fromkeys([*data.get("variants", []), *(s.variant for s in specs)]))
    seeds = sorted({*data.get("seeds", []), *(s.seed for s in specs)})
    entry = {
        "argv": list(argv),
        "config": specs[0].config if specs else None,
        "revision": code_revision(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
    }
    data.update(variants=variants, seeds=seeds, config=entry["config"])
    data["invocations"].append(entry)
    atomic_write_json(Path(out) / MANIFEST, data)
    return len(data["invocations"]) - 1


def update_invocation(out: str | os.PathLike, index: int, **fields: Any) -> None:
    """Set ``fields`` of invocation ``index`` in ``compare.json`` (``jobs`` are merged)."""
    data = read_manifest(out)
    entry = data["invocations"][index]
    jobs = {**entry.get("jobs", {}), **fields.pop("jobs", {})}
    entry.update(fields, **({"jobs": jobs} if jobs or "jobs" in entry else {}))
    atomic_write_json(Path(out) / MANIFEST, data)


# ---------------------------------------------------------------- job states


def local_job_alive(pid: int, marker: bytes = b"submitit") -> bool:
    """Whether a submitit local job (its controller process ``pid``; or any process whose
    command line holds ``marker``) runs on this host."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():  # Linux: not a zombie, and the process we mean (pids are reused)
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] != "Z" and marker in cmdline
    if os.name != "posix" or Path("/proc/self").is_dir():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _scheduler(cmd: list[str]) -> list[list[str]]:
    """``|``-separated lines of a SLURM command's output (empty if it fails or is missing)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split("|") for line in out.stdout.splitlines() if "|" in line]


def slurm_states(jobs: Iterable[str]) -> dict[str, str]:
    """SLURM state (``PENDING``, ``RUNNING``, ``COMPLETED``, ``FAILED``, ...) of each job id
    (``4242_3`` for an array task) that the scheduler knows."""
    jobs = sorted({str(j) for j in jobs if j})
    if not jobs:
        return {}
    arrays = ",".join(sorted({j.split("_")[0] for j in jobs}))
    states = {}
    for job, state, *_ in _scheduler(["squeue", "-h", "-r", "-o", "%i|%T", "-j", arrays]):
        states[job.strip()] = state.strip().split(" ")[0]
    if set(jobs) - set(states):  # ended (or not yet listed): ask the accounting
        cmd = ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", arrays]
        for job, state, *_ in _scheduler(cmd):
            states.setdefault(job.strip(), state.strip().split(" ")[0])
    return {j: states[j] for j in jobs if j in states}


def _alive_jobs(invocation: dict[str, Any], slurm: dict[str, str]) -> dict[str, str]:
    """Label -> job id of an invocation's jobs that are still queued or running."""
    jobs = invocation.get("jobs") or {}
    if invocation.get("launcher") == "slurm":
        active = PENDING | RUNNING
        return {label: j for label, j in jobs.items() if j and slurm.get(j) in active}
    if invocation.get("launcher") != "local" or invocation.get("host") != platform.node():
        return {}
    alive = {label: j for label, j in jobs.items() if j and local_job_alive(int(j))}
    if invocation.get("wait") and local_job_alive(int(invocation.get("pid", -1)), b"compare"):
        alive.update({label: "waiting" for label, j in jobs.items() if j is None})
    return alive


def _slurm_jobs(invocations: Iterable[dict[str, Any]]) -> list[str]:
    return [j for i in invocations if i.get("launcher") == "slurm" for j in i["jobs"].values()]


def active_jobs(out: str | os.PathLike, states: dict[str, str] | None = None) -> dict[str, str]:
    """Label -> job id of every run that an earlier ``compare`` on ``out`` still has queued
    or running (local jobs of another host are not visible here); ``states``: the SLURM
    states of the folder's jobs when already known."""
    invocations = read_manifest(out)["invocations"]
    if states is None:
        states = slurm_states(_slurm_jobs(invocations))
    alive: dict[str, str] = {}
    for inv in invocations:
        alive.update(_alive_jobs(inv, states))
    return alive


# ---------------------------------------------------------------- run states


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _latest_jobs(out: Path) -> dict[str, tuple[str, str | None]]:
    """Label -> (launcher, job id) of each run's latest submission."""
    latest: dict[str, tuple[str, str | None]] = {}
    for inv in read_manifest(out)["invocations"]:
        for label, job in (inv.get("jobs") or {}).items():
            latest[label] = (inv.get("launcher", "pool"), job)
    return latest


def run_status(out: str | os.PathLike, specs: Sequence[Any]) -> list[tuple[Any, str]]:
    """``(spec, state)`` per run: ``done (final acc@1 X%)``, ``running (job J)``, ``queued
    (job J)``, ``failed: <first line of its error>``, ``failed (job J: STATE)``,
    ``interrupted (will resume)`` or ``not started``."""
    out = Path(out)
    latest = _latest_jobs(out)
    slurm = slurm_states(_slurm_jobs(read_manifest(out)["invocations"]))
    alive = active_jobs(out, slurm)
    states = []
    for spec in specs:
        launcher, job = latest.get(spec.label, ("pool", None))
        state = slurm.get(job or "") if launcher == "slurm" else None
        line = _state(Path(spec.run_dir), launcher, job, state, alive.get(spec.label))
        states.append((spec, line))
    return states


def _state(
    run_dir: Path, launcher: str, job: str | None, state: str | None, alive: str | None
) -> str:
    """One run's state line (see :func:`run_status`); ``state``: SLURM's for its job,
    ``alive``: its job id if an invocation still has it queued or running."""
    done = _read_json(run_dir / "done.json")
    if isinstance(done, dict):
        acc = done.get("final_test_acc1")
        return "done" + (f" (final acc@1 {acc:.2f}%)" if isinstance(acc, float) else "")
    if alive == "waiting":
        return "queued (waiting for a free slot of the local launcher)"
    if alive:
        return f"{'queued' if state in PENDING else 'running'} ({launcher} job {alive})"
    failed = _read_json(run_dir / "failed.json")
    if isinstance(failed, dict):
        first = str(failed.get("error", "unknown error")).strip().splitlines() or ["?"]
        return f"failed: {first[0]}"
    if state and state not in ("COMPLETED", *PENDING, *RUNNING):
        log = run_dir.parent.parent / "jobs" / f"{job}_0_log.err"
        return f"failed (job {job}: {state}; see {log})"
    holder = lock_holder(run_dir)
    if holder is not None:
        return f"running (pid {holder['pid']} on {holder.get('host')})"
    return "interrupted (will resume)" if (run_dir / "last.pt").is_file() else "not started"
