"""Multi-step LIF as one Triton kernel per direction (forward over all ``T``, backward over all
``T`` in reverse); the math is the one in :mod:`dassdp.neurons.functional`'s docstring.

Layout: ``x`` ``[T, B, ...]`` is viewed as ``[T, N]`` (contiguous) and the grid runs over the
``N`` neurons in blocks of ``BLOCK``; each program keeps its block's membrane (forward) or
membrane gradient ``gH[t + 1]`` (backward) in registers and loops over ``t`` inside the kernel.
Every input dtype (fp16, bf16, fp32, fp64) is loaded and computed in fp32 registers (fp64 in
fp64); spikes, membranes and ``gX`` are stored in the input dtype.

Saved for backward (only what the backward reads):

* ``H`` ``[T, N]``: the surrogate ``sg(H - V_th)``, ``R[t]`` and (for a learnable ``k``) the
  previous membrane ``V[t-1]`` are all functions of ``H`` and ``S``. For fp32 / fp64 inputs
  ``H`` is kept exactly (the compute dtype) and ``S = H >= V_th`` is recomputed from it, bit
  for bit the forward's decision. For fp16 / bf16 inputs ``H`` is kept in the input dtype (half
  the bytes of fp32) and ``S`` as ``uint8`` beside it, because a rounded ``H`` can land on the
  other side of ``V_th``: 3 bytes a neuron-step instead of 4.
* ``X`` only when ``k`` needs a gradient and ``decay_input`` (``dH/dk = X - (V[t-1] - V_r)``).
* ``k`` (a one-element tensor, read by the kernel through its pointer: no host read).

Launches: forward one kernel; backward one kernel, plus for a learnable ``k`` one ``sum`` over
the per-program partial sums of ``gk`` (fp32, or fp64 for fp64 inputs) and a cast to ``k``'s
dtype. ``tau``, ``v_threshold``, ``v_reset`` and ``alpha`` are compile-time constants
(``tl.constexpr``: one compiled variant per neuron configuration), so their fp64 values reach an
fp64 kernel unrounded. FMA contraction is switched off on the GPU so that the fp32 forward
rounds exactly like the torch backend and the autograd loop (same spikes). Each launch is a
custom operator (``torch.ops.dassdp.lif_triton_fwd`` / ``lif_triton_bwd``, with fake
implementations), so ``torch.compile`` traces :class:`TritonLIF` whole, without graph breaks.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU tensors. Because
``triton.jit`` decides between compiled and interpreted when the kernel is created, the kernels
are created on first use and cached per mode (:func:`interpret_mode` is read at every call), so
the variable may be set before or after :mod:`dassdp` is imported.
"""

# The kernels spell out their compile-time (constexpr) branches as if blocks.
# ruff: noqa: SIM108

import math
import types
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from dassdp.neurons.surrogate import get_surrogate

__all__ = ["TritonLIF", "interpret_mode", "lif_multistep_triton_apply"]

_BLOCK_MAX = 1024
_SURROGATE_IDS = {"atan": 0, "sigmoid": 1}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@torch.compiler.assume_constant_result  # torch.compile: a constant, not traced
def interpret_mode() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` now)."""
    return bool(triton.knobs.runtime.interpret)


def _lif_fwd(
    x_ptr,
    k_ptr,
    s_ptr,
    v_ptr,
    h_ptr,
    sb_ptr,
    N,
    T,
    K: tl.constexpr,
    K_FROM_PTR: tl.constexpr,
    V_TH: tl.constexpr,
    V_R: tl.constexpr,
    HARD_RESET: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    STORE_V: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_S: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if F64:  # the compute dtype, as a constexpr flag (older Triton cannot take a dtype)
        zero = tl.full([BLOCK], 0.0, tl.float64)
    else:
        zero = tl.full([BLOCK], 0.0, tl.float32)
    if K_FROM_PTR:
        k = zero + tl.load(k_ptr).to(zero.dtype)
    else:
        k = zero + K
    v_th = zero + V_TH
    v_r = zero + V_R
    v = zero  # V[-1] = 0
    xp, sp, vp, hp, sbp = x_ptr + offs, s_ptr + offs, v_ptr + offs, h_ptr + offs, sb_ptr + offs
    for _ in range(T):
        x = tl.load(xp, mask=mask, other=0.0).to(zero.dtype)
        if DECAY_INPUT:  # H = V + (X - (V - V_r)) k
            h = v + (x - (v - v_r)) * k
        else:  # H = V - (V - V_r) k + X
            h = v - (v - v_r) * k + x
        spike = h >= v_th
        s = spike.to(zero.dtype)
        if HARD_RESET:  # V = V_r where it spiked, else H
            v = tl.where(spike, v_r, h)
        else:  # V = H - V_th S
            v = h - v_th * s
        tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=mask)
        if STORE_V:
            tl.store(vp, v.to(v_ptr.dtype.element_ty), mask=mask)
        if STORE_H:
            tl.store(hp, h.to(h_ptr.dtype.element_ty), mask=mask)
        if STORE_S:
            tl.store(sbp, spike.to(tl.uint8), mask=mask)
        xp += N
        sp += N
        vp += N
        hp += N
        sbp += N


def _lif_bwd(  # noqa: C901  (a Triton kernel: its branches are compile-time constants)
    gs_ptr,
    gv_ptr,
    h_ptr,
    sb_ptr,
    x_ptr,
    k_ptr,
    gx_ptr,
    gk_ptr,
    N,
    T,
    LAST,
    K: tl.constexpr,
    K_FROM_PTR: tl.constexpr,
    V_TH: tl.constexpr,
    V_R: tl.constexpr,
    HARD_RESET: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    ALPHA: tl.constexpr,
    HAS_GS: tl.constexpr,
    HAS_GV: tl.constexpr,
    LOAD_S: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_GK: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if F64:  # the compute dtype, as a constexpr flag (older Triton cannot take a dtype)
        zero = tl.full([BLOCK], 0.0, tl.float64)
    else:
        zero = tl.full([BLOCK], 0.0, tl.float32)
    if K_FROM_PTR:
        k = zero + tl.load(k_ptr).to(zero.dtype)
    else:
        k = zero + K
    one = zero + 1.0
    v_th = zero + V_TH
    v_r = zero + V_R
    decay = one - k  # dH[t] / dV[t-1]
    # Pointers at step T-1; they walk back by N per step.
    hp, sbp, xp = h_ptr + LAST + offs, sb_ptr + LAST + offs, x_ptr + LAST + offs
    gsp, gvp, gxp = gs_ptr + LAST + offs, gv_ptr + LAST + offs, gx_ptr + LAST + offs
    h = tl.load(hp, mask=mask, other=0.0).to(zero.dtype)
    if LOAD_S:
        s = tl.load(sbp, mask=mask, other=0).to(zero.dtype)
    else:
        s = (h >= v_th).to(zero.dtype)
    g_next = zero  # gH[t + 1]
    gk_acc = zero
    for i in range(T):  # t = T - 1 - i
        d = h - v_th
        if SURROGATE == 0:  # atan: (alpha / 2) / (1 + (pi / 2 alpha d)^2)
            u = d * (math.pi / 2 * ALPHA)
            sg = (ALPHA / 2) / (one + u * u)
        else:  # sigmoid: alpha sig(alpha d) (1 - sig(alpha d))
            sig = one / (one + tl.exp(-(d * ALPHA)))
            sg = ALPHA * sig * (one - sig)
        if HARD_RESET:
            if DETACH_RESET:
                r = one - s
            else:
                r = one - s + (v_r - h) * sg
        else:
            if DETACH_RESET:
                r = one
            else:
                r = one - v_th * sg
        carry = decay * g_next
        if HAS_GV:
            carry += tl.load(gvp, mask=mask, other=0.0).to(zero.dtype)
        gh = r * carry
        if HAS_GS:
            gh += tl.load(gsp, mask=mask, other=0.0).to(zero.dtype) * sg
        if NEED_GX:
            if DECAY_INPUT:
                tl.store(gxp, (gh * k).to(gx_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(gxp, gh.to(gx_ptr.dtype.element_ty), mask=mask)
        # H[t-1], S[t-1] (zeros before the first step: V[-1] = 0 either way).
        prev_mask = mask & (i < T - 1)
        h_prev = tl.load(hp - N, mask=prev_mask, other=0.0).to(zero.dtype)
        if LOAD_S:
            s_prev = tl.load(sbp - N, mask=prev_mask, other=0).to(zero.dtype)
        else:
            s_prev = ((h_prev >= v_th) & prev_mask).to(zero.dtype)
        if NEED_GK:  # dH[t]/dk = X[t] - (V[t-1] - V_r)  or  V_r - V[t-1]
            if HARD_RESET:
                v_prev = tl.where(s_prev > 0, v_r, h_prev)
            else:
                v_prev = h_prev - v_th * s_prev
            v_prev = tl.where(prev_mask, v_prev, zero)
            if DECAY_INPUT:
                dh_dk = tl.load(xp, mask=mask, other=0.0).to(zero.dtype) - (v_prev - v_r)
            else:
                dh_dk = v_r - v_prev
            gk_acc += tl.where(mask, gh * dh_dk, zero)
        g_next = gh
        h = h_prev
        s = s_prev
        hp -= N
        sbp -= N
        xp -= N
        gsp -= N
        gvp -= N
        gxp -= N
    if NEED_GK:
        tl.store(gk_ptr + pid, tl.reduce(gk_acc, 0, _ADD))  # noqa: F821 (see _kernels)


def _add(a, b):
    return a + b


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
        scope = {**globals(), "_ADD": triton.jit(_add)}
        bwd = types.FunctionType(_lif_bwd.__code__, scope, _lif_bwd.__name__)
        # A function made from a code object has no annotations: without them Triton sees no
        # tl.constexpr parameter (seen on an H200: "arange's arguments must be constexpr").
        bwd.__annotations__ = dict(_lif_bwd.__annotations__)
        _KERNELS[mode] = (triton.jit(_lif_fwd), triton.jit(bwd))
    return _KERNELS[mode]


def _block(n: int) -> int:
    return min(_BLOCK_MAX, max(16, triton.next_power_of_2(max(n, 1))))


# The two launches are custom operators, so that torch.compile treats them as opaque ops (it
# cannot trace a Triton launch made through the interpreter or a lazily jitted kernel) while
# tracing TritonLIF itself. Outputs a call does not need come back as empty placeholders.


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
    """``(spikes, membrane | [], H | [], S as uint8 | [])`` of a contiguous ``x`` ``[T, ...]``."""
    T = x.shape[0]
    N = x.numel() // T
    half = x.dtype in _HALF_DTYPES
    s = torch.empty_like(x)
    v = torch.empty_like(x) if return_membrane else x.new_empty(0)
    h = torch.empty_like(x) if save else x.new_empty(0)  # H in the input dtype (see above)
    sb = torch.empty(x.shape if save and half else 0, dtype=torch.uint8, device=x.device)
    block = _block(N)
    fwd, _ = _kernels()
    fwd[(max(1, triton.cdiv(N, block)),)](
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
        torch.empty(x.shape if save and half else 0, dtype=torch.uint8, device=x.device),
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
    """``(gX | [], gk | [])``; ``gk`` is 0-d, summed in fp32 (fp64 for fp64 inputs)."""
    T = h.shape[0]
    N = h.numel() // T
    gx = torch.empty(h.shape if need_gx else 0, dtype=x_dtype, device=h.device)
    block = _block(N)
    grid = max(1, triton.cdiv(N, block))
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    gk_part = torch.empty(grid if need_gk else 0, dtype=acc, device=h.device)
    any_g = g_s if g_s is not None else g_v
    _, bwd = _kernels()
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
    gx = torch.empty(h.shape if need_gx else 0, dtype=x_dtype, device=h.device)
    return gx, torch.empty(() if need_gk else 0, dtype=acc, device=h.device)


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
        x = x.contiguous()
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
            g_s.contiguous() if g_s is not None else None,
            g_v.contiguous() if g_v is not None else None,
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
    """Run :class:`TritonLIF` (checks done by the caller, see ``functional.lif_multistep``)."""
    return TritonLIF.apply(x, k_tensor, k, params, return_membrane)  # type: ignore[no-any-return]
