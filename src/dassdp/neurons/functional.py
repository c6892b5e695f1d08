"""Leaky integrate-and-fire dynamics as pure functions (norse style: step first, module later).

One step, with input current ``X[t]``, membrane ``V[t-1]`` (``V[-1] = 0``), time constant
``tau`` (or ``k = 1 / tau`` given directly, as PLIF does), threshold ``V_th`` and reset
value ``V_r``:

charge (decay_input=True)   ``H[t] = V[t-1] + (X[t] - (V[t-1] - V_r)) / tau``
charge (decay_input=False)  ``H[t] = V[t-1] - (V[t-1] - V_r) / tau + X[t]``
fire                        ``S[t] = Θ(H[t] - V_th)``  (surrogate gradient backward)
hard reset (V_r a number)   ``V[t] = H[t] (1 - S'[t]) + V_r S'[t]``
soft reset (V_r None)       ``V[t] = H[t] - V_th S'[t]``   (and ``V_r = 0`` in the charge)

where ``S' = S.detach()`` when ``detach_reset`` (the reset path carries no gradient) and
``S' = S`` otherwise. The multi-step form runs the step over a time-major ``[T, B, ...]``
tensor inside one call, so no membrane state outlives that call.

Backends of :func:`lif_multistep`
---------------------------------
``"loop"`` (:func:`lif_multistep_loop`): the step above through autograd, the reference (any
surrogate, any broadcastable ``inv_tau``, double backward). ``"torch"``
(:func:`lif_multistep_fused`): the fused multi-step below, in torch ops. ``"triton"``
(:func:`lif_multistep_triton`, :mod:`dassdp.neurons.triton_lif`): the same forward and
backward math as one Triton kernel each over all ``T``. ``"cpu"``
(:func:`lif_multistep_cpu`, :mod:`dassdp.neurons.cpu_lif`): the torch backend's operations
as one compiled C loop each way (CPU, fp32 / fp64, fixed time constant; the same membranes
and spikes as the torch backend, input gradients equal to it within a few ulps). ``"auto"``
(default): triton for CUDA inputs when Triton is importable; on the CPU ``cpu`` for calls it
supports with at least ``cpu_lif.MIN_NEURONS`` neurons per sample (unless
``DASSDP_LIF_CPU=0``, or no C compiler), else torch; the loop for what none supports. The
torch, triton and cpu backends read nothing back to the host and make no tensor from Python
data: a learnable ``k`` (PLIF) stays a one-element device tensor throughout.

Fused multi-step (:func:`lif_multistep_fused`, the ``"torch"`` backend)
-----------------------------------------------------------------------
The forward runs the same operations as the step above, in the same order (so spikes and
membranes are bit-identical to the autograd loop), but without recording a graph: it keeps
only ``H`` ``[T, ...]`` (plus ``X`` when a learnable ``k`` needs its gradient); the
backward rebuilds the spikes from it as ``H >= V_th``, the forward's own comparison. The
backward is written by hand. With ``k = 1 / tau``, surrogate ``σ'[t] = sg(H[t] - V_th)``,
incoming gradients ``gS[t]`` (and ``gV_out[t]`` for the returned membrane, else 0) and the
reset derivative ``R[t] = dV[t] / dH[t]``::

    R[t] = 1 - S[t]                         hard reset, detach_reset
         = 1                                soft reset, detach_reset
         = 1 - S[t] + (V_r - H[t]) σ'[t]    hard reset, no detach
         = 1 - V_th σ'[t]                   soft reset, no detach

    gH[T-1] = gS[T-1] σ'[T-1] + R[T-1] gV_out[T-1]
    gH[t]   = gS[t] σ'[t] + R[t] (gV_out[t] + (1 - k) gH[t + 1])        (t = T-2 ... 0)
    gX[t]   = k gH[t]   (decay_input)    or    gH[t]   (not decay_input)
    gk      = Σ_t Σ gH[t] dH[t]/dk,   dH[t]/dk = X[t] - (V[t-1] - V_r)   (decay_input)
                                               = V_r - V[t-1]            (not decay_input)

since ``dH[t] / dV[t-1] = 1 - k`` in both charge forms; ``V[t-1]`` for ``gk`` is rebuilt
from ``H`` and ``S``. The surrogate and ``R`` are computed for all steps at once; only the
recurrence (one multiply-add per step) runs over ``t``. The Triton kernels run the same
recurrences per neuron in registers (forward ``t = 0 ... T-1``, backward ``T-1 ... 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dassdp.neurons.saving import attach_spike_bits
from dassdp.neurons.surrogate import get_surrogate

__all__ = [
    "BACKENDS",
    "LIFParams",
    "check_backend",
    "fused_supported",
    "lif_multistep",
    "lif_multistep_cpu",
    "lif_multistep_fused",
    "lif_multistep_loop",
    "lif_multistep_triton",
    "lif_step",
    "resolve_backend",
    "triton_available",
]


@dataclass(frozen=True)
class LIFParams:
    """Parameters of a LIF neuron. Defaults are the LIF that SpikingResformer uses.

    Attributes:
        tau: membrane time constant in time steps (> 1 for a leak in (0, 1)); ignored by
            the step when ``inv_tau`` is given.
        v_threshold: firing threshold.
        v_reset: value the membrane is set to after a spike (hard reset), or ``None`` for a
            soft reset (subtract the threshold).
        decay_input: whether the input is scaled by ``1 / tau`` too.
        detach_reset: whether the reset path is cut from the autograd graph.
        surrogate: ``"atan"`` or ``"sigmoid"``.
        alpha: surrogate sharpness; ``None`` means the surrogate's default (2 or 4).
    """

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    decay_input: bool = True
    detach_reset: bool = True
    surrogate: str = "atan"
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        get_surrogate(self.surrogate)  # validates the name


def lif_step(
    x: Tensor, v: Tensor, params: LIFParams, inv_tau: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """One step. ``x``, ``v``: ``[B, ...]``; returns ``(spikes, v_next)``, both ``[B, ...]``.

    ``inv_tau`` overrides ``1 / params.tau`` (a tensor for a learnable time constant).
    """
    k = 1.0 / params.tau if inv_tau is None else inv_tau
    v_r = 0.0 if params.v_reset is None else params.v_reset
    h = v + (x - (v - v_r)) * k if params.decay_input else v - (v - v_r) * k + x
    spike_fn, default_alpha = get_surrogate(params.surrogate)
    s = spike_fn(h - params.v_threshold, default_alpha if params.alpha is None else params.alpha)
    s_reset = s.detach() if params.detach_reset else s
    if params.v_reset is None:
        v_next = h - params.v_threshold * s_reset
    else:
        v_next = h * (1 - s_reset) + params.v_reset * s_reset
    return s, v_next


def _check_time_major(x: Tensor) -> None:
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(
            f"expected a time-major tensor [T, B, ...] with T >= 1, got {tuple(x.shape)}"
        )


def lif_multistep_loop(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The reference multi-step LIF: :func:`lif_step` looped over ``T`` through autograd.

    Arguments and results as :func:`lif_multistep`; works for every configuration (any
    surrogate in the registry, any broadcastable ``inv_tau``) and for double backward.
    """
    _check_time_major(x)
    v = torch.zeros_like(x[0])
    spikes, membrane = [], []
    for t in range(x.shape[0]):
        s, v = lif_step(x[t], v, params, inv_tau)
        spikes.append(s)
        if return_membrane:
            membrane.append(v)
    out = torch.stack(spikes)
    return (out, torch.stack(membrane)) if return_membrane else out


_FUSED_SURROGATES = ("atan", "sigmoid")


def fused_supported(x: Tensor, params: LIFParams, inv_tau: Tensor | float | None = None) -> bool:
    """Whether :func:`lif_multistep_fused` handles this call: a floating ``x``, the ``atan``
    or ``sigmoid`` surrogate, and ``inv_tau`` ``None``, a number or a one-element tensor.
    Every reset / ``decay_input`` / ``detach_reset`` combination is supported."""
    if not x.is_floating_point() or params.surrogate not in _FUSED_SURROGATES:
        return False
    return not isinstance(inv_tau, Tensor) or inv_tau.numel() == 1


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


def _split_k(params: LIFParams, inv_tau: Tensor | float | None) -> tuple[Tensor | None, float]:
    """``(k_tensor, k_number)``: a one-element ``inv_tau`` tensor stays a tensor (no host
    read); else ``k`` is the number ``1 / tau`` or ``inv_tau``."""
    if isinstance(inv_tau, Tensor):
        return inv_tau, 0.0
    return None, 1.0 / params.tau if inv_tau is None else float(inv_tau)


def lif_multistep_fused(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused multi-step LIF (the ``"torch"`` backend): same results as
    :func:`lif_multistep_loop` (bit-identical forward, gradients equal up to float rounding),
    faster and with less saved memory.

    Arguments and results as :func:`lif_multistep`. Needs :func:`fused_supported`; a
    one-element ``inv_tau`` tensor gets its gradient (PLIF) and is never read back to the
    host. The backward is not itself differentiable (no double backward; use the loop).
    """
    _check_time_major(x)
    if not fused_supported(x, params, inv_tau):
        raise ValueError(
            "lif_multistep_fused needs a floating x, surrogate in "
            f"{_FUSED_SURROGATES} and inv_tau None / a number / a one-element tensor; "
            f"got dtype {x.dtype}, surrogate {params.surrogate!r}"
        )
    k_tensor, k = _split_k(params, inv_tau)
    return _FusedLIF.apply(x, k_tensor, k, params, return_membrane)  # type: ignore[no-any-return]


_TRITON_OK: list[bool] = []  # filled on the first call of triton_available


def triton_available() -> bool:
    """Whether the Triton backend can be imported (``triton`` installed and recent enough)."""
    if not _TRITON_OK:
        try:
            import dassdp.neurons.triton_lif  # noqa: F401
        except ImportError:
            _TRITON_OK.append(False)
        else:
            _TRITON_OK.append(True)
    return _TRITON_OK[0]


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def lif_multistep_triton(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-step LIF as one Triton kernel forward and one backward (the ``"triton"``
    backend, :mod:`dassdp.neurons.triton_lif`): same spikes as :func:`lif_multistep_loop` in
    fp32 / fp64; fp16 / bf16 inputs are computed in fp32 registers.

    Arguments and results as :func:`lif_multistep`. Needs :func:`fused_supported` with an
    fp16 / bf16 / fp32 / fp64 ``x``, and ``x`` on a CUDA device, or Triton's CPU interpreter
    (``TRITON_INTERPRET=1``). No double backward.
    """
    _check_time_major(x)
    if not fused_supported(x, params, inv_tau) or x.dtype not in _TRITON_DTYPES:
        raise ValueError(
            "the triton LIF backend needs x of dtype float16 / bfloat16 / float32 / float64, "
            f"surrogate in {_FUSED_SURROGATES} and inv_tau None / a number / a one-element "
            f"tensor; got dtype {x.dtype}, surrogate {params.surrogate!r}"
        )
    if not triton_available():
        raise RuntimeError(
            "backend 'triton' needs the triton package (not importable here); "
            "use backend='torch' or 'auto'"
        )
    from dassdp.neurons import triton_lif

    if x.device.type != "cuda" and not triton_lif.interpret_mode():
        raise RuntimeError(
            f"backend 'triton' needs x on a CUDA device (x is on {x.device}), or "
            "TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter; "
            "use backend='torch' or 'auto' on the CPU"
        )
    per_step = x.numel() // x.shape[0]
    if per_step >= 2**31:  # the kernels index one step's neurons with int32
        raise ValueError(
            f"the triton LIF backend takes < 2**31 neurons per time step, got {per_step}"
        )
    k_tensor, k = _split_k(params, inv_tau)
    return triton_lif.lif_multistep_triton_apply(x, k_tensor, k, params, return_membrane)


def lif_multistep_cpu(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-step LIF as compiled C loops on the CPU (the ``"cpu"`` backend,
    :mod:`dassdp.neurons.cpu_lif`): the membranes and spikes of :func:`lif_multistep_fused`
    bit for bit, input gradients within a few ulps of it (fp32 / fp64), one pass over memory
    per direction instead of a few per time step.

    Arguments and results as :func:`lif_multistep`. Needs :func:`fused_supported`, a CPU
    ``x`` of dtype fp32 / fp64, ``inv_tau`` ``None`` or a number, no returned membrane, and a
    C compiler on first use (the kernels are built once per machine). No double backward.
    """
    from dassdp.neurons import cpu_lif

    _check_time_major(x)
    if not fused_supported(x, params, inv_tau) or not cpu_lif.supported(
        x, inv_tau, return_membrane
    ):
        raise ValueError(
            "the cpu LIF backend needs a CPU x of dtype float32 / float64, surrogate in "
            f"{_FUSED_SURROGATES}, inv_tau None or a number and return_membrane=False; got "
            f"{x.dtype} on {x.device}, surrogate {params.surrogate!r}, inv_tau "
            f"{type(inv_tau).__name__}, return_membrane={return_membrane}"
        )
    _, k = _split_k(params, inv_tau)
    return cpu_lif.CpuLIF.apply(x, k, params)  # type: ignore[no-any-return]


def _cpu_auto(x: Tensor, inv_tau: Tensor | float | None, return_membrane: bool) -> bool:
    """Whether ``backend="auto"`` runs the cpu backend for this (CPU) call."""
    from dassdp.neurons import cpu_lif

    return (
        cpu_lif.large_enough(x)
        and cpu_lif.supported(x, inv_tau, return_membrane)
        and cpu_lif.usable()
    )


BACKENDS = ("auto", "loop", "torch", "triton", "cpu")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise a ``ValueError``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown LIF backend {backend!r}; choose one of {list(BACKENDS)}")
    return backend


def resolve_backend(
    backend: str,
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
) -> str:
    """The backend that :func:`lif_multistep` runs for this call: ``"auto"`` becomes
    ``"triton"`` for a CUDA ``x`` when Triton is importable and the call is supported,
    ``"cpu"`` for a large enough CPU call it supports (module docstring), ``"torch"``
    for other supported calls and ``"loop"`` for the rest; others stay."""
    if check_backend(backend) != "auto":
        return backend
    if not fused_supported(x, params, inv_tau):
        return "loop"
    if x.is_cuda and x.dtype in _TRITON_DTYPES and triton_available():
        return "triton"
    if x.device.type == "cpu" and _cpu_auto(x, inv_tau, return_membrane):
        return "cpu"
    return "torch"


_BACKEND_FNS = {
    "loop": lif_multistep_loop,
    "torch": lif_multistep_fused,
    "triton": lif_multistep_triton,
    "cpu": lif_multistep_cpu,
}


def lif_multistep(
    x: Tensor,
    params: LIFParams,
    inv_tau: Tensor | float | None = None,
    *,
    return_membrane: bool = False,
    backend: str = "auto",
    fused: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run LIF over a time-major input ``x`` ``[T, B, ...]`` starting from ``V = 0``.

    Returns the spikes ``[T, B, ...]`` (in {0, 1}, dtype of ``x``), and with
    ``return_membrane`` also the membrane after each step's reset ``[T, B, ...]``.
    ``inv_tau`` overrides ``1 / params.tau``. ``backend``: ``"loop"``
    (:func:`lif_multistep_loop`, the autograd reference), ``"torch"``
    (:func:`lif_multistep_fused`), ``"triton"`` (:func:`lif_multistep_triton`),
    ``"cpu"`` (:func:`lif_multistep_cpu`) or ``"auto"`` (default, see
    :func:`resolve_backend`; without a C compiler the cpu backend warns once and ``"auto"``
    runs the torch backend). ``fused`` is a deprecated alias:
    ``fused=False`` means ``backend="loop"``; ``fused=True`` changes nothing.
    """
    _check_time_major(x)
    if fused is False:
        backend = "loop"
    chosen = resolve_backend(backend, x, params, inv_tau, return_membrane=return_membrane)
    return _BACKEND_FNS[chosen](x, params, inv_tau, return_membrane=return_membrane)
