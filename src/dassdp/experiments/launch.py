"""``dassdp compare --launcher local|slurm``: one submitit job per (variant, seed).

Each job runs :func:`~dassdp.experiments.runner.run_one` for its run folder, exactly what
the ``pool`` launcher runs (same config, pairing, resume, ``done.json``). ``slurm`` submits
one job array (``sbatch --array=0-K%P``, one task per run that is not done); ``local`` runs
the same jobs as processes on this machine (submitit's ``LocalExecutor``: time limit,
signal and requeue included), at most ``--array-parallelism`` at once, each on its own
GPUs when there are any. submitit keeps its files in ``OUT/jobs/``: the job's pickle, and
the logs ``<job id>_<task>_log.out`` / ``.err`` (a SLURM array task's id is
``<array id>_<index>``).

Multi-GPU runs: ``--gpus-per-run N`` asks for N GPUs on one node and N tasks, one rank each;
every task exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` from the job's environment (submitit's ``TorchDistributedEnvironment``) and
the engine joins one DDP group; rank 0 alone writes the run folder. Without a GPU the ranks
are CPU processes (gloo).

Requeue: the scheduler signals a task (``SIGUSR2``) ``--signal-delay-s`` seconds before its
time limit (SLURM ``--signal=USR2@S``; on preemption too where the cluster is set up to
signal first). The task then stops at the end of the current epoch, where the engine has
just written ``last.pt``, or after half the delay if that epoch does not end by then (the
resume point is then the previous epoch's ``last.pt``); rank 0 asks submitit to requeue
the job, and the requeued task resumes from ``last.pt``: the run ends bit-identical to an
uninterrupted one (same device and precision). A run is requeued at most ``--max-requeues``
times; each start after a requeue is an entry of ``run.json``'s ``resumes`` with its
``launch`` record (job id, requeue count). A task that raises is not requeued: its error is
in ``failed.json`` and in the summary.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dassdp.experiments.runner import (
    DONE,
    FAILED,
    ROBUSTNESS,
    RunSpec,
    SweepResult,
    record_failure,
    run_one,
)
from dassdp.experiments.state import record_invocation, update_invocation

__all__ = [
    "JOBS",
    "LAUNCHERS",
    "LaunchOptions",
    "RequeueLimitReached",
    "RunTask",
    "launch_sweep",
    "make_executor",
]

LAUNCHERS = ("pool", "local", "slurm")
JOBS = "jobs"  # submitit's folder (pickles, logs) inside the comparison folder
LOCAL_REQUEUE_EXIT = 144  # submitit's local controller restarts a task that exits with this
LOCAL_MAX_REQUEUES = 5  # ... at most this many times (it starts a job at most 6 times)
NO_LIMIT_MIN = 60 * 24 * 365  # "no time limit" for the local launcher


class RequeueLimitReached(RuntimeError):
    """A run was stopped by its time limit (or preemption) more than ``--max-requeues``."""


@dataclass(frozen=True)
class LaunchOptions:
    """How ``compare`` runs its jobs; the SLURM meanings of ``sbatch``'s options.

    ``time_min``: each task's time limit in minutes; ``gpus_per_run``: GPUs (= tasks = DDP
    ranks) per run on one node, 0 for a CPU run of one task; ``cpus_per_gpu``: CPUs per task;
    ``mem_gb``: memory per node; ``setup``: shell lines run before each task; ``extra``:
    ``sbatch`` options (``key=value``); ``signal_delay_s``: how long before the time limit
    the task is signalled (default 90 on SLURM, 30 locally).
    """

    launcher: str = "pool"
    wait: bool = True
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: float | None = None
    gpus_per_run: int | None = None
    cpus_per_gpu: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    setup: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)
    max_requeues: int = 3
    signal_delay_s: int | None = None
    poll_s: float | None = None

    @property
    def delay_s(self) -> int:
        if self.signal_delay_s is not None:
            return self.signal_delay_s
        return 90 if self.launcher == "slurm" else 30

    @property
    def gpus(self) -> int:
        """GPUs per run (the default: 1 on SLURM; locally 1 if CUDA is visible, else 0)."""
        if self.gpus_per_run is not None:
            return self.gpus_per_run
        if self.launcher == "slurm":
            return 1
        import torch

        return int(torch.cuda.is_available())

    @property
    def ranks(self) -> int:
        """Processes (DDP ranks) per run."""
        return max(1, self.gpus)


# ---------------------------------------------------------------- the task


class RunTask:
    """One run as a submitit job: picklable, and checkpointable (submitit calls
    :meth:`checkpoint` to requeue it after a time-limit or preemption signal)."""

    def __init__(
        self, spec: RunSpec, launcher: str, max_requeues: int, signal_delay_s: int
    ) -> None:
        self.spec = spec
        self.launcher = launcher
        self.max_requeues = max_requeues
        self.signal_delay_s = signal_delay_s
        self.requeues: list[dict[str, Any]] = []  # one entry per requeue so far
        self._stop = False
        self._rank = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_stop=False, _rank=0)  # per process, not part of the job
        return state

    def __call__(self) -> str:
        """Run ``run_one`` on every rank of this job; on a stop request hand the job back
        to submitit for a requeue (rank 0) or end this rank. Returns the run's status."""
        import submitit

        env = submitit.JobEnvironment()
        self._rank = env.global_rank
        if env.num_tasks > 1:
            _export_torch_environment(self.launcher)
        _set_threads()
        sig = env._usr_sig()
        handler = signal.getsignal(sig)  # submitit's: checkpoint() and requeue
        signal.signal(sig, lambda signum, frame: self._on_signal(signum, handler))
        info = self._run_info(env.job_id, env.num_tasks)
        try:
            status = run_one(
                self.spec, should_stop=self._stopping, run_info=info, main=self._rank == 0
            )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _leave_process_group()
        if status == "interrupted":
            self._hand_back(sig, handler)
        return status

    def _stopping(self) -> bool:
        return self._stop

    def _on_signal(self, signum: int, handler: Any) -> None:
        """The scheduler's warning: stop after this epoch; rank 0 requeues the job then, or
        after half the signal delay if this epoch has not ended by then."""
        if self._stop:
            return
        self._stop = True
        budget = max(1.0, self.signal_delay_s / 2)
        print(
            f"[compare] {self.spec.label}: {signal.Signals(signum).name}: stopping at the end "
            f"of this epoch (or in {budget:.0f} s) to be requeued",
            flush=True,
        )
        if self._rank == 0 and callable(handler):
            signal.signal(signal.SIGALRM, lambda _s, frame: self._requeue(signum, handler, frame))
            signal.setitimer(signal.ITIMER_REAL, budget)

    def _requeue(self, signum: int, handler: Any, frame: Any) -> None:
        """submitit's handler: :meth:`checkpoint`, then requeue and exit (or raise)."""
        try:
            handler(signum, frame)
        except RequeueLimitReached as err:
            record_failure(Path(self.spec.run_dir), err)
            raise
        except SystemExit as end:
            if self.launcher == "local" and end.code == LOCAL_REQUEUE_EXIT:
                # the local controller must see this code before its own time limit: skip
                # the interpreter's teardown (files are written; the flock dies with us)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(LOCAL_REQUEUE_EXIT)
            raise

    def _hand_back(self, sig: int, handler: Any) -> None:
        if self._rank != 0:
            if self.launcher == "local":
                sys.exit(LOCAL_REQUEUE_EXIT)
            time.sleep(self.signal_delay_s + 60)  # SLURM ends this task when rank 0 requeues
            sys.exit(1)
        if not callable(handler):
            raise RuntimeError("stopped by a signal, but submitit's requeue handler is missing")
        self._requeue(sig, handler, None)

    def checkpoint(self) -> Any:
        """Called by submitit on rank 0: the job to requeue (this task, with one more entry
        in ``requeues``); raises :class:`RequeueLimitReached` past ``max_requeues``."""
        from submitit.helpers import DelayedSubmission

        if len(self.requeues) >= self.max_requeues:
            raise RequeueLimitReached(
                f"{self.spec.label}: stopped by the time limit or preemption "
                f"{len(self.requeues) + 1} times, --max-requeues {self.max_requeues}: not "
                "requeued again; rerun the compare command (the run resumes from last.pt), "
                "with a longer --time-min"
            )
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
        self.requeues.append({"job": job, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        print(f"[compare] {self.spec.label}: requeued ({len(self.requeues)})", flush=True)
        return DelayedSubmission(self)

    def _run_info(self, job_id: str, ranks: int) -> dict[str, Any]:
        launch = {
            "launcher": self.launcher,
            "job_id": job_id,
            "host": platform.node(),
            "ranks": ranks,
            "requeues": len(self.requeues),
        }
        return {"launch": launch}


def _export_torch_environment(launcher: str) -> None:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT`` of this task."""
    from submitit.helpers import TorchDistributedEnvironment

    dist_env = TorchDistributedEnvironment()
    if launcher == "local":
        dist_env.master_addr = "127.0.0.1"  # one machine: no name resolution needed
    # every task sees the node's GPUs; the engine takes cuda:LOCAL_RANK (cuda:0 if only one)
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)


def _set_threads() -> None:
    """Torch CPU threads of a task: SLURM's CPUs per task, else ``OMP_NUM_THREADS``, else 1
    (as the pool's workers); a config's ``threads`` overrides it."""
    import torch

    n = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("OMP_NUM_THREADS") or "1"
    torch.set_num_threads(max(1, int(n)) if n.isdigit() else 1)


def _leave_process_group() -> None:
    from dassdp.engine.distributed import cleanup_distributed

    cleanup_distributed()


# ---------------------------------------------------------------- executors


def slurm_parameters(opts: LaunchOptions) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters for ``opts`` (one node, one task per GPU)."""
    params: dict[str, Any] = {
        "job_name": "dassdp-compare",
        "time": int(opts.time_min or 0),
        "nodes": 1,
        "ntasks_per_node": opts.ranks,
        "signal_delay_s": opts.delay_s,
        "additional_parameters": {"requeue": True, **opts.extra},
    }
    if opts.gpus:
        params["gpus_per_node"] = opts.gpus
    optional = {
        "partition": opts.partition,
        "account": opts.account,
        "qos": opts.qos,
        "constraint": opts.constraint,
        "cpus_per_task": opts.cpus_per_gpu,
        "array_parallelism": opts.array_parallelism,
        "setup": list(opts.setup) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if opts.mem_gb is not None:
        gb = opts.mem_gb
        params["mem"] = f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"
    return params


def make_executor(opts: LaunchOptions, out: Path) -> Any:
    """submitit's ``SlurmExecutor`` or ``LocalExecutor`` for ``opts``, files in ``out/jobs``."""
    import submitit

    folder = out / JOBS
    if opts.launcher == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_requeues)
        executor.update_parameters(**slurm_parameters(opts))
        return executor
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=opts.max_requeues)
    executor.update_parameters(
        timeout_min=opts.time_min or NO_LIMIT_MIN,
        tasks_per_node=opts.ranks,
        signal_delay_s=opts.delay_s,
    )
    return executor


# ---------------------------------------------------------------- submit and wait


def _todo(specs: Sequence[RunSpec], result: SweepResult) -> list[RunSpec]:
    """The runs with something left to do (training, or a missing robustness file)."""
    todo = []
    for spec in specs:
        run_dir = Path(spec.run_dir)
        done = (run_dir / DONE).is_file()
        if done and not (spec.robustness and not (run_dir / ROBUSTNESS).is_file()):
            result.status[spec.label] = "done"
        else:
            todo.append(spec)
    return todo


def launch_sweep(
    specs: Sequence[RunSpec], out: str | os.PathLike, opts: LaunchOptions, argv: Sequence[str]
) -> SweepResult | None:
    """Submit every run that is not done as a submitit job; with ``opts.wait``, wait for
    them (printing each end) and return what they did, else return None after submitting."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = SweepResult()
    todo = _todo(specs, result)
    launch = _Launch(out, opts, result)
    if not opts.wait and opts.launcher == "local" and launch.parallel < len(todo):
        raise ValueError(
            f"--no-wait with --launcher local starts every run at once ({len(todo)} runs), "
            f"but at most {launch.parallel} fit (--array-parallelism, GPUs); leave out "
            "--no-wait (this command then starts the rest as runs end)"
        )
    launch.index = record_invocation(
        out,
        specs,
        argv,
        launcher=opts.launcher,
        host=platform.node(),
        pid=os.getpid(),
        wait=opts.wait,
        jobs={spec.label: None for spec in todo},
        job_folder=str(out / JOBS),
    )
    if not todo:
        return result
    for spec in todo:  # an earlier failure's error: this attempt writes its own
        (Path(spec.run_dir) / FAILED).unlink(missing_ok=True)
    tasks = [RunTask(s, opts.launcher, opts.max_requeues, opts.delay_s) for s in todo]
    launch.submit(tasks)
    if not opts.wait:
        return None
    launch.wait()
    return result


class _Launch:
    """The jobs of one ``compare`` invocation: submission, GPU slots, results."""

    def __init__(self, out: Path, opts: LaunchOptions, result: SweepResult) -> None:
        self.out, self.opts, self.result = out, opts, result
        self.index = -1  # of this invocation in compare.json
        self.executor = make_executor(opts, out)
        self.queue: deque[RunTask] = deque()
        self.running: dict[str, tuple[Any, RunTask, tuple[str, ...]]] = {}
        self.free_gpus = _local_gpus(opts) if opts.launcher == "local" else []
        self.parallel = local_parallelism(opts, len(self.free_gpus))

    def submit(self, tasks: Sequence[RunTask]) -> None:
        if self.opts.launcher == "slurm":
            jobs = self.executor.submit_array(list(tasks))
            for job, task in zip(jobs, tasks):
                self.running[task.spec.label] = (job, task, ())
            array = str(jobs[0].job_id).split("_")[0]
            self._record(array=array)
            what = f"1 run as SLURM job {array}"
            if len(jobs) > 1:
                what = f"{len(jobs)} runs as SLURM job array {array} (tasks 0-{len(jobs) - 1})"
            print(f"[compare] submitted {what}; logs in {self.out / JOBS}", flush=True)
            return
        self.queue.extend(tasks)
        self._fill()

    def _fill(self) -> None:
        """Local: start queued jobs while slots (and GPUs) are free."""
        started = False
        while self.queue and len(self.running) < self.parallel:
            task = self.queue.popleft()
            gpus = tuple(self.free_gpus[: self.opts.gpus])
            self.free_gpus = self.free_gpus[len(gpus) :]
            if gpus:
                self.executor.update_parameters(gpus_per_node=len(gpus), visible_gpus=gpus)
            job = self.executor.submit(task)
            self.running[task.spec.label] = (job, task, gpus)
            print(f"[compare] {task.spec.label}: started (local job {job.job_id})", flush=True)
            started = True
        if started:
            self._record()

    def _record(self, **fields: Any) -> None:
        jobs = {label: str(job.job_id) for label, (job, _, _) in self.running.items()}
        update_invocation(self.out, self.index, jobs=jobs, submitted=_now(), **fields)

    def wait(self) -> None:
        """Poll until every job has ended; print each end and a progress line now and then."""
        poll = self.opts.poll_s or (0.5 if self.opts.launcher == "local" else 30.0)
        last_progress = time.monotonic()
        try:
            while self.running or self.queue:
                self._collect()
                self._fill()
                if time.monotonic() - last_progress > 600:
                    self._progress()
                    last_progress = time.monotonic()
                if self.running:
                    time.sleep(poll)
        except KeyboardInterrupt:
            self._interrupted()
            raise

    def _collect(self) -> None:
        for label, (job, task, gpus) in list(self.running.items()):
            if not job.done():
                continue
            del self.running[label]
            self.free_gpus = sorted([*self.free_gpus, *gpus])
            status, error = _outcome(job, task)
            self.result.status[label] = status
            if error:
                self.result.errors[label] = error
                print(f"[compare] {label}: FAILED (job {job.job_id}): {error}", file=sys.stderr)
            else:
                print(f"[compare] {label}: {status} (job {job.job_id})", flush=True)

    def _progress(self) -> None:
        ended = len(self.result.status)
        print(
            f"[compare] {ended} runs ended ({len(self.result.errors)} failed), "
            f"{len(self.running)} running or queued, {len(self.queue)} waiting",
            flush=True,
        )

    def _interrupted(self) -> None:
        if self.opts.launcher == "slurm":
            array = {str(job.job_id).split("_")[0] for job, _, _ in self.running.values()}
            print(
                f"[compare] stopped waiting; the SLURM jobs keep running (scancel "
                f"{' '.join(sorted(array))} stops them); watch with --status",
                file=sys.stderr,
            )
            return
        for job, _, _ in self.running.values():
            job.cancel(check=False)  # the controller stops its tasks; a rerun resumes them


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _local_gpus(opts: LaunchOptions) -> list[int]:
    """The GPU ids (as ``CUDA_VISIBLE_DEVICES`` sees them) the local launcher shares out."""
    if opts.gpus == 0:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [int(x) for x in visible.split(",") if x.strip().isdigit()] if visible else []
    return ids or list(range(torch.cuda.device_count()))


def local_parallelism(opts: LaunchOptions, gpus: int) -> int:
    """Local jobs at once: ``--array-parallelism``, else as many as the GPUs (or CPU
    cores) allow."""
    if opts.gpus and gpus:  # never more than the GPUs hold
        return min(opts.array_parallelism or gpus, max(1, gpus // opts.gpus))
    return opts.array_parallelism or max(1, (os.cpu_count() or 1) // opts.ranks)


def _outcome(job: Any, task: RunTask) -> tuple[str, str | None]:
    """A finished job's run status, and its error (``failed.json``'s, else submitit's)."""
    try:
        return str(job.results()[0]), None
    except Exception as err:  # the task raised, or ended without a result (killed, OOM)
        failed = Path(task.spec.run_dir) / FAILED
        try:
            return "failed", str(json.loads(failed.read_text())["error"]).splitlines()[0]
        except (OSError, ValueError, KeyError, IndexError):
            lines = [line for line in str(err).splitlines() if line.strip()][:2]
            return "failed", " ".join(lines) or type(err).__name__
