"""Every registered model: shapes, finite output, gradients, DA-SSDP sites, registry, params."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import dassdp
from dassdp.models import SpikingResformer, create_model, list_models, register_model
from dassdp.neurons import PLIF
from dassdp.plasticity.sites import SiteSpec, Source

torch.set_num_threads(1)

T = 2
# Per model: constructor kwargs and a small input (ImageNet-stem variants at 32x32 still
# leave 8, 4, 2 pixels per stage, enough for patch sizes 4, 2, 1).
CASES: dict[str, tuple[dict, tuple[int, ...]]] = {
    "spiking_cnn": ({"in_channels": 1}, (2, 1, 28, 28)),
    "spikingresformer_cifar": ({}, (2, 3, 32, 32)),
    "spikingresformer_dvsg": ({}, (2, T, 2, 32, 32)),  # event frames [B, T, C, H, W]
    "spikingresformer_ti": ({}, (1, 3, 32, 32)),
    "spikingresformer_s": ({}, (1, 3, 32, 32)),
    "spikingresformer_m": ({}, (1, 3, 32, 32)),
    "spikingresformer_l": ({}, (1, 3, 32, 32)),
}
NUM_CLASSES = 7

# Parameter counts at default arguments (ImageNet variants: 1000 classes). Paper table
# (Shi et al. 2024): Ti 11.14M, S 17.76M, M 35.52M, L 60.38M.
PARAMS = {
    "spiking_cnn": 72_058,
    "spikingresformer_cifar": 10_793_152,
    "spikingresformer_dvsg": 2_709_542,
    "spikingresformer_ti": 11_180_992,
    "spikingresformer_s": 17_813_824,
    "spikingresformer_m": 35_601_472,
    "spikingresformer_l": 60_375_680,
}


def test_every_registered_model_has_a_case():
    assert sorted(CASES) == list_models() == sorted(PARAMS)


@functools.cache
def _trained_step(name: str) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    """Build ``name``, run one train-mode forward+backward with hooks on every site source."""
    torch.manual_seed(0)
    kwargs, shape = CASES[name]
    model = create_model(name, num_classes=NUM_CLASSES, T=T, **kwargs).train()
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for preset in model.dassdp_site_presets:
        for site, spec in model.dassdp_sites(preset).items():
            for src in (spec.pre_source, spec.post_source):
                where = site if src.where in ("input", "output") else src.where
                port = src.where if src.where in ("input", "output") else src.port
                key = f"{where}@{port}"

                def hook(m, args, out, key=key, port=port):
                    t = args[0] if port == "input" else out
                    captured[key] = (t[0] if isinstance(t, tuple) else t).detach()

                hooks.append(model.get_submodule(where).register_forward_hook(hook))
    x = torch.rand(shape) * 2
    out = model(x)
    out.sum().backward()
    for h in hooks:
        h.remove()
    return model, out, captured


@pytest.mark.parametrize("name", list(CASES))
def test_output_shape_finite_and_every_parameter_gets_a_gradient(name):
    model, out, _ = _trained_step(name)
    assert out.shape == (CASES[name][1][0], NUM_CLASSES)
    assert torch.isfinite(out).all()
    assert model.T == T
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    # the network is not dead at init: most parameters receive a non-zero gradient
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert len(zero) <= 0.1 * len(list(model.parameters())), zero


def _channels(t: torch.Tensor, batch: int) -> int:
    """Channel size under the recorder's layout rules (rank 3/5 time-major, 2/4 flat)."""
    if t.dim() in (3, 5):
        assert t.shape[:2] == (T, batch)
        return t.shape[2]
    assert t.dim() in (2, 4) and t.shape[0] == T * batch
    return t.shape[1]


@pytest.mark.parametrize("name", list(CASES))
def test_site_presets_resolve_to_valid_dassdp_sites(name):
    model, _, captured = _trained_step(name)
    batch = CASES[name][1][0]
    assert "default" in model.dassdp_site_presets
    for preset in model.dassdp_site_presets:
        sites = model.dassdp_sites(preset)
        assert sites, preset
        for site, spec in sites.items():
            assert isinstance(spec, SiteSpec)
            layer = model.get_submodule(site)
            if isinstance(layer, nn.Conv2d):
                assert layer.kernel_size == (1, 1) and layer.groups == 1, site
                c_in, c_out = layer.in_channels, layer.out_channels
            else:
                assert isinstance(layer, nn.Linear), site
                c_in, c_out = layer.in_features, layer.out_features
            for text, src, size in (
                (spec.pre, spec.pre_source, c_in),
                (spec.post, spec.post_source, c_out),
            ):
                where = site if src.where in ("input", "output") else src.where
                port = src.where if src.where in ("input", "output") else src.port
                t = captured[f"{where}@{port}"]
                assert _channels(t, batch) == size, (preset, site, text, tuple(t.shape))
                if ">" not in text:  # a source without a threshold must be spikes
                    assert set(t.unique().tolist()) <= {0.0, 1.0}, (preset, site, text)
    with pytest.raises(ValueError, match="default"):
        model.dassdp_sites("no_such_preset")


def test_spikingresformer_site_semantics():
    model = create_model("spikingresformer_cifar", T=T)
    block = "stages.2.blocks.0"
    assert type(model.get_submodule(block)).__name__ == "DSSA"
    default = model.dassdp_sites()
    assert default == {
        "classifier": SiteSpec(pre="input>0", post="output>0"),
        f"{block}.proj": SiteSpec(pre="input", post=f"{block}>0"),
    }
    compat = model.dassdp_sites("compat")
    assert compat["classifier"].fired == "mean"
    proj = compat[f"{block}.proj"]
    assert Source.parse(proj.pre) == Source(block, 0.0, "input")
    assert (proj.silent_pre, proj.silent_post, proj.fired) == (0, 0, "any")
    assert model.dassdp_sites("classifier").keys() == {"classifier"}
    assert model.dassdp_sites("projection").keys() == {f"{block}.proj"}


def test_spikingresformer_mid_preset_is_the_stage_before_the_last():
    from dassdp.engine import ConfigError, config_from_dict
    from dassdp.models.spikingresformer import SpikingResformer
    from engine_fixtures import tiny_dict

    model = create_model("spikingresformer_cifar", T=T)  # Ti depths 1-2-3
    assert model.mid_blocks == ["stages.1.blocks.0", "stages.1.blocks.2"]
    assert model.dassdp_sites("mid") == {
        f"{b}.proj": SiteSpec(pre="input", post=f"{b}>0") for b in model.mid_blocks
    }
    assert all(model.get_submodule(f"{b}.proj").weight.shape == (192, 192, 1, 1)
               for b in model.mid_blocks)  # fmt: skip
    with torch.device("meta"):
        large = create_model("spikingresformer_l")
    assert large.mid_blocks == [f"stages.1.blocks.{j}" for j in (0, 2)]
    one_stage = SpikingResformer(
        dims=(8,), depths=(1,), num_heads=(1,), patch_sizes=(1,), group_size=8
    )
    with pytest.raises(ValueError, match="at least 2 stages"):
        one_stage.dassdp_sites("mid")
    cfg = config_from_dict(
        tiny_dict(model="spikingresformer_cifar", model_args={}, plasticity={"sites": "mid"})
    )
    assert cfg.plasticity.sites == "mid"
    with pytest.raises(ConfigError, match=r"plasticity.sites: .*unknown DA-SSDP site preset 'mid'"):
        config_from_dict(tiny_dict(plasticity={"sites": "mid"}))  # spiking_cnn has no stages


def test_spiking_cnn_hidden_site_posts_its_lif_spikes():
    sites = create_model("spiking_cnn").dassdp_sites()
    assert sites["fc1"].post == "lif3" and sites["classifier"].pre == "input"


@pytest.mark.parametrize("name", ["spiking_cnn", "spikingresformer_dvsg"])
def test_no_state_survives_between_forward_calls(name):
    model, _, _ = _trained_step(name)
    model.eval()
    shape = CASES[name][1]
    a, b = torch.rand(shape) * 2, torch.rand(shape) * 2
    with torch.no_grad():
        first = model(b)
        model(a)
        assert torch.equal(model(b), first)
    model.train()


def test_dssa_running_rates_update_only_in_training():
    model, _, _ = _trained_step("spikingresformer_dvsg")
    dssa = model.get_submodule("stages.0.blocks.0")
    assert (dssa.rate_x > 0).all() and (dssa.rate_attn > 0).all()
    before = dssa.rate_x.clone()
    with torch.no_grad():
        model.eval()(torch.rand(CASES["spikingresformer_dvsg"][1]))
    model.train()
    assert torch.equal(dssa.rate_x, before)


def test_static_images_are_repeated_and_event_frames_made_time_major():
    torch.manual_seed(0)
    model = create_model("spiking_cnn", in_channels=1, T=3).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        static = model(x)
        frames = model(x.unsqueeze(1).expand(2, 3, 1, 28, 28))
    assert torch.allclose(static, frames)
    with pytest.raises(ValueError, match="T=3"):
        model(torch.rand(2, 5, 1, 28, 28))


def test_dvsg_uses_plif_and_others_lif():
    assert any(isinstance(m, PLIF) for m in create_model("spikingresformer_dvsg").modules())
    model = create_model("spikingresformer_cifar")
    assert not any(isinstance(m, PLIF) for m in model.modules())
    assert model.stem.conv.kernel_size == (3, 3) and model.stem.conv.stride == (1, 1)
    ti = create_model("spikingresformer_ti")
    assert ti.stem.conv.kernel_size == (7, 7) and isinstance(ti.stem.pool, nn.MaxPool2d)
    assert create_model("spikingresformer_dvsg").no_weight_decay()


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_are_pinned(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_registry_create_list_and_errors():
    assert dassdp.create_model is create_model
    assert list_models("spikingresformer_*") == [
        "spikingresformer_cifar",
        "spikingresformer_dvsg",
        "spikingresformer_l",
        "spikingresformer_m",
        "spikingresformer_s",
        "spikingresformer_ti",
    ]
    assert list_models("nothing*") == []
    model = create_model("spikingresformer_ti", num_classes=5, T=3)
    assert isinstance(model, SpikingResformer) and model.T == 3
    assert model.classifier.out_features == 5
    with pytest.raises(ValueError, match="spikingresformer_ti"):
        create_model("spikingresformer_tj")
    with pytest.raises(TypeError):
        create_model("spiking_cnn", no_such_kwarg=1)
    with pytest.raises(ValueError, match="already registered"):

        @register_model(name="spiking_cnn")
        def other(**kwargs):  # pragma: no cover
            return nn.Linear(1, 1)


def test_ls_models_prints_every_model_with_params(capsys):
    from dassdp.commands import ls

    parser = __import__("argparse").ArgumentParser()
    ls.add_arguments(parser)
    assert ls.run(parser.parse_args(["models", "spik*"])) == 0
    out = capsys.readouterr().out
    for name, count in PARAMS.items():
        assert name in out and f"{count:,}" in out
