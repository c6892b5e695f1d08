"""The ``"torch"`` backend: the fused multi-step LIF in torch operations, with the hand-written
backward of :mod:`dassdp.neurons.lif` (an autograd ``Function``, :class:`_FusedLIF`).

The forward runs the same operations as :func:`~dassdp.neurons.lif.lif_step`, in the same
order (so spikes and membranes are bit-identical to the autograd loop), but without recording
a graph: it keeps only ``H`` ``[T, ...]`` (plus ``X`` when a learnable ``k`` needs its
gradient); the backward rebuilds the spikes from it as ``H >= V_th``, the forward's own
comparison. The surrogate and ``R`` are computed for all steps at once; only the recurrence
(one multiply-add per step) runs over ``t``. Runs on any device, for a floating ``x``, the
``atan`` or ``sigmoid`` surrogate and ``inv_tau`` ``None``, a number or a one-element tensor
(never read back to the host). No double backward (use the loop).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dassdp.neurons.backends._registry import Backend, Call
from dassdp.neurons.lif import LIFParams, check_time_major, split_k
from dassdp.neurons.saving import attach_spike_bits
from dassdp.neurons.surrogate import get_surrogate

__all__ = ["BACKEND", "FUSED_SURROGATES", "fused_supported", "lif_multistep_fused"]

FUSED_SURROGATES = ("atan", "sigmoid")


def fused_supported(x: Tensor, params: LIFParams, inv_tau: Tensor | float | None = None) -> bool:
    """Whether the fused math (``torch``, and within their own limits ``triton`` and ``cpu``)
    handles this call: a floating ``x``, the ``atan`` or ``sigmoid`` surrogate, and ``inv_tau``
    ``None``, a number or a one-element tensor. Every reset / ``decay_input`` /
    ``detach_reset`` combination is supported."""
    if not x.is_floating_point() or params.surrogate not in FUSED_SURROGATES:
        return False
    return not isinstance(inv_tau, Tensor) or inv_tau.numel() == 1


def call_supported(call: Call) -> bool:
    """:func:`fused_supported` of a :class:`Call`."""
    if not call.dtype.is_floating_point or call.params.surrogate not in FUSED_SURROGATES:
        return False
    return not call.k_is_tensor or call.k_numel == 1


def _surrogate_grad_(d: Tensor, name: str, alpha: float) -> Tensor:
    """Surrogate derivative at ``d = H - V_th``, computed in place in ``d`` (same operations
    and order as :mod:`dassdp.neurons.surrogate`)."""
    if name == "atan":  # (alpha / 2) / (1 + (pi / 2 * alpha * d)^2)
        return d.mul_(math.pi / 2 * alpha).square_().add_(1).reciprocal_().mul_(alpha / 2)
    sg = d.mul_(alpha).sigmoid_()  # alpha * sig(alpha d) * (1 - sig(alpha d))
    one_minus = torch.rsub(sg, 1)
    return sg.mul_(alpha).mul_(one_minus)


class _FusedLIF(torch.autograd.Function):
    """Multi-step LIF with a hand-written backward; see the module docstring for the math.

    ``k`` is a number (fixed ``tau``) or, with ``k_tensor`` given, that one-element tensor
    used as a 0-d tensor in every operation (never read back to the host).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        k_tensor: Tensor | None,
        k_num: float,
        params: LIFParams,
        return_membrane: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        v_th, v_reset = params.v_threshold, params.v_reset
        v_r = 0.0 if v_reset is None else v_reset
        k: Tensor | float = k_num if k_tensor is None else k_tensor.detach().reshape(())
        T = x.shape[0]
        h_seq = torch.empty_like(x)
        s_mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        s_out = torch.empty_like(x)
        v_seq = torch.empty_like(x) if return_membrane else None
        v_bufs = (torch.empty_like(x[0]), torch.empty_like(x[0])) if not return_membrane else None
        tmp = torch.empty_like(x[0])
        v_r_t = x.new_full((), v_r)  # a device fill, not a tensor from host data
        v: Tensor | None = None  # V[-1] = 0
        for t in range(T):
            h = h_seq[t]
            if v is None and v_r == 0.0:  # V = 0: the charge reduces to H = k X or H = X
                if params.decay_input:
                    torch.mul(x[t], k, out=h)
                else:
                    h.copy_(x[t])
            else:
                if v is None:
                    v = torch.zeros_like(x[0])
                if params.decay_input:  # H = V + (X - (V - V_r)) k
                    if v_r != 0.0:
                        torch.sub(v, v_r, out=tmp)
                        torch.sub(x[t], tmp, out=tmp)
                    else:
                        torch.sub(x[t], v, out=tmp)
                    tmp.mul_(k)
                    torch.add(v, tmp, out=h)
                else:  # H = V - (V - V_r) k + X
                    if v_r != 0.0:
                        torch.sub(v, v_r, out=tmp)
                        tmp.mul_(k)
                    else:
                        torch.mul(v, k, out=tmp)
                    torch.sub(v, tmp, out=h)
                    h.add_(x[t])
            s = torch.ge(h, v_th, out=s_mask[t])
            v_next = v_seq[t] if v_seq is not None else v_bufs[t % 2]  # type: ignore[index]
            if v_reset is None:  # V = H - V_th S
                s_out[t].copy_(s)
                torch.sub(h, s_out[t], alpha=v_th, out=v_next)
            else:  # V = H (1 - S) + V_r S
                torch.where(s, v_r_t, h, out=v_next)
            v = v_next
        if v_reset is not None:
            s_out.copy_(s_mask)
        # The spikes as bool, for spike_saving to keep (no float -> bool copy of the output).
        attach_spike_bits(s_out, s_mask)
        k_needs_grad = k_tensor is not None and ctx.needs_input_grad[1]
        x_saved = x if k_needs_grad and params.decay_input else None
        # The spike mask is not saved: the backward rebuilds it as H >= V_th, the very
        # comparison made here (T x N bytes less kept per neuron layer).
        ctx.save_for_backward(h_seq, x_saved, k_tensor)
        ctx.k_num, ctx.params, ctx.return_membrane = k_num, params, return_membrane
        ctx.k_needs_grad = k_needs_grad
        if return_membrane:
            return s_out, v_seq  # type: ignore[return-value]
        return s_out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_s: Tensor, g_v_out: Tensor | None = None):  # type: ignore[override]
        h_seq, x_saved, k_tensor = ctx.saved_tensors
        p = ctx.params
        need_mask = p.v_reset is not None or ctx.k_needs_grad
        s_mask = torch.ge(h_seq, p.v_threshold) if need_mask else None  # as the forward
        k: Tensor | float = ctx.k_num if k_tensor is None else k_tensor.reshape(())
        v_r = 0.0 if p.v_reset is None else p.v_reset
        alpha = get_surrogate(p.surrogate)[1] if p.alpha is None else p.alpha
        sg = _surrogate_grad_(h_seq - p.v_threshold, p.surrogate, float(alpha))
        # R = dV/dH: a tensor, or the number 1 (soft reset, detached).
        if p.detach_reset:
            hard = s_mask is not None and p.v_reset is not None
            r: Tensor | float = (~s_mask).to(h_seq.dtype) if hard else 1.0  # type: ignore[operator]
        elif p.v_reset is not None:  # 1 - S + (V_r - H) sg
            r = torch.rsub(h_seq, v_r).mul_(sg).add_(~s_mask)
        else:  # 1 - V_th sg
            r = torch.mul(sg, -p.v_threshold).add_(1)
        g = sg.mul_(g_s)  # gS sg, then the recurrence in place: this becomes gH
        if ctx.return_membrane and g_v_out is not None:
            if isinstance(r, Tensor):
                g.addcmul_(g_v_out, r)
            else:
                g.add_(g_v_out)
        decay = 1 - k  # dH[t] / dV[t-1]: a number, or a 0-d tensor
        if isinstance(r, Tensor):
            c = r.mul_(decay)  # (1 - k) R[t]
            for t in range(g.shape[0] - 1, 0, -1):
                g[t - 1].addcmul_(g[t], c[t - 1])
        elif isinstance(decay, Tensor):
            for t in range(g.shape[0] - 1, 0, -1):
                g[t - 1].addcmul_(g[t], decay)
        else:
            for t in range(g.shape[0] - 1, 0, -1):
                g[t - 1].add_(g[t], alpha=decay)
        g_k = None
        if ctx.k_needs_grad:
            # V[t-1] from H and S: V_r where it spiked (hard) or H - V_th S (soft).
            v_prev = torch.zeros_like(h_seq)
            if p.v_reset is None:
                torch.sub(h_seq[:-1], s_mask[:-1].to(h_seq.dtype), alpha=p.v_threshold,
                          out=v_prev[1:])  # fmt: skip
            else:
                v_prev[1:].copy_(h_seq[:-1]).masked_fill_(s_mask[:-1], v_r)
            dh_dk = v_prev.sub_(v_r).neg_()  # V_r - V[t-1]
            if p.decay_input:
                dh_dk.add_(x_saved)  # X - (V[t-1] - V_r)
            # One sum over every neuron and step, accumulated in fp32 (fp64 for fp64).
            acc = torch.float64 if h_seq.dtype == torch.float64 else torch.float32
            g_k = dh_dk.mul_(g).sum(dtype=acc).reshape(k_tensor.shape).to(k_tensor.dtype)
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = g.mul_(k) if p.decay_input else g
        return g_x, g_k, None, None, None


def _refusal(dtype: torch.dtype, surrogate: str) -> str:
    return (
        "lif_multistep_fused needs a floating x, surrogate in "
        f"{FUSED_SURROGATES} and inv_tau None / a number / a one-element tensor; "
        f"got dtype {dtype}, surrogate {surrogate!r}"
    )


def _run(
    x: Tensor, params: LIFParams, inv_tau: Tensor | float | None, return_membrane: bool
) -> Tensor | tuple[Tensor, Tensor]:
    k_tensor, k = split_k(params, inv_tau)
    return _FusedLIF.apply(x, k_tensor, k, params, return_membrane)  # type: ignore[no-any-return]


def lif_multistep_fused(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused multi-step LIF (the ``"torch"`` backend): same results as
    :func:`~dassdp.neurons.lif.lif_multistep_loop` (bit-identical forward, gradients equal up
    to float rounding), faster and with less saved memory.

    Arguments and results as :func:`dassdp.neurons.lif_multistep`. Needs
    :func:`fused_supported`; a one-element ``inv_tau`` tensor gets its gradient (PLIF) and is
    never read back to the host. The backward is not itself differentiable (no double
    backward; use the loop).
    """
    check_time_major(x)
    if not fused_supported(x, params, inv_tau):
        raise ValueError(_refusal(x.dtype, params.surrogate))
    return _run(x, params, inv_tau, return_membrane)


def _check(call: Call) -> None:
    if not call_supported(call):
        raise ValueError(_refusal(call.dtype, call.params.surrogate))


BACKEND = Backend(name="torch", run=_run, check=_check, pick=call_supported, auto_rank=30)
