"""``dassdp compare --config FILE --seeds 0-4 --variants baseline,dassdp --out DIR [key=value]``.

One training run per (variant, seed) in ``DIR/<variant>/seed<k>/``, paired by seed (same
initial weights and data order across variants). Rerunning the same command continues a
stopped sweep: finished runs are skipped, an interrupted run resumes from its
``last.pt``, nothing is overwritten. Variants (compose with ``+``, e.g.
``dassdp+no-kernel``): see ``dassdp.experiments.variants``. When the sweep is complete the
report (``dassdp report DIR``) is written.

``--launcher pool`` (the default) runs in this process (``--workers N``: N processes);
``--launcher local|slurm`` submits one submitit job per run that is not done
(:mod:`dassdp.experiments.launch`): on this machine, or as a SLURM job array.
``--status`` shows each run's state. A second ``compare`` on a folder is refused while the
first one, or the jobs it submitted, still run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dassdp.experiments.launch import LaunchOptions

HELP = "paired multi-seed comparison of variants (baseline, dassdp, ssdp, controls ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dassdp.experiments.variants import VARIANTS

    parser.add_argument("--config", "-c", required=True, help="YAML config file (configs/*.yaml)")
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,3,7 (default 0-4)")
    parser.add_argument(
        "--variants",
        default="baseline,dassdp",
        help="comma-separated, composable with '+'; known: "
        + ", ".join(VARIANTS)
        + "; a part may be key=value (e.g. dassdp+A_plus=1.5e-4)",
    )
    parser.add_argument("--out", required=True, help="comparison folder")
    parser.add_argument(
        "--workers", type=int, default=None, help="parallel runs (pool processes; default 1)"
    )
    parser.add_argument(
        "--robustness",
        default=None,
        metavar="SPEC",
        help='also evaluate each final checkpoint under e.g. "jitter=1,drop=0.1,noise=0.05"',
    )
    parser.add_argument("--no-report", action="store_true", help="do not write the report")
    parser.add_argument(
        "--dry-run",
        "--status",
        dest="status",
        action="store_true",
        help="list the runs and their state (done, running/queued with the job id, failed "
        "with its error, interrupted, not started); starts nothing",
    )
    _add_launcher_arguments(parser)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. epochs=5"
    )


def _add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("launchers (--launcher local|slurm, through submitit)")
    g.add_argument(
        "--launcher",
        choices=["pool", "local", "slurm"],
        default="pool",
        help="pool: in this process (default); local: one submitit job per run on this "
        "machine; slurm: a SLURM job array, one task per run",
    )
    g.add_argument("--no-wait", action="store_true", help="return after submitting")
    for name, what in (
        ("partition", "SLURM partition"),
        ("account", "SLURM account"),
        ("qos", "SLURM quality of service"),
        ("constraint", "SLURM node features, e.g. a100"),
    ):
        g.add_argument(f"--slurm-{name}", default=None, metavar=name.upper(), help=what)
    g.add_argument("--time-min", type=float, default=None, help="time limit per task in minutes")
    g.add_argument(
        "--gpus-per-run",
        type=int,
        default=None,
        metavar="N",
        help="GPUs of one node per run, one task (DDP rank) each; 0: a CPU run (default 1 "
        "on SLURM, locally 1 if CUDA is visible, else 0)",
    )
    g.add_argument(
        "--cpus-per-gpu",
        type=int,
        default=None,
        metavar="C",
        help="CPUs per task (per GPU; with --gpus-per-run 0 the run's CPUs)",
    )
    g.add_argument(
        "--mem-gb", type=float, default=None, metavar="G", help="memory per run (its node), GB"
    )
    g.add_argument("--array-parallelism", type=int, default=None, metavar="P", help="runs at once")
    g.add_argument(
        "--slurm-setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before each task, e.g. 'module load cuda' (repeatable)",
    )
    g.add_argument(
        "--slurm-extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. mail-type=END (repeatable)",
    )
    g.add_argument(
        "--max-requeues",
        type=int,
        default=None,
        help="requeues per run after a time limit or preemption (default 3)",
    )
    g.add_argument(
        "--poll-s",
        type=float,
        default=None,
        metavar="S",
        help="seconds between checks of the jobs while waiting (default 30 on SLURM, 0.5 locally)",
    )
    g.add_argument(
        "--signal-delay-s",
        type=int,
        default=None,
        metavar="S",
        help="signal a task S seconds before its time limit (default 90 on SLURM, 30 "
        "locally); it stops at the end of its epoch if that comes within S/2",
    )


POOL_ONLY = ("workers",)
LAUNCH_ONLY = (
    "no_wait",
    "time_min",
    "gpus_per_run",
    "cpus_per_gpu",
    "mem_gb",
    "array_parallelism",
    "max_requeues",
    "signal_delay_s",
    "poll_s",
)
SLURM_ONLY = (
    "slurm_partition",
    "slurm_account",
    "slurm_qos",
    "slurm_constraint",
    "slurm_setup",
    "slurm_extra",
)


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The options of ``names`` that were given (as ``--option-name``)."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, False, [])]


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    """The checked :class:`~dassdp.experiments.launch.LaunchOptions` of the command line;
    a bad value or combination is a ``ValueError`` naming the option."""
    from dassdp.experiments.launch import LaunchOptions

    launcher = args.launcher
    wrong = _given(args, POOL_ONLY) if launcher != "pool" else []
    if launcher == "pool":
        wrong = _given(args, LAUNCH_ONLY + SLURM_ONLY)
    elif launcher == "local":
        wrong += _given(args, SLURM_ONLY)
    if wrong:
        where = "--launcher slurm" if launcher == "local" else "--launcher local or slurm"
        if launcher != "pool" and wrong[0] == "--workers":
            where = "--launcher pool (use --array-parallelism)"
        raise ValueError(f"{wrong[0]} applies to {where}, not to --launcher {launcher}")
    extra = {}
    for item in args.slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm-extra {item!r}: give KEY=VALUE, e.g. mail-type=END")
        extra[key.strip().lstrip("-")] = value
    opts = LaunchOptions(
        launcher=launcher,
        wait=not args.no_wait,
        partition=args.slurm_partition,
        account=args.slurm_account,
        qos=args.slurm_qos,
        constraint=args.slurm_constraint,
        time_min=args.time_min,
        gpus_per_run=args.gpus_per_run,
        cpus_per_gpu=args.cpus_per_gpu,
        mem_gb=args.mem_gb,
        array_parallelism=args.array_parallelism,
        setup=tuple(args.slurm_setup),
        extra=extra,
        max_requeues=3 if args.max_requeues is None else args.max_requeues,
        signal_delay_s=args.signal_delay_s,
        poll_s=args.poll_s,
    )
    _check_values(opts)
    return opts


def _check_values(opts: LaunchOptions) -> None:
    """Ranges of the launcher options, and what this machine has."""
    positive = {
        "--time-min": opts.time_min,
        "--cpus-per-gpu": opts.cpus_per_gpu,
        "--mem-gb": opts.mem_gb,
        "--array-parallelism": opts.array_parallelism,
        "--signal-delay-s": opts.signal_delay_s,
        "--poll-s": opts.poll_s,
    }
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if opts.gpus_per_run is not None and opts.gpus_per_run < 0:
        raise ValueError(f"--gpus-per-run must be >= 0, got {opts.gpus_per_run}")
    if opts.max_requeues < 0:
        raise ValueError(f"--max-requeues must be >= 0, got {opts.max_requeues}")
    if opts.time_min is not None and opts.delay_s >= opts.time_min * 60:
        raise ValueError(
            f"--signal-delay-s {opts.delay_s} must be shorter than --time-min "
            f"{opts.time_min:g} (x 60 s)"
        )
    if opts.launcher == "pool":
        return
    _check_submitit()
    if opts.launcher == "slurm":
        _check_slurm(opts)
    else:
        _check_local(opts)


def _check_submitit() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ValueError(
            "--launcher local|slurm needs submitit: pip install 'dassdp[cluster]'"
        ) from None


def _check_slurm(opts: LaunchOptions) -> None:
    import shutil

    if opts.time_min is None:
        raise ValueError(
            "--launcher slurm needs --time-min (each task's time limit, minutes; a run that "
            "takes longer is requeued and resumed)"
        )
    if opts.time_min != int(opts.time_min):
        raise ValueError(f"--time-min for SLURM is whole minutes, got {opts.time_min:g}")
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise ValueError(
            f"--launcher slurm: {' and '.join(missing)} not found on PATH; submit from a "
            "machine with SLURM's commands (a login node), or use --launcher local"
        )


def _check_local(opts: LaunchOptions) -> None:
    from dassdp.experiments.launch import LOCAL_MAX_REQUEUES

    if opts.max_requeues > LOCAL_MAX_REQUEUES:
        raise ValueError(
            f"--max-requeues {opts.max_requeues}: submitit's local controller restarts a job "
            f"at most {LOCAL_MAX_REQUEUES} times; give <= {LOCAL_MAX_REQUEUES}"
        )
    import torch

    if opts.gpus_per_run and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if opts.gpus_per_run > count:
            raise ValueError(f"--gpus-per-run {opts.gpus_per_run}: this machine has {count} GPUs")
    elif opts.gpus_per_run and opts.gpus_per_run > 1:
        print(
            f"[compare] no GPU visible: each run's {opts.gpus_per_run} ranks are CPU "
            "processes (gloo)",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    from dassdp.experiments.robustness import parse_conditions
    from dassdp.experiments.runner import parse_seeds, plan
    from dassdp.experiments.variants import parse_variants

    seeds, variants = parse_seeds(args.seeds), parse_variants(args.variants)
    conditions = parse_conditions(args.robustness) if args.robustness else []
    specs = plan(args.config, seeds, variants, args.out, args.overrides, conditions)
    opts = launch_options(args)
    for spec in specs:
        spec.resolve()  # every config error before anything starts (or any folder)
    if args.status:
        return _print_status(args.out, specs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _CompareLock(out):
        if opts.launcher == "pool":
            result = _run_pool(args, specs)
        else:
            from dassdp.experiments.launch import launch_sweep
            from dassdp.experiments.runner import check_folders

            check_folders(specs)  # a folder of another run: refused before submitting
            result = launch_sweep(specs, out, opts, sys.argv)
            if result is None:
                _print_submitted(args)
                return 0
    return _summary(args, specs, result)


def _run_pool(args: argparse.Namespace, specs: list) -> object:
    from dassdp.experiments.runner import run_sweep

    workers = 1 if args.workers is None else args.workers
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and (os.cpu_count() or 1) <= 2:
        print(
            f"warning: --workers {workers} on {os.cpu_count()} CPU cores: parallel runs "
            "compete for the cores and are rarely faster than one at a time",
            file=sys.stderr,
        )
    return run_sweep(specs, args.out, workers=workers)


def _summary(args: argparse.Namespace, specs: list, result: object) -> int:
    counts = {s: list(result.status.values()).count(s) for s in ("done", "trained", "failed")}
    print(
        f"[compare] {len(specs)} runs: {counts['trained']} trained, "
        f"{counts['done']} already done, {counts['failed']} failed; folder {args.out}"
    )
    if not result.ok:
        for label, error in result.errors.items():
            print(f"  {label}: {error}", file=sys.stderr)
        print(
            "[compare] rerun the same command to retry the failed runs (finished ones are "
            "kept); --status shows each run's state",
            file=sys.stderr,
        )
        return 1
    if not args.no_report:
        from dassdp.experiments.report import write_report

        path = write_report(args.out)
        print(f"[compare] report: {path}")
    return 0


def _print_status(out: str, specs: list) -> int:
    from dassdp.experiments.state import read_manifest, run_status

    manifest = read_manifest(out) if Path(out).is_dir() else {"invocations": []}
    submitted = [i for i in manifest["invocations"] if i.get("launcher") in ("local", "slurm")]
    if submitted:
        last = submitted[-1]
        job = f"job array {last['array']}" if last.get("array") else "local jobs"
        print(f"[compare] last submission: {last['launcher']} {job}, {last.get('started')}")
    for spec, state in run_status(out, specs) if Path(out).is_dir() else []:
        print(f"{spec.label:32s} {spec.run_dir}  {state}")
    if not Path(out).is_dir():
        for spec in specs:
            print(f"{spec.label:32s} {spec.run_dir}  not started")
    return 0


def _print_submitted(args: argparse.Namespace) -> None:
    print(
        "[compare] submitted; watch with the same command and --status; when all runs are "
        "done, rerun the same command: it submits nothing and writes the report"
    )


class _CompareLock:
    """This command's hold on the comparison folder (``OUT/.lock``), and the refusal when
    an earlier ``compare`` or the jobs it submitted still run there."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.lock = None

    def __enter__(self) -> _CompareLock:
        from dassdp.engine.rundir import RunFolderError, RunLock
        from dassdp.experiments.state import active_jobs

        try:
            self.lock = RunLock(self.out)
        except RunFolderError as err:
            raise ValueError(f"another dassdp compare uses {self.out}: {err}") from None
        busy = active_jobs(self.out)
        if busy:
            self.lock.release()
            shown = ", ".join(f"{label} (job {job})" for label, job in list(busy.items())[:4])
            more = f" and {len(busy) - 4} more" if len(busy) > 4 else ""
            raise ValueError(
                f"{self.out}: runs of an earlier dassdp compare are still queued or running: "
                f"{shown}{more}; watch them with --status, wait for them, or cancel them "
                "(scancel JOB for SLURM) before rerunning"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()
