"""The training loop: one run of a :class:`~dassdp.engine.config.TrainConfig` in a run folder.

The step reads top to bottom::

    forward -> loss -> backward -> optimizer step -> plasticity.step(loss) -> dassdp.reset(model)

and everything else (builders, checkpoints, metrics) happens around it. Run folder::

    runs/<name>/config.yaml     the resolved config (code revision in its header)
    runs/<name>/run.json        revision, versions, command line, start time (rundir.py),
                                the LIF backend each layer ran (after the first step)
    runs/<name>/metrics.jsonl   one row per epoch (see dassdp.engine.metrics)
    runs/<name>/train.log       the log lines
    runs/<name>/last.pt         after every epoch (atomic); --resume continues from it
    runs/<name>/best.pt         the epoch with the best test acc@1

DDP: launched by ``torchrun``, each rank trains on its ``DistributedSampler`` shard; DA-SSDP
all-reduces its own statistics and updates, test metrics are summed over ranks, and only
rank 0 logs and writes files. Resume is exact (bit-identical weights on CPU): the
checkpoint holds model, optimizer, scheduler, grad scaler, DA-SSDP state, every global
RNG state (per rank) and the data-order generator.

Precision (``amp``): float32, bfloat16 autocast (no grad scaler) or float16 autocast with a
``GradScaler`` (CUDA). ``compile`` wraps the training forward in ``torch.compile``;
evaluation runs the eager model in the same autocast dtype. Resume is bit-exact only with
the same device, precision and compile setting (which config keys a resume may change:
:data:`dassdp.engine.checkpoint.RESUMABLE_CHANGES`).

The step itself (forward, loss, backward, clip, optimizer/scaler step, DA-SSDP step, reset,
meters) is :func:`dassdp.engine.step.train_step`, with its host reads: one per step in every
precision, DA-SSDP included.

The loss, accuracy, non-finite and DA-SSDP meters accumulate on the device and are read
once per epoch; a progress bar (``progress``) shows the running loss every
:data:`PROGRESS_EVERY` steps (one read each time).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import dassdp
from dassdp.engine import step as engine_step
from dassdp.engine.builders import (
    build_criterion,
    build_datasets,
    build_learner,
    build_loaders,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
    data_info,
    load_pretrained,
)
from dassdp.engine.checkpoint import (
    CheckpointError,
    check_resumable,
    load_checkpoint,
    load_model_state,
    resume_config,
    save_checkpoint,
)
from dassdp.engine.config import ConfigError, TrainConfig, apply_overrides, config_from_dict
from dassdp.engine.distributed import (
    broadcast_buffers,
    init_distributed,
    pick_device,
    replicas_identical,
)
from dassdp.engine.metrics import FiringRates, LossMeter, MetricsWriter, PlasticityMeter
from dassdp.engine.precision import autocast, compile_model, prepare_model, resolve_amp
from dassdp.engine.rundir import (
    RunLock,
    add_to_run_json,
    check_run_folder,
    code_revision,
    write_run_files,
)
from dassdp.engine.seed import get_rng_state, seed_everything, set_rng_state

__all__ = [
    "PROGRESS_EVERY",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
]

log = logging.getLogger("dassdp.train")

PROGRESS_EVERY = 50  # steps between progress-bar loss updates (each is one host read)


class _RunLogs:
    """The ``train.log`` handlers of the open trainers on the ``dassdp.train`` logger.

    So that ``train.log`` gets the epoch lines (INFO) even where logging is not configured
    (Python's default is WARNING), the logger's own level is set to INFO while a run log is
    open, if it would drop them. It is put back when the last one closes, and only if it
    still is the INFO set here: a level someone else set in between (a test's ``caplog``,
    an application) is theirs, never overwritten with a stale value.
    """

    def __init__(self) -> None:
        self.handlers: list[logging.Handler] = []
        self.saved_level: int | None = None  # the level before it was raised; None: untouched

    def open(self, path: Path) -> logging.Handler:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        if self.saved_level is None and log.getEffectiveLevel() > logging.INFO:
            self.saved_level = log.level
            log.setLevel(logging.INFO)
        self.handlers.append(handler)
        return handler

    def close(self, handler: logging.Handler) -> None:
        log.removeHandler(handler)
        handler.close()
        if handler in self.handlers:
            self.handlers.remove(handler)
        if not self.handlers and self.saved_level is not None:
            if log.level == logging.INFO:  # still the level set here
                log.setLevel(self.saved_level)
            self.saved_level = None


_RUN_LOGS = _RunLogs()


class TrainingDiverged(RuntimeError):
    """The weights (or buffers) became non-finite: training stopped, checkpoints kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` (Ctrl-C, SIGINT) stopped :meth:`Trainer.fit`; still a
    ``KeyboardInterrupt`` for those who catch that. ``epoch``: the 1-based epoch it stopped
    in; ``completed``: the epochs in the run folder's ``last.pt`` (0: none yet); ``run_dir``
    and ``epochs`` (the planned total) for the message that says how to go on."""

    def __init__(self, epoch: int, completed: int, trainer: Trainer) -> None:
        self.epoch, self.completed = epoch, completed
        self.epochs, self.run_dir = trainer.cfg.epochs, trainer.run_dir
        super().__init__(self.describe())

    def describe(self) -> str:
        """One line: where it stopped, what is kept, how to go on."""
        where = f"interrupted in epoch {self.epoch}/{self.epochs}"
        if not self.completed:
            return f"{where}, before any epoch was complete; start it again the same way"
        return (
            f"{where}; {self.run_dir / 'last.pt'} holds {self.completed} complete epoch(s); "
            f"resume with: dassdp train --resume --out {self.run_dir}"
        )


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the model's floating parameters and buffers holding NaN or inf; checked on
    the device with a single host read when all are finite (the usual case)."""
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    tensors = [(name, t) for name, t in named if t.is_floating_point()]
    if not tensors:
        return []
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors])  # [N] bool
    if bool(flags.all()):
        return []
    return [name for (name, _), ok in zip(tensors, flags.tolist()) if not ok]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: torch.dtype | bool | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Test loss (cross entropy), acc@1, acc@5 (percent) over ``loader``, summed over ranks.

    ``amp``: the autocast dtype (``None``/``False``: float32; ``True``: float16).
    ``transform``: applied to each input batch on the device before the model (e.g. a
    robustness perturbation from :mod:`dassdp.experiments.robustness`).
    """
    dtype = torch.float16 if amp is True else (amp or None)
    model.eval()
    meter = LossMeter(device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if transform is not None:
            x = transform(x)
        with autocast(device, dtype):
            logits = model(x)  # [B, K]
        meter.update(F.cross_entropy(logits.float(), y), logits, y)
        dassdp.reset(model)
    return meter.result()


class Trainer:
    """Builds everything for ``cfg`` and trains it in ``run_dir``.

    Args:
        cfg: a validated config.
        run_dir: the run folder (created; rank 0 writes into it).
        resume: ``False``, ``True`` (``run_dir/last.pt``) or a checkpoint path.

    After construction the parts are plain attributes (``model``, ``optimizer``,
    ``scheduler``, ``learner``, ``train_loader`` ...) and ``start_epoch`` is where
    :meth:`fit` begins.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | os.PathLike,
        *,
        resume: bool | str = False,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._run_info = dict(run_info or {})  # extra run.json fields of this start
        self.dist = init_distributed(cfg.device)
        self.device = self.dist.device
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.amp = resolve_amp(cfg.amp, self.device)  # autocast dtype; None: float32
        seed_everything(cfg.seed)
        self.info = data_info(cfg)
        train_set, test_set = build_datasets(cfg)
        self.model = build_model(cfg, self.info)
        if cfg.pretrained:
            load_pretrained(self.model, cfg.pretrained)
        if cfg.sync_bn and self.dist.distributed:
            if self.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:
                log.warning("sync_bn: SyncBatchNorm needs CUDA; plain BatchNorm on CPU")
        self.model.to(self.device)
        self._cudnn_benchmark = torch.backends.cudnn.benchmark  # restored by close()
        prepare_model(self.model, cfg, self.device)  # channels_last, cudnn_benchmark
        self.learner = build_learner(cfg, self.model)  # hooks on the unwrapped model
        self.net = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:  # the training forward only; hooks on self.model are traced into it
            self.net = compile_model(self.net, cfg)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        fp16 = self.amp == torch.float16  # bf16 has float32's range: no grad scaler
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.mixup = build_mixup(cfg, self.info)
        self.criterion = build_criterion(cfg)
        seed_everything(cfg.seed + self.dist.rank)  # augmentation differs across ranks
        self.train_loader, self.test_loader, self.loader_gen = build_loaders(
            cfg, train_set, test_set, self.dist
        )
        self.firing = FiringRates(self.model)
        self.start_epoch, self.best_acc1 = 0, -math.inf
        self._epoch = self._saved_epochs = 0  # in progress (0-based); held by last.pt
        self._resumed, self._backends_recorded = bool(resume), False
        self.writer: MetricsWriter | None = None
        try:  # everything is checked and restored before the first file is written
            path = self._resume(resume)
            if self.dist.main:
                self._prepare_run_dir(path)
        except BaseException:
            self.close()  # hooks and log files must not outlive a failed start
            raise
        if path is not None:
            log.info("resumed from %s at epoch %d", path, self.start_epoch)

    # ----------------------------------------------------------------- run folder
    def _resume(self, resume: bool | str) -> Path | None:
        """Check the run folder (rank 0) and, for a resume, restore the checkpoint: it must
        be a full training checkpoint of this run (:func:`resume_config`). Writes nothing;
        returns the checkpoint's path (None for a new start)."""
        path = None if not resume else self.run_dir / "last.pt" if resume is True else Path(resume)
        state = None
        if path is not None:
            state = load_checkpoint(path, map_location="cpu")
            check_resumable(state, path)
            resume_config(state["config"], self.cfg)  # the same run, resumable keys aside
        if self.dist.main:  # the folder: new, empty, or this run's (never another's)
            check_run_folder(self.run_dir, self.cfg, resume=path or False)
        if state is not None:
            self.load_state_dict(state, source=path)
            if path != self.run_dir / "last.pt":
                self._saved_epochs = 0  # from elsewhere: this folder has no last.pt yet
        return path

    def _prepare_run_dir(self, resumed_from: Path | None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # called inside __init__'s try: a failure here closes the trainer (lock, hooks, log)
        self._lock = RunLock(self.run_dir)  # one trainer per folder; freed when we die
        write_run_files(
            self.run_dir,
            self.cfg,
            world_size=self.dist.world_size,
            device=str(self.device),
            resumed_from=resumed_from,
            extra=self._run_info,
        )
        self._open_log()  # after config.yaml: a folder with a train.log holds a run's config

    def _open_log(self) -> None:
        """Send this run's log lines to ``train.log`` in the run folder (until :meth:`close`)."""
        self._log_handler = _RUN_LOGS.open(self.run_dir / "train.log")

    # ----------------------------------------------------------------- the loop
    def fit(
        self, stop_after: int | None = None, should_stop: Callable[[], bool] | None = None
    ) -> dict[str, Any]:
        """Train from ``start_epoch`` to ``cfg.epochs``; ``stop_after``: stop once that many
        epochs are complete (a planned interruption); ``should_stop``: asked after each
        epoch's checkpoint, on every rank (True on any rank stops all: e.g. a time-limit
        signal). Returns the last metrics row.

        Raises :class:`TrainingDiverged` when an epoch leaves non-finite weights; the
        checkpoints of the epochs before it are kept."""
        cfg = self.cfg
        if stop_after is not None and stop_after < 1:
            raise ValueError(f"stop_after must be >= 1 (epochs to complete), got {stop_after}")
        if self.start_epoch >= cfg.epochs:
            log.info("all %d epochs are already complete in %s", cfg.epochs, self.run_dir)
        if self.dist.main and self.writer is None:
            self.writer = MetricsWriter(self.run_dir, self.cfg.tensorboard, self.start_epoch)
        try:
            return self._epochs(stop_after, should_stop)
        except KeyboardInterrupt:
            raise TrainingInterrupted(self._epoch + 1, self._saved_epochs, self) from None

    def _epochs(
        self, stop_after: int | None, should_stop: Callable[[], bool] | None
    ) -> dict[str, Any]:
        cfg, row = self.cfg, {}
        for epoch in range(self.start_epoch, cfg.epochs):
            self._epoch = epoch
            t0 = time.perf_counter()
            self.scheduler.step(epoch)  # timm: per-epoch cosine with warm-up
            if self.learner is not None:
                self.learner.set_epoch(epoch)  # warm-up: record only; then fit the gate once
            self.train_loader.sampler.set_epoch(epoch)  # the order is f(seed, epoch)
            train = self.train_epoch(epoch)
            self._check_finite(epoch, train)  # before any checkpoint of this epoch is written
            test = evaluate(self.model, self.test_loader, self.device, self.amp)
            row = {
                "epoch": epoch,
                "lr": self.optimizer.param_groups[0]["lr"],
                **train,
                "test": test,
                "epoch_time_s": time.perf_counter() - t0,
            }
            if self.dist.distributed:
                row["replicas_identical"] = self._check_replicas()
            self.start_epoch = epoch + 1
            is_best = test["acc1"] > self.best_acc1
            self.best_acc1 = max(self.best_acc1, test["acc1"])
            # the row first: a run killed between the two resumes from the previous
            # checkpoint and rewrites this epoch's row, never loses it
            self._report(row)
            self._save(is_best=is_best)
            if stop_after is not None and epoch + 1 >= stop_after:
                break
            last = epoch + 1 >= cfg.epochs  # the same on every rank: the collective agrees
            if should_stop is not None and not last and self._any_rank(should_stop()):
                log.info("stopping on request after epoch %d (last.pt holds it)", epoch + 1)
                break
        return row

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a collective under DDP)."""
        if not self.dist.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def _check_finite(self, epoch: int, train: dict[str, Any]) -> None:
        bad = nonfinite_tensors(self.model)
        if not bad:
            return
        kept = (
            f"{self.run_dir / 'last.pt'} keeps epoch {epoch}, the last finite weights"
            if epoch
            else "no checkpoint was written"
        )
        message = (
            f"training diverged in epoch {epoch + 1}: non-finite values in "
            f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''} (train loss "
            f"{train['train']['loss']:.3g}, lr {self.optimizer.param_groups[0]['lr']:.3g}); "
            f"stopped; {kept}. Lower lr, set "
            "grad_clip, or check the data"
        )
        log.error(message)
        raise TrainingDiverged(message)

    def _check_replicas(self) -> bool:
        """DDP: do all ranks hold bit-identical weights, buffers and DA-SSDP gate? (collective)"""
        fits = getattr(self.learner, "fits", None) or {}  # warm-up sums are per rank: not here
        gate = {site: fit.to_dict() for site, fit in fits.items()}
        same = bool(replicas_identical(self.model, json.dumps(gate, sort_keys=True).encode()))
        if not same and self.dist.main:
            log.warning("replicas differ across ranks: weights, buffers or gate are not in sync")
        return same

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training data; returns the epoch's train/plasticity metrics."""
        self.net.train()
        meter = LossMeter(self.device)
        plast = PlasticityMeter(self.learner) if self.learner is not None else None
        nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        batches = self._batches(epoch)
        bar = batches if getattr(batches, "disable", True) is False else None  # a shown tqdm
        for i, (x, y) in enumerate(batches, 1):
            nonfinite += self.train_step(x, y, meter, plast)
            if not self._backends_recorded:
                self._record_backends()  # resolved at the first forward: record it now
            if bar is not None and i % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{meter.mean_loss():.4f}")  # one host read
        broadcast_buffers(self.model)  # DDP: rank 0's BN statistics for eval and checkpoints
        out: dict[str, Any] = {"train": meter.result(), "nonfinite_steps": int(nonfinite)}
        out["firing_rate"] = self.firing.pop()
        if plast is not None:
            out["plasticity"] = plast.result()
        return out

    def train_step(
        self, x: Tensor, y: Tensor, meter: LossMeter, plast: PlasticityMeter | None
    ) -> Tensor:
        """One step on a batch (x: ``[B, C, H, W]`` images, repeated over T by the model, or
        ``[B, T, C, H, W]`` frames; y: ``[B]``) through :func:`dassdp.engine.step.train_step`;
        returns 1 if the loss was non-finite (a 0-d device tensor)."""
        out = engine_step.train_step(
            x, y, model=self.model, optimizer=self.optimizer, criterion=self.criterion,
            learner=self.learner, scaler=self.scaler, amp=self.amp, grad_clip=self.cfg.grad_clip,
            mixup=self.mixup, net=self.net, device=self.device, meter=meter, plast=plast,
        )  # fmt: skip
        return out.nonfinite

    def _batches(self, epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
        """The epoch's training batches (at most ``limit_train_batches``), with a progress bar
        on rank 0 when ``progress`` is set and stderr is a terminal."""
        limit = self.cfg.limit_train_batches
        batches = self.train_loader if limit is None else itertools.islice(self.train_loader, limit)
        if not (self.dist.main and self.cfg.progress):
            return batches
        from tqdm import tqdm

        total = len(self.train_loader) if limit is None else min(limit, len(self.train_loader))
        desc = f"epoch {epoch + 1}/{self.cfg.epochs}"
        return tqdm(batches, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)

    # ----------------------------------------------------------------- reporting
    def _record_backends(self) -> None:
        """After the first training step: the LIF backend each layer ran, counted per backend
        (plus the Triton version where it ran), in the log and in ``run.json`` (the latest
        resume's entry after a resume)."""
        from dassdp.neurons import resolved_backends
        from dassdp.neurons.backends.triton import triton_version

        self._backends_recorded = True
        layers = resolved_backends(self.model)
        record: dict[str, Any] = {"requested": self.cfg.lif_backend, "layers": layers}
        if "triton" in layers:
            record["triton"] = triton_version()
        if not self.dist.main:
            return
        ran = ", ".join(f"{name} {n}" for name, n in layers.items()) or "no LIF layers"
        triton = f" (triton {record['triton']})" if "triton" in record else ""
        log.info("LIF backends (lif_backend=%s): %s%s", self.cfg.lif_backend, ran, triton)
        add_to_run_json(self.run_dir, {"lif_backends": record}, resumed=self._resumed)

    def _report(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        self.writer.write(row)
        tr, te = row["train"], row["test"]
        line = (
            f"epoch {row['epoch'] + 1}/{self.cfg.epochs}  lr {row['lr']:.2e}  "
            f"train loss {tr['loss']:.4f} acc {tr['acc1']:.2f}  "
            f"test loss {te['loss']:.4f} acc {te['acc1']:.2f} (best {self.best_acc1:.2f})  "
            f"{row['epoch_time_s']:.1f} s"
        )
        if row["nonfinite_steps"]:
            line += f"  non-finite steps {row['nonfinite_steps']}"
        if "plasticity" in row:
            line += "  " + _plasticity_line(row["plasticity"])
        log.info(line)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (a collective under DDP: call on all ranks)."""
        rng = get_rng_state()
        if self.dist.distributed:
            all_rng: list[Any] = [None] * self.dist.world_size
            torch_dist.all_gather_object(all_rng, rng)
            rng = all_rng
        else:
            rng = [rng]
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "plasticity": self.learner.state_dict() if self.learner is not None else None,
            "rng": rng,
            "loader": self.loader_gen.get_state(),
            "epoch": self.start_epoch,
            "best_acc1": self.best_acc1,
            "config": dataclasses.asdict(self.cfg),
            "revision": code_revision(),
        }

    def load_state_dict(
        self, state: dict[str, Any], source: str | os.PathLike = "the checkpoint"
    ) -> None:
        """Restore :meth:`state_dict` (model, optimizer, ..., RNG states, epoch); a state that
        does not fit this trainer is a :class:`CheckpointError` naming ``source``."""
        check_resumable(state, source)
        load_model_state(self.model, state["model"], source)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, TypeError) as err:  # torch's words for a mismatch
            raise CheckpointError(
                f"{source}: its optimizer/scheduler state does not fit this run's ({err})"
            ) from None
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.learner is not None:
            if state["plasticity"] is None:
                raise ConfigError(f"{source} has no DA-SSDP state but the config has one")
            self.learner.load_state_dict(state["plasticity"])
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
        self.loader_gen.set_state(state["loader"])
        self.start_epoch = self._epoch = self._saved_epochs = int(state["epoch"])
        self.best_acc1 = float(state["best_acc1"])

    def _save(self, is_best: bool) -> None:
        state = self.state_dict()  # collective: every rank
        if self.dist.main:
            save_checkpoint(state, self.run_dir / "last.pt")
            if is_best:
                save_checkpoint(state, self.run_dir / "best.pt")
        self._saved_epochs = self.start_epoch

    def close(self) -> None:
        """Remove hooks and close the log files."""
        self.firing.close()
        if self.learner is not None:
            self.learner.close()
        torch.backends.cudnn.benchmark = self._cudnn_benchmark
        if self.writer is not None:
            self.writer.close()
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            _RUN_LOGS.close(handler)
            self._log_handler = None
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()


def _plasticity_line(p: dict[str, Any]) -> str:
    parts = [f"DA-SSDP {p['phase']}"]
    if p["phase"] == "off":
        return parts[0]
    for site, m in p["sites"].items():
        part = f"{site}: S {m.get('synchrony', math.nan):.3f}"
        if p["phase"] == "active":
            part += f" G {m.get('gate_mean', math.nan):.3f} |dW| {m.get('dw_abs_mean', 0):.1e}"
        parts.append(part)
    skipped = sum(v for k, v in p["counters"].items() if k.startswith("skipped"))
    if skipped:
        parts.append(f"skipped {skipped}")
    return "  ".join(parts)


def evaluate_checkpoint(
    path: str | os.PathLike,
    overrides: Sequence[str] = (),
    transform: Callable[[Tensor, int], Tensor] | None = None,
) -> dict[str, Any]:
    """Test metrics of a checkpoint, with its stored config (plus ``key=value`` overrides).

    ``transform(x, T)``: applied to every test batch (``x`` images ``[B, C, H, W]`` or frames
    ``[B, T, C, H, W]`` on the device, ``T`` the config's time steps) before the model; see
    :class:`dassdp.experiments.robustness.Perturber`.

    Returns ``{"epoch", "model", "dataset", "test": {loss, acc1, acc5, samples}, "gate"}``;
    ``gate`` maps each DA-SSDP site to its fit (``k: None`` while still in warm-up).
    """
    state = load_checkpoint(path)
    saved = {**state["config"], "pretrained": None}  # the weights come from the checkpoint
    cfg = config_from_dict(apply_overrides(saved, overrides))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    info = data_info(cfg)
    _, test_set = build_datasets(cfg)
    model = build_model(cfg, info)
    load_model_state(model, state["model"], path)
    bad = nonfinite_tensors(model)
    if bad:  # as training refuses to go on: no accuracy of a diverged or damaged model
        raise CheckpointError(
            f"{path} holds non-finite weights (NaN or inf in {', '.join(bad[:6])}"
            f"{' ...' if len(bad) > 6 else ''}); it is not evaluated: use an earlier "
            "checkpoint of the run"
        )
    loader = DataLoader(test_set, batch_size=cfg.batch_size, num_workers=cfg.workers or 0)
    bound = None if transform is None else (lambda x: transform(x, cfg.T))
    test = evaluate(model.to(device), loader, device, resolve_amp(cfg.amp, device), bound)
    plast = state.get("plasticity")
    gate = None
    if plast is not None:
        fits = plast.get("fits") or {}
        gate = {site: fits.get(site, {"k": None}) for site in plast["sites"]}
    return {
        "epoch": int(state["epoch"]),
        "model": cfg.model,
        "dataset": cfg.dataset,
        "test": test,
        "gate": gate,
    }


def fit(
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool | str = False,
    stop_after: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` (see :class:`Trainer`; ``run_info``: extra fields for this
    start in ``run.json``, ``should_stop``: see :meth:`Trainer.fit`); returns the last
    metrics row."""
    trainer = Trainer(cfg, run_dir, resume=resume, run_info=run_info)
    try:
        return trainer.fit(stop_after=stop_after, should_stop=should_stop)
    finally:
        trainer.close()
