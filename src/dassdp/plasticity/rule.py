r"""The DA-SSDP rule as pure tensor functions (no module state).

Notation (DESIGN §1): batch ``B``, time steps ``T`` (t = 0..T-1), presynaptic units ``i``
(``C_in``), postsynaptic units ``j`` (``C_out``). Activity ``s[t, b, c]`` is boolean.

* fired indicator   ``p[b,i] = any_t s_pre[t,b,i]``, ``q[b,j] = any_t s_post[t,b,j]``
* latency           ``tau[b,c] = min{t : s[t,b,c]}`` (``"first"``) or ``max{t : s}`` (``"last"``,
  the released code's convention); a silent unit gets ``T`` (or a chosen constant)
* co-firing         ``lam[b,j,i] = q[b,j] p[b,i]``
* latency kernel    ``g[b,j,i] = exp(-(tau_post[b,j] - tau_pre[b,i])^2 / (2 sigma^2))``
* synchrony         ``S[b] = mean_{j,i} lam[b,j,i] = mean_j q[b,j] * mean_i p[b,i]``
* update            ``dW[j,i] = clip((1/B) sum_b G[b] g[b,j,i] (A+ lam - A- (1 - lam)), -c, c)``

Latencies are integers in ``0..T``, so the kernel is a ``(T+1) x (T+1)`` table ``K[v,u]`` and
the batch sum factorises into two GEMMs with inner size ``B*(T+1)``::

    sum_b G g      = X  @ Y     X[j,(b,v)] = G[b] 1[tau_post[b,j] = v]
                                Y[(b,v),i] = K[v, tau_pre[b,i]]
    sum_b G lam g  = X' @ Y'    X' = X * q[b,j],  Y' = Y * p[b,i]
    dW = clip(((A+ + A-) X'Y' - A- XY) / B, -c, c)

Memory is ``O(B (T+1) (C_in + C_out))``; no ``[B, C_out, C_in]`` tensor is ever built.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

LATENCY_MODES = ("first", "last")


class Activity(NamedTuple):
    """One population's summary: ``fired [B, C]`` (bool) and ``latency [B, C]`` (long)."""

    fired: Tensor
    latency: Tensor


def first_last_active(active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per unit: any step active, first active step, last active step.

    Args:
        active: ``[T, B, C]`` boolean activity.

    Returns:
        ``(any [B, C] bool, first [B, C] long, last [B, C] long)``; ``first``/``last`` are
        0 where ``any`` is False. (A loop of in-place masked fills over T: several times
        faster on CPU than an argmax over a uint8 copy.)
    """
    if active.dim() != 3:
        raise ValueError(f"activity must be [T, B, C], got shape {tuple(active.shape)}")
    T = active.shape[0]
    fired = active[0].clone()
    first = torch.zeros(active.shape[1:], dtype=torch.long, device=active.device)
    last = torch.zeros_like(first)
    for t in range(1, T):
        fired |= active[t]
        last.masked_fill_(active[t], t)
    for t in range(T - 1, -1, -1):
        first.masked_fill_(active[t], t)
    return fired, first, last


def fired_latency(
    active: Tensor,
    latency: str = "first",
    silent: int | None = None,
) -> Activity:
    """Fired indicator and spike latency from time-major activity.

    Args:
        active: ``[T, B, C]`` activity (bool, or a tensor read as ``!= 0``).
        latency: ``"first"`` (first active step, the paper) or ``"last"`` (last active step,
            the released code).
        silent: latency of a silent unit; ``None`` means ``T``.

    Returns:
        :class:`Activity` with ``fired [B, C]`` bool and ``latency [B, C]`` long in ``0..T``.
    """
    if latency not in LATENCY_MODES:
        raise ValueError(f"latency must be one of {LATENCY_MODES}, got {latency!r}")
    T = active.shape[0] if active.dim() == 3 else 0
    fired, first, last = first_last_active(active.bool() if active.dtype != torch.bool else active)
    tau = first if latency == "first" else last
    return Activity(fired, finalize_latency(fired, tau, T, silent))


def finalize_latency(fired: Tensor, tau: Tensor, T: int, silent: int | None = None) -> Tensor:
    """Give silent units their latency (``T`` unless ``silent`` is set); checks the range."""
    fill = T if silent is None else silent
    if not 0 <= fill <= T:
        raise ValueError(f"silent latency must be in 0..T={T}, got {fill}")
    return torch.where(fired, tau, torch.full_like(tau, fill))


def synchrony(pre_fired: Tensor, post_fired: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Batch synchrony ``S[b] = mean_j q[b,j] * mean_i p[b,i]``.

    Args:
        pre_fired: ``[B, C_in]`` fired indicator ``p``.
        post_fired: ``[B, C_out]`` fired indicator ``q``.

    Returns:
        ``[B]`` tensor in ``[0, 1]``.
    """
    _check_batch(pre_fired, post_fired)
    return post_fired.to(dtype).mean(dim=1) * pre_fired.to(dtype).mean(dim=1)


def kernel_table(
    T: int,
    sigma: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Latency kernel ``K[v, u] = exp(-(v - u)^2 / (2 sigma^2))`` for ``v, u`` in ``0..T``.

    ``sigma = inf`` gives a table of ones (the no-kernel ablation).

    Returns:
        ``[T+1, T+1]`` tensor.
    """
    if T < 0:
        raise ValueError(f"T must be >= 0, got {T}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (inf allowed), got {sigma}")
    steps = torch.arange(T + 1, dtype=dtype, device=device)
    diff = steps[:, None] - steps[None, :]
    if math.isinf(sigma):
        return torch.ones_like(diff)
    return torch.exp(-(diff**2) / (2.0 * sigma**2))


def delta_w(
    pre: Activity,
    post: Activity,
    gate: Tensor | None,
    *,
    T: int,
    A_plus: float,
    A_minus: float,
    sigma: float,
    clip: float | None = None,
    dtype: torch.dtype = torch.float32,
    chunk: int = 32,
) -> Tensor:
    """The DA-SSDP weight change by the factorised two-GEMM form.

    Args:
        pre: presynaptic :class:`Activity`, ``[B, C_in]`` each.
        post: postsynaptic :class:`Activity`, ``[B, C_out]`` each.
        gate: ``[B]`` per-sample dopamine gate ``G``; ``None`` means ``G = 1``.
        T: number of time steps (latencies lie in ``0..T``).
        A_plus, A_minus: potentiation / depression amplitudes.
        sigma: kernel width in time steps (``inf``: no kernel).
        clip: clip ``dW`` to ``[-clip, clip]``; ``None``: no clipping.
        dtype: compute dtype (float32 or float64).
        chunk: samples per GEMM pair; the factors take ``O(chunk (T+1) (C_in + C_out))``.

    Returns:
        ``[C_out, C_in]`` weight change (unclipped when ``clip`` is None).
    """
    _check_batch(pre.fired, post.fired)
    _check_latency(pre.latency, T, "pre")
    _check_latency(post.latency, T, "post")
    B, C_out = post.fired.shape
    device = post.fired.device
    K = kernel_table(T, sigma, dtype=dtype, device=device)  # [T+1, T+1]
    G = torch.ones(B, dtype=dtype, device=device) if gate is None else gate.to(dtype)
    if G.shape != (B,):
        raise ValueError(f"gate must have shape [B]=[{B}], got {tuple(G.shape)}")
    dw = torch.zeros(C_out, pre.fired.shape[1], dtype=dtype, device=device)
    for lo in range(0, B, max(1, chunk)):
        part = slice(lo, lo + chunk)
        X, Y, Xq, Yp = _factors(_rows(pre, part), _rows(post, part), G[part], K)
        # The GEMMs sum unscaled factors (exact sums when g and G are 1); alpha scales after.
        dw.addmm_(Xq, Yp, alpha=(A_plus + A_minus) / B)  # + (A+ + A-)/B sum_b G lam g
        dw.addmm_(X, Y, alpha=-A_minus / B)  # - A-/B sum_b G g
    return dw.clamp_(-clip, clip) if clip is not None else dw


def _rows(act: Activity, part: slice) -> Activity:
    return Activity(act.fired[part], act.latency[part])


def _factors(
    pre: Activity, post: Activity, G: Tensor, K: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For ``n`` samples: ``X [C_out, n(T+1)]``, ``Y [n(T+1), C_in]``, and ``X' = X q``,
    ``Y' = Y p`` (fired-masked), with column/row index ``b (T+1) + v``."""
    n, C_out = post.fired.shape
    V = K.shape[0]  # T + 1
    X = torch.zeros(C_out, n, V, dtype=K.dtype, device=K.device)
    X.scatter_(2, post.latency.T.unsqueeze(2), G.view(1, n, 1).expand(C_out, n, 1))
    X = X.view(C_out, n * V)  # X[j, (b, v)] = G[b] 1[tau_post[b, j] = v]
    Y = K[:, pre.latency].transpose(0, 1).reshape(n * V, -1)  # Y[(b, v), i] = K[v, tau_pre]
    q = post.fired.T.to(K.dtype).repeat_interleave(V, dim=1)  # [C_out, n(T+1)]
    p = pre.fired.to(K.dtype).repeat_interleave(V, dim=0)  # [n(T+1), C_in]
    return X, Y, X * q, Y * p


def _check_batch(pre_fired: Tensor, post_fired: Tensor) -> None:
    if pre_fired.dim() != 2 or post_fired.dim() != 2:
        raise ValueError(
            f"fired indicators must be [B, C]; got pre {tuple(pre_fired.shape)}, "
            f"post {tuple(post_fired.shape)}"
        )
    if pre_fired.shape[0] != post_fired.shape[0]:
        raise ValueError(
            f"pre and post batch sizes differ: {pre_fired.shape[0]} vs {post_fired.shape[0]}"
        )


def _check_latency(latency: Tensor, T: int, name: str) -> None:
    if latency.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} latency must be an integer tensor, got {latency.dtype}")
    if latency.numel() and (int(latency.min()) < 0 or int(latency.max()) > T):
        raise ValueError(f"{name} latency out of range 0..T={T}")
