"""The ``"cpu"`` backend: the multi-step LIF as one compiled C loop per direction.

The torch backend (:mod:`dassdp.neurons.backends.torch_fused`) runs the fused math as a few
whole-tensor operations per time step; on the CPU each is a pass over memory (about 6 per step
forward, 12 backward), and the LIF layers took about 30 % of a ``spikingresformer_cifar``
training step. Here the same math is one loop over blocks of neurons that runs all ``T`` steps
while the block is in cache (``cpu_lif.c``, shipped with the package): forward reads ``X`` and
writes ``H``, ``S`` and the spikes as bytes; backward reads ``H`` and ``gS`` and writes ``gX``.

Exactness: the operations are the torch backend's, in its order, each rounded to the tensor's
dtype (constants rounded to it first, as ATen does with Python numbers; no FMA contraction),
so ``H`` and the spikes are bit-identical to it and the input gradients equal to it within a
few ulps (some ATen kernels fuse a multiply-add; the sigmoid's ``exp`` is libm's). Tests check
every reset / ``decay_input`` / ``detach_reset`` / surrogate combination in fp32 and fp64.

Scope: a CPU ``x`` of dtype fp32 or fp64, a fixed time constant (``inv_tau`` ``None`` or a
number; PLIF's learnable one runs on the torch backend), no returned membrane, not while
``torch.compile`` traces. Layout: the input is made contiguous and the spikes are contiguous.
(The kernels treat every neuron alike, so a dense channels-last input could be processed as
stored, as the Triton backend does; it is not, because the next conv's weight gradient then
rounds differently, and CPU runs with ``channels_last`` would no longer repeat bit for bit.)
Threads: the neurons are split over
``torch.get_num_threads()`` threads (:mod:`dassdp.neurons.backends._threads`; the C calls
release the GIL).

Build: :mod:`dassdp._util.native` compiles ``cpu_lif.c`` once per machine with the system
C compiler (``$CC``, else ``cc`` / ``gcc`` / ``clang``; 1-2 s) into ``$DASSDP_KERNEL_CACHE``
(default ``~/.cache/dassdp/kernels``) and verifies a cached library (size and sha256) before
loading it. No compiler, a failed build or an unusable cache: :func:`usable` is false for the
process, with one warning naming the reason, and ``backend="auto"`` runs the torch backend;
``backend="cpu"`` raises that reason. ``DASSDP_LIF_CPU=0`` switches the backend off for
``auto``.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from importlib.resources import files
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dassdp._util import native as _native
from dassdp._util.native import CACHE_ENV, NativeError, NativeSource
from dassdp.neurons.backends._registry import Backend, Call
from dassdp.neurons.backends._threads import run_split
from dassdp.neurons.backends.torch_fused import FUSED_SURROGATES, call_supported
from dassdp.neurons.lif import LIFParams, check_time_major, split_k
from dassdp.neurons.saving import attach_spike_bits
from dassdp.neurons.surrogate import get_surrogate

__all__ = [
    "BACKEND",
    "CACHE_ENV",
    "ENV",
    "KERNEL",
    "MIN_NEURONS",
    "CpuLIF",
    "build",
    "disable",
    "large_enough",
    "lif_multistep_cpu",
    "supported",
    "usable",
]

ENV = "DASSDP_LIF_CPU"  # "0": backend="auto" never picks this backend
# backend="auto" picks this backend for layers of at least this many neurons per sample and
# time step (x [T, B, ...]: x[0, 0].numel()). Per sample, not per call, so the choice (and
# with it the last bits of the gradients) does not change with the batch size or the number
# of DDP ranks; small layers do not repay the call.
MIN_NEURONS = 4096
_BLOCK = 512  # neurons per block: the C loops keep a block's state in cache (BLOCK in the .c)
_CHUNK = 1 << 16  # neurons per thread task when several threads run

KERNEL = NativeSource(
    name="lif",
    source=files(__package__) / "cpu_lif.c",
    symbols=("lif_fwd_f32", "lif_fwd_f64", "lif_bwd_f32", "lif_bwd_f64"),
    what="the CPU LIF kernels",
    # -ffp-contract=off: no FMA (the torch backend rounds every product); no -ffast-math.
    flags=("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"),
)

_LOCK = threading.Lock()
_LIB: list[Any] = []  # the loaded library, once built
_FAILED: list[str] = []  # why the backend is off for the process


def usable() -> bool:
    """Whether ``backend="auto"`` may pick this backend: not switched off (``ENV=0``) and no
    build failure in this process (building on first use)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if _FAILED:
        return False
    try:
        build()
    except RuntimeError as err:
        disable(str(err))
        return False
    return True


def disable(reason: str) -> None:
    """Turn the backend off for ``auto`` in this process, with one warning naming ``reason``."""
    if not _FAILED:
        _FAILED.append(reason)
        warnings.warn(
            f"dassdp: the compiled CPU LIF is off for this process ({reason}); the torch "
            f"backend runs instead (set {ENV}=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )


def build() -> Any:
    """The loaded kernel library, built (or verified in the cache) on first use, see the
    module docstring. A missing compiler, a failed build or an unusable cache is a
    ``RuntimeError`` (:class:`~dassdp._util.native.NativeError`) saying which."""
    with _LOCK:
        if _LIB:
            return _LIB[0]
        lib = _native.load(KERNEL)
        i64, dbl, ci, vp = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
        for dt in ("f32", "f64"):
            fwd, bwd = getattr(lib, f"lif_fwd_{dt}"), getattr(lib, f"lif_bwd_{dt}")
            fwd.restype = bwd.restype = None
            fwd.argtypes = [vp, vp, vp, vp, i64, i64, i64, i64, dbl, dbl, dbl, ci, ci]
            bwd.argtypes = [vp, vp, vp, i64, i64, i64, i64, dbl, dbl, dbl, ci, ci, ci, ci, dbl]
        _LIB.append(lib)
        return lib


def _run(fn: Any, n: int, args: tuple[Any, ...], tail: tuple[Any, ...]) -> None:
    run_split(fn, n, args, tail, chunk=_CHUNK, align=_BLOCK)


def _as_2d(t: Tensor) -> Tensor:
    return t.contiguous().view(t.shape[0], -1)


def _reset(params: Any) -> tuple[float, int]:
    """The kernels' ``(v_r, hard)``: the reset value (0 for a soft reset) and 1 for a hard one."""
    return (0.0, 0) if params.v_reset is None else (params.v_reset, 1)


class CpuLIF(torch.autograd.Function):
    """Forward and backward through the C kernels; saves only ``H``. The spikes come out as
    the dtype (contiguous) and, attached for :func:`dassdp.neurons.spike_saving`, as
    ``bool``."""

    @staticmethod
    def forward(ctx, x: Tensor, k: float, params: Any) -> Tensor:  # type: ignore[override]
        lib = build()
        x2 = _as_2d(x)
        T, n = x2.shape
        h = torch.empty_like(x2)
        # The spikes own their memory in x's shape (contiguous), so the neuron module can
        # mark them and the bytes can be attached (neither works on a view).
        s = torch.empty(x.shape, dtype=x.dtype)
        bits = torch.empty(x.shape, dtype=torch.uint8)
        fn = lib.lif_fwd_f32 if x.dtype == torch.float32 else lib.lif_fwd_f64
        _run(
            fn,
            n,
            (x2.data_ptr(), h.data_ptr(), s.data_ptr(), bits.data_ptr(), T, n),
            (k, params.v_threshold, *_reset(params), int(params.decay_input)),
        )
        ctx.save_for_backward(h)
        ctx.k, ctx.params = k, params
        attach_spike_bits(s, bits.view(torch.bool))
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, g_s: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (h,) = ctx.saved_tensors
        p = ctx.params
        alpha = float(get_surrogate(p.surrogate)[1] if p.alpha is None else p.alpha)
        lib = build()
        g2 = _as_2d(g_s).to(h.dtype)
        T, n = h.shape
        gx = torch.empty_like(h)
        fn = lib.lif_bwd_f32 if h.dtype == torch.float32 else lib.lif_bwd_f64
        _run(
            fn, n, (h.data_ptr(), g2.data_ptr(), gx.data_ptr(), T, n),
            (ctx.k, p.v_threshold, *_reset(p), int(p.decay_input), int(p.detach_reset),
             0 if p.surrogate == "atan" else 1, alpha),
        )  # fmt: skip
        return gx.view(g_s.shape), None, None


def large_enough(x: Tensor) -> bool:
    """Whether ``x`` ``[T, B, ...]`` has at least :data:`MIN_NEURONS` neurons per sample."""
    if x.numel() == 0:
        return False
    per_sample = x[0, 0].numel() if x.dim() >= 2 else x[0].numel()
    return per_sample >= MIN_NEURONS


def supported(x: Tensor, inv_tau: Tensor | float | None, return_membrane: bool) -> bool:
    """Whether this backend handles the call (the module docstring's scope)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not isinstance(inv_tau, Tensor)
        and not return_membrane
        and x.dim() >= 1
        and x.numel() > 0
        and not torch.compiler.is_compiling()
    )


def _call_supported(call: Call) -> bool:
    """:func:`supported` (and the fused math's scope) of a :class:`Call`."""
    return (
        call_supported(call)
        and call.device.type == "cpu"
        and call.dtype in (torch.float32, torch.float64)
        and not call.k_is_tensor
        and not call.return_membrane
        and not call.empty
        and not call.compiling
    )


def _refusal(call: Call) -> str:
    return (
        "the cpu LIF backend needs a CPU x of dtype float32 / float64, surrogate in "
        f"{FUSED_SURROGATES}, inv_tau None or a number and return_membrane=False; got "
        f"{call.dtype} on {call.device}, surrogate {call.params.surrogate!r}, inv_tau "
        f"{call.k_type}, return_membrane={call.return_membrane}"
    )


def _check(call: Call) -> None:
    if not _call_supported(call):
        raise ValueError(_refusal(call))
    build()  # by name: a missing compiler or a failed build is the error


def _pick(call: Call) -> bool:
    return call.per_sample >= MIN_NEURONS and _call_supported(call) and usable()


def _run_backend(
    x: Tensor, params: LIFParams, inv_tau: Tensor | float | None, return_membrane: bool
) -> Tensor:
    _, k = split_k(params, inv_tau)
    return CpuLIF.apply(x, k, params)  # type: ignore[no-any-return]


def lif_multistep_cpu(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-step LIF as compiled C loops on the CPU (the ``"cpu"`` backend): the membranes
    and spikes of :func:`~dassdp.neurons.backends.torch_fused.lif_multistep_fused` bit for
    bit, input gradients within a few ulps of it (fp32 / fp64), one pass over memory per
    direction instead of a few per time step.

    Arguments and results as :func:`dassdp.neurons.lif_multistep`. Needs the module
    docstring's scope and a C compiler on first use (the kernels are built once per machine).
    No double backward.
    """
    check_time_major(x)
    _check(Call.of(x, params, inv_tau, return_membrane))
    return _run_backend(x, params, inv_tau, return_membrane)


def _unready() -> str | None:
    try:
        build()
    except NativeError as err:
        return str(err)
    return None


BACKEND = Backend(
    name="cpu",
    run=_run_backend,
    check=_check,
    pick=_pick,
    auto_rank=20,
    size_class=lambda per_sample: per_sample >= MIN_NEURONS,
    unready=_unready,
)
