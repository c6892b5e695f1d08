"""``dassdp ls sites --effect`` (:mod:`dassdp.experiments.site_effect`): what one DA-SSDP
update changes after its site, checked on models whose answer is derived exactly."""

from __future__ import annotations

import copy
import csv
import itertools
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from dassdp.cli import main
from dassdp.engine.train import fit
from dassdp.experiments.site_effect import (
    calibrate_norms,
    dassdp_updates,
    measure_site,
    site_effects,
    site_norms,
    split_update,
)
from dassdp.plasticity import DASSDP, DASSDPConfig, SiteSpec
from engine_fixtures import tiny

torch.set_num_threads(1)
EPS = 1e-5  # BatchNorm's eps


class SiteNet(nn.Module):
    """``x [B, n_in]`` (one time step) -> ``site`` (Linear, no bias) -> ``bn`` -> ``head``.

    The site's output goes straight into the BatchNorm, whose output feeds the logits."""

    T = 1
    dassdp_site_norms: ClassVar[dict[str, str] | None] = {"site": "bn"}

    def __init__(self, n_in: int = 4, n_out: int = 3, classes: int = 2) -> None:
        super().__init__()
        self.site = nn.Linear(n_in, n_out, bias=False)
        self.bn = nn.BatchNorm1d(n_out)
        self.head = nn.Linear(n_out, classes)
        with torch.no_grad():  # positive weights: every output > 0 where any input fires
            self.site.weight.uniform_(0.1, 1.0, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.site(x.unsqueeze(0))  # [1, B, n_out]
        return self.head(self.bn(y.flatten(0, 1))).unflatten(0, y.shape[:2]).mean(0)

    def dassdp_sites(self, preset: str = "default") -> dict[str, SiteSpec]:
        return {"site": SiteSpec(pre="input", post="output>0")}


class UndeclaredNet(SiteNet):
    dassdp_site_norms = None  # the tool must trace the BatchNorm


def balanced(n_in: int = 4, k: int = 2) -> torch.Tensor:
    """Every set of ``k`` of ``n_in`` inputs firing: ``[C(n_in, k), n_in]``. The total
    activity is ``k`` for every sample and every input fires in the same share of them."""
    rows = [[float(i in c) for i in range(n_in)] for c in itertools.combinations(range(n_in), k)]
    return torch.tensor(rows)


def reference(model: SiteNet, part: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """The relative changes, by hand in numpy: y = x W^T, BN with batch statistics (train)
    or the running ones (eval), change over the spread of the reference values."""
    W = model.site.weight.detach().double().numpy()
    dW = part.double().numpy()
    X = x.double().numpy()
    gamma = model.bn.weight.detach().double().numpy()
    beta = model.bn.bias.detach().double().numpy()
    mu_run = model.bn.running_mean.double().numpy()
    var_run = model.bn.running_var.double().numpy()

    def spread(z: np.ndarray) -> float:
        return float(((z - z.mean(0)) ** 2).sum())

    def change(z0: np.ndarray, z1: np.ndarray) -> float:
        return math.sqrt(((z1 - z0) ** 2).sum() / spread(z0))

    y0, y1 = X @ W.T, X @ (W + dW).T

    def train(y: np.ndarray) -> np.ndarray:
        return gamma * (y - y.mean(0)) / np.sqrt(y.var(0) + EPS) + beta

    def evaluate(y: np.ndarray) -> np.ndarray:
        return gamma * (y - mu_run) / np.sqrt(var_run + EPS) + beta

    return {
        "site": change(y0, y1),
        "norm_train": change(train(y0), train(y1)),
        "norm_eval": change(evaluate(y0), evaluate(y1)),
    }


def test_split_update_is_row_means_and_a_zero_sum_rest():
    dw = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    uniform, rest = split_update(dw)
    assert torch.allclose(uniform, dw.mean(1, keepdim=True).expand(5, 7))
    assert torch.allclose(rest.sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(uniform + rest, dw)
    assert uniform.norm() ** 2 + rest.norm() ** 2 == pytest.approx(float(dw.norm() ** 2))
    conv = dw.reshape(5, 7, 1, 1)  # a 1x1 conv weight
    u4, r4 = split_update(conv)
    assert u4.shape == conv.shape and torch.allclose(u4.reshape(5, 7), uniform)
    assert torch.allclose(r4.reshape(5, 7), rest)


def test_uniform_dw_with_constant_input_activity_is_absorbed_by_bn_train_only():
    """Row-uniform dW[j, :] = c_j adds c_j * k to output j for every sample (k inputs fire in
    each): BN with batch statistics removes that constant entirely (norm train 0, and the
    logits of a training-mode forward do not move); BN with its running statistics is a
    fixed affine map and passes it, scaled (gamma = 1, equal running variances: exactly the
    site's relative change)."""
    model = SiteNet()
    x = balanced()
    uniform = torch.tensor([[0.1], [-0.2], [0.05]]).expand(3, 4).clone()
    got = measure_site(model, "site", "bn", {"uniform": uniform}, [(x, None)])["uniform"]
    assert got["site"] > 0.05
    assert got["norm_train"] < 1e-6 and got["logits_train"] < 1e-6
    assert got["norm_eval"] == pytest.approx(got["site"], rel=1e-6)
    assert got["logits_eval"] > 0.01
    want = reference(model, uniform, x)
    assert got["site"] == pytest.approx(want["site"], rel=1e-5)
    assert got["norm_eval"] == pytest.approx(want["norm_eval"], rel=1e-5)


def test_uniform_dw_with_varying_activity_and_the_rest_pass_bn_train_as_derived():
    """Uniform dW with a total activity that varies between samples: BN(train) removes only
    the batch mean of the shift c_j * sum_i s_i; the non-uniform rest passes except for its
    own batch-mean part. Both as computed by hand."""
    model = SiteNet(n_in=6, n_out=3)
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(10, 6, generator=gen) < torch.linspace(0.2, 0.8, 10)[:, None]).float()
    dw = 0.05 * torch.randn(3, 6, generator=gen)
    uniform, rest = split_update(dw)
    got = measure_site(model, "site", "bn", {"uniform": uniform, "rest": rest}, [(x, None)])
    for name, part in (("uniform", uniform), ("rest", rest)):
        want = reference(model, part, x)
        for key in ("site", "norm_train", "norm_eval"):
            assert got[name][key] == pytest.approx(want[key], rel=1e-5), (name, key)
    assert 1e-3 < got["uniform"]["norm_train"] < got["uniform"]["norm_eval"]


def test_one_dassdp_update_on_balanced_spikes_is_uniform_and_bn_train_absorbs_it():
    """End to end: every output fires (at step 0) and every input fires in half the
    samples, so each pair's term has the same batch mean: dW is one constant,
    A+ / 2 - A- exp(-1/2) / 2 (co-firing at latency 0; a silent input has latency T = 1),
    purely uniform, and with constant total activity BN(train) absorbs all of it."""
    model = SiteNet()
    x = balanced()
    config = DASSDPConfig(gate="one")
    before = copy.deepcopy(model.state_dict())
    updates = dassdp_updates(model, model.dassdp_sites(), config, (x, None))
    for key, value in model.state_dict().items():  # the model is as it was
        assert torch.equal(value, before[key]), key
    dw = updates["site"]
    want = 0.5 * (config.A_plus - config.A_minus * math.exp(-0.5))
    assert torch.allclose(dw, torch.full_like(dw, want), rtol=1e-4)
    norms = site_norms(model, ["site"])
    assert norms == {"site": ("bn", "declared")}
    rows = {e.part: e for e in site_effects(model, updates, norms, [(x, None)])}
    assert rows["uniform"].share == pytest.approx(1.0, abs=1e-4)
    assert rows["rest"].share < 1e-3
    assert rows["dW"].norm_train < 1e-5 and rows["dW"].logits_train < 1e-5
    assert rows["dW"].norm_eval == pytest.approx(rows["dW"].site_change, rel=1e-5)
    assert rows["dW"].passed_train < 1e-3


def test_the_update_is_what_the_learner_applies():
    model = SiteNet(n_in=6)
    x = (torch.rand(8, 6, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    y = torch.tensor([0, 1] * 4)
    config = DASSDPConfig(gate="one", A_minus=5e-4)
    updates = dassdp_updates(model, model.dassdp_sites(), config, (x, y))
    other = copy.deepcopy(model).train()
    learner = DASSDP(other, config.replace(warmup_epochs=0), T=1)
    w0 = other.site.weight.detach().clone()
    loss = nn.functional.cross_entropy(other(x), y)
    learner.step(loss.detach())
    learner.close()
    assert torch.equal(updates["site"], other.site.weight.detach() - w0)
    assert updates["site"].abs().max() > 0


def test_the_next_batchnorm_is_traced_when_not_declared():
    model = UndeclaredNet()
    assert site_norms(model, ["site"], balanced()) == {"site": ("bn", "traced")}
    assert site_norms(model, ["head"], balanced()) == {"head": (None, "none")}
    with pytest.raises(ValueError, match="pass an input to trace"):
        site_norms(model, ["site"])


def test_calibration_sets_running_statistics_from_the_batches():
    model = SiteNet()
    a, b = balanced(), balanced(4, 1)
    calibrate_norms(model, [(a, None), (b, None)])
    ys = [model.site(x).detach() for x in (a, b)]
    assert torch.allclose(model.bn.running_mean, (ys[0].mean(0) + ys[1].mean(0)) / 2)
    assert model.bn.momentum == 0.1  # restored


def run_ls(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["ls", "sites", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


CNN = "{channels: [4, 8], hidden: 16}"


def test_cli_effect_on_a_small_cnn(capsys, tmp_path):
    out_csv = tmp_path / "effect.csv"
    rc, out, _ = run_ls(
        capsys, "spiking_cnn", "--effect", "--data", "cifar10", "--random", "--batches", "2",
        "--batch-size", "8", "--model-args", CNN, "--csv", str(out_csv),
    )  # fmt: skip
    assert rc == 0, out
    assert "G = 1 (initialised model)" in out and "re-estimated on these batches" in out
    assert "next normalisation: classifier: none; fc1: bn3 (declared)" in out
    lines = out.splitlines()
    assert lines[2].split()[:3] == ["site", "part", "norm"]
    assert sum(line.startswith("fc1 ") for line in lines) == 3
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [(r["site"], r["part"]) for r in rows] == [
        (s, p) for s in ("classifier", "fc1") for p in ("dW", "uniform", "rest")
    ]
    for r in rows:
        if r["part"] != "dW":
            continue
        assert float(r["share"]) == 1.0 and float(r["site_change"]) > 0
        assert (r["norm"] == "bn3") == (r["site"] == "fc1")
        assert math.isnan(float(r["norm_train"])) == (r["site"] == "classifier")
    rc, out, _ = run_ls(
        capsys, "spiking_cnn", "--effect", "--data", "cifar10", "--random", "--batch-size",
        "4", "--model-args", "{channels: [4, 8], hidden: 16, site_norm: true}", "--markdown",
    )  # fmt: skip
    assert rc == 0 and "classifier: classifier_bn (declared)" in out
    assert (
        "| site | part | norm | ‖part‖/‖dW‖ |" in out
        and "| classifier | dW | classifier_bn |" in out
    )


def test_cli_effect_from_a_checkpoint_uses_its_fitted_gate(capsys, tmp_path):
    fit(tiny(epochs=2), tmp_path)  # warm-up 1 epoch: the gate is fitted
    ckpt = str(tmp_path / "last.pt")
    rc, out, _ = run_ls(capsys, "--effect", "--checkpoint", ckpt, "--batch-size", "8")
    assert rc == 0, out
    assert "the checkpoint's fitted gate" in out and "8 synthetic training images" in out
    assert "BatchNorm running statistics: the checkpoint's (epoch 2)" in out
    rc, out, _ = run_ls(capsys, "--effect", "--checkpoint", ckpt, "--preset", "classifier")
    assert rc == 0 and "G = 1 (no fitted gate for these sites)" in out
    rc, _, err = run_ls(capsys, "spikingresformer_cifar", "--effect", "--checkpoint", ckpt)
    assert rc == 2 and "holds 'spiking_cnn', not 'spikingresformer_cifar'" in err
    rc, _, err = run_ls(capsys, "--effect", "--checkpoint", ckpt, "--model-args", CNN)
    assert rc == 2 and "--model-args: not with --checkpoint" in err


def test_cli_effect_errors(capsys):
    rc, _, err = run_ls(capsys, "spiking_cnn", "--effect")
    assert rc == 2 and "--effect needs --data DATASET" in err
    rc, _, err = run_ls(capsys, "spiking_cnn", "--csv", "x.csv", "--markdown")
    assert rc == 2 and "--csv, --markdown: only with --effect" in err
    rc, _, err = run_ls(capsys, "--effect", "--data", "cifar10")
    assert rc == 2 and "needs a model name" in err
