"""``spiking_cnn`` variants: ``dropout`` before the classifier and ``site_norm`` (a BatchNorm
after the classifier site); the defaults are the earlier model bit for bit; every model
names the normalisation after each DA-SSDP site (``dassdp_site_norms``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dassdp.engine.config import ConfigError
from dassdp.models import SpikingResformer, create_model
from dassdp.models.layers import TimeSharedDropout, seq_apply, to_time_major
from engine_fixtures import tiny

torch.set_num_threads(1)

# The state dict and modules of spiking_cnn before the variants existed (revision 43337e2).
OLD_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "bn1.num_batches_tracked", "conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean",
    "bn2.running_var", "bn2.num_batches_tracked", "fc1.weight", "fc1.bias", "bn3.weight",
    "bn3.bias", "bn3.running_mean", "bn3.running_var", "bn3.num_batches_tracked",
    "classifier.weight", "classifier.bias",
]  # fmt: skip
OLD_MODULES = [
    "", "conv1", "bn1", "lif1", "pool1", "conv2", "bn2", "lif2", "pool2", "pool3", "fc1",
    "bn3", "lif3", "classifier",
]  # fmt: skip
# sum of |parameters| of create_model("spiking_cnn") after torch.manual_seed(0), at 43337e2
OLD_INIT_ABS_SUM = 1892.5748806064048


def _build(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model("spiking_cnn", **kwargs)


def _old_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of spiking_cnn as it was before the variants (from its own modules)."""
    x = to_time_major(x, m.T)
    x = m.lif1(seq_apply(lambda z: m.bn1(m.conv1(z)), x))
    x = seq_apply(m.pool1, x)
    x = m.lif2(seq_apply(lambda z: m.bn2(m.conv2(z)), x))
    x = seq_apply(m.pool2, x)
    x = seq_apply(m.pool3, x).flatten(2)
    x = m.lif3(seq_apply(m.bn3, m.fc1(x)))
    return m.classifier(x).mean(0)


def test_default_spiking_cnn_is_the_earlier_model_bit_for_bit():
    model = _build()
    assert list(model.state_dict()) == OLD_KEYS
    assert [n for n, _ in model.named_modules()] == OLD_MODULES
    total = sum(p.double().abs().sum().item() for p in model.parameters())
    assert total == pytest.approx(OLD_INIT_ABS_SUM, rel=1e-12)
    explicit = _build(dropout=0.0, site_norm=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), explicit.parameters()))
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2
    for train in (True, False):
        model.train(train)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        with torch.no_grad():
            got = model(x)
            assert torch.equal(torch.get_rng_state(), rng)  # the forward draws nothing
            model.load_state_dict(saved)  # the same BatchNorm statistics for the reference
            assert torch.equal(got, _old_forward(model, x))


def test_time_shared_dropout_drops_a_unit_for_every_step():
    torch.manual_seed(0)
    drop = TimeSharedDropout(0.3)
    x = torch.ones(4, 64, 128)  # [T, B, C]
    y = drop(x)
    assert torch.equal(y, y[:1].expand_as(y))  # one mask per (sample, unit) for all T
    assert y.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert (y[0] == 0).float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert drop.eval()(x) is x
    for bad in (1.0, -0.1, "0.3", True):
        with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
            TimeSharedDropout(bad)


def test_dropout_before_the_classifier_only_in_training():
    plain, dropped = _build(), _build(dropout=0.5)
    assert list(dropped.state_dict()) == OLD_KEYS  # no parameters, the same init
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), dropped.parameters()))
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), dropped.eval()(x))
    seen = {}
    dropped.classifier.register_forward_hook(lambda m, a, o: seen.__setitem__("in", a[0]))
    dropped.lif3.register_forward_hook(lambda m, a, o: seen.__setitem__("spikes", o))
    dropped.train()
    with torch.no_grad():
        dropped(x)
    spikes, into = seen["spikes"], seen["in"]  # [T, B, hidden]
    kept = into.gt(0).any(0) | ~spikes.gt(0).any(0)  # [B, hidden]: dropped units are silent
    assert 0 < (~kept).sum() < kept.sum()
    assert torch.equal(into, spikes * 2.0 * kept)  # kept units scaled by 1 / (1 - p), all T
    with pytest.raises(ConfigError, match="model_args"):
        tiny(model_args={"channels": [4, 8], "hidden": 16, "dropout": 1.5})


def test_site_norm_puts_a_batchnorm_after_the_classifier_site():
    model = _build(site_norm=True)
    keys = list(model.state_dict())
    assert keys[: len(OLD_KEYS)] == OLD_KEYS and keys[len(OLD_KEYS) :] == [
        f"classifier_bn.{k}"
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ]
    assert all(torch.equal(a, b) for a, b in zip(_build().parameters(), model.parameters()))
    assert model.dassdp_site_norms == {"fc1": "bn3", "classifier": "classifier_bn"}
    assert list(model.dassdp_sites()) == ["classifier", "fc1"]  # still the default sites
    assert _build().dassdp_site_norms == {"fc1": "bn3", "classifier": None}
    assert _build(norm=False).dassdp_site_norms == {"fc1": None, "classifier": None}
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2
    seen = {}
    model.classifier.register_forward_hook(lambda m, a, o: seen.__setitem__("logits", o))
    with torch.no_grad():
        out = model.train()(x)
    z = seen["logits"].flatten(0, 1)  # [T*B, classes], BatchNorm over the T*B rows
    want = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    assert torch.allclose(out, want.unflatten(0, (4, 4)).mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="site_norm must be true or false"):
        create_model("spiking_cnn", site_norm="yes")
    assert tiny(model_args={"channels": [4, 8], "hidden": 16, "site_norm": True})


def test_spikingresformer_names_the_batchnorm_after_every_projection():
    torch.manual_seed(0)
    model = SpikingResformer(
        dims=(8, 16, 16), depths=(1, 2, 1), num_heads=(1, 1, 1), group_size=8,
        num_classes=10, in_channels=3, T=2, stem="small",
    )  # fmt: skip
    norms = model.dassdp_site_norms
    assert norms["classifier"] is None
    for preset in model.dassdp_site_presets:
        for site in model.dassdp_sites(preset):
            assert site in norms
            if site != "classifier":
                assert norms[site] == site.removesuffix("proj") + "proj_bn"
                assert isinstance(model.get_submodule(norms[site]), nn.BatchNorm2d)
