"""A fake SLURM for the launcher tests: ``sbatch``, ``squeue``, ``sacct``, ``scancel``,
``scontrol`` and ``srun`` executables (the approach of submitit's own tests) that record
what they were given in ``STATE/calls.jsonl``.

``sbatch SCRIPT`` keeps a copy of the script (``STATE/<id>.sh``) and prints ``Submitted
batch job <id>``. With ``FAKE_SLURM_RUN=1`` it also runs the job, detached, as SLURM would
on one node: each array task (``--array=0-K%P``, at most P at once) runs the script with
``SLURM_JOB_ID``, ``SLURM_ARRAY_JOB_ID``, ``SLURM_ARRAY_TASK_ID``, ``SLURM_NTASKS`` ...; the
script's ``srun`` starts ``--ntasks-per-node`` processes with ``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_STEP_ID``. ``squeue`` and ``sacct`` report the tasks' states
from ``STATE/<job>.state`` files (``PENDING`` until a task starts, then ``RUNNING``,
``COMPLETED`` or ``FAILED``).

Usage: ``install(bin_dir, state_dir)`` writes the executables; put ``bin_dir`` first on
``PATH`` and set ``FAKE_SLURM_STATE=state_dir`` (``env(...)`` returns both).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol", "srun")
FIRST_JOB = 4242


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """Write the fake executables; returns the environment changes that activate them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        exe = bin_dir / name
        exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{__file__}" {name} "$@"\n')
        exe.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_STATE": str(state_dir),
    }


def calls(state_dir: Path, name: str | None = None) -> list[list[str]]:
    """Every recorded call (``[command, *args]``), optionally of one command only."""
    path = state_dir / "calls.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if name is None or r[0] == name]


def sbatch_options(script: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines of a batch script (``--flag``: value ``""``)."""
    found = re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M)
    return {key: value.strip("'\"") for key, value in found}


# ---------------------------------------------------------------- the fake commands


def _state() -> Path:
    return Path(os.environ["FAKE_SLURM_STATE"])


def _record(argv: list[str]) -> None:
    with open(_state() / "calls.jsonl", "a") as f:
        f.write(json.dumps(argv) + "\n")


def _set(job: str, state: str) -> None:
    (_state() / f"{job}.state").write_text(state)


def _states() -> dict[str, str]:
    return {p.stem: p.read_text().strip() for p in _state().glob("*.state")}


def sbatch(args: list[str]) -> int:
    script = Path(args[-1]).read_text()
    counter = _state() / "next_id"
    job = int(counter.read_text()) if counter.exists() else FIRST_JOB
    counter.write_text(str(job + 1))
    (_state() / f"{job}.sh").write_text(script)
    opts = sbatch_options(script)
    first, last, _ = _array(opts.get("array"))
    for index in range(first, last + 1):
        _set(f"{job}_{index}" if "array" in opts else str(job), "PENDING")
    if os.environ.get("FAKE_SLURM_RUN") == "1":
        log = open(_state() / f"{job}.runner.log", "w")  # noqa: SIM115 (the child keeps it)
        subprocess.Popen(
            [sys.executable, __file__, "_run", str(job), args[-1]],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    print(f"Submitted batch job {job}")
    return 0


def _array(spec: str | None) -> tuple[int, int, int]:
    if not spec:
        return 0, 0, 1
    match = re.fullmatch(r"(\d+)-(\d+)(?:%(\d+))?", spec)
    first, last = int(match.group(1)), int(match.group(2))
    return first, last, int(match.group(3) or last - first + 1)


def _run(job: str, script_path: str) -> int:
    """Run a submitted job's tasks (at most P array tasks at once), like one SLURM node."""
    script = Path(script_path).read_text()
    opts = sbatch_options(script)
    first, last, parallel = _array(opts.get("array"))
    pending = list(range(first, last + 1))
    running: dict[str, subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < parallel:
            index = pending.pop(0)
            name = f"{job}_{index}" if "array" in opts else job
            running[name] = _start_task(job, index, name, opts, script_path)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                _set(name, "COMPLETED" if proc.returncode == 0 else "FAILED")
                del running[name]
        time.sleep(0.1)
    return 0


def _start_task(job: str, index: int, name: str, opts: dict, script: str) -> subprocess.Popen:
    # an array task has its own job id (SLURM_JOB_ID); a plain job's is the submitted one
    task_id = FIRST_JOB * 10 + int(job) - FIRST_JOB + index if "array" in opts else int(job)
    ntasks = opts.get("ntasks-per-node", "1")
    env = {
        **os.environ,
        "SLURM_JOB_ID": str(task_id),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": ntasks,
        "SLURM_NTASKS_PER_NODE": ntasks,
        "SLURM_PROCID": "0",  # the batch script itself
        "SLURM_LOCALID": "0",
    }
    if "array" in opts:
        env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(index))
    if "cpus-per-task" in opts:
        env["SLURM_CPUS_PER_TASK"] = opts["cpus-per-task"]
    _set(name, "RUNNING")
    out = _expand(opts.get("output", f"slurm-{name}.out"), job, index, name, "0")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    log = open(out, "a")  # noqa: SIM115 (the child keeps it)
    return subprocess.Popen(["bash", script], env=env, stdout=log, stderr=subprocess.STDOUT)


def _expand(pattern: str, job: str, index: int, name: str, task: str) -> str:
    return (
        pattern.replace("%A", job).replace("%a", str(index)).replace("%j", name)
        .replace("%t", task)
    )  # fmt: skip


def srun(args: list[str]) -> int:
    """``srun [--output F] [--error F] [--unbuffered] [-n N | --ntasks N] CMD...``: N
    processes (default ``SLURM_NTASKS_PER_NODE``) with SLURM's per-task variables."""
    outputs: dict[str, str] = {}
    ntasks = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            outputs[flag] = args.pop(0)
        elif flag in ("-n", "--ntasks"):
            ntasks = int(args.pop(0))
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID", "0")
    index = os.environ.get("SLURM_ARRAY_TASK_ID", "0")
    name = f"{job}_{index}" if "SLURM_ARRAY_JOB_ID" in os.environ else job
    procs = []
    for rank in range(ntasks):
        env = {
            **os.environ,
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS": str(ntasks),
            "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_ID": "0",
            "SLURM_STEP_NODELIST": os.environ.get("SLURM_JOB_NODELIST", "localhost"),
        }
        files = {
            k: open(_expand(v, job, int(index), name, str(rank)), "a")  # noqa: SIM115
            for k, v in outputs.items()
        }
        out, err = files.get("--output"), files.get("--error")
        procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=err or out))
    return max(p.wait() for p in procs)


def squeue(args: list[str]) -> int:
    fmt = args[args.index("-o") + 1] if "-o" in args else "%i|%T"
    wanted = args[args.index("-j") + 1].split(",") if "-j" in args else None
    for job, state in sorted(_states().items()):
        if state in ("PENDING", "RUNNING") and (wanted is None or job.split("_")[0] in wanted):
            print(fmt.replace("%i", job).replace("%T", state))
    return 0


def sacct(args: list[str]) -> int:
    wanted = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    wanted = [j for w in wanted for j in w.split(",")]
    if "-n" not in args:
        print("JobID|State|NodeList")
    for job, state in sorted(_states().items()):
        if not wanted or job.split("_")[0] in wanted:
            print(f"{job}|{state}|localhost" if "-n" not in args else f"{job}|{state}")
    return 0


def scancel(args: list[str]) -> int:
    for job in (a for a in args if not a.startswith("-")):
        for name in _states():
            if name == job or name.split("_")[0] == job:
                _set(name, "CANCELLED")
    return 0


def main(argv: list[str]) -> int:
    name, args = argv[0], argv[1:]
    if name == "_run":
        return _run(*args)
    _record([name, *args])
    handlers = {"sbatch": sbatch, "srun": srun, "squeue": squeue, "sacct": sacct}
    handlers.update(scancel=scancel, scontrol=lambda a: 0)
    return handlers[name](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
