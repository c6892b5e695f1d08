"""DASSDPCallback with a real lightning.Trainer on CPU: the same weights and learner state as
the plain PyTorch loop, gradient accumulation, apply='grad', and resume from a checkpoint."""

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
