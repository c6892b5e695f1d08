"""The compiled C LIF for the CPU (``backend="cpu"``, :mod:`dassdp.neurons.backends.cpu`): the
torch backend's spikes bit for bit, gradients within a few ulps of it and of the autograd
loop, its choice under ``backend="auto"``, threads, and what happens without a compiler."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from dassdp._util import native as _native
from dassdp.neurons import (
    LIF,
    PLIF,
    LIFParams,
    backends,
    is_marked_spikes,
    lif_multistep,
    lif_multistep_cpu,
    lif_multistep_fused,
    lif_multistep_loop,
    resolve_backend,
)
from dassdp.neurons.backends import cpu as cpu_lif
from dassdp.neurons.saving import _BITS
from test_neurons import _CONFIGS, _TOL, _config_id, _input_hitting_threshold

torch.set_num_threads(1)

# The kernels are built with the system C compiler; without one the backend is off (tested
# below with a stand-in) and these tests are skipped with that reason, like the CUDA ones.
needs_cc = pytest.mark.skipif(
    _native.compiler() is None, reason="needs a C compiler (cc, gcc or clang)"
)


def _spikes_and_grad(fn, x, params, g_s):
    x = x.detach().clone().requires_grad_(True)
    s = fn(x, params)
    (g,) = torch.autograd.grad((s * g_s).sum(), x)
    return s.detach(), g


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", _CONFIGS, ids=_config_id)
def test_cpu_equals_torch_backend_and_loop(cfg, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"cpu{_config_id(cfg)}{dtype}".encode()))
    tol = _TOL[dtype]
    for tau in (2.0, 1.7):  # k = 0.5 (exact products) and a k that rounds
        T = int(torch.randint(1, 9, (1,), generator=gen))
        shape = (T, 3, int(torch.randint(1, 700, (1,), generator=gen)))  # blocks of 512 + tail
        params = LIFParams(tau=tau, v_threshold=1.0 if tau == 2.0 else 0.9, **cfg)
        x, on_threshold = _input_hitting_threshold(params, 1 / tau, shape, dtype, gen)
        g_s = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        s_ref, g_ref = _spikes_and_grad(lif_multistep_fused, x, params, g_s)
        s, g = _spikes_and_grad(lif_multistep_cpu, x, params, g_s)
        assert s.dtype == g.dtype == dtype
        assert torch.equal(s, s_ref)  # the same membranes, so the same spikes, bit for bit
        torch.testing.assert_close(g, g_ref, atol=tol, rtol=tol)  # a few ulps
        s_loop, g_loop = _spikes_and_grad(lif_multistep_loop, x, params, g_s)
        assert torch.equal(s, s_loop)
        if tau == 2.0:  # H[0] lands exactly on V_th there (exact arithmetic with k = 0.5)
            assert bool(s[0][on_threshold].eq(1).all())
        torch.testing.assert_close(g, g_loop, atol=tol, rtol=0)


@needs_cc
def test_cpu_spikes_are_marked_with_their_bytes_attached():
    x = torch.randn(4, 2, 3, 9, 9) * 2
    s = LIF(backend="cpu")(x)
    assert is_marked_spikes(s) and s._base is None and s.is_contiguous()
    bits = getattr(s, _BITS)
    assert bits.dtype == torch.bool and torch.equal(bits.to(s.dtype), s)


@needs_cc
def test_threads_split_the_neurons_with_the_same_result(monkeypatch):
    monkeypatch.setattr(cpu_lif, "_CHUNK", 1024)  # several thread tasks on a small tensor
    x = torch.randn(3, 2, 5000, dtype=torch.float64) * 2
    g_s = torch.randn_like(x)
    s1, g1 = _spikes_and_grad(lif_multistep_cpu, x, LIFParams(), g_s)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s2, g2 = _spikes_and_grad(lif_multistep_cpu, x, LIFParams(), g_s)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(s1, s2) and torch.equal(g1, g2)


@needs_cc
def test_auto_picks_cpu_for_large_layers_whatever_the_batch(monkeypatch):
    monkeypatch.delenv(cpu_lif.ENV, raising=False)
    params = LIFParams()
    big = cpu_lif.MIN_NEURONS
    for batch in (1, 2, 64):  # per sample: the batch size does not change the choice
        assert resolve_backend("auto", torch.zeros(4, batch, big), params) == "cpu"
        assert resolve_backend("auto", torch.zeros(4, batch, big - 1), params) == "torch"
    x = torch.zeros(4, 2, big)
    assert resolve_backend("auto", x.double(), params) == "cpu"
    assert resolve_backend("auto", x.bfloat16(), params) == "torch"  # fp32 / fp64 only
    assert resolve_backend("auto", x, params, 0.5) == "cpu"  # a fixed number: fine
    assert resolve_backend("auto", x, params, torch.tensor(0.5)) == "torch"  # PLIF's k
    assert resolve_backend("auto", x, params, return_membrane=True) == "torch"
    assert type(LIF()(x.requires_grad_()).grad_fn).__name__ == "CpuLIFBackward"
    assert type(PLIF()(x).grad_fn).__name__ == "_FusedLIFBackward"
    monkeypatch.setenv(cpu_lif.ENV, "0")  # switched off for auto; still there by name
    assert resolve_backend("auto", x, params) == "torch"
    assert resolve_backend("cpu", x, params) == "cpu"


def test_unsupported_calls_by_name_are_errors():
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"cpu LIF backend needs.*bfloat16"):
        lif_multistep(x.bfloat16(), LIFParams(), backend="cpu")
    with pytest.raises(ValueError, match=r"inv_tau None or a number.*Tensor"):
        lif_multistep(x, LIFParams(), torch.tensor(0.5), backend="cpu")
    with pytest.raises(ValueError, match="return_membrane=True"):
        lif_multistep(x, LIFParams(), backend="cpu", return_membrane=True)


def test_without_a_compiler_auto_warns_once_and_runs_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_lif, "_LIB", [])  # nothing built in this "process"
    monkeypatch.setattr(cpu_lif, "_FAILED", [])
    monkeypatch.setenv(cpu_lif.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(_native, "compiler", lambda: None)
    monkeypatch.delenv(cpu_lif.ENV, raising=False)
    x = torch.randn(2, 1, cpu_lif.MIN_NEURONS)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert resolve_backend("auto", x, LIFParams()) == "torch"
    assert resolve_backend("auto", x, LIFParams()) == "torch"  # once: no second warning
    assert type(LIF()(x.requires_grad_()).grad_fn).__name__ == "_FusedLIFBackward"
    with pytest.raises(RuntimeError, match="no C compiler found"):
        lif_multistep(x, LIFParams(), backend="cpu")  # asked for by name: the error


@needs_cc
def test_a_failed_build_is_reported_and_the_cache_is_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_lif, "_LIB", [])
    monkeypatch.setenv(cpu_lif.CACHE_ENV, str(tmp_path))
    bad = tmp_path.with_name(tmp_path.name + "_src") / "lif.c"  # outside the cache folder
    bad.parent.mkdir()
    bad.write_text(cpu_lif.KERNEL.source.read_text() + "\nthis is not C;\n")
    monkeypatch.setattr(cpu_lif, "KERNEL", dataclasses.replace(cpu_lif.KERNEL, source=bad))
    with pytest.raises(RuntimeError, match=r"building the CPU LIF kernels with .* failed"):
        cpu_lif.build()
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    monkeypatch.undo()
    monkeypatch.setattr(cpu_lif, "_LIB", [])
    monkeypatch.setenv(cpu_lif.CACHE_ENV, str(tmp_path))
    cpu_lif.build()
    (lib,) = tmp_path.iterdir()
    assert lib.name.startswith("lif_") and lib.suffix == ".so"
    assert backends.resolve_backend("cpu", torch.zeros(1), LIFParams()) == "cpu"


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["spiking_cnn", "spikingresformer_cifar"])
def test_models_on_the_cpu_backend_match_the_torch_backend(name, dtype, monkeypatch):
    """Every LIF of the model on the cpu backend (threshold lowered): the same outputs bit for
    bit, parameter gradients within float rounding, and spike saving still exact."""
    from dassdp.models import create_model
    from dassdp.neurons import LIF as LIFModule
    from test_models import CASES, NUM_CLASSES, T

    kwargs, shape = CASES[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, T=T, **kwargs).to(dtype).train()
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 2).to(dtype)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    monkeypatch.setattr(
        LIFModule, "forward",
        lambda self, x, f=LIFModule.forward: calls.append(resolve_backend(
            self.backend, x, self.params)) or f(self, x),
    )  # fmt: skip

    def step(use_cpu: bool, saving: bool):
        monkeypatch.setattr(cpu_lif, "MIN_NEURONS", 1 if use_cpu else 1 << 40)
        model.load_state_dict(start)
        model.spike_saving = saving
        model.zero_grad(set_to_none=True)
        calls.clear()
        out = model(x)
        out.square().sum().backward()
        used = set(calls)
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, used

    o_t, g_t, used_t = step(False, True)
    o_c, g_c, used_c = step(True, True)
    o_c0, g_c0, _ = step(True, False)
    assert torch.equal(o_c0, o_c)
    assert used_t == {"torch"} and used_c == {"cpu"}
    assert torch.equal(o_c, o_t)
    for n in g_t:
        tol = (1e-4, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
        torch.testing.assert_close(g_c[n], g_t[n], rtol=tol[0], atol=tol[1], msg=n)
        assert torch.equal(g_c[n], g_c0[n]), n  # spike saving: bit-identical on this backend
