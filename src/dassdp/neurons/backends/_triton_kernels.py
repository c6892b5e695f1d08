"""The Triton LIF kernels (``@triton.jit`` sources), imported only by
:func:`dassdp.neurons.backends.triton._kernels` once Triton has been found usable.

One program per block of ``BLOCK`` neurons of ``x`` viewed as ``[T, N]`` rows; each keeps its
block's membrane (forward) or membrane gradient ``gH[t + 1]`` (backward) in registers and loops
over ``t`` inside the kernel. The math is :mod:`dassdp.neurons.lif`'s; parameters in capitals
are compile-time constants (``tl.constexpr``). These functions are jitted by ``_kernels`` for
the current mode (compiled or interpreted), never here.
"""

# The kernels spell out their compile-time (constexpr) branches as if blocks.
# ruff: noqa: SIM108

import math

import triton.language as tl

__all__: list[str] = []


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
