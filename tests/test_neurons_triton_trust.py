"""The Triton LIF proves itself before ``backend="auto"`` trusts it: simulated failures (Triton
missing, too old, without ``triton.knobs``, a kernel that raises, a kernel with wrong spikes)
end in the torch backend with one warning under ``auto`` and in an error under ``"triton"``;
the launches run on the input's device; dense non-contiguous inputs keep their layout.

Triton runs here in its CPU interpreter (``TRITON_INTERPRET=1``); ``auto`` considers Triton
for CUDA inputs only, so :func:`_trust_cpu` lets it consider CPU tensors too.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings

import pytest
import torch

from dassdp.neurons import LIF, PLIF, LIFParams, lif_multistep_loop, lif_multistep_triton
from dassdp.neurons.backends import _triton_check
from dassdp.neurons.backends import triton as tri

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """The interpreter, and a process that has not probed or checked Triton yet."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(tri.ENV, raising=False)
    monkeypatch.setattr(tri, "_PROBE", [])
    monkeypatch.setattr(tri, "_WARNED", set())
    monkeypatch.setattr(tri, "_CHECKED", {})


@pytest.fixture
def _trust_cpu(monkeypatch):
    monkeypatch.setattr(tri, "_auto_device", lambda device: True)


def _x() -> torch.Tensor:
    return (
        1.5 * torch.randn(4, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    ).requires_grad_()


def _triton_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "Triton" in str(w.message)]


def _kernel_that_raises(monkeypatch):
    class Raising:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("simulated: PTX assembly aborted\nptxas fatal")

            return launch

    monkeypatch.setattr(tri, "_kernels", lambda: (Raising(), Raising()))


def _kernel_with_wrong_spikes(monkeypatch):
    real = tri._fwd_op

    def wrong(*args):
        s, v, h, sb = real(*args)
        return 1 - s, v, h, sb

    monkeypatch.setattr(tri, "_fwd_op", wrong)


FAILURES = {
    "import-error": (lambda mp: mp.setitem(sys.modules, "triton", None), "not importable"),
    "too-old": (lambda mp: mp.setattr(sys.modules["triton"], "__version__", "3.3.1"), "3.3.1"),
    "no-knobs": (lambda mp: mp.delattr(sys.modules["triton"], "knobs"), "triton.knobs"),
    "kernel-raises": (_kernel_that_raises, "PTX assembly aborted"),
    "wrong-spikes": (_kernel_with_wrong_spikes, "spikes differ from the torch backend"),
}


def test_auto_runs_a_checked_triton_without_a_warning(_trust_cpu):
    """The control for the failures below: with nothing broken, auto picks Triton here."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = LIF()(_x())
    assert type(out.grad_fn).__name__ == "TritonLIFBackward"
    assert _triton_warnings(record) == []
    assert {("cpu", torch.float32): None} == tri._CHECKED


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failing_triton_means_torch_with_one_warning_under_auto(monkeypatch, _trust_cpu, failure):
    simulate, reason = FAILURES[failure]
    simulate(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [layer(_x()) for layer in (LIF(), LIF(), PLIF(), LIF())]  # 4 layers, 1 warning
    assert all(type(o.grad_fn).__name__ == "_FusedLIFBackward" for o in outs)
    assert torch.equal(outs[0], lif_multistep_loop(_x(), LIFParams()))
    (message,) = _triton_warnings(record)
    assert reason in message and "torch backend runs instead" in message


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failing_triton_is_an_error_when_asked_for_by_name(monkeypatch, failure):
    simulate, reason = FAILURES[failure]
    simulate(monkeypatch)
    with pytest.raises(RuntimeError, match="backend 'triton'") as err:
        LIF(backend="triton")(_x())
    assert reason in str(err.value)
    with pytest.raises(RuntimeError, match="backend 'triton'"):
        lif_multistep_triton(_x(), LIFParams())


def test_env_switch_skips_triton_without_a_check_or_a_warning(monkeypatch, _trust_cpu):
    monkeypatch.setenv(tri.ENV, "0")
    monkeypatch.setattr(tri, "self_check", lambda *a: pytest.fail("checked"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = LIF()(_x())
    assert type(out.grad_fn).__name__ == "_FusedLIFBackward" and _triton_warnings(record) == []


def test_the_check_runs_once_per_device_and_dtype_and_half_needs_fp32(_trust_cpu):
    runs = []
    real = _triton_check.check
    _triton_check.check = lambda *a: runs.append(a[1]) or real(*a)
    try:
        for layer in (LIF(), PLIF(), LIF(v_reset=None)):
            layer(_x())
            layer(_x().bfloat16())
    finally:
        _triton_check.check = real
    assert runs == [torch.float32, torch.bfloat16]


def test_the_check_leaves_the_global_rng_and_the_callers_modes_alone(_trust_cpu):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    x = _x().detach()
    state = torch.get_rng_state()
    with Count(), torch.no_grad():
        LIF()(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert Count.n < 20  # the layer's own ops; the check's hundreds are not seen


def test_tolerances_are_the_stated_ones():
    p = LIFParams()
    assert _triton_check.tolerance(torch.float32, p, 0.5) == 64 * 6 * 2**-23
    assert _triton_check.tolerance(torch.float64, p, 0.5) == 64 * 6 * 2**-52
    bf16 = _triton_check.tolerance(torch.bfloat16, p, 0.5)
    # 2 (pi / 2) alpha eps_bf16 max(1, |V_th|) / k + eps_bf16, alpha = 2 (atan), k = 0.5
    assert bf16 == pytest.approx(64 * 6 * 2**-23 + math.pi * 2 * 2**-7 / 0.5 + 2**-7)


def test_under_torch_compile_the_check_runs_at_trace_time(monkeypatch, _trust_cpu):
    """Compiled with auto, the choice (and its check) is made eagerly while tracing, with no
    graph break; a failing check gives the torch backend inside the graph, one warning."""
    for broken in (False, True):
        torch._dynamo.reset()
        monkeypatch.setattr(tri, "_CHECKED", {})
        monkeypatch.setattr(tri, "_WARNED", set())
        if broken:
            _kernel_with_wrong_spikes(monkeypatch)
        lif = LIF(v_reset=None)
        x = _x().detach()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            explain = torch._dynamo.explain(lif)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        assert lif.resolved_backend == ("torch" if broken else "triton")
        assert len(_triton_warnings(record)) == int(broken)
    torch._dynamo.reset()


# --- the device guard ----------------------------------------------------------------------


def test_launches_run_under_the_inputs_device(monkeypatch):
    """Each launch happens inside ``_on_device(x)``; for a CUDA tensor that is
    ``torch.cuda.device(x.device)`` (a stand-in records it: no GPU here)."""
    entered: list[str] = []
    inside = []

    @contextlib.contextmanager
    def guard(t):
        entered.append(str(t.device))
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    fwd, bwd = tri._kernels()

    class Watched:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            assert inside, "a launch outside the device guard"
            return self.kernel[grid]

    monkeypatch.setattr(tri, "_on_device", guard)
    monkeypatch.setattr(tri, "_kernels", lambda: (Watched(fwd), Watched(bwd)))
    x = _x()
    k = torch.tensor(0.5, requires_grad=True)
    tri.lif_multistep_triton_apply(x, k, 0.5, LIFParams(), False).sum().backward()
    assert entered == ["cpu", "cpu"]


def test_the_guard_of_a_cuda_tensor_is_its_device(monkeypatch):
    seen = []

    class FakeCudaDevice:  # torch.cuda.device, recorded (no GPU here)
        def __init__(self, device):
            seen.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    on_gpu1 = type("OnGpu1", (), {"device": torch.device("cuda", 1)})()
    with tri._on_device(on_gpu1):
        pass
    assert seen == [torch.device("cuda", 1)]
    with tri._on_device(torch.zeros(1)):  # CPU (the interpreter): no guard
        pass
    assert seen == [torch.device("cuda", 1)]


def test_inv_tau_on_another_device_is_an_error():
    x = _x()
    with pytest.raises(ValueError, match=r"x is on cpu, inv_tau on meta"):
        lif_multistep_triton(x, LIFParams(), torch.tensor(0.5, device="meta"))


# --- layouts -------------------------------------------------------------------------------


def _channels_last(T: int = 3, B: int = 2, C: int = 5, H: int = 4, W: int = 3) -> torch.Tensor:
    """A [T, B, C, H, W] view of a channels-last [T*B, C, H, W] conv output (time outermost,
    dense, not contiguous): what a LIF after a conv sees under ``channels_last``."""
    gen = torch.Generator().manual_seed(1)
    flat = (1.5 * torch.randn(T * B, C, H, W, generator=gen)).to(memory_format=torch.channels_last)
    return flat.view(T, B, C, H, W)


@pytest.mark.parametrize("learn_k", [False, True], ids=["lif", "plif"])
def test_dense_permuted_inputs_keep_their_layout_without_a_copy(monkeypatch, learn_k):
    x = _channels_last().requires_grad_(True)
    assert not x.is_contiguous()
    seen = []
    real = tri._fwd_op
    monkeypatch.setattr(tri, "_fwd_op", lambda xi, *a: seen.append(xi) or real(xi, *a))
    k = torch.tensor(0.5, requires_grad=True) if learn_k else None
    s, v = lif_multistep_triton(x, LIFParams(), k, return_membrane=True)
    assert seen[-1].data_ptr() == x.data_ptr() and seen[-1].stride() == x.stride()  # no copy
    assert s.stride() == v.stride() == x.stride()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))  # contiguous
    (s * g).sum().backward()
    assert x.grad.stride() == x.stride()
    xc = x.detach().contiguous().requires_grad_(True)
    kc = k.detach().clone().requires_grad_(True) if learn_k else None
    s_ref, v_ref = lif_multistep_loop(xc, LIFParams(), kc, return_membrane=True)
    (s_ref * g).sum().backward()
    assert torch.equal(s, s_ref) and torch.equal(v, v_ref)
    torch.testing.assert_close(x.grad, xc.grad, rtol=1e-5, atol=1e-6)
    if learn_k:
        torch.testing.assert_close(k.grad, kc.grad, rtol=1e-5, atol=1e-6)


def test_other_layouts_are_made_contiguous_and_stay_exact():
    base = 1.5 * torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(3))
    x = base.transpose(0, 1)  # [T=3, B=2, 6]: time is not outermost in memory
    assert not x.is_contiguous()
    s = lif_multistep_triton(x, LIFParams())
    assert s.is_contiguous() and torch.equal(s, lif_multistep_loop(x.contiguous(), LIFParams()))
