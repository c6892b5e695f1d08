"""Per-epoch metrics: loss/accuracy meters, firing rates, DA-SSDP statistics, the log files.

One JSON object per epoch goes to ``metrics.jsonl`` in the run folder (and to TensorBoard
when ``torch.utils.tensorboard`` imports): ``epoch``, ``lr``, ``train`` and ``test``
(``loss``, ``acc1``, ``acc5`` in percent, ``samples``), ``nonfinite_steps``,
``firing_rate`` (per neuron layer: mean spikes per neuron per time step over the training
epoch), ``plasticity`` (phase, counters of this epoch, per-site synchrony / gate / |dW|
averaged over the epoch's recorded steps, with ``plasticity.learn`` also the learned
``sigma``, ``amplitude`` and their hypergradients, and the gate fit ``k``, ``mu``, ``sd``) and
``epoch_time_s``. Meters keep running sums on the device and synchronise once per epoch:
their per-step ``update`` reads nothing back to the host.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dassdp._util.io import atomic_write_text, write_error
from dassdp._util.recompute import is_recomputing
from dassdp.plasticity import distributed as D

__all__ = [
    "FiringRates",
    "LossMeter",
    "MetricsWriter",
    "PlasticityMeter",
    "accuracy_counts",
    "neuron_layers",
    "read_metrics",
]


def accuracy_counts(logits: Tensor, target: Tensor) -> Tensor:
    """Correct top-1 and top-5 predictions: logits ``[B, K]``, target ``[B]`` -> ``[2]``."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # [B, k]
    hit = top.eq(target[:, None])
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).double()


class LossMeter:
    """Sample-weighted loss and top-1/top-5 accuracy over an epoch, summed over ranks."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, c1, c5, n

    @torch.no_grad()
    def update(self, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        """``loss``: the batch mean; ``logits`` ``[B, K]``; ``target`` ``[B]`` class indices."""
        # a non-finite loss (a skipped step, counted elsewhere) must not poison the mean: it
        # is masked out on the device, as a Python `if` would read the flag to the host
        finite = torch.isfinite(loss.detach()).all()
        n = target.shape[0]
        row = torch.cat([(loss.double() * n).reshape(1), accuracy_counts(logits.float(), target)])
        row = torch.cat([row, row.new_full((1,), n)])  # [loss*n, c1, c5, n]
        self.sums += torch.where(finite, row, 0.0)

    def mean_loss(self) -> float:
        """The running mean loss on this rank (one host read; for progress bars)."""
        loss_n, n = self.sums[0::3].tolist()  # [loss*n, n]
        return loss_n / n if n else math.nan

    def result(self, reduce: bool = True) -> dict[str, float]:
        """``loss``, ``acc1``, ``acc5`` (percent) and ``samples``; all-reduced over ranks."""
        sums = D.all_reduce_(self.sums.clone(), "sum") if reduce else self.sums
        loss_n, c1, c5, n = sums.tolist()
        if n == 0:
            return {"loss": math.nan, "acc1": math.nan, "acc5": math.nan, "samples": 0}
        return {"loss": loss_n / n, "acc1": 100 * c1 / n, "acc5": 100 * c5 / n, "samples": int(n)}


def neuron_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The spiking neuron modules of ``model`` by name (dassdp LIF/PLIF, or named like one)."""
    from dassdp.neurons import LIF, PLIF

    found = {}
    for name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, LIF | PLIF) or cls.endswith(("LIF", "IFNode", "LIFNode", "Leaky")):
            found[name] = module
    return found


class FiringRates:
    """Forward hooks that average each neuron layer's output (spikes) while training.

    The rate of a layer is ``sum(spikes) / numel`` over the epoch's training forwards: the
    mean spikes per neuron per time step. Costs one reduction per layer per forward.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = neuron_layers(model)
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not module.training or is_recomputing():  # not twice under checkpointing
                return
            out = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                total = out.detach().float().sum()
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            self.counts[name] = self.counts.get(name, 0) + out.numel()

        return hook

    def pop(self) -> dict[str, float]:
        """Rates since the last ``pop`` (one sync), then start again from zero."""
        names = list(self.sums)
        if not names:
            return {}
        totals = torch.stack([self.sums[n] for n in names]).double().cpu().tolist()
        rates = {n: t / self.counts[n] for n, t in zip(names, totals)}
        self.sums.clear()
        self.counts.clear()
        return rates

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class PlasticityMeter:
    """Epoch view of a :class:`dassdp.DASSDP`: averaged site metrics and counter deltas.

    Per-step sums stay on the device (no host read per step): each step adds the learner's
    last metrics (``last_metrics(as_tensors=True)``) times its 0/1 ``last_step_recorded``
    flag; the counters are read once, in :meth:`result`.
    """

    def __init__(self, learner: Any) -> None:
        self.learner = learner
        self.start = dict(learner.counters)  # one host read per epoch
        self.sums: dict[str, dict[str, Tensor]] = {}
        self.steps: Tensor | int = 0

    def update(self) -> None:
        """Add the learner's last step (call after ``learner.step``; skipped steps add 0)."""
        flag = self.learner.last_step_recorded  # 0-d bool on the device
        for site, values in self.learner.last_metrics(as_tensors=True).items():
            acc = self.sums.setdefault(site, {})
            for key, value in values.items():
                value = value.detach().double()
                # a skipped step's values may be stale or NaN: where(), not a multiply
                value = torch.where(flag.to(value.device), value, 0.0)
                acc[key] = acc[key] + value if key in acc else value
        self.steps = self.steps + flag.to(torch.int64)

    def result(self) -> dict[str, Any]:
        """Phase, this epoch's counters, per-site means and the gate fit (k, mu, sd, valid)."""
        learner = self.learner
        counters = {k: v - self.start.get(k, 0) for k, v in learner.counters.items()}
        steps = max(int(self.steps), 1)
        sites = {}
        for site, fit in learner.gate_summary().items():
            sums = self.sums.get(site, {})
            values = torch.stack(list(sums.values())).tolist() if sums else []  # one read
            means = {k: v / steps for k, v in zip(sums, values)}
            gate = {f"gate_{k}": fit[k] for k in ("k", "mu", "sd", "valid", "reason")}
            sites[site] = {**means, **gate, "records": fit["records"]}
        phase = "off" if not learner.enabled else "warmup" if learner.in_warmup else "active"
        return {"phase": phase, "counters": counters, "sites": sites}


def _flatten(row: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{name}/")
        elif isinstance(value, bool | int | float) and value is not None:
            yield name, float(value)


class MetricsWriter:
    """Appends per-epoch rows to ``metrics.jsonl`` (and TensorBoard if importable)."""

    def __init__(
        self, run_dir: str | os.PathLike, tensorboard: bool = True, start_epoch: int = 0
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.truncate(start_epoch)  # a resumed run rewrites the epochs after its checkpoint
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional extra: pip install 'dassdp[tb]'
                SummaryWriter = None
            if SummaryWriter is not None:
                log_dir = str(Path(run_dir) / "tensorboard")
                self.tb = SummaryWriter(log_dir, purge_step=start_epoch or None)

    def truncate(self, from_epoch: int) -> None:
        """Drop rows with ``epoch >= from_epoch`` (a resumed run rewrites them)."""
        if not self.path.is_file():
            return
        keep = [row for row in _json_lines(self.path) if row.get("epoch", -1) < from_epoch]
        atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in keep))

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` as one line (a line torn by a failed write is dropped on reading)."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, allow_nan=True) + "\n")
        except OSError as err:  # disk full: name the file, not a bare "[Errno 28]"
            raise write_error(err, self.path, unchanged=False) from err  # type: ignore[misc]
        if self.tb is not None:
            for name, value in _flatten(row):
                if name != "epoch":
                    self.tb.add_scalar(name, value, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return _json_lines(path)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of a ``.jsonl`` file; a torn last line (a kill mid-append) is dropped.

    Any other line that is not UTF-8 JSON (a damaged or foreign file) is a ``ValueError``
    naming the file and the line, not a codec error."""
    lines = [(n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except ValueError as err:  # UnicodeDecodeError and JSONDecodeError both are
            if i != len(lines) - 1:
                what = "UTF-8 text" if isinstance(err, UnicodeDecodeError) else "JSON"
                raise ValueError(f"{path}: line {number} is not {what} (damaged?)") from None
    return rows
