"""``dassdp train --config FILE [key=value ...] [--resume [CKPT]] [--out DIR]``.

Overrides use dotted keys and YAML values: ``epochs=10 plasticity.enabled=false
model_args.channels=[8,16]``, anywhere after ``train``. The run folder is ``--out`` or
``runs/<name>`` (``name`` defaults to the config file's stem); a new run starts only in a new
or empty folder, or over what a start of the same config left before its first checkpoint
(:func:`dassdp.engine.rundir.check_run_folder`). A folder that already holds ``last.pt`` is
only continued with ``--resume``, which restores everything and continues exactly; with
``--resume`` the config may be omitted (the checkpoint's is used), and the checkpoint must be
of the folder's run. Under ``torchrun`` every rank runs this command; rank 0 alone logs and
writes. Under ``srun`` with N tasks (no torchrun) the ranks come from SLURM's variables
(:mod:`dassdp.engine.distributed`). Ctrl-C stops with one line saying the epoch and how to
resume (exit status 130).

On a GPU: ``amp=bf16`` (or ``fp16``, with a grad scaler), ``compile=true``,
``channels_last=true``, ``cudnn_benchmark=true``; see :class:`dassdp.engine.TrainConfig`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dassdp.engine.config import TrainConfig

HELP = "train a model from a YAML config (with DA-SSDP if the config has a plasticity block)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config file (configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. epochs=10"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CKPT",
        help="continue from CKPT (default: the run folder's last.pt)",
    )
    parser.add_argument("--out", default=None, help="run folder (default: runs/<name>)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="launch N processes with torchrun (DDP; gloo on CPU, NCCL on CUDA)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop once N epochs are complete (resume later with --resume)",
    )


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The config to train and its run folder, with the checks of a new or resumed run."""
    from dassdp.engine import (
        apply_overrides,
        config_from_dict,
        load_checkpoint,
        load_config,
        resume_config,
    )
    from dassdp.engine.checkpoint import check_resumable

    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(
            f"--stop-after must be >= 1 (the epochs to complete before stopping), "
            f"got {args.stop_after}"
        )
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume epochs=3`: argparse took an override for the optional checkpoint path
        args.overrides, args.resume = [args.resume, *args.overrides], True
    if args.config is None and not args.resume:
        raise ValueError("give --config FILE (or --resume with --out DIR or a checkpoint)")
    cfg = load_config(args.config, args.overrides) if args.config else None
    if not args.resume:
        run_dir = Path(args.out or Path("runs") / cfg.name)
        _check_folder(run_dir, cfg, False)
        return cfg, run_dir
    if args.resume is True:
        if args.out is None and cfg is None:
            raise ValueError("--resume without a checkpoint path needs --out DIR or --config")
        run_dir = Path(args.out or Path("runs") / cfg.name)
        ckpt = run_dir / "last.pt"
    else:
        ckpt = Path(args.resume)
        run_dir = Path(args.out) if args.out else ckpt.parent
    state = load_checkpoint(ckpt)
    check_resumable(state, ckpt)
    saved = state["config"]
    if cfg is None:
        cfg = config_from_dict(apply_overrides(dict(saved), args.overrides))
    args.resume = str(ckpt)
    cfg = resume_config(saved, cfg)
    _check_folder(run_dir, cfg, ckpt)
    return cfg, run_dir


def _check_folder(run_dir: Path, cfg: TrainConfig, resume: bool | Path) -> None:
    """The run folder's checks (:func:`~dassdp.engine.rundir.check_run_folder`) before
    anything is built or launched; rank 0 alone (the one that writes)."""
    import os

    from dassdp.engine.rundir import check_run_folder

    if int(os.environ.get("RANK", 0)) == 0:
        check_run_folder(run_dir, cfg, resume=resume)


def setup_logging(main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )


def launch(nproc: int, argv: list[str]) -> int:
    """``torchrun --standalone --nproc_per_node N -m dassdp train ARGV``; its exit status.

    torchrun's agent watches the workers: if any rank fails, the others are stopped and
    the launcher exits non-zero with the failing rank's error shown. The agent and the ranks
    end with this process (:func:`dassdp._util.process.die_with_parent`, through
    :data:`~dassdp.commands._torchrun.LAUNCHER_ENV`), even when it is killed by SIGKILL.
    Ctrl-C reaches the ranks directly (one process group); this process waits for them.
    """
    import os
    import subprocess

    from dassdp.commands._torchrun import LAUNCHER_ENV

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    cmd = [
        sys.executable,
        "-m",
        "dassdp.commands._torchrun",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "dassdp",
        "train",
        *argv,
    ]
    agent = subprocess.Popen(cmd, env={**os.environ, LAUNCHER_ENV: str(os.getpid())})
    try:
        return agent.wait()
    except KeyboardInterrupt:
        try:  # the ranks got the SIGINT too: let them stop, and rank 0 say where
            agent.wait(timeout=60)
            return 130
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            agent.kill()
            agent.wait()
            raise


def _follow_launcher() -> None:
    """A rank of ``dassdp train --nproc``: end with its torchrun agent (this process's
    parent) or with the ``dassdp`` process that launched that agent, whichever dies first."""
    import os

    from dassdp._util.process import die_with_parent
    from dassdp.commands._torchrun import LAUNCHER_ENV

    launcher = os.environ.get(LAUNCHER_ENV, "")
    if "LOCAL_RANK" in os.environ and launcher.isdigit():
        die_with_parent(os.getppid(), launcher=int(launcher))


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The ``train`` arguments of ``args`` without ``--nproc``, for each torchrun worker."""
    argv = list(args.overrides)
    if args.config:
        argv += ["--config", str(args.config)]
    if args.out:
        argv += ["--out", str(args.out)]
    if args.stop_after is not None:
        argv += ["--stop-after", str(args.stop_after)]
    if args.resume:
        argv += ["--resume"] if args.resume is True else ["--resume", str(args.resume)]
    return argv


def run(args: argparse.Namespace) -> int:
    import os

    from dassdp.engine.distributed import export_slurm_environment

    export_slurm_environment()  # under srun: RANK, WORLD_SIZE, ... from SLURM's variables
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        resolve(args)  # every config, checkpoint and run-folder error before the ranks start
        return launch(args.nproc, _forwarded(args))
    _follow_launcher()

    from dassdp.engine.distributed import cleanup_distributed
    from dassdp.engine.train import TrainingDiverged, TrainingInterrupted, fit

    main = int(os.environ.get("RANK", 0)) == 0
    setup_logging(main)
    cfg, run_dir = resolve(args)
    finished = False
    try:
        row = fit(cfg, run_dir, resume=args.resume, stop_after=args.stop_after)
        finished = True
    except TrainingDiverged:
        return 1  # the trainer logged why (stderr and train.log); the checkpoints are kept
    except TrainingInterrupted as stop:
        if main:
            print(f"dassdp train: {stop.describe()}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended
    finally:
        # a rank that raised must not wait for its peers at a barrier (they may be in a
        # collective it will never join): it leaves at once and they fail on its closed link
        cleanup_distributed(failed=not finished)
    if main and row:
        test = row["test"]
        print(
            f"run folder: {run_dir}\n"
            f"epoch {row['epoch'] + 1}: test acc@1 {test['acc1']:.2f}%  "
            f"acc@5 {test['acc5']:.2f}%  loss {test['loss']:.4f}"
        )
    return 0
