"""Variants: each one's resolved config differs from ``dassdp``'s only by its own knob(s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dassdp.engine import config_to_dict, load_config
from dassdp.engine.config import dassdp_config
from dassdp.experiments.variants import VARIANTS, parse_variants, variant_overrides
from engine_fixtures import tiny_dict


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "model_args":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config whose model has every site preset (the compat sites exist only on
    SpikingResformer); it is only resolved and validated (meta device), never trained."""
    path = tmp_path_factory.mktemp("variants") / "tiny.yaml"
    data = tiny_dict(model="spikingresformer_cifar", model_args={})
    data["plasticity"]["sites"] = "default"  # explicit, as in configs/*.yaml
    path.write_text(yaml.safe_dump(data))
    return path


def _resolved(path: Path, variant: str) -> dict[str, Any]:
    return _flat(config_to_dict(load_config(path, variant_overrides(variant))))


def _knobs(*names: str) -> set[str]:
    return {o.partition("=")[0] for n in names for o in VARIANTS[n].overrides}


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "dassdp"])
def test_variant_differs_from_dassdp_only_by_its_knobs(config_file: Path, variant: str) -> None:
    ref, got = _resolved(config_file, "dassdp"), _resolved(config_file, variant)
    changed = {k for k in ref.keys() | got.keys() if ref.get(k) != got.get(k)}
    assert changed == _knobs(variant)


def test_composed_variant_changes_the_union_of_knobs(config_file: Path) -> None:
    ref, got = _resolved(config_file, "dassdp"), _resolved(config_file, "ssdp+no-kernel")
    changed = {k for k in ref if ref[k] != got[k]}
    assert changed == {"plasticity.gate", "plasticity.sigma"}
    assert got["plasticity.sigma"] == float("inf")


def test_variants_build_the_intended_learner_config(config_file: Path) -> None:
    def learner(v: str) -> Any:
        return dassdp_config(load_config(config_file, variant_overrides(v)).plasticity)

    assert learner("dassdp").gate == "fitted" and learner("dassdp").control == "none"
    assert learner("ssdp").gate == "one"
    compat = learner("compat")
    assert (compat.latency, compat.A_minus, compat.sites) == ("last", 5e-4, "compat")
    assert learner("baseline").enabled is False
    assert learner("uniform-drift").control == "uniform_drift"
    assert learner("projection-only").sites == "projection"
    assert learner("mid-only").sites == "mid"
    for name, gate in (("dassdp-learned", "fitted"), ("ssdp-learned", "one")):
        assert learner(name).learn == ("sigma", "amplitude") and learner(name).gate == gate
    assert learner("dassdp").learn == ()


def test_compat_needs_a_model_with_compat_sites(tmp_path: Path) -> None:
    path = tmp_path / "cnn.yaml"
    path.write_text(yaml.safe_dump(tiny_dict()))  # spiking_cnn: no "compat" site preset
    with pytest.raises(ValueError, match="compat"):
        load_config(path, variant_overrides("compat"))


def test_parse_variants_checks_names() -> None:
    assert parse_variants("baseline, dassdp,dassdp,ssdp+no-kernel") == [
        "baseline",
        "dassdp",
        "ssdp+no-kernel",
    ]
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variants("dassdp,nope")
    with pytest.raises(ValueError, match="cannot be combined"):
        parse_variants("baseline+ssdp")
    with pytest.raises(ValueError, match="no variants"):
        parse_variants(" , ")


def test_key_value_parts_change_one_key(config_file: Path) -> None:
    ref = _resolved(config_file, "dassdp")
    for variant, expected in [
        ("A_plus=1.5e-4", {"plasticity.A_plus": 1.5e-4}),
        ("ssdp+sigma=2", {"plasticity.gate": "one", "plasticity.sigma": 2.0}),
        ("dassdp+plasticity.A_minus=3e-5+epochs=3", {"plasticity.A_minus": 3e-5, "epochs": 3}),
    ]:
        got = _resolved(config_file, variant)
        changed = {k: got[k] for k in ref.keys() | got.keys() if ref.get(k) != got.get(k)}
        assert changed == expected, variant
    assert parse_variants("baseline,A_plus=1e-4, A_plus=1e-4") == ["baseline", "A_plus=1e-4"]


def test_bad_key_value_parts_are_named(config_file: Path) -> None:
    with pytest.raises(ValueError, match="must look like key=value"):
        parse_variants("dassdp+A_plus=")
    with pytest.raises(ValueError, match="cannot be combined"):
        parse_variants("baseline+A_plus=1e-4")
    with pytest.raises(ValueError, match="folder name"):
        parse_variants("dassdp+data_root=/tmp/x")
    with pytest.raises(ValueError, match="no_such_key"):
        load_config(config_file, variant_overrides("no_such_key=1"))


def test_baseline_takes_overrides_outside_the_plasticity_block(tmp_path: Path) -> None:
    """Ordinary regularizers as variants: 10x weight decay, dropout before the classifier."""
    path = tmp_path / "cnn.yaml"
    path.write_text(yaml.safe_dump(tiny_dict()))  # spiking_cnn: has model_args.dropout
    ref = _flat(config_to_dict(load_config(path, variant_overrides("baseline"))))
    args = ref["model_args"]
    for variant, expected in [
        ("baseline+weight_decay=0.1", {"weight_decay": 0.1}),
        ("baseline+model_args.dropout=0.3", {"model_args": {**args, "dropout": 0.3}}),
        ("model_args.site_norm=true+baseline", {"model_args": {**args, "site_norm": True}}),
    ]:
        got = _flat(config_to_dict(load_config(path, variant_overrides(variant))))
        changed = {k: got[k] for k in ref.keys() | got.keys() if ref.get(k) != got.get(k)}
        assert changed == expected, variant
        assert got["plasticity.enabled"] is False
    assert parse_variants("baseline,baseline+weight_decay=0.1") == [
        "baseline",
        "baseline+weight_decay=0.1",
    ]
    for bad in ("baseline+sigma=2", "baseline+plasticity.enabled=true", "baseline+ssdp"):
        with pytest.raises(ValueError, match="cannot be combined"):
            parse_variants(bad)
    with pytest.raises(ValueError, match="plasticity override changes nothing"):
        parse_variants("baseline+A_plus=1e-4")
