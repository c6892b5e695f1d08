"""CUDA checks (marked ``cuda``: skipped, with the reason said, where no GPU is visible).

They run on a GPU machine through ``scripts/gpu_check.sh`` (``pytest -m cuda``): the Triton
LIF/PLIF in float32 and float64 against a float64 reference, within rounding bounds derived in
``tests/lif_reference.py`` (checked on the CPU by ``tests/test_fp_bounds.py``), the rule and
the learner on CUDA against the CPU in float64, a training step with DA-SSDP that must not
synchronise with the host (``torch.cuda.set_sync_debug_mode("error")``), the engine in fp16
(a grad-scaler skip is a DA-SSDP skip in both ``apply`` modes), bf16 and compiled, and DDP
over NCCL when two GPUs exist. Sizes are tiny: the whole file is meant to take well under two
minutes on one GPU.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import dassdp
from dassdp.neurons import LIF, PLIF
from dassdp.neurons.functional import LIFParams, lif_multistep
from dassdp.plasticity.rule import delta_w, fired_latency
from engine_fixtures import tiny, tiny_dict
from lif_reference import CONFIGS, check_lif, lif_inputs, reference, triton_gk_depth
from snn_fixtures import TinySNN
from test_engine_train import _InfGrad

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


def _kernel_block(n: int) -> int:
    """Lanes per program of the Triton LIF for ``n`` neurons a step (the kernel's own choice);
    16, its smallest block and so the deepest sum, if that helper is not there."""
    from dassdp.neurons.backends import triton as triton_lif

    pick = getattr(triton_lif, "_block", None)
    return int(pick(n)) if callable(pick) else 16


def _run_lif(backend: str, params: LIFParams, learn_k: bool, dtype: torch.dtype):
    """``(spikes, g_x, g_w, k, x, g_s)`` of ``<spikes, g_s>`` on CUDA for ``lif_inputs()``
    (made on the CPU: the same values on every machine, so the spike margin checked by
    ``tests/test_fp_bounds.py`` holds here)."""
    x, g_s = (t.to(CUDA, dtype) for t in lif_inputs())
    xi = x.clone().requires_grad_(True)
    w = torch.tensor(0.3, device=CUDA, dtype=dtype, requires_grad=True)
    k = torch.sigmoid(w) if learn_k else None
    s = lif_multistep(xi, params, k, backend=backend)
    (s * g_s).sum().backward()
    return s.detach(), xi.grad, (w.grad if learn_k else None), k, x, g_s


def _check_against_float64(params: LIFParams, run: tuple, dtype: torch.dtype) -> None:
    """A Triton ``run`` (``_run_lif``): spikes equal to the float64 reference's; ``g_x`` per
    element and PLIF's ``g_w`` within the rounding bounds of ``tests/lif_reference.py``.
    ``g_w`` sums ``T N`` terms (41k here) whose absolute sum is 50-2500x the result, so its
    bound is ``γ_depth`` times that absolute sum (``depth``: the kernel's summation order)
    plus each term's own rounding, not a relative 1e-5."""
    s, g_x, g_w, k, x, g_s = run
    ref = reference(x, g_s, params, k, dtype)
    T, n = x.shape[0], x[0].numel()
    check_lif(ref, s, g_x, g_w, dtype, triton_gk_depth(T, n, _kernel_block(n)))


@pytest.mark.parametrize("params", CONFIGS, ids=lambda p: f"{p.v_reset}-{p.surrogate}")
@pytest.mark.parametrize("learn_k", [False, True], ids=["lif", "plif"])
def test_triton_lif_equals_the_loop_on_cuda(params, learn_k):
    s_loop, *_ = _run_lif("loop", params, learn_k, torch.float32)
    run = _run_lif("triton", params, learn_k, torch.float32)
    s_tri = run[0]
    assert torch.equal(s_loop, s_tri)
    _check_against_float64(params, run, torch.float32)


@pytest.mark.parametrize(
    "params,learn_k",
    [(CONFIGS[0], False), *[(p, True) for p in CONFIGS]],
    ids=["lif-0.0-atan", *[f"plif-{p.v_reset}-{p.surrogate}" for p in CONFIGS]],
)
def test_triton_lif_in_float64_on_cuda(params, learn_k):
    # the fp64 kernels (F64: fp64 registers, constants unrounded) against the float64 loop
    run = _run_lif("triton", params, learn_k, torch.float64)
    _check_against_float64(params, run, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_lif_half_inputs_on_cuda(dtype):
    x = (torch.randn(4, 32, 64, device=CUDA) * 1.5).to(dtype).requires_grad_(True)
    s = lif_multistep(x, LIFParams(), backend="triton")
    s.sum().backward()
    assert s.dtype == dtype and x.grad.dtype == dtype
    ref = lif_multistep(x.detach().float(), LIFParams(), backend="loop")
    assert (s.float() != ref).float().mean() < 1e-3  # rounding of H near the threshold only


def test_auto_backend_is_triton_on_cuda():
    lif, plif = LIF().to(CUDA), PLIF().to(CUDA)
    x = torch.randn(2, 3, 5, device=CUDA, requires_grad=True)
    for module in (lif, plif):
        s = module(x)
        assert "Triton" in type(s.grad_fn).__name__, type(s.grad_fn).__name__


def test_rule_on_cuda_equals_cpu_in_float64():
    gen = torch.Generator().manual_seed(1)
    s_pre = torch.rand(4, 16, 40, generator=gen) < 0.2
    s_post = torch.rand(4, 16, 24, generator=gen) < 0.3
    G = torch.rand(16, generator=gen, dtype=torch.float64) * 2
    kw = dict(T=4, A_plus=1.5e-3, A_minus=1e-4, sigma=1.0, dtype=torch.float64)
    cpu = delta_w(fired_latency(s_pre), fired_latency(s_post), G, **kw)
    gpu = delta_w(fired_latency(s_pre.to(CUDA)), fired_latency(s_post.to(CUDA)), G.to(CUDA), **kw)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-15)


def _learner_run(device: torch.device, apply: str) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = TinySNN().double().to(device)
    cfg = dassdp.DASSDPConfig(warmup_epochs=1, dtype="float64", apply=apply)
    plast = dassdp.DASSDP(model, cfg)  # both of TinySNN's sites
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    for epoch in range(2):
        plast.set_epoch(epoch)
        for _ in range(3):
            x = torch.randn(8, 12, generator=gen, dtype=torch.float64).to(device)
            y = torch.randint(0, 4, (8,), generator=gen).to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if apply == "grad":
                plast.step(loss)
            opt.step()
            if apply == "post_step":
                plast.step(loss)
            dassdp.reset(model)
    return {k: v.cpu() for k, v in model.state_dict().items()}, plast.counters


@pytest.mark.parametrize("apply", ["post_step", "grad"])
def test_learner_on_cuda_equals_cpu_in_float64(apply):
    weights_cpu, counters_cpu = _learner_run(torch.device("cpu"), apply)
    weights_gpu, counters_gpu = _learner_run(CUDA, apply)
    assert counters_gpu == counters_cpu and counters_cpu["applied"] == 3
    for key, value in weights_cpu.items():
        torch.testing.assert_close(weights_gpu[key], value, rtol=1e-12, atol=1e-14, msg=key)


@pytest.mark.parametrize(
    "name,shape",
    [("spiking_cnn", (4, 1, 28, 28)), ("spikingresformer_ti", (2, 3, 32, 32))],
)
def test_a_training_step_with_dassdp_does_not_synchronise(name, shape):
    torch.manual_seed(0)
    model = dassdp.create_model(name, num_classes=10, T=2, in_channels=shape[1]).to(CUDA)
    plast = dassdp.DASSDP(model, dassdp.DASSDPConfig(warmup_epochs=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(shape, device=CUDA)
    y = torch.randint(0, 10, (shape[0],), device=CUDA)
    stepped = torch.ones((), dtype=torch.bool, device=CUDA)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        plast.step(loss.detach(), optimizer_stepped=stepped)
        dassdp.reset(model)

    step()  # first step: lazy CUDA init, optimizer state, learner buffers moved to the GPU
    torch.cuda.synchronize()
    for epoch in range(2):
        plast.set_epoch(epoch)
        if epoch == 1:
            plast.fit()  # once per run, at the end of warm-up: reads the sums (allowed)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert plast.counters["applied"] == 2 and plast.counters["recorded"] == 5


@pytest.mark.parametrize("apply", ["post_step", "grad"])
def test_engine_fp16_scaler_skip_is_a_dassdp_skip(tmp_path, apply):
    from dassdp.engine.train import Trainer

    cfg = tiny(epochs=2, amp="fp16", device="cuda", plasticity={"warmup_epochs": 1, "apply": apply})
    trainer = Trainer(cfg, tmp_path)
    trainer.fit(stop_after=1)
    criterion, calls = trainer.criterion, itertools.count()

    def overflowing(logits, target):
        return criterion(_InfGrad.apply(logits) if next(calls) == 1 else logits, target)

    trainer.criterion = overflowing
    row = trainer.fit()
    trainer.close()
    counters = row["plasticity"]["counters"]
    assert counters["skipped_optimizer"] == 1 and counters["applied"] == 3, counters
    assert torch.isfinite(trainer.model.classifier.weight).all()


@pytest.mark.parametrize(
    "changes",
    [
        {"amp": "bf16"},
        {"amp": "bf16", "channels_last": True, "cudnn_benchmark": True},
        {"compile": True, "compile_backend": "aot_eager"},
    ],
    ids=["bf16", "bf16-channels-last", "compiled"],
)
def test_engine_trains_on_cuda(tmp_path, changes):
    from dassdp.engine.train import Trainer

    trainer = Trainer(tiny(epochs=2, device="cuda", **changes), tmp_path)
    row = trainer.fit()
    trainer.close()
    assert row["train"]["samples"] == 128 and row["plasticity"]["counters"]["applied"] == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_triton_lif_compiles_with_inductor():
    lif = LIF(backend="triton").to(CUDA)
    x = torch.randn(4, 8, 64, device=CUDA, requires_grad=True)
    eager = lif(x)
    compiled = torch.compile(lif, fullgraph=True)(x)
    assert torch.equal(eager, compiled)


@pytest.mark.distributed
def test_ddp_over_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (NCCL DDP)")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dassdp", "train", "--nproc", "2", "--out", str(out)]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_dict(epochs=2, device="cuda")))
    env = {**os.environ, "PYTHONPATH": str(Path(dassdp.__file__).parents[1])}
    done = subprocess.run([*cmd, "--config", str(cfg)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all('"replicas_identical": true' in r for r in rows)
    shutil.rmtree(out)
