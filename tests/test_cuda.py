"""CUDA checks (marked ``cuda``; skipped without a GPU, run by ``scripts/gpu_check.sh``).

Triton LIF/PLIF against the autograd loop, ``backend="auto"`` choosing Triton, the rule and
the learner on CUDA equal to the CPU in float64, a training step with no host sync
(``torch.cuda.set_sync_debug_mode("error")``), AMP fp16 (a grad-scaler skip skips DA-SSDP in
both apply modes) and bf16 through the engine, ``compile: true``, and DDP with NCCL.
Shapes are tiny: the whole file should take well under three minutes on one GPU, most of it
Triton JIT and torch.compile.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dassdp
from dassdp import DASSDP, DASSDPConfig, create_model
from engine_fixtures import tiny, tiny_dict

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")

# (v_reset, decay_input, detach_reset, surrogate, alpha)
LIF_CONFIGS = [
    (0.0, True, True, "atan", None),
    (None, True, True, "atan", 3.0),
    (0.0, False, False, "sigmoid", None),
    (-0.2, True, False, "sigmoid", 5.0),
    (None, False, True, "atan", None),
]


def _lif_kwargs(cfg):
    v_reset, decay_input, detach_reset, surrogate, alpha = cfg
    return dict(
        v_threshold=1.0,
        v_reset=v_reset,
        decay_input=decay_input,
        detach_reset=detach_reset,
        surrogate=surrogate,
        alpha=alpha,
    )


def _fwd_bwd(neuron, x, g):
    x = x.detach().clone().requires_grad_(True)
    out = neuron(x)
    out.backward(g)
    return out.detach(), x.grad.detach()


def _assert_rel(a, b, rel, what):
    scale = b.abs().max().clamp_min(1e-12)
    err = (a.double() - b.double()).abs().max() / scale
    assert err <= rel, f"{what}: max error {err:.3g} of max |ref| > {rel}"


# --------------------------------------------------------------------- Triton neurons
@pytest.mark.parametrize("cfg", LIF_CONFIGS)
@pytest.mark.parametrize("shape", [(4, 3, 8, 5, 5), (2, 7, 33)])
def test_triton_lif_matches_the_loop_in_fp32(cfg, shape):
    from dassdp.neurons import LIF

    gen = torch.Generator().manual_seed(hash((cfg, shape)) % 2**31)
    x = (1.5 * torch.randn(shape, generator=gen)).to(CUDA)
    g = torch.randn(shape, generator=gen).to(CUDA)
    tau = 2.5
    s_tri, gx_tri = _fwd_bwd(LIF(tau, backend="triton", **_lif_kwargs(cfg)), x, g)
    s_ref, gx_ref = _fwd_bwd(LIF(tau, backend="loop", **_lif_kwargs(cfg)), x, g)
    assert torch.equal(s_tri, s_ref)
    _assert_rel(gx_tri, gx_ref, 1e-5, "input gradient")


@pytest.mark.parametrize("cfg", LIF_CONFIGS[:3])
def test_triton_plif_matches_the_loop_in_fp32_with_the_w_gradient(cfg):
    from dassdp.neurons import PLIF

    shape = (4, 3, 16, 6, 6)
    gen = torch.Generator().manual_seed(7)
    x = (1.5 * torch.randn(shape, generator=gen)).to(CUDA)
    g = torch.randn(shape, generator=gen).to(CUDA)
    tri = PLIF(3.0, backend="triton", **_lif_kwargs(cfg)).to(CUDA)
    ref = PLIF(3.0, backend="loop", **_lif_kwargs(cfg)).to(CUDA)
    s_tri, gx_tri = _fwd_bwd(tri, x, g)
    s_ref, gx_ref = _fwd_bwd(ref, x, g)
    assert torch.equal(s_tri, s_ref)
    _assert_rel(gx_tri, gx_ref, 1e-5, "input gradient")
    _assert_rel(tri.w.grad, ref.w.grad, 1e-5, "w gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_lif_and_plif_run_on_half_inputs(dtype):
    from dassdp.neurons import LIF, PLIF

    shape = (4, 2, 8, 4, 4)
    gen = torch.Generator().manual_seed(3)
    x32 = (1.5 * torch.randn(shape, generator=gen)).to(CUDA)
    g = torch.randn(shape, generator=gen).to(CUDA)
    for neuron in (LIF(backend="triton"), PLIF(backend="triton").to(CUDA)):
        x = x32.to(dtype).requires_grad_(True)
        out = neuron(x)
        assert out.dtype == dtype and out.shape == x.shape
        out.backward(g.to(dtype))
        assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
        # the same rounded input through the float32 loop: (almost) the same spikes
        ref = type(neuron)(backend="loop").to(CUDA)(x.detach().float())
        assert (out.float() != ref).float().mean() < 0.01
    assert torch.isfinite(neuron.w.grad).all() and neuron.w.grad.dtype == torch.float32


def _kernels(fn):
    from dassdp.bench.devstats import count_cuda_kernels

    return count_cuda_kernels(fn)[0]


def test_auto_backend_runs_the_triton_kernels_on_cuda():
    from dassdp.neurons import LIF
    from dassdp.neurons.functional import LIFParams, lif_multistep

    shape = (4, 2, 8, 4, 4)
    x = (1.5 * torch.randn(shape)).to(CUDA).requires_grad_(True)
    g = torch.randn(shape).to(CUDA)

    def call(backend):
        def run():
            LIF(backend=backend)(x).backward(g)

        run()  # JIT outside the count
        return _kernels(run)

    auto, triton, fused = call("auto"), call("triton"), call("torch")
    assert auto == triton < fused
    params = LIFParams()
    out_auto = lif_multistep(x.detach(), params, backend="auto")
    out_tri = lif_multistep(x.detach(), params, backend="triton")
    assert torch.equal(out_auto, out_tri)


# ------------------------------------------------------------ rule and learner: fp64
def test_rule_on_cuda_equals_cpu_in_float64():
    from dassdp.bench.rule import make_inputs
    from dassdp.plasticity.rule import delta_w, fired_latency

    for latency in ("first", "last"):
        pre, post, gate = make_inputs(16, 24, 40, T=4, rate=0.3, seed=5)
        out = []
        for dev in ("cpu", "cuda"):
            p, q, gt = pre.to(dev), post.to(dev), gate.to(dev)
            a, b = fired_latency(p, latency), fired_latency(q, latency)
            dw = delta_w(
                a, b, gt, T=4, A_plus=1.5e-3, A_minus=1e-4, sigma=1.0, clip=1.0,
                dtype=torch.float64,
            )  # fmt: skip
            out.append(dw.cpu())
        torch.testing.assert_close(out[1], out[0], rtol=1e-12, atol=1e-12)


class LinearSNN(nn.Module):
    """[B, D] -> repeat over T (ramped) -> fc1 -> LIF -> fc2 -> mean over T; fc2 a site."""

    def __init__(self, d_in=12, hidden=16, classes=4, T=4):
        from dassdp.neurons import LIF

        super().__init__()
        self.T = T
        self.fc1 = nn.Linear(d_in, hidden)
        self.lif1 = LIF(backend="loop")
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        ramp = torch.linspace(0.6, 1.4, self.T, dtype=x.dtype, device=x.device)
        x = x.unsqueeze(0) * ramp.view(-1, 1, 1)  # [T, B, D]
        return self.fc2(self.lif1(self.fc1(x))).mean(0)

    def dassdp_sites(self, preset="default"):
        return {"fc2": {"pre": "input", "post": "output>0"}}


def _learn(model, dev, batches):
    model = model.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=1, dtype="float64", A_plus=1e-2))
    for i, (x, y) in enumerate(batches):
        if i == 3:
            plast.set_epoch(1)
        loss = F.cross_entropy(model(x.to(dev)), y.to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plast.step(loss.detach())
        dassdp.reset(model)
    return model, plast


def test_learner_on_cuda_equals_cpu_in_float64():
    torch.manual_seed(0)
    model = LinearSNN().double()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (2 * torch.rand(8, 12, generator=gen, dtype=torch.float64),
         torch.randint(0, 4, (8,), generator=gen))
        for _ in range(6)
    ]  # fmt: skip
    cpu_model, cpu_plast = _learn(copy.deepcopy(model), "cpu", batches)
    gpu_model, gpu_plast = _learn(copy.deepcopy(model), "cuda", batches)
    assert cpu_plast.counters == gpu_plast.counters and cpu_plast.counters["applied"] == 3
    for (name, a), b in zip(cpu_model.state_dict().items(), gpu_model.state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12, msg=name)
    for name, fit in cpu_plast.fits.items():
        other = gpu_plast.fits[name]
        for key in ("k", "mu", "sd"):
            if hasattr(fit, key):
                assert getattr(other, key) == pytest.approx(getattr(fit, key), abs=1e-12)


# --------------------------------------------------------- no host sync in the step
SYNC_MODELS = [
    ("spikingresformer_ti", {"T": 2}, (2, 3, 32, 32)),
    ("spiking_cnn", {"T": 2, "channels": [8, 16], "hidden": 32}, (2, 1, 16, 16)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), SYNC_MODELS)
def test_training_step_with_dassdp_has_no_host_sync(name, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs).to(CUDA).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=1))
    plast.set_epoch(0)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(shape, generator=gen).to(CUDA) for _ in range(4)]
    y = torch.randint(0, 10, (shape[0],), generator=gen).to(CUDA)
    stepped = torch.ones((), dtype=torch.bool, device=CUDA)

    def train_step(x, mode_step):
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            torch.cuda.set_sync_debug_mode(mode_step)
            plast.step(loss.detach(), optimizer_stepped=stepped)
            torch.cuda.set_sync_debug_mode("error")
            dassdp.reset(model)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    # first steps: lazy initialisation (cuDNN, Triton JIT, optimizer state) outside the check
    for x in xs[:2]:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        plast.step(loss.detach())
        dassdp.reset(model)
    torch.cuda.synchronize()
    train_step(xs[2], "error")  # warm-up: zero syncs anywhere
    plast.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plast.fit()  # the once-per-run fit reads the host: outside the step
    train_step(xs[3], "warn")  # one active step (its first-use work) outside the count
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step(xs[0], "warn")  # active: at most one sync, inside DASSDP.step only
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    assert plast.counters["applied"] >= 2


# ------------------------------------------------------------------ engine on CUDA
def _last_counters(run_dir):
    from dassdp.engine import read_metrics

    return read_metrics(run_dir)[-1]["plasticity"]["counters"]


@pytest.mark.parametrize("apply", ["post_step", "grad"])
def test_fp16_grad_scaler_skip_skips_dassdp(tmp_path, apply):
    from dassdp.engine import Trainer

    cfg = tiny(device="cuda", amp="fp16", plasticity={"apply": apply})
    trainer = Trainer(cfg, tmp_path)
    trainer.fit(stop_after=1)  # the warm-up epoch, normal fp16 steps
    trainer.close()
    warm = _last_counters(tmp_path)
    trainer = Trainer(cfg, tmp_path, resume=True)
    inf = torch.tensor(float("inf"), device=CUDA)
    for p in trainer.model.parameters():  # every gradient inf: the scaler skips every step
        p.register_hook(lambda grad: grad + inf)
    trainer.fit()
    trainer.close()
    counters = _last_counters(tmp_path)
    # 128 images / batch 32: 4 steps in the active epoch, all skipped by the scaler
    assert counters["skipped_optimizer"] - warm["skipped_optimizer"] == 4
    assert counters["applied"] == warm["applied"] == 0


def test_fp16_without_skips_applies_and_bf16_trains(tmp_path):
    from dassdp.engine import fit, read_metrics

    fit(tiny(device="cuda", amp="fp16"), tmp_path / "fp16")
    assert _last_counters(tmp_path / "fp16")["applied"] > 0
    fit(tiny(device="cuda", amp="bf16"), tmp_path / "bf16")
    rows = read_metrics(tmp_path / "bf16")
    assert _last_counters(tmp_path / "bf16")["applied"] == 4
    assert all(torch.isfinite(torch.tensor(r["train"]["loss"])) for r in rows)


def test_compiled_model_trains_one_epoch(tmp_path):
    from dassdp.engine import fit, read_metrics

    fit(tiny(device="cuda", compile=True, epochs=1, subset=64), tmp_path)
    row = read_metrics(tmp_path)[-1]
    assert row["train"]["samples"] == 64
    assert torch.isfinite(torch.tensor(row["train"]["loss"]))


def test_ddp_with_nccl_keeps_replicas_identical(tmp_path):
    import yaml

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(tiny_dict(name="nccl", device="cuda", epochs=2)))
    cmd = [sys.executable, "-m", "dassdp", "train", "--config", str(cfg)]
    cmd += ["--out", str(tmp_path / "run"), "--nproc", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["replicas_identical"] for r in rows] == [True, True]
