"""``dassdp ls sites``: site shapes, firing fractions at initialisation, drift notes, errors."""

import pickle

import numpy as np
import pytest
import torch

from dassdp.cli import main
from dassdp.commands.ls import format_sites, site_firing, site_infos
from dassdp.models import create_model
from dassdp.models.spikingresformer import SpikingResformer

TINY = "{dims: [8, 16, 16], depths: [1, 2, 1], num_heads: [1, 1, 1], group_size: 8}"


def tiny_resformer() -> SpikingResformer:
    torch.manual_seed(0)
    return SpikingResformer(
        dims=(8, 16, 16), depths=(1, 2, 1), num_heads=(1, 1, 1), group_size=8,
        num_classes=10, in_channels=3, T=2, stem="small",
    )  # fmt: skip


def run_ls(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["ls", "sites", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_site_infos_give_kind_and_shapes():
    infos = {i.name: i for i in site_infos(tiny_resformer())}
    cls, proj = infos["classifier"], infos["stages.2.blocks.0.proj"]
    assert (cls.kind, cls.c_out, cls.c_in, cls.weight_shape) == ("Linear", 10, 16, (10, 16))
    assert (proj.kind, proj.weight_shape) == ("1x1 conv", (16, 16, 1, 1))
    assert (proj.pre, proj.post) == ("input", "stages.2.blocks.0>0")
    mid = site_infos(tiny_resformer(), "mid")
    assert [i.name for i in mid] == ["stages.1.blocks.0.proj", "stages.1.blocks.2.proj"]


def test_site_firing_equals_a_direct_count_and_leaves_the_model_as_it_was():
    model = tiny_resformer().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    firing = site_firing(model, "default", [x], T=2)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same forward (train mode, fresh buffers), counted by hand
    seen = {}
    block = "stages.2.blocks.0"
    hooks = [
        model.get_submodule(f"{block}.proj").register_forward_hook(
            lambda m, a, o: seen.__setitem__("pre", a[0])
        ),
        model.get_submodule(block).register_forward_hook(
            lambda m, a, o: seen.__setitem__("post", o)
        ),
    ]
    model.train()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    pre = seen["pre"].unflatten(0, (2, 6)) if seen["pre"].dim() == 4 else seen["pre"]
    want_pre = (pre > 0).amax(dim=(0, 3, 4)).float().mean(1).mean().item()  # [T,B,C,H,W]
    want_post = (seen["post"] > 0).amax(dim=(0, 3, 4)).float().mean(1).mean().item()
    assert firing[f"{block}.proj"] == pytest.approx((want_pre, want_post), abs=1e-6)
    assert all(0 <= v <= 1 for pair in firing.values() for v in pair)


def test_drift_note_only_when_pre_and_post_both_fire_at_least_90_percent():
    infos = site_infos(create_model("spiking_cnn"))
    lines = format_sites(infos, {"classifier": (0.95, 0.9), "fc1": (0.99, 0.5)})
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == [
        "note: classifier: pre 95% and post 90% of units fire: dW is a near-uniform drift here"
    ]
    assert "pre fired" in lines[0] and "95.0%" in lines[1]


def test_cli_spiking_cnn_on_random_input_says_so(capsys, tmp_path):
    rc, out, _ = run_ls(
        capsys, "spiking_cnn", "--data", "cifar10", "--root", str(tmp_path), "--batches", "2",
        "--batch-size", "4",
    )  # fmt: skip
    assert rc == 0
    assert f"random input (4, 3, 32, 32) x 2 (cifar10 is not prepared in {tmp_path})" in out
    assert "fc1  " in out and "128 x 512" in out and "(128, 512)" in out and "lif3" in out


def test_cli_tiny_spikingresformer_presets(capsys):
    rc, out, _ = run_ls(capsys, "spikingresformer_cifar", "--model-args", TINY, "--preset", "mid")
    assert rc == 0 and "site preset 'mid': 2 site(s)" in out
    assert "stages.1.blocks.2.proj" in out and "1x1 conv" in out and "(16, 16, 1, 1)" in out
    rc, out, _ = run_ls(
        capsys, "spikingresformer_cifar", "--model-args", TINY, "--data", "cifar10", "--random"
    )
    assert rc == 0 and "random input (16, 3, 32, 32) x 1 (--random)" in out
    assert "pre fired" in out and "stages.2.blocks.0.proj" in out


def test_cli_reads_prepared_data_through_the_builders(capsys, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for f in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        (folder / f).write_bytes(pickle.dumps({"data": data, "labels": [0, 1, 2]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    rc, out, _ = run_ls(
        capsys, "spiking_cnn", "--data", "cifar10", "--root", str(tmp_path), "--batches", "3",
        "--batch-size", "4",
    )  # fmt: skip
    assert rc == 0 and f"on real data: 12 cifar10 training images in {tmp_path}" in out


def test_cli_errors_name_the_allowed_models_and_presets(capsys):
    rc, _, err = run_ls(capsys, "no_such_model")
    assert rc == 2 and "unknown model 'no_such_model'" in err and "spiking_cnn" in err
    rc, _, err = run_ls(capsys, "spiking_cnn", "--preset", "mid")
    assert rc == 2 and "unknown DA-SSDP site preset 'mid'" in err
    assert "['classifier', 'default', 'hidden', 'projection']" in err
    rc, _, err = run_ls(capsys, "spikingresformer_cifar", "--preset", "nope")
    assert rc == 2 and "'mid'" in err and "'compat'" in err
    rc, _, err = run_ls(capsys)
    assert rc == 2 and "needs a model name" in err
    rc, _, err = run_ls(capsys, "spiking_cnn", "--data", "imagenette")
    assert rc == 2 and "unknown dataset 'imagenette'" in err


def test_ls_models_still_lists_parameter_counts(capsys):
    assert main(["ls", "models", "spiking_*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "params"] and out[1].startswith("spiking_cnn")
