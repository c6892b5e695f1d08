"""The ``"triton"`` backend: the multi-step LIF as one Triton kernel per direction (forward
over all ``T``, backward over all ``T`` in reverse); the math is :mod:`dassdp.neurons.lif`'s,
the kernels are in :mod:`dassdp.neurons.backends._triton_kernels`.

Layout: ``x`` ``[T, B, ...]`` is read as ``[T, N]`` rows of its own storage and the grid runs
over the ``N`` neurons in blocks of ``BLOCK``. The kernels treat every neuron alike, so a dense
input with time outermost (contiguous, channels-last, ...; :func:`~dassdp.neurons.lif.
dense_time_major`) is processed as it is stored and every output is made with
``torch.empty_like``: the spikes come back in the input's layout, without a copy. Any other
input is made contiguous first. Every input dtype (fp16, bf16, fp32, fp64) is loaded and
computed in fp32 registers (fp64 in fp64); spikes, membranes and ``gX`` are stored in the input
dtype.

Saved for backward (only what the backward reads):

* ``H`` ``[T, N]``: the surrogate ``sg(H - V_th)``, ``R[t]`` and (for a learnable ``k``) the
  previous membrane ``V[t-1]`` are all functions of ``H`` and ``S``. For fp32 / fp64 inputs
  ``H`` is kept exactly (the compute dtype) and ``S = H >= V_th`` is recomputed from it, bit
  for bit the forward's decision. For fp16 / bf16 inputs ``H`` is kept in the input dtype (half
  the bytes of fp32) and ``S`` as ``uint8`` beside it, because a rounded ``H`` can land on the
  other side of ``V_th``: 3 bytes a neuron-step instead of 4.
* ``X`` only when ``k`` needs a gradient and ``decay_input`` (``dH/dk = X - (V[t-1] - V_r)``).
* ``k`` (a one-element tensor on ``x``'s device, read by the kernel through its pointer: no
  host read; on another device it is an error).

Launches: forward one kernel; backward one kernel, plus for a learnable ``k`` one ``sum`` over
the per-program partial sums of ``gk`` (fp32, or fp64 for fp64 inputs) and a cast to ``k``'s
dtype. Both launch on the input's device (``torch.cuda.device(x.device)``), not the current
one. ``tau``, ``v_threshold``, ``v_reset`` and ``alpha`` are compile-time constants
(``tl.constexpr``: one compiled variant per neuron configuration), so their fp64 values reach an
fp64 kernel unrounded. FMA contraction is switched off on the GPU so that the fp32 forward
rounds exactly like the torch backend and the autograd loop (same spikes). Each launch is a
custom operator (``torch.ops.dassdp.lif_triton_fwd`` / ``lif_triton_bwd``, with fake
implementations), so ``torch.compile`` traces :class:`TritonLIF` whole, without graph breaks.

Trust: Triton must import, be at least :data:`MIN_VERSION` (the kernels read
``triton.knobs``, new in 3.4; Triton 3.3 fails on it) and pass a self-check on the device
before it runs (:func:`self_check`, :mod:`dassdp.neurons.backends._triton_check`: once per
device and dtype).
Under ``backend="auto"`` any failure means the torch backend, with one warning naming the
reason; ``backend="triton"`` raises it instead. ``DASSDP_LIF_TRITON=0`` keeps ``auto`` off
Triton.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU tensors. Because
``triton.jit`` decides between compiled and interpreted when the kernel is created, the kernels
are created on first use and cached per mode (:func:`interpret_mode` is read at every call), so
the variable may be set before or after :mod:`dassdp` is imported.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import types
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dassdp.neurons.backends._registry import Backend, Call
from dassdp.neurons.backends.torch_fused import FUSED_SURROGATES, call_supported
from dassdp.neurons.lif import LIFParams, check_time_major, dense_time_major, split_k
from dassdp.neurons.surrogate import get_surrogate

__all__ = [
    "BACKEND",
    "ENV",
    "MIN_VERSION",
    "TritonLIF",
    "interpret_mode",
    "lif_multistep_triton",
    "lif_multistep_triton_apply",
    "self_checking",
    "triton_available",
    "triton_version",
    "unavailable_reason",
]

ENV = "DASSDP_LIF_TRITON"  # "0": backend="auto" never picks Triton
MIN_VERSION = (3, 4)  # triton.knobs (interpret_mode) first appears in 3.4
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK_MAX = 1024
_SURROGATE_IDS = {"atan": 0, "sigmoid": 1}
_HALF_DTYPES = (torch.float16, torch.bfloat16)

# ---------------------------------------------------------------- is Triton usable here

_PROBE: list[str | None] = []  # the reason Triton is unusable (None: usable), once probed
_PROBE_LOCK = threading.Lock()


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def _probe() -> str | None:
    """Why Triton cannot run the kernels here (not importable, too old, the kernels module
    fails to load), or ``None``."""
    try:
        import triton
    except ImportError as err:
        return f"triton is not importable ({err})"
    version = str(getattr(triton, "__version__", "0"))
    if _version_tuple(version) < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        return f"triton {version} is older than {need}, which the kernels need (triton.knobs)"
    if not hasattr(triton, "knobs"):
        return f"triton {version} has no triton.knobs, which the kernels read"
    try:
        from dassdp.neurons.backends import _triton_kernels  # noqa: F401
    except Exception as err:  # any failure to define the kernels means: not usable
        return f"the Triton LIF kernels do not load with triton {version} ({err})"
    return None


def unavailable_reason() -> str | None:
    """Why Triton is unusable in this process (probed once), or ``None``."""
    with _PROBE_LOCK:
        if not _PROBE:
            _PROBE.append(_probe())
        return _PROBE[0]


def triton_available() -> bool:
    """Whether Triton is importable and recent enough for the kernels (see the docstring)."""
    return unavailable_reason() is None


def triton_version() -> str | None:
    """``triton.__version__`` when Triton is usable, else ``None``."""
    if not triton_available():
        return None
    import triton

    return str(triton.__version__)


@torch.compiler.assume_constant_result  # torch.compile: a constant, not traced
def interpret_mode() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` now)."""
    if not triton_available():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------- kernels and launches

_KERNELS: dict[bool, tuple[Any, Any]] = {}


def _kernels() -> tuple[Any, Any]:
    """``(forward, backward)`` jitted for the current mode (compiled or interpreted).

    The kernels use only Triton builtins (``tl.full``, ``tl.reduce`` with our own ``_ADD``),
    never ``triton.language.standard``'s jitted helpers such as ``tl.zeros`` / ``tl.sum``:
    those were jitted for the mode in force when ``triton`` was imported, which may not be
    the mode now. ``_ADD`` (the reduction's combine function, jitted for the current mode)
    reaches the backward through a copy of the module globals made for that mode.
    """
    mode = interpret_mode()
    if mode not in _KERNELS:
        import triton

        from dassdp.neurons.backends import _triton_kernels as src

        scope = {**vars(src), "_ADD": triton.jit(src._add)}
        bwd = types.FunctionType(src._lif_bwd.__code__, scope, src._lif_bwd.__name__)
        # A function made from a code object has no annotations: without them Triton sees no
        # tl.constexpr parameter (seen on an H200: "arange's arguments must be constexpr").
        bwd.__annotations__ = dict(src._lif_bwd.__annotations__)
        _KERNELS[mode] = (triton.jit(src._lif_fwd), triton.jit(bwd))
    return _KERNELS[mode]


_CHECKING = threading.local()  # .on: this thread runs the self-check


def self_checking() -> bool:
    """Whether this thread is inside Triton's self-check: its launches are the check's own,
    not the caller's (launch counters skip them)."""
    return bool(getattr(_CHECKING, "on", False))


def _block(n: int) -> int:
    return min(_BLOCK_MAX, max(16, 1 << (max(n, 1) - 1).bit_length()))


def _grid(n: int, block: int) -> int:
    return max(1, -(-n // block))


def _on_device(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Launch on ``t``'s CUDA device (not the current one); nothing to do elsewhere."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _uint8_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, dtype=torch.uint8)


def _gx_out(h: Tensor, dtype: torch.dtype, needed: bool) -> Tensor:
    return (
        torch.empty_like(h, dtype=dtype) if needed else torch.empty(0, dtype=dtype, device=h.device)
    )


# The two launches are custom operators, so that torch.compile treats them as opaque ops (it
# cannot trace a Triton launch made through the interpreter or a lazily jitted kernel) while
# tracing TritonLIF itself. Outputs a call does not need come back as empty placeholders.
# Outputs are made with empty_like: the layout of x (dense, time outermost; see the docstring).


@torch.library.custom_op("dassdp::lif_triton_fwd", mutates_args=())
def _fwd_op(
    x: Tensor,
    k: Tensor | None,
    k_num: float,
    v_th: float,
    v_r: float | None,
    decay_input: bool,
    return_membrane: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(spikes, membrane | [], H | [], S as uint8 | [])`` of a dense time-major ``x``."""
    T = x.shape[0]
    N = x.numel() // T
    half = x.dtype in _HALF_DTYPES
    s = torch.empty_like(x)
    v = torch.empty_like(x) if return_membrane else x.new_empty(0)
    h = torch.empty_like(x) if save else x.new_empty(0)  # H in the input dtype (see above)
    sb = _uint8_like(x) if save and half else torch.empty(0, dtype=torch.uint8, device=x.device)
    block = _block(N)
    fwd, _ = _kernels()
    with _on_device(x):
        fwd[(_grid(N, block),)](
            x, k if k is not None else x, s, v if return_membrane else s, h if save else s,
            sb if save and half else s, N, T,
            K=k_num, K_FROM_PTR=k is not None, V_TH=v_th, V_R=0.0 if v_r is None else v_r,
            HARD_RESET=v_r is not None, DECAY_INPUT=decay_input, STORE_V=return_membrane,
            STORE_H=save, STORE_S=save and half, F64=x.dtype == torch.float64, BLOCK=block,
            enable_fp_fusion=False,
        )  # fmt: skip
    return s, v, h, sb


@_fwd_op.register_fake
def _(x, k, k_num, v_th, v_r, decay_input, return_membrane, save):
    half = x.dtype in _HALF_DTYPES
    return (
        torch.empty_like(x),
        torch.empty_like(x) if return_membrane else x.new_empty(0),
        torch.empty_like(x) if save else x.new_empty(0),
        _uint8_like(x) if save and half else torch.empty(0, dtype=torch.uint8, device=x.device),
    )


@torch.library.custom_op("dassdp::lif_triton_bwd", mutates_args=())
def _bwd_op(
    g_s: Tensor | None,
    g_v: Tensor | None,
    h: Tensor,
    sb: Tensor | None,
    x: Tensor | None,
    k: Tensor | None,
    k_num: float,
    v_th: float,
    v_r: float | None,
    decay_input: bool,
    detach_reset: bool,
    surrogate: str,
    alpha: float,
    x_dtype: torch.dtype,
    need_gx: bool,
    need_gk: bool,
) -> tuple[Tensor, Tensor]:
    """``(gX | [], gk | [])`` (``gX`` in ``h``'s layout, which every input shares); ``gk`` is
    0-d, summed in fp32 (fp64 for fp64 inputs)."""
    T = h.shape[0]
    N = h.numel() // T
    gx = _gx_out(h, x_dtype, need_gx)
    block = _block(N)
    grid = _grid(N, block)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    gk_part = torch.empty(grid if need_gk else 0, dtype=acc, device=h.device)
    any_g = g_s if g_s is not None else g_v
    _, bwd = _kernels()
    with _on_device(h):
        bwd[(grid,)](
            g_s if g_s is not None else any_g, g_v if g_v is not None else any_g, h,
            sb if sb is not None else h, x if x is not None else h, k if k is not None else h,
            gx if need_gx else h, gk_part if need_gk else h, N, T, (T - 1) * N,
            K=k_num, K_FROM_PTR=k is not None, V_TH=v_th, V_R=0.0 if v_r is None else v_r,
            HARD_RESET=v_r is not None, DECAY_INPUT=decay_input, DETACH_RESET=detach_reset,
            SURROGATE=_SURROGATE_IDS[surrogate], ALPHA=alpha, HAS_GS=g_s is not None,
            HAS_GV=g_v is not None, LOAD_S=sb is not None, NEED_GX=need_gx, NEED_GK=need_gk,
            F64=h.dtype == torch.float64, BLOCK=block, enable_fp_fusion=False,
        )  # fmt: skip
    return gx, (gk_part.sum() if need_gk else gk_part)


@_bwd_op.register_fake
def _(g_s, g_v, h, sb, x, k, k_num, v_th, v_r, decay_input, detach_reset, surrogate, alpha,
      x_dtype, need_gx, need_gk):  # fmt: skip
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    gx = _gx_out(h, x_dtype, need_gx)
    return gx, torch.empty(() if need_gk else 0, dtype=acc, device=h.device)


def _in_layout(g: Tensor | None, like: Tensor) -> Tensor | None:
    """An incoming gradient with ``like``'s strides (a copy only when they differ, e.g. the
    expanded ones of ``out.sum().backward()``)."""
    if g is None or g.stride() == like.stride():
        return g
    return torch.empty_like(like, dtype=g.dtype).copy_(g)


class TritonLIF(torch.autograd.Function):
    """Multi-step LIF, forward and backward each one Triton kernel over all ``T``.

    ``forward(x [T, ...], k_tensor (one-element tensor or None), k (float, used when
    k_tensor is None), params (LIFParams), return_membrane)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        k_tensor: Tensor | None,
        k: float,
        params: Any,
        return_membrane: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        x = x if dense_time_major(x) else x.contiguous()
        half = x.dtype in _HALF_DTYPES
        needs_grad = any(ctx.needs_input_grad[:2])
        k_needs_grad = k_tensor is not None and ctx.needs_input_grad[1]
        k_flat = k_tensor.detach().reshape(1) if k_tensor is not None else None
        s, v, h, sb = _fwd_op(
            x, k_flat, float(k), float(params.v_threshold),
            None if params.v_reset is None else float(params.v_reset), params.decay_input,
            return_membrane, needs_grad,
        )  # fmt: skip
        ctx.save_for_backward(
            h if needs_grad else None,
            sb if needs_grad and half else None,
            x if k_needs_grad and params.decay_input else None,
            k_tensor,
        )
        ctx.k, ctx.params, ctx.k_needs_grad, ctx.x_dtype = k, params, k_needs_grad, x.dtype
        return (s, v) if return_membrane else s

    @staticmethod
    @once_differentiable
    def backward(ctx, g_s: Tensor | None, g_v: Tensor | None = None):  # type: ignore[override]
        h, sb, x_saved, k_tensor = ctx.saved_tensors
        p = ctx.params
        need_gx, need_gk = ctx.needs_input_grad[0], ctx.k_needs_grad
        if (g_s is None and g_v is None) or not (need_gx or need_gk):
            return None, None, None, None, None
        alpha = get_surrogate(p.surrogate)[1] if p.alpha is None else p.alpha
        gx, gk = _bwd_op(
            _in_layout(g_s, h), _in_layout(g_v, h),
            h, sb, x_saved, k_tensor.detach().reshape(1) if k_tensor is not None else None,
            float(ctx.k), float(p.v_threshold),
            None if p.v_reset is None else float(p.v_reset), p.decay_input, p.detach_reset,
            p.surrogate, float(alpha), ctx.x_dtype, need_gx, need_gk,
        )  # fmt: skip
        g_k = gk.reshape(k_tensor.shape).to(k_tensor.dtype) if need_gk else None
        return (gx if need_gx else None), g_k, None, None, None


def lif_multistep_triton_apply(
    x: Tensor, k_tensor: Tensor | None, k: float, params: Any, return_membrane: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """Run :class:`TritonLIF` as it is (no checks, no self-check: see
    :func:`lif_multistep_triton`)."""
    return TritonLIF.apply(x, k_tensor, k, params, return_membrane)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the self-check

_CHECKED: dict[tuple[str, torch.dtype], str | None] = {}
_CHECK_LOCK = threading.RLock()


def _run_for_check(x: Tensor, k_tensor: Tensor | None, k: float, params: LIFParams) -> Tensor:
    return lif_multistep_triton_apply(x, k_tensor, k, params, False)  # type: ignore[return-value]


def self_check(device: torch.device, dtype: torch.dtype, params: LIFParams) -> str | None:
    """Why the Triton LIF is not to be trusted on ``(device, dtype)``, or ``None`` when it
    agreed with the torch backend there (:mod:`~dassdp.neurons.backends._triton_check`, run
    under the device guard, once per pair and process; fp16 / bf16 need fp32 to pass too)."""
    from dassdp.neurons.backends import _triton_check

    key = (str(device), dtype)
    with _CHECK_LOCK:
        if key not in _CHECKED:
            base = self_check(device, torch.float32, params) if dtype in _HALF_DTYPES else None
            if base is None:
                _CHECKING.on = True
                try:
                    with _on_device(torch.empty(0, device=device)):
                        base = _triton_check.check(device, dtype, params, _run_for_check)
                finally:
                    _CHECKING.on = False
            _CHECKED[key] = base
        return _CHECKED[key]


# ---------------------------------------------------------------- the backend

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _auto_device(device: torch.device) -> bool:
    """Devices ``"auto"`` considers Triton for (CUDA; the interpreter only by name)."""
    return device.type == "cuda"


def _off() -> bool:
    return os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")


def _refusal(call: Call) -> str | None:
    """Why this call is outside the kernels' scope (``ValueError`` by name), or ``None``."""
    if call_supported(call) and call.dtype in DTYPES:
        return None
    return (
        "the triton LIF backend needs x of dtype float16 / bfloat16 / float32 / float64, "
        f"surrogate in {FUSED_SURROGATES} and inv_tau None / a number / a one-element "
        f"tensor; got dtype {call.dtype}, surrogate {call.params.surrogate!r}"
    )


def _check(call: Call) -> None:
    """By name: the call's scope, then Triton, the device and the self-check, else raise."""
    refusal = _refusal(call)
    if refusal is not None:
        raise ValueError(refusal)
    if not triton_available():
        raise RuntimeError(
            f"backend 'triton' needs the triton package, importable and >= "
            f"{'.'.join(map(str, MIN_VERSION))} ({unavailable_reason() or 'unavailable'}); "
            "use backend='torch' or 'auto'"
        )
    if call.device.type != "cuda" and not interpret_mode():
        raise RuntimeError(
            f"backend 'triton' needs x on a CUDA device (x is on {call.device}), or "
            "TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter; "
            "use backend='torch' or 'auto' on the CPU"
        )
    failed = self_check(call.device, call.dtype, call.params)
    if failed is not None:
        raise RuntimeError(
            f"backend 'triton' failed its self-check on {call.device} ({call.dtype}): "
            f"{failed}; use backend='torch' or 'auto'"
        )


def _pick(call: Call) -> bool:
    """``"auto"``: Triton for a supported call on CUDA that Triton is usable for and whose
    (device, dtype) passed the self-check; otherwise no, with one warning naming why."""
    if _off() or not _auto_device(call.device) or _refusal(call) is not None:
        return False
    if not triton_available():
        reason = unavailable_reason() or "unavailable"
        _warn_once("probe", f"dassdp: the Triton LIF is off ({reason}); {_FALLBACK}")
        return False
    failed = self_check(call.device, call.dtype, call.params)
    if failed is not None:
        _warn_once(
            f"{call.device}/{call.dtype}",
            f"dassdp: the Triton LIF failed its self-check on {call.device} ({call.dtype}): "
            f"{failed}; {_FALLBACK}",
        )
        return False
    return True


_FALLBACK = f"the torch backend runs instead (set {ENV}=0 to skip Triton)"


def _run_backend(
    x: Tensor, params: LIFParams, inv_tau: Tensor | float | None, return_membrane: bool
) -> Tensor | tuple[Tensor, Tensor]:
    per_step = x.numel() // x.shape[0]
    if per_step >= 2**31:  # the kernels index one step's neurons with int32
        raise ValueError(
            f"the triton LIF backend takes < 2**31 neurons per time step, got {per_step}"
        )
    k_tensor, k = split_k(params, inv_tau)
    if k_tensor is not None and k_tensor.device != x.device:
        raise ValueError(
            f"the triton LIF backend reads inv_tau on x's device: x is on {x.device}, inv_tau "
            f"on {k_tensor.device} (move the neuron's parameters with the model: .to(device))"
        )
    return lif_multistep_triton_apply(x, k_tensor, k, params, return_membrane)


def lif_multistep_triton(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-step LIF as one Triton kernel forward and one backward (the ``"triton"``
    backend): same spikes as :func:`~dassdp.neurons.lif.lif_multistep_loop` in fp32 / fp64;
    fp16 / bf16 inputs are computed in fp32 registers.

    Arguments and results as :func:`dassdp.neurons.lif_multistep`. Needs an fp16 / bf16 /
    fp32 / fp64 ``x`` on a CUDA device, or Triton's CPU interpreter (``TRITON_INTERPRET=1``),
    the atan or sigmoid surrogate, ``inv_tau`` ``None`` / a number / a one-element tensor on
    ``x``'s device, a usable Triton and a passed self-check (module docstring). No double
    backward.
    """
    check_time_major(x)
    _check(Call.of(x, params, inv_tau, return_membrane))
    return _run_backend(x, params, inv_tau, return_membrane)


def _unready() -> str | None:
    reason = unavailable_reason()
    if reason is None and not torch.cuda.is_available() and not interpret_mode():
        return "no CUDA device (and TRITON_INTERPRET is not set)"
    return reason


BACKEND = Backend(
    name="triton", run=_run_backend, check=_check, pick=_pick, auto_rank=10, unready=_unready
)
