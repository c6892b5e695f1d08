"""DASSDPCallback with a real lightning.Trainer on CPU: the same weights and learner state as
the plain PyTorch loop, gradient accumulation, apply='grad', manual optimization, resume from
a checkpoint (also mid-epoch under accumulation), and a gate fit that does not depend on the
accumulation schedule."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dassdp
from dassdp import DASSDP, DASSDPConfig
from dassdp.integrations.lightning import DASSDPCallback, learner_model
from snn_fixtures import TinySNN

CFG = DASSDPConfig(warmup_epochs=1, A_plus=0.02, A_minus=0.005)


class Lit(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": F.cross_entropy(self.model(x), y)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05)


def data(n=32, bs=8):
    gen = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 12, generator=gen), torch.randint(0, 4, (n,), generator=gen))
    return DataLoader(ds, batch_size=bs, shuffle=False)


def trainer(tmp_path, epochs, callback, **kw):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kw,
    )


def plain_loop(model, cfg, epochs, accumulate=1):
    """The README loop (with accumulation: k forwards/backwards, one optimizer step)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plast = DASSDP(model, cfg)
    for epoch in range(epochs):
        plast.set_epoch(epoch)
        losses = []
        for i, (x, y) in enumerate(data()):
            loss = F.cross_entropy(model(x), y)
            (loss / accumulate).backward()
            losses.append(loss.detach())
            if (i + 1) % accumulate == 0:
                if cfg.apply == "grad":
                    plast.step(torch.stack(losses).mean())
                opt.step()
                if cfg.apply == "post_step":
                    plast.step(torch.stack(losses).mean())
                opt.zero_grad()
                losses = []
                dassdp.reset(model)
            else:
                dassdp.reset(model, records=False)
    return plast


@pytest.mark.parametrize(
    ("cfg", "accumulate"), [(CFG, 1), (CFG, 2), (CFG.replace(apply="grad"), 1)]
)
def test_callback_matches_the_plain_loop(tmp_path, cfg, accumulate):
    torch.manual_seed(0)
    net = TinySNN()
    twin = copy.deepcopy(net)
    callback = DASSDPCallback(cfg)
    trainer(tmp_path, 2, callback, accumulate_grad_batches=accumulate).fit(Lit(net), data())
    ref = plain_loop(twin, cfg, 2, accumulate)
    for name, p in twin.state_dict().items():
        torch.testing.assert_close(net.state_dict()[name], p, rtol=1e-5, atol=1e-6)
    assert callback.learner.recorder.closed  # closed at teardown
    state = callback.state_dict()["learner"]
    assert state["counters"] == ref.counters
    assert state["counters"]["applied"] == 4 // accumulate  # epoch 1: after the warm-up
    assert state["fits"] == {n: f.to_dict() for n, f in ref.fits.items()}
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()) == 0


def test_resume_from_a_lightning_checkpoint_restores_the_learner(tmp_path):
    torch.manual_seed(0)
    net = TinySNN()
    twin = copy.deepcopy(net)
    full = DASSDPCallback(CFG)
    trainer(tmp_path / "full", 3, full).fit(Lit(net), data())

    first = DASSDPCallback(CFG)
    t1 = trainer(tmp_path / "a", 2, first)
    t1.fit(Lit(twin), data())
    ckpt = tmp_path / "two.ckpt"
    t1.save_checkpoint(ckpt)
    torch.manual_seed(123)
    resumed_net = TinySNN()  # different init: all from the checkpoint
    resumed = DASSDPCallback(CFG)
    trainer(tmp_path / "b", 3, resumed).fit(Lit(resumed_net), data(), ckpt_path=ckpt)
    for name, p in net.state_dict().items():
        assert torch.equal(resumed_net.state_dict()[name], p), name
    a, b = full.state_dict()["learner"], resumed.state_dict()["learner"]
    assert a["counters"] == b["counters"] and a["fits"] == b["fits"] and a["stats"] == b["stats"]


def test_learner_model_rule():
    lit = Lit(TinySNN())
    assert learner_model(lit) is lit.model

    class Declares(Lit):
        def dassdp_sites(self, preset="default"):
            return {"model.fc2": "output>0"}

    own = Declares(TinySNN())
    assert learner_model(own) is own


class ResumableBatches:
    """A fixed list of batches that Lightning can checkpoint mid-epoch (the ``state_dict`` /
    ``load_state_dict`` protocol of a stateful loader): after a restore the epoch continues
    at the batch where it stopped, so a resumed run sees exactly the uninterrupted data."""

    def __init__(self, loader):
        self.batches = list(loader)
        self.start = self.position = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.batches)):
            self.position = i + 1
            yield self.batches[i]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.start = state["position"]


class StopAfterStep(pl.Callback):
    """Save a checkpoint at the end of the batch on which optimizer step ``step`` ran, and
    stop there (a job killed mid-epoch right after its periodic checkpoint)."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def test_a_mid_epoch_resume_with_accumulation_equals_the_uninterrupted_run(tmp_path):
    """Regression: after a mid-epoch resume the callback's step tracker restarted at 0, so
    the first micro-batch called step() alone, out of phase with the optimizer, and every
    later update of that epoch learned from the wrong windows. 6 batches per epoch,
    accumulate 2 (3 optimizer steps per epoch), warm-up 1 epoch; stopped after step 4 (the
    first step of epoch 1, which DA-SSDP changes), resumed, run to 3 epochs."""
    torch.manual_seed(0)
    net = TinySNN()
    twin = copy.deepcopy(net)
    full = DASSDPCallback(CFG)
    trainer(tmp_path / "full", 3, full, accumulate_grad_batches=2).fit(
        Lit(net), ResumableBatches(data(n=48))
    )

    ckpt = tmp_path / "mid.ckpt"
    first = DASSDPCallback(CFG)
    stop = StopAfterStep(4, ckpt)
    t1 = pl.Trainer(
        **{**_TRAINER, "default_root_dir": tmp_path / "a"},
        max_epochs=3,
        accumulate_grad_batches=2,
        callbacks=[first, stop],
    )
    t1.fit(Lit(twin), ResumableBatches(data(n=48)))
    saved = torch.load(ckpt, weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (1, 4)  # mid-epoch: batch 4 of 6 next
    torch.manual_seed(123)
    resumed_net = TinySNN()  # another init: everything comes from the checkpoint
    resumed = DASSDPCallback(CFG)
    trainer(tmp_path / "b", 3, resumed, accumulate_grad_batches=2).fit(
        Lit(resumed_net), ResumableBatches(data(n=48)), ckpt_path=ckpt
    )
    for name, p in net.state_dict().items():
        assert torch.equal(resumed_net.state_dict()[name], p), name
    a, b = full.state_dict()["learner"], resumed.state_dict()["learner"]
    assert a["counters"] == b["counters"] and a["counters"]["applied"] == 6
    assert a["fits"] == b["fits"] and a["stats"] == b["stats"]


_TRAINER = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
)


def paired_data(batches=4, bs=8):
    """``2 * batches`` batches: each of ``batches`` distinct batches twice in a row."""
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(batches, bs, 12, generator=gen),
        torch.randint(0, 4, (batches, bs), generator=gen),
    )
    x, y = x.repeat_interleave(2, dim=0).flatten(0, 1), y.repeat_interleave(2, dim=0).flatten()
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


class FrozenLit(Lit):
    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.0)


@pytest.mark.parametrize("schedule", ["accumulate 2", "accumulate 1 then 2"])
def test_the_gate_fit_does_not_depend_on_the_accumulation_schedule(tmp_path, schedule):
    """Regression: the recorded loss was Lightning's loss divided by the accumulation factor.

    Set up so that the warm-up records must be the same under every schedule: the learning
    rate is 0 (the weights never move, so every forward sees the same weights) and each
    batch comes twice in a row. Accumulating the two copies gives one window whose records
    are the two copies' (S[b], each twice) and whose loss is the mean of two equal losses,
    i.e. each copy's loss: the same (S[b], L) pairs that accumulate 1 records in two steps.
    So the gate's warm-up sums (n, ΣS, ΣS², ΣL, ΣL², ΣSL) and its fit (mu, sd, k) must agree
    to rounding. A loss divided by 2 halves ΣL (constant factor 2), and when the factor
    changes between warm-up epochs (1 then 2) it also changes k = -corr(S, L)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    cfg = CFG.replace(warmup_epochs=2)
    runs = {}
    for name, kw, extra in [
        ("reference", {"accumulate_grad_batches": 1}, []),
        (
            schedule,
            {"accumulate_grad_batches": 2} if schedule == "accumulate 2" else {},
            [] if schedule == "accumulate 2" else [GradientAccumulationScheduler({0: 1, 1: 2})],
        ),
    ]:
        torch.manual_seed(0)
        callback = DASSDPCallback(cfg)
        pl.Trainer(
            **{**_TRAINER, "default_root_dir": tmp_path / name},
            max_epochs=3,
            callbacks=[callback, *extra],
            **kw,
        ).fit(FrozenLit(TinySNN()), paired_data())
        runs[name] = callback.learner
    ref, other = runs["reference"], runs[schedule]
    assert ref.fits is not None and all(f.valid for f in ref.fits.values())
    for site in ref.sites:
        torch.testing.assert_close(other.stats[site].sums, ref.stats[site].sums, rtol=1e-12, atol=0)
        a, b = ref.fits[site], other.fits[site]
        assert a.n == b.n and b.valid
        assert (b.mu, b.sd, b.k) == pytest.approx((a.mu, a.sd, a.k), rel=1e-10, abs=1e-12)


class ManualLit(pl.LightningModule):
    """Manual optimization whose training_step returns nothing: the loss reaches the
    callback only through manual_backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05)


def test_manual_optimization_takes_the_loss_given_to_manual_backward(tmp_path):
    """Regression: documented, but a training_step returning nothing raised "found no loss
    for this step ... or call manual_backward(loss)" although it had called it."""
    torch.manual_seed(0)
    net = TinySNN()
    twin = copy.deepcopy(net)
    callback = DASSDPCallback(CFG)
    trainer(tmp_path, 2, callback).fit(ManualLit(net), data())
    ref = plain_loop(twin, CFG, 2)
    for name, p in twin.state_dict().items():
        torch.testing.assert_close(net.state_dict()[name], p, rtol=1e-5, atol=1e-6)
    state = callback.state_dict()["learner"]
    assert state["counters"] == ref.counters and state["counters"]["applied"] == 4
    assert state["fits"] == {n: f.to_dict() for n, f in ref.fits.items()}
