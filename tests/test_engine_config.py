"""Training configs: every error names its key; overrides; shipped configs; saved config."""

from pathlib import Path

import pytest
import yaml

from dassdp.data import DatasetNotFoundError
from dassdp.engine import (
    ConfigError,
    PlasticityConfig,
    config_from_dict,
    load_config,
    resume_config,
)
from dassdp.engine.builders import build_datasets
from dassdp.engine.config import apply_overrides, config_to_dict, dassdp_config
from engine_fixtures import tiny, tiny_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def error_of(**changes) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(tiny_dict(**changes))
    return str(info.value)


def test_unknown_keys_are_named_with_the_allowed_ones():
    msg = error_of(epoch=3)
    assert "unknown config key(s) epoch" in msg and "epochs" in msg
    msg = error_of(plasticity={"sigmaa": 1.0})
    assert "plasticity.sigmaa" in msg and "allowed in plasticity" in msg and "sigma" in msg


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("epochs", "ten", "epochs must be int"),
        ("epochs", 2.5, "epochs must be int"),
        ("mixup", 1, "mixup must be bool"),
        ("lr", "fast", "lr must be float"),
        ("model_args", [4, 8], "model_args must be dict"),
        ("plasticity", 3, "plasticity must be a mapping or null"),
    ],
)
def test_wrong_types_are_named(key, value, expected):
    assert expected in error_of(**{key: value})


def test_wrong_type_inside_plasticity_is_named():
    assert "plasticity.enabled must be bool" in error_of(plasticity={"enabled": "yes"})


def test_warmup_must_end_before_training_does():
    msg = error_of(epochs=3, plasticity={"warmup_epochs": 3})
    assert "plasticity.warmup_epochs (3) must be < epochs (3)" in msg
    # a disabled learner never fits a gate, so the rule does not apply
    assert config_from_dict(tiny_dict(epochs=3, plasticity={"warmup_epochs": 3, "enabled": False}))


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_sigma_must_be_positive(sigma):
    assert "plasticity.sigma must be > 0" in error_of(plasticity={"sigma": sigma})


def test_other_plasticity_values_are_checked_by_the_learner_config():
    assert "plasticity: gate must be one of" in error_of(plasticity={"gate": "two"})
    assert "plasticity.preset must be one of" in error_of(plasticity={"preset": "paper"})
    assert "plasticity.sites" in error_of(plasticity={"sites": "everything"})


def test_unknown_model_and_dataset_are_named_with_choices():
    msg = error_of(model="spiking_cnnn")
    assert "model: unknown model 'spiking_cnnn'" in msg and "spikingresformer_cifar" in msg
    msg = error_of(dataset="cifar11")
    assert "dataset: unknown dataset 'cifar11'" in msg and "fashion-mnist" in msg


def test_bad_model_args_are_caught_before_training():
    assert "model_args" in error_of(model_args={"channels": [4, 8], "width": 3})
    assert "model_args.num_classes" in error_of(model_args={"num_classes": 3})


def test_missing_data_paths_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    msg = error_of(data_root=str(missing))
    assert f"data_root: no such folder {missing}" in msg and "dassdp data prepare" in msg
    assert "pretrained: no such checkpoint" in error_of(pretrained=str(missing / "x.pt"))
    # the folder exists but holds no CIFAR-10: the reader names the files it looked for
    cfg = tiny(dataset="cifar10", data_root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "cifar-10-batches-py")):
        build_datasets(cfg)


def test_ranges_are_checked():
    assert "batch_size must be >= 1" in error_of(batch_size=0)
    assert "optimizer must be one of adamw, sgd" in error_of(optimizer="lamb")
    assert "even batch_size" in error_of(mixup=True, batch_size=31)


def test_dotted_overrides_parse_yaml_values():
    data = apply_overrides(
        tiny_dict(),
        ["plasticity.enabled=false", "model_args.channels=[8, 16]", "lr=5e-4", "data_root=null"],
    )
    cfg = config_from_dict(data)
    assert cfg.plasticity.enabled is False
    assert cfg.model_args["channels"] == [8, 16]
    assert cfg.lr == 5e-4  # YAML 1.1 reads 5e-4 as a string; float fields accept it
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["epochs"])
    cfg = config_from_dict(apply_overrides(tiny_dict(), ["plasticity=null"]))
    assert cfg.plasticity is None


def test_load_config_names_the_file_and_defaults_the_run_name(tmp_path):
    path = tmp_path / "exp.yaml"
    data = tiny_dict()
    del data["name"]
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).name == "exp"
    assert load_config(path, ["epochs=5"]).epochs == 5
    path.write_text(yaml.safe_dump({**data, "bogus": 1}))
    with pytest.raises(ConfigError, match=r"exp\.yaml: unknown config key\(s\) bogus"):
        load_config(path)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.yaml")


def test_compat_preset_maps_to_the_learner_compat_config():
    d = dassdp_config(PlasticityConfig(preset="compat"))
    assert (d.latency, d.A_minus, d.sites) == ("last", 5e-4, "compat")
    # explicit values win over the preset (spiking_cnn has no "compat" sites of its own)
    cfg = tiny(plasticity={"preset": "compat", "sites": "default", "A_minus": 1e-4})
    d = dassdp_config(cfg.plasticity)
    assert (d.latency, d.A_minus, d.sites) == ("last", 1e-4, "default")
    assert "unknown DA-SSDP site preset 'compat'" in error_of(plasticity={"preset": "compat"})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_start_with_their_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# dassdp ", "# torchrun ")), first
    cfg = load_config(path)
    assert cfg.plasticity is not None and cfg.plasticity.enabled


def test_paper_recipes_hold_the_published_values():
    c10, dvs = load_config(CONFIGS / "cifar10.yaml"), load_config(CONFIGS / "cifar10dvs.yaml")
    assert (c10.lr, c10.weight_decay, c10.epochs, c10.T, c10.label_smoothing) == (
        5e-4, 0.01, 600, 4, 0.1,
    )  # fmt: skip
    assert c10.augment == "rand-m7-n1-mstd0.5-inc1" and c10.plasticity.warmup_epochs == 100
    assert (dvs.T, dvs.lr, dvs.batch_size, dvs.plasticity.warmup_epochs) == (10, 4e-5, 48, 80)
    imagenet = load_config(CONFIGS / "imagenet.yaml")
    assert imagenet.model == "spikingresformer_l" and imagenet.sync_bn


def test_resume_config_allows_only_harmless_changes():
    saved = config_to_dict(tiny())
    assert resume_config(saved, tiny(epochs=5)).epochs == 5
    with pytest.raises(ConfigError, match=r"lr: 0\.005 -> 0\.1"):
        resume_config(saved, tiny(lr=0.1))


def test_override_errors_name_the_override_not_the_file(tmp_path):
    """Regression: `epochs=0` on the command line was reported as a problem of the file."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_dict()))
    with pytest.raises(ConfigError) as info:
        load_config(path, ["lr=1e-3", "epochs=0"])
    assert str(info.value) == "override 'epochs=0': epochs must be >= 1, got 0"
    with pytest.raises(ConfigError, match=r"^override 'bogus=1': unknown config key\(s\) bogus"):
        load_config(path, ["bogus=1"])
    with pytest.raises(ConfigError, match=r"^override 'plasticity.sigma=0': plasticity.sigma"):
        load_config(path, ["plasticity.sigma=0"])
    # a key that only the file holds (min_lr) is the file's, though lr is overridden
    path.write_text(yaml.safe_dump(tiny_dict(min_lr=-1.0)))
    with pytest.raises(ConfigError, match=r"exp\.yaml: min_lr must be >= 0"):
        load_config(path, ["lr=1e-3"])


def test_grad_clip_accepts_any_positive_max_norm():
    """Regression: grad_clip=0.5 was rejected with `must be >= 1`."""
    assert tiny(grad_clip=0.5).grad_clip == 0.5 and tiny(grad_clip=1e-3).grad_clip == 1e-3
    for bad in (0, -1.0, float("inf")):
        assert "grad_clip must be null (no clipping) or a max gradient norm > 0" in error_of(
            grad_clip=bad
        )


# ---------------------------------------------------------------- the plasticity block


def test_the_plasticity_block_takes_every_learner_field():
    from dataclasses import fields

    from dassdp import DASSDPConfig

    keys = {f.name for f in fields(PlasticityConfig)}
    assert {f.name for f in fields(DASSDPConfig)} <= keys
    assert keys - {f.name for f in fields(DASSDPConfig)} == {"preset"}  # the engine's own


# Learner fields with a non-default value; none is named anywhere in the engine's code.
UNNAMED = {
    "A_minus": 2e-4,
    "latency": "last",
    "control": "shuffled_latency",
    "eps": 1e-6,
    "debug": True,
    "sigma_lr": 3.0,
    "amplitude_range": [0.5, 2.0],
    "hyper_step": "plain",
    "hyper_lr": 0.01,
    "hyper_beta": 0.9,
}


@pytest.mark.parametrize(("key", "value"), UNNAMED.items(), ids=list(UNNAMED))
def test_a_learner_field_the_engine_never_names_reaches_the_learner(key, value, tmp_path):
    """A new DASSDPConfig field needs no engine change: these fields pass through although
    no line of the engine names them (the proof that nothing lists the fields by hand)."""
    import re

    import dassdp.engine

    engine = Path(dassdp.engine.__file__).parent
    for source in engine.glob("*.py"):
        assert not re.search(rf"\b{key}\b", source.read_text()), (key, source.name)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_dict()))
    cfg = load_config(path, [f"plasticity.{key}={value}"])
    expected = tuple(value) if isinstance(value, list) else value
    assert getattr(dassdp_config(cfg.plasticity), key) == expected
    assert getattr(dassdp_config(tiny().plasticity), key) != expected  # unset: the default


def test_the_learner_seed_is_the_run_seed_unless_the_block_sets_it():
    assert dassdp_config(tiny(seed=5).plasticity, seed=5).seed == 5
    assert dassdp_config(tiny(seed=5, plasticity={"seed": 9}).plasticity, seed=5).seed == 9


def test_the_learner_config_is_built_once_per_run(monkeypatch):
    """Validating the config and building the learner share one DASSDPConfig."""
    from dassdp import DASSDPConfig
    from dassdp.engine.builders import build_learner
    from dassdp.models import create_model

    built = []
    check = DASSDPConfig.__post_init__
    monkeypatch.setattr(DASSDPConfig, "__post_init__", lambda self: built.append(check(self)))
    cfg = tiny(seed=1234, plasticity={"A_plus": 1.25e-3})  # a block no other test builds
    learner = build_learner(cfg, create_model(cfg.model, T=cfg.T, **cfg.model_args))
    assert len(built) == 1
    assert learner.config is dassdp_config(cfg.plasticity, seed=cfg.seed)
    assert (learner.config.A_plus, learner.config.seed) == (1.25e-3, 1234)


def test_a_learner_error_from_an_override_blames_the_override(tmp_path):
    """Regression: `plasticity.gate=two` on the command line was reported as the file's."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_dict()))
    with pytest.raises(ConfigError, match=r"^override 'plasticity.gate=two': plasticity: gate"):
        load_config(path, ["lr=1e-3", "plasticity.gate=two"])
    with pytest.raises(ConfigError, match=r"^override 'plasticity.learn=\[tau\]': plasticity"):
        load_config(path, ["plasticity.learn=[tau]"])


def test_resume_takes_a_plasticity_block_saved_before_keys_were_added():
    """A checkpoint's block lacks the keys added to DASSDPConfig since, or spells an unset
    value as the learner's default: the same learner, so resume goes on."""
    saved = config_to_dict(tiny())
    old = dict(saved["plasticity"])
    del old["eps"], old["seed"]  # keys an older version did not have
    old["debug"] = False  # the older engine's default, now "unset" (None)
    saved["plasticity"] = old
    assert resume_config(saved, tiny(epochs=5)).epochs == 5
    with pytest.raises(ConfigError, match=r"--resume: .*plasticity: .*'A_plus': 0\.01"):
        resume_config(saved, tiny(plasticity={"A_plus": 0.01}))


def test_resume_may_turn_the_learners_debug_checks_on_or_off():
    """`plasticity.debug` only adds checks (the learner's RESUMABLE_CONFIG): a resume may change
    it; any other learner field still refuses."""
    saved = config_to_dict(tiny())
    resumed = resume_config(saved, tiny(plasticity={"debug": True}))
    assert resumed.plasticity.debug is True
    with pytest.raises(ConfigError, match=r"--resume: .*plasticity"):
        resume_config(saved, tiny(plasticity={"debug": True, "sigma": 2.0}))
