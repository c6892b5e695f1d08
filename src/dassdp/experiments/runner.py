"""Paired multi-seed sweeps: one training run per (variant, seed), resumable, 1 or N processes.

Layout of a comparison folder ``DIR``::

    DIR/compare.json                    what was asked (config, seeds, variants, overrides)
    DIR/<variant>/seed<k>/config.yaml   the resolved config (code revision in its header)
    DIR/<variant>/seed<k>/run.json      revision, versions, start time (the engine's)
    DIR/<variant>/seed<k>/metrics.jsonl one row per epoch
    DIR/<variant>/seed<k>/last.pt       the latest checkpoint (resume point)
    DIR/<variant>/seed<k>/done.json     written atomically, last: the run is finished
    DIR/<variant>/seed<k>/failed.json   the error of a run that failed (gone when it restarts)
    DIR/<variant>/seed<k>/robustness.json   (optional) accuracy under input perturbations
    DIR/jobs/                           submitit's files and logs (--launcher local|slurm)

Pairing: the config's ``seed`` is the only source of randomness (initial weights, data
order, augmentation) and DA-SSDP never draws from the global generators, so runs with the
same seed differ only by the variant's knobs.

Resuming: a folder with ``done.json`` is skipped; one with ``last.pt`` continues from it
(the engine restores everything, so an interrupted run ends exactly as an uninterrupted
one); one without is started. A folder whose config differs from the requested one is an
error, never overwritten.

Launchers: ``run_sweep`` runs in this process or a pool of ``workers``; the local and SLURM
launchers (:mod:`dassdp.experiments.launch`) run :func:`run_one` for each run in a submitit
job, with the same folder, checks and ``done.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dassdp._util.io import atomic_write_json
from dassdp._util.yamlfile import YAMLInputError, read_yaml_file
from dassdp.engine import config_to_dict, fit, load_checkpoint, load_config, read_metrics
from dassdp.engine.checkpoint import RESUMABLE_CHANGES
from dassdp.engine.config import ConfigError, TrainConfig, same_plasticity
from dassdp.engine.rundir import code_revision
from dassdp.engine.train import evaluate_checkpoint
from dassdp.experiments.robustness import Perturbation, Perturber
from dassdp.experiments.state import record_invocation
from dassdp.experiments.variants import variant_overrides

__all__ = [
    "DONE",
    "FAILED",
    "RunSpec",
    "SweepResult",
    "check_folders",
    "evaluate_robustness",
    "parse_seeds",
    "plan",
    "run_one",
    "run_sweep",
]

DONE = "done.json"
FAILED = "failed.json"
ROBUSTNESS = "robustness.json"
log = logging.getLogger("dassdp.compare")


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: where, which variant and seed, and the overrides that make it."""

    config: str
    variant: str
    seed: int
    run_dir: str
    overrides: tuple[str, ...]
    robustness: tuple[Perturbation, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.variant} seed{self.seed}"

    def resolve(self) -> TrainConfig:
        """The run's validated config: file, then user overrides, variant, seed."""
        return load_config(self.config, self.overrides)


@dataclass
class SweepResult:
    """What a sweep did, per run label: ``done`` (skipped), ``trained``, ``failed``."""

    status: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def parse_seeds(spec: str | Sequence[int]) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,2,5-6"`` -> [0, 2, 5, 6] (order kept, no duplicates)."""
    if not isinstance(spec, str):
        return list(dict.fromkeys(int(s) for s in spec))
    seeds: list[int] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise ValueError(f"--seeds: {part!r} is not N or N-M (e.g. 0-4 or 0,3,7)") from None
        if last < first:
            raise ValueError(f"--seeds: the range {part!r} is reversed; write {last}-{first}")
        seeds += range(first, last + 1)
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds {spec!r}: give seeds >= 0, e.g. 0-4")
    return list(dict.fromkeys(seeds))


def plan(
    config: str | os.PathLike,
    seeds: Sequence[int],
    variants: Sequence[str],
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
    robustness: Sequence[Perturbation] = (),
) -> list[RunSpec]:
    """Every (variant, seed) run, seed-major (so a stopped sweep has whole pairs done)."""
    specs = []
    for seed in seeds:
        for variant in variants:
            ov = (*overrides, *variant_overrides(variant), f"seed={seed}")
            run_dir = Path(out) / variant / f"seed{seed}"
            specs.append(RunSpec(str(config), variant, seed, str(run_dir), ov, tuple(robustness)))
    return specs


# ---------------------------------------------------------------- one run


# What may differ between a run folder and the requested run: where and how it runs, not
# what it computes. Unlike `dassdp train --resume`, `epochs` may not change: the cosine
# schedule depends on it, and a sweep must not mix runs of different lengths.
MAY_DIFFER = RESUMABLE_CHANGES - {"epochs"}


def _config_conflict(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Keys (other than :data:`MAY_DIFFER`) where a folder's config differs from ``cfg``."""
    new = config_to_dict(cfg)
    keys = set(saved) | set(new)
    return sorted(k for k in keys if not _same(k, saved.get(k), new.get(k)) and k not in MAY_DIFFER)


def _same(key: str, old: Any, new: Any) -> bool:
    """Equal values; two ``plasticity`` blocks are equal when they configure the same learner
    (a key added to the block since the folder was written takes the preset's value)."""
    return same_plasticity(old, new) if key == "plasticity" else old == new


def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping, or ``{}`` for an empty, truncated or foreign file."""
    try:
        data = read_yaml_file(path)
    except YAMLInputError:
        return {}
    return data if isinstance(data, dict) else {}


def _check_folder(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether to resume (``last.pt`` exists); raises if the folder holds a different run."""
    last, saved_yaml = run_dir / "last.pt", run_dir / "config.yaml"
    if last.is_file() and not (run_dir / DONE).is_file():  # resume: the checkpoint's config
        saved = load_checkpoint(last)["config"]
    elif saved_yaml.is_file():
        saved = _read_yaml(saved_yaml)
        if not set(config_to_dict(cfg)) <= set(saved):
            return False  # killed while the engine wrote config.yaml: nothing to keep
    else:
        return False
    conflict = _config_conflict(saved, cfg)
    if conflict:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k, None)!r}" for k in conflict)
        raise ConfigError(
            f"{run_dir} holds a run with a different config ({detail}); it is not overwritten: "
            "use another --out or remove that folder"
        )
    return last.is_file()


def check_folders(specs: Sequence[RunSpec]) -> None:
    """Every spec's config is valid and its folder holds no other run (a launcher checks
    this before it submits anything); raises :class:`ConfigError` naming the first."""
    for spec in specs:
        _check_folder(Path(spec.run_dir), spec.resolve())


def record_failure(run_dir: Path, err: BaseException, pid: int | None = None) -> None:
    """Write ``failed.json`` (the error, its traceback, where it ran: this process, or the
    process ``pid``) into an existing run folder; ``dassdp compare --status`` shows its
    first line."""
    if not run_dir.is_dir():
        return
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    failure = {
        "error": f"{type(err).__name__}: {err}",
        "traceback": tb,
        "host": platform.node(),
        "pid": os.getpid() if pid is None else pid,
        "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(run_dir / FAILED, failure)


def _finish(spec: RunSpec, run_dir: Path, wall_s: float, row: dict[str, Any]) -> dict[str, Any]:
    """Write ``done.json``: the final values come from the last epoch's row as trained
    (``row``; read back from ``metrics.jsonl`` only when the run was already complete)."""
    rows = read_metrics(run_dir)
    last = row or (rows[-1] if rows else {})
    done = {
        "variant": spec.variant,
        "seed": spec.seed,
        "config": spec.config,
        "overrides": list(spec.overrides),
        "revision": code_revision(),
        "epochs": len(rows),
        "final_test_acc1": last.get("test", {}).get("acc1"),
        "final_test": last.get("test"),
        "best_test_acc1": max((r["test"]["acc1"] for r in rows), default=None),
        "wall_s": wall_s,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(run_dir / DONE, done)  # last: marks the run as finished
    return done


def run_one(
    spec: RunSpec,
    *,
    should_stop: Callable[[], bool] | None = None,
    run_info: dict[str, Any] | None = None,
    main: bool = True,
) -> str:
    """Train (or resume, or skip) one run; then its robustness evaluation if asked.

    Returns ``"done"`` (already finished: nothing is touched), ``"trained"``, or
    ``"interrupted"`` (``should_stop`` said so after an epoch: ``last.pt`` holds it). A
    training error is written to ``failed.json`` and raised. ``run_info``: extra ``run.json``
    fields of this start. Under DDP every rank calls this; ranks other than 0 pass
    ``main=False`` and only train (no checks, files or output).
    """
    run_dir = Path(spec.run_dir)
    cfg = spec.resolve()
    hooks = {
        k: v for k, v in (("should_stop", should_stop), ("run_info", run_info)) if v is not None
    }
    if not main:
        if (run_dir / DONE).is_file():
            return "done"
        row = fit(cfg, run_dir, resume=(run_dir / "last.pt").is_file(), **hooks)
        return "interrupted" if _stopped_early(row, cfg) else "trained"
    resume = _check_folder(run_dir, cfg)  # also for finished runs: one config per folder
    status = "done"
    if not (run_dir / DONE).is_file():
        print(
            f"[compare] {spec.label}: {'resuming' if resume else 'training'} in {run_dir}",
            flush=True,
        )
        (run_dir / FAILED).unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            with _epoch_lines(spec.label):
                row = fit(cfg, run_dir, resume=resume, **hooks)
        except Exception as err:
            record_failure(run_dir, err)
            raise
        if _stopped_early(row, cfg):
            print(f"[compare] {spec.label}: stopped after epoch {row['epoch'] + 1}", flush=True)
            return "interrupted"
        done = _finish(spec, run_dir, time.perf_counter() - start, row)
        print(
            f"[compare] {spec.label}: finished, final test acc@1 {done['final_test_acc1']:.2f}% "
            f"({done['wall_s'] / 60:.1f} min)",
            flush=True,
        )
        status = "trained"
    if spec.robustness and not (run_dir / ROBUSTNESS).is_file():
        result = evaluate_robustness(run_dir / "last.pt", spec.robustness, seed=spec.seed)
        atomic_write_json(run_dir / ROBUSTNESS, result)
    return status


def _stopped_early(row: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether ``fit`` returned before the last epoch (on a ``should_stop`` request)."""
    return bool(row) and row["epoch"] + 1 < cfg.epochs


@contextlib.contextmanager
def _epoch_lines(label: str) -> Iterator[None]:
    """The engine's log lines (one per epoch) on stdout as ``[compare] LABEL: ...`` while a
    run trains; the engine's own ``train.log`` handler receives them too."""
    engine = logging.getLogger("dassdp.train")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[compare] {label}: %(message)s"))
    level, propagate = engine.level, engine.propagate
    engine.addHandler(handler)
    engine.setLevel(logging.INFO)
    engine.propagate = False  # not twice when the caller configured logging
    try:
        yield
    finally:
        engine.removeHandler(handler)
        engine.setLevel(level)
        engine.propagate = propagate


def evaluate_robustness(
    checkpoint: str | os.PathLike,
    conditions: Sequence[Perturbation],
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Test metrics of ``checkpoint`` clean and under each perturbation (one at a time).

    Returns ``{"checkpoint", "epoch", "seed", "overrides", "conditions": [{name, kind, value,
    loss, acc1, acc5, samples}, ...]}`` with ``clean`` first. ``seed`` seeds every perturbation's
    generator, so runs with the same seed see the same perturbed inputs.
    """
    rows = []
    result: dict[str, Any] = {}
    for cond in (Perturbation("clean"), *[c for c in conditions if c.kind != "clean"]):
        transform = None if cond.kind == "clean" else Perturber(cond, seed=seed)
        result = evaluate_checkpoint(checkpoint, overrides, transform=transform)
        rows.append({"name": cond.name, "kind": cond.kind, "value": cond.value, **result["test"]})
    return {
        "checkpoint": str(checkpoint),
        "epoch": result.get("epoch"),
        "seed": seed,
        "overrides": list(overrides),
        "conditions": rows,
    }


# ---------------------------------------------------------------- the sweep


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the sweep's process dies, even by SIGKILL,
    so no orphan keeps training (and taking queued runs) behind a rerun's back.

    Linux: the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``). Everywhere:
    a daemon thread checks once a second that the parent pid is still ours.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="dassdp-parent-watch", daemon=True).start()


def _run_safely(spec: RunSpec) -> tuple[str, str | None]:
    """One run, its status and error text (never raises Exception)."""
    import torch

    torch.set_num_threads(1)
    try:
        return run_one(spec), None
    except Exception as err:  # one failed run must not stop the others
        return "failed", f"{type(err).__name__}: {err}"


def _worker_main(spec: RunSpec, conn: Any, parent: int) -> None:
    """Entry of a worker process (one per run): the run, then ``(status, error)`` on
    ``conn``. Ctrl-C is the sweep's to handle: it ends its workers (SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    conn.send(_run_safely(spec))
    conn.close()


def run_sweep(
    specs: Sequence[RunSpec],
    out: str | os.PathLike,
    workers: int = 1,
    argv: Sequence[str] | None = None,
) -> SweepResult:
    """Run every spec (skipping finished ones), sequentially or in ``workers`` processes.

    Failures are collected, not raised (a ``KeyboardInterrupt`` stops the sweep; rerunning
    it continues where it stopped). Each run first checks that its config is valid.
    """
    for spec in specs:
        spec.resolve()  # every config error before any training starts (or any folder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record_invocation(out, specs, argv if argv is not None else sys.argv, launcher="pool")
    result = SweepResult()
    if workers <= 1:
        for spec in specs:
            result.status[spec.label], error = _run_safely(spec)
            if error:
                result.errors[spec.label] = error
                print(f"[compare] {spec.label}: FAILED: {error}", file=sys.stderr)
        return result
    return _run_parallel(specs, workers, result)


class WorkerDied(RuntimeError):
    """A sweep worker process ended (a signal, ``os._exit``) before reporting its run."""


@dataclass
class _Worker:
    """A worker process running one spec, and the read end of its result pipe."""

    spec: RunSpec
    proc: Any
    conn: Any


def _start_worker(ctx: Any, spec: RunSpec) -> _Worker:
    """A fresh (spawned) process that runs ``spec``."""
    conn, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_worker_main, args=(spec, child, os.getpid()), name=f"dassdp {spec.label}"
    )
    proc.start()
    child.close()  # ours closed: the pipe reads EOF when the worker dies
    return _Worker(spec, proc, conn)


def _outcome(worker: _Worker) -> tuple[str, str | None]:
    """``(status, error)`` of a worker that sent its result or ended (waits for its end)."""
    try:
        outcome = worker.conn.recv() if worker.conn.poll() else None
    except (EOFError, OSError):  # it ended without a result
        outcome = None
    worker.conn.close()
    worker.proc.join(None if outcome is None else 60)
    if worker.proc.is_alive():  # sent its result but hangs on the way out
        worker.proc.kill()
        worker.proc.join()
    if outcome is not None:
        return outcome
    error = _death_message(worker)
    record_failure(Path(worker.spec.run_dir), WorkerDied(error), pid=worker.proc.pid)
    return "failed", error


def _death_message(worker: _Worker) -> str:
    """One line: which worker died, how, in which folder, and what a rerun does."""
    code = worker.proc.exitcode
    try:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else ""
    except ValueError:
        how = f"was killed by signal {-code}"
    how = how or f"exited with status {code} before reporting the run"
    run_dir = Path(worker.spec.run_dir)
    rerun = "resumes it" if (run_dir / "last.pt").is_file() else "starts it again"
    return (
        f"its worker process (pid {worker.proc.pid}) {how} while running it in {run_dir}; "
        f"rerunning the same command {rerun}"
    )


def _run_parallel(specs: Sequence[RunSpec], workers: int, result: SweepResult) -> SweepResult:
    """Each run in its own spawned process, at most ``workers`` at once. A worker that dies
    (SIGKILL, out of memory, a crash) fails its run only: the others, running or queued,
    go on. Ending this function early (Ctrl-C) ends the workers (SIGTERM)."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    queue, running = list(reversed(specs)), []
    try:
        while queue or running:
            while queue and len(running) < workers:
                running.append(_start_worker(ctx, queue.pop()))
            ready = set(wait([w.conn for w in running] + [w.proc.sentinel for w in running]))
            for worker in [w for w in running if {w.conn, w.proc.sentinel} & ready]:
                running.remove(worker)
                result.status[worker.spec.label], error = _outcome(worker)
                if error:
                    result.errors[worker.spec.label] = error
                    print(f"[compare] {worker.spec.label}: FAILED: {error}", file=sys.stderr)
    finally:
        for worker in running:
            worker.proc.terminate()
        for worker in running:
            worker.proc.join()
    return result
