"""No host syncs in a training step of SpikingResformer with DA-SSDP (issue 11).

Counted with a ``TorchDispatchMode``: ``_local_scalar_dense`` (``.item()``, ``bool()``,
``int()``, ``float()`` of a tensor), ``nonzero`` and ``masked_select`` (boolean masks, whose
size the host must read) and ``lift_fresh`` (a tensor made from Python data: a host-to-device
copy on CUDA). Every counted call is attributed to the innermost ``dassdp`` source line, so a
failure names where the sync comes from.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dassdp
from dassdp import DASSDP, DASSDPConfig

SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.lift_fresh.default,
}
SRC = Path(dassdp.__file__).parent
NEURONS = SRC / "neurons"


class SyncCounter(TorchDispatchMode):
    """Counts the calls of :data:`SYNC_OPS`, by ``(op, innermost dassdp file:line)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            ours = [f for f in traceback.extract_stack() if Path(f.filename).is_relative_to(SRC)]
            where = f"{Path(ours[-1].filename).relative_to(SRC)}:{ours[-1].lineno}" if ours else "?"
            self.calls[(func.__name__, where)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def outside(self, folder: Path) -> dict[tuple[str, str], int]:
        """Calls whose innermost dassdp frame is not under ``folder``."""
        prefix = f"{folder.relative_to(SRC)}/"
        return {k: n for k, n in self.calls.items() if not k[1].startswith(prefix)}


class Run:
    """``spikingresformer_ti`` at T=2 on a 2-image 32x32 batch, SGD and DA-SSDP."""

    def __init__(self, **config) -> None:
        torch.manual_seed(0)
        self.model = dassdp.create_model("spikingresformer_ti", num_classes=10, T=2)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.plast = DASSDP(self.model, DASSDPConfig(warmup_epochs=1, **config))
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(2, 3, 32, 32, generator=gen)
        self.y = torch.tensor([1, 7])

    def forward_backward(self) -> torch.Tensor:
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.detach()

    def step(self) -> None:
        self.plast.step(self.forward_backward())
        dassdp.reset(self.model)


@pytest.fixture(scope="module")
def counts() -> dict[str, SyncCounter]:
    """Counts of one forward+backward, one warm-up step, one active step and eval forwards."""
    run, out = Run(), {}
    with SyncCounter() as out["forward_backward"]:
        loss = run.forward_backward()
    with SyncCounter() as out["warmup"]:
        applied = run.plast.step(loss)
    assert not applied  # reading the returned flag is a sync: outside the counter
    dassdp.reset(run.model)
    run.step()  # a second warm-up step: 4 records for the gate fit
    run.plast.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a degenerate fit is fine here
        run.plast.fit()  # once at the end of warm-up (reads the sums), not per step
    loss = run.forward_backward()
    with SyncCounter() as out["active"]:
        applied = run.plast.step(loss)
    dassdp.reset(run.model)
    assert applied and run.plast.counters["applied"] == 1
    skip = torch.zeros(())  # a grad scaler's skip, as a tensor (1 - found_inf)
    loss = run.forward_backward()
    with SyncCounter() as out["active_skipped"]:
        run.plast.step(loss, optimizer_stepped=skip)
    dassdp.reset(run.model)
    loss = run.forward_backward() * float("nan")
    with SyncCounter() as out["active_nonfinite"]:
        run.plast.step(loss)
    dassdp.reset(run.model)
    counters = run.plast.counters
    assert counters["skipped_optimizer"] == 1 and counters["skipped_nonfinite"] == 1
    assert counters["applied"] == 1 and counters["steps"] == 5
    run.model.eval()
    with torch.no_grad(), SyncCounter() as out["eval"]:
        run.model(run.x)  # DSSA's running rates, all measured by now
    fresh = Run().model.eval()
    with torch.no_grad(), SyncCounter() as out["eval_fresh"]:
        fresh(run.x)  # rates not measured yet: the batch's rates
    return out


@pytest.mark.parametrize("phase", ["warmup", "active", "active_skipped", "active_nonfinite"])
def test_dassdp_step_makes_no_host_sync(counts, phase):
    # The issue allows one sync per step after warm-up; the learner needs none.
    assert counts[phase].total == 0, dict(counts[phase].calls)


@pytest.mark.parametrize("phase", ["forward_backward", "eval", "eval_fresh"])
def test_model_and_recorder_make_no_host_sync_outside_the_neurons(counts, phase):
    assert counts[phase].outside(NEURONS) == {}, dict(counts[phase].calls)


@pytest.mark.parametrize("phase", ["forward_backward", "eval", "eval_fresh"])
def test_forward_backward_makes_no_host_sync(counts, phase):
    # Includes the neurons (their syncs go with the one-kernel LIF/PLIF of issue 11).
    assert counts[phase].total == 0, dict(counts[phase].calls)


def test_the_counter_sees_what_it_should():
    with SyncCounter() as mode:
        t = torch.tensor([1.0, -1.0])  # lift_fresh
        float(t[0])  # _local_scalar_dense
        torch.masked_select(t, t > 0)  # a boolean mask
    assert mode.total >= 3
    assert all(where.startswith("?") for _, where in mode.calls)  # not dassdp code


@pytest.mark.parametrize("hyper_step", ["plain", "normalized"])
def test_learned_sigma_and_amplitude_make_no_host_sync(hyper_step):
    # Learning adds the hypergradient (a read of .grad, the stored D_t), the stacked
    # dD/dsigma GEMM and the log-space updates (normalized: and the running means): all on
    # the device, skipped steps included.
    run = Run(
        learn=("sigma", "amplitude"), sigma_range=(0.25, 4.0), amplitude_range=(0.1, 10.0),
        hyper_step=hyper_step,
    )  # fmt: skip
    with SyncCounter() as warmup:
        run.step()
    run.step()
    run.plast.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run.plast.fit()
    phases = {}
    for phase, stepped, scale in (
        ("first", True, 1.0),  # no stored update yet
        ("learning", True, 1.0),  # h from the last step's D_t
        ("skipped", torch.zeros(()), 1.0),
        ("nonfinite", True, float("nan")),
        ("after_skips", True, 1.0),
    ):
        loss = run.forward_backward() * scale
        with SyncCounter() as phases[phase]:
            run.plast.step(loss, optimizer_stepped=stepped)
        dassdp.reset(run.model)
        if phase == "learning":
            learned = run.plast.last_metrics()  # reads (outside the counters)
    assert warmup.total == 0, dict(warmup.calls)
    for phase, counter in phases.items():
        assert counter.total == 0, (phase, dict(counter.calls))
    for site in learned.values():
        assert {"sigma", "amplitude", "hypergrad_sigma", "hypergrad_amplitude"} <= set(site)
    assert all(m["hypergrad_amplitude"] != 0 for m in learned.values())
    assert run.plast.counters["applied"] == 3
    after = run.plast.last_metrics()  # the step after the skips has nothing to learn from
    assert all(m["hypergrad_amplitude"] == 0 for m in after.values())
