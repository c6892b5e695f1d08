"""The one-kernel Triton LIF (run on CPU tensors by Triton's interpreter) == the autograd loop;
backend selection; no host syncs or host-made tensors in the torch and triton backends."""

from __future__ import annotations

import collections
import inspect
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dassdp.neurons import (
    BACKENDS,
    LIF,
    PLIF,
    LIFParams,
    lif_multistep,
    lif_multistep_loop,
    lif_multistep_triton,
    resolve_backend,
)
from dassdp.neurons.backends import triton as triton_lif  # needs triton (installed with torch)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """Every test here runs the Triton kernels in the CPU interpreter (set after import on
    purpose: the kernels are created for the mode in force at call time)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


_CONFIGS = [
    dict(v_reset=v_reset, decay_input=decay, detach_reset=detach, surrogate=surrogate)
    for v_reset in (0.0, -0.5, None)
    for decay in (True, False)
    for detach in (True, False)
    for surrogate in ("atan", "sigmoid")
]


def _config_id(cfg: dict) -> str:
    reset = "soft" if cfg["v_reset"] is None else f"hard{cfg['v_reset']:+g}"
    return (
        f"{reset}-{'decay' if cfg['decay_input'] else 'nodecay'}-"
        f"{'detach' if cfg['detach_reset'] else 'attached'}-{cfg['surrogate']}"
    )


def _run(fn, x, params, inv_tau, g_s, g_v):
    """Spikes, membranes, gradients of ``<S, g_s> + <V, g_v>`` w.r.t. ``x`` (and a tensor
    ``inv_tau``) and the name of the autograd node that made the spikes."""
    x = x.detach().clone().requires_grad_(True)
    leaves = [x]
    if isinstance(inv_tau, torch.Tensor):
        inv_tau = inv_tau.detach().clone().requires_grad_(True)
        leaves.append(inv_tau)
    s, v = fn(x, params, inv_tau, return_membrane=True)
    node = type(s.grad_fn).__name__
    loss = (s * g_s).sum() if g_v is None else (s * g_s).sum() + (v * g_v).sum()
    grads = torch.autograd.grad(loss, leaves)
    return s.detach(), v.detach(), grads, node


def _input(params: LIFParams, k: float, shape, dtype, gen) -> torch.Tensor:
    """Random ``x`` whose first step puts a quarter of the neurons exactly on the threshold."""
    x = (1.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    v_r = 0.0 if params.v_reset is None else params.v_reset
    x0 = params.v_threshold / k - v_r if params.decay_input else params.v_threshold - v_r * k
    x[0][torch.rand(shape[1:], generator=gen) < 0.25] = x0
    return x


def _rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """``|a - b| <= rtol * max|b|`` (relative to the gradient's scale)."""
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("cfg", _CONFIGS, ids=_config_id)
def test_triton_equals_loop(cfg):
    gen = torch.Generator().manual_seed(zlib.crc32(_config_id(cfg).encode()))
    alpha = 3.0 if cfg["surrogate"] == "atan" else None  # a non-default alpha for atan
    params = LIFParams(tau=2.0, v_threshold=1.0, alpha=alpha, **cfg)
    shape = (4, 3, 100)  # [T, B, N]: 300 neurons, so several programs of 16+ lanes
    for dtype in (torch.float32, torch.float64):
        x = _input(params, 0.5, shape, dtype, gen)
        g_s = torch.randn(shape, generator=gen, dtype=dtype)
        g_v = torch.randn(shape, generator=gen, dtype=dtype)
        for inv_tau in (None, torch.tensor(0.5, dtype=dtype)):  # LIF, then a learnable k
            for g_v_used in (None, g_v):  # spikes only, then spikes + membrane
                s_ref, v_ref, grads_ref, _ = _run(
                    lif_multistep_loop, x, params, inv_tau, g_s, g_v_used
                )
                s, v, grads, node = _run(lif_multistep_triton, x, params, inv_tau, g_s, g_v_used)
                assert node == "TritonLIFBackward"
                assert torch.equal(s, s_ref) and torch.equal(v, v_ref)
                assert s.dtype == v.dtype == dtype
                rtol = 1e-5 if dtype == torch.float32 else 1e-12
                for g, g_ref in zip(grads, grads_ref, strict=True):
                    assert g.dtype == g_ref.dtype
                    _rel_close(g, g_ref, rtol)


def test_triton_non_power_of_two_tau_is_exact_in_float64_and_float32():
    # k = 1/3 is not a binary fraction: the kernel must see tau in the input's precision.
    params = LIFParams(tau=3.0, v_reset=None, v_threshold=0.7)
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        x = 1.5 * torch.randn(5, 257, generator=gen, dtype=dtype)
        s_ref, v_ref = lif_multistep_loop(x, params, return_membrane=True)
        s, v = lif_multistep_triton(x, params, return_membrane=True)
        assert torch.equal(s, s_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs_compute_in_fp32(dtype):
    """fp16 / bf16 in and out, fp32 inside: equal to the fp32 loop on the rounded input."""
    gen = torch.Generator().manual_seed(5)
    params = LIFParams(v_reset=None, detach_reset=False)
    x = (1.5 * torch.randn(4, 3, 100, generator=gen)).to(dtype)
    g_s = torch.randn(x.shape, generator=gen).to(dtype)
    g_v = torch.randn(x.shape, generator=gen).to(dtype)
    k = torch.tensor(0.4)  # fp32, as PLIF passes it
    s, v, (gx, gk), node = _run(lif_multistep_triton, x, params, k, g_s, g_v)
    s_ref, v_ref, (gx_ref, gk_ref), _ = _run(
        lif_multistep_loop, x.float(), params, k, g_s.float(), g_v.float()
    )
    assert node == "TritonLIFBackward"
    assert s.dtype == v.dtype == gx.dtype == dtype and gk.dtype == torch.float32
    assert torch.equal(s.float(), s_ref)  # the same fp32 arithmetic on the same input
    if dtype == torch.float16:
        assert torch.equal(v, v_ref.to(dtype))
    else:  # Triton's interpreter rounds fp32 -> bf16 towards zero (GPUs: to nearest)
        torch.testing.assert_close(v.float(), v_ref, rtol=2**-7, atol=0)
    # The backward reads H rounded to the input dtype (the spikes exactly, as uint8).
    _rel_close(gx.float(), gx_ref, 2e-2)
    _rel_close(gk, gk_ref, 2e-2)


def test_triton_saves_h_and_spikes_only_where_needed():
    x = torch.rand(3, 40, requires_grad=True)
    k = torch.tensor(0.5, requires_grad=True)
    for dtype, learnable, expected in [
        (torch.float32, False, [torch.float32]),  # H only: S = H >= V_th is recomputed
        (torch.float32, True, [torch.float32, torch.float32, torch.float32]),  # + X, k
        (torch.bfloat16, False, [torch.bfloat16, torch.uint8]),  # rounded H + exact S
    ]:
        xi = x.detach().to(dtype).requires_grad_(True)
        out = lif_multistep_triton(xi, LIFParams(), k if learnable else None)
        saved = [t.dtype for t in out.grad_fn.saved_tensors if t is not None]
        assert saved == expected
    with torch.no_grad():  # inference saves nothing
        assert lif_multistep_triton(x, LIFParams()).grad_fn is None


def test_triton_membrane_only_gradient_and_broadcast_grads():
    x = 1.5 * torch.randn(4, 2, 30, generator=torch.Generator().manual_seed(2))
    params = LIFParams(detach_reset=False)
    for fn_out in (lambda s, v: v.sum(), lambda s, v: s.sum(), lambda s, v: s.sum() + v.sum()):
        grads = []
        for fn in (lif_multistep_loop, lif_multistep_triton):
            xi = x.clone().requires_grad_(True)
            fn_out(*fn(xi, params, return_membrane=True)).backward()  # expanded ones as grads
            grads.append(xi.grad)
        _rel_close(grads[1], grads[0], 1e-5)


def test_triton_edge_shapes():
    params = LIFParams()
    for shape in [(1, 5), (3, 1), (2, 0, 4), (6,)]:
        x = (2 * torch.rand(shape)).requires_grad_(True)
        out = lif_multistep_triton(x, params)
        assert torch.equal(out, lif_multistep_loop(x, params))
        out.sum().backward()
        assert x.grad.shape == x.shape


def test_plif_w_gradient_accumulates_in_fp32():
    # 2 x 20000 neuron-steps with |dH/dk gH| ~ 2.5: the sum exceeds fp16's range (65504).
    x = torch.full((2, 20000), 1.9, dtype=torch.float16)
    grads = {}
    for backend in ("torch", "triton"):
        for dtype in (torch.float16, torch.float32):
            plif = PLIF(backend=backend)
            (8 * plif(x.to(dtype)).float()).sum().backward()
            grads[backend, dtype] = plif.w.grad
    for backend in ("torch", "triton"):
        g16, g32 = grads[backend, torch.float16], grads[backend, torch.float32]
        assert g16.dtype == torch.float32 and torch.isfinite(g16)
        assert abs(float(g32)) > 65504
        assert float(g16) == pytest.approx(float(g32), rel=1e-2)


@pytest.mark.parametrize("neuron", [LIF, PLIF])
def test_modules_with_triton_backend_equal_loop(neuron):
    torch.manual_seed(1)
    tri, loop = neuron(v_reset=None, backend="triton"), neuron(v_reset=None, backend="loop")
    loop.load_state_dict(tri.state_dict())
    x = 1.5 * torch.randn(4, 2, 3, 5, 5)
    x[:, 0, 0] = 2.0  # H[0] = X / 2 = V_th exactly
    outs, grads = [], []
    for module in (tri, loop):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        outs.append(out)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([xi.grad, *[p.grad for p in module.parameters()]])
    assert type(outs[0].grad_fn).__name__ == "TritonLIFBackward"
    assert torch.equal(outs[0], outs[1])
    for g, g_ref in zip(grads[0], grads[1], strict=True):
        _rel_close(g, g_ref, 1e-5)
    assert "backend=triton" in repr(tri) and "backend=loop" in repr(loop)


# --- backend selection -----------------------------------------------------------------------


def test_backend_selection():
    x = torch.rand(3, 4)
    params = LIFParams()
    assert BACKENDS == ("auto", "loop", "torch", "triton", "cpu")
    assert resolve_backend("auto", x, params) == "torch"  # CPU: never triton by default
    assert resolve_backend("auto", x, LIFParams(), torch.full((4,), 0.5)) == "loop"
    for backend in ("loop", "torch", "triton", "cpu"):
        assert resolve_backend(backend, x, params) == backend
    from dassdp._util import native as _native

    nodes = {
        backend: type(lif_multistep(x.requires_grad_(True), params, backend=backend).grad_fn)
        for backend in BACKENDS
        if backend != "cpu" or _native.compiler() is not None  # its kernels need a compiler
    }
    assert nodes["auto"].__name__ == nodes["torch"].__name__ == "_FusedLIFBackward"
    assert nodes["triton"].__name__ == "TritonLIFBackward"
    if "cpu" in nodes:
        assert nodes["cpu"].__name__ == "CpuLIFBackward"
    assert "Fused" not in nodes["loop"].__name__ and "Triton" not in nodes["loop"].__name__
    # The deprecated fused=False still means the loop, in the function and the modules.
    out = lif_multistep(x, params, fused=False, backend="triton")
    assert type(out.grad_fn) is nodes["loop"]
    assert LIF(fused=False).backend == PLIF(fused=False).backend == "loop"
    assert not LIF(fused=False).fused and PLIF().fused and LIF(backend="torch").fused
    assert LIF().backend == PLIF().backend == "auto" and "backend=auto" in repr(LIF())
    assert "backend=torch" in repr(PLIF(backend="torch"))


def test_backend_errors(monkeypatch):
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"unknown LIF backend 'cuda'.*'triton'"):
        LIF(backend="cuda")
    with pytest.raises(ValueError, match="unknown LIF backend"):
        PLIF(backend="fast")
    with pytest.raises(ValueError, match="unknown LIF backend"):
        lif_multistep(x, LIFParams(), backend="")
    per_channel = torch.full((4,), 0.5)
    for backend in ("torch", "triton"):  # explicit fast backends refuse what they can't do
        with pytest.raises(ValueError, match="one-element"):
            lif_multistep(x, LIFParams(), per_channel, backend=backend)
    with pytest.raises(ValueError, match="float16"):
        lif_multistep_triton(x.to(torch.int32), LIFParams())
    huge = torch.zeros(1).expand(2, 2**31)  # stride 0: no memory behind it
    with pytest.raises(ValueError, match=r"< 2\*\*31 neurons per time step"):
        lif_multistep_triton(huge, LIFParams())
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match=r"CUDA device \(x is on cpu\).*TRITON_INTERPRET=1"):
        LIF(backend="triton")(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_lif, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        LIF(backend="triton")(x)
    assert resolve_backend("auto", x, LIFParams()) == "torch"


# --- no host syncs, no host-made tensors, few ops --------------------------------------------

_FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "lift_fresh")


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("neuron", [LIF, PLIF])
@pytest.mark.parametrize("v_reset", [-0.5, None])
def test_forward_backward_without_host_syncs(neuron, backend, v_reset):
    module = neuron(v_reset=v_reset, detach_reset=False, backend=backend)
    x = (2 * torch.rand(4, 2, 8)).requires_grad_(True)
    g = torch.randn(4, 2, 8)
    with _CountOps() as mode:
        out = module(x)
        out.backward(g)
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())
    assert {op: mode.counts[op] for op in _FORBIDDEN} == dict.fromkeys(_FORBIDDEN, 0)
    if backend == "triton":
        # One custom op per direction (one kernel each); besides them only the interpreter's
        # host copies (copy_ / set_), and for PLIF sigmoid(w), its backward and the sum of
        # the per-program partials of gk.
        assert mode.counts["lif_triton_fwd"] == mode.counts["lif_triton_bwd"] == 1
        host_copies = {"copy_", "set_", "new_empty", "empty_strided"}
        ours = {"lif_triton_fwd", "lif_triton_bwd", "empty", "empty_like", "view", "detach"}
        ours |= {"sigmoid", "sigmoid_backward", "sum"}
        assert set(mode.counts) - host_copies <= ours


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("neuron", [LIF, PLIF])
def test_compiles_without_graph_breaks(neuron, backend):
    """torch.compile traces both fast backends whole (the Triton launches are custom ops) and
    the compiled forward + backward (AOT autograd, fake tensors) equals eager."""
    module = neuron(backend=backend, v_reset=None, detach_reset=False)
    x = 2 * torch.rand(4, 2, 8)
    explain = torch._dynamo.explain(module)(x.clone().requires_grad_(True))
    torch._dynamo.reset()
    assert explain.graph_break_count == 0, explain.break_reasons
    results = []
    for fn in (module, torch.compile(module, backend="aot_eager", fullgraph=True)):
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append((out, xi.grad, *[p.grad.clone() for p in module.parameters()]))
        module.zero_grad()
    torch._dynamo.reset()
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_a_cuda_gpu_without_fma(monkeypatch, dtype):
    """The compiled (non-interpreted) path, checked without a GPU: both kernels build down to
    an sm_90 binary, and the forward has no fused multiply-add (it would round differently
    from the torch ops and move spikes at the threshold)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET")
    fwd, bwd = triton_lif._kernels()
    const = dict(K=1 / 3, K_FROM_PTR=True, V_TH=1.0, V_R=-0.5, HARD_RESET=True, DECAY_INPUT=True)
    const.update(F64=False, BLOCK=1024)
    fwd_const = dict(const, STORE_V=True, STORE_H=True, STORE_S=True)
    bwd_const = dict(const, DETACH_RESET=False, SURROGATE=1, ALPHA=4.0, HAS_GS=True, HAS_GV=True)
    bwd_const.update(LOAD_S=True, NEED_GX=True, NEED_GK=True)
    ptr = f"*{dtype}"
    fwd_sig = dict(x_ptr=ptr, k_ptr="*fp32", s_ptr=ptr, v_ptr=ptr, h_ptr=ptr, sb_ptr="*u8")
    fwd_sig.update(N="i32", T="i32", **dict.fromkeys(fwd_const, "constexpr"))
    bwd_sig = dict(gs_ptr=ptr, gv_ptr=ptr, h_ptr=ptr, sb_ptr="*u8", x_ptr=ptr, k_ptr="*fp32")
    bwd_sig.update(gx_ptr=ptr, gk_ptr="*fp32", N="i32", T="i32", LAST="i64")
    bwd_sig.update(dict.fromkeys(bwd_const, "constexpr"))
    target, options = GPUTarget("cuda", 90, 32), {"enable_fp_fusion": False}
    built = [
        triton.compile(ASTSource(fn, sig, const), target=target, options=options)
        for fn, sig, const in ((fwd, fwd_sig, fwd_const), (bwd, bwd_sig, bwd_const))
    ]
    assert all(k.asm["cubin"] for k in built)
    assert "fma" not in built[0].asm["ptx"]


@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpreted"])
def test_kernel_parameters_in_capitals_are_constexpr(monkeypatch, interpret):
    # A compiled launch specialises exactly the tl.constexpr parameters; the interpreter and a
    # compile from an explicit constants dict do not look, so check the jitted signature.
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for kernel in triton_lif._kernels():
        fn = getattr(kernel, "fn", kernel)
        params = inspect.signature(fn).parameters
        caps = [n for n in params if n.isupper() and n != "N" and n != "T" and n != "LAST"]
        assert caps, fn
        for name in caps:
            assert "constexpr" in str(params[name].annotation), (fn.__name__, name)
        if not interpret:
            flags = {p.name: p.is_constexpr for p in kernel.params}
            assert all(flags[n] for n in caps) and not flags["N"], flags


class _FakeCudaDriver:
    """Triton's active driver as a CUDA sm_90 device, for compiling without a GPU."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


class _CompileOnly:
    """A jitted kernel whose ``kernel[grid](...)`` goes through Triton's real launcher (the
    argument binder, constexpr specialisation and compile) and stops before the launch."""

    def __init__(self, kernel, built: list) -> None:
        self.kernel, self.built = kernel, built

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.jit import MockTensor

            args = [
                MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a
                for a in args
            ]  # only tensors are replaced: every other argument is bound as given
            self.built.append(self.kernel.run(*args, grid=grid, warmup=True, **kwargs))

        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("neuron", ["lif-hard", "plif-soft"])
def test_the_real_launch_path_compiles_for_a_cuda_gpu(monkeypatch, neuron, dtype):
    """LIF / PLIF forward and backward through the launches exactly as the module makes them
    (``fn[grid](*args, **constexprs)``): Triton's binder specialises the arguments and compiles
    both kernels for sm_90; only the launch itself is left out. This reproduces, on the CPU,
    both failures the first H200 runs hit ("failed to specialize argument of type: dtype";
    "arange's arguments must be of type tl.constexpr") with the code before their fixes."""
    from triton.runtime import driver

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(driver, "_active", _FakeCudaDriver())  # restored after the test
    built: list = []
    fwd, bwd = triton_lif._kernels()
    monkeypatch.setattr(triton_lif, "_kernels", lambda: (_CompileOnly(fwd, built),
                                                         _CompileOnly(bwd, built)))  # fmt: skip
    hard = neuron == "lif-hard"
    params = LIFParams(v_reset=0.0 if hard else None, surrogate="atan" if hard else "sigmoid")
    x = torch.randn(4, 2, 3, 8, dtype=dtype, requires_grad=True)
    k = None if hard else torch.tensor(0.5, dtype=dtype, requires_grad=True)
    s, v = triton_lif.lif_multistep_triton_apply(x, k, 0.5, params, True)
    torch.autograd.backward([s, v], [torch.ones_like(s), torch.ones_like(v)])
    assert len(built) == 2 and all(kern.asm["cubin"] for kern in built)
    assert [kern.name for kern in built] == ["_lif_fwd", "_lif_bwd"]
    for params_ in (fwd, bwd):
        constexpr = {p.name for p in params_.params if p.is_constexpr}
        assert {"BLOCK", "F64", "V_TH"} <= constexpr and "N" not in constexpr
    if dtype == torch.float32:
        assert "fma" not in built[0].asm["ptx"]  # no contraction: rounds like the torch ops
