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

Latencies are integers in ``0..T``, so a unit's state is one of ``2(T+1)`` values
``s = v + (T+1) f`` (latency ``v``, fired ``f``) and the per-pair term is a table over states,
``F[s_j, s_i] = K[v_j, v_i] ((A+ + A-) q_j p_i - A-)`` with ``K[v, u]`` the ``(T+1) x (T+1)``
kernel table. The batch sum is then one GEMM with inner size ``B S``::

    dW = clip((1/B) X @ Y, -c, c)    X[j, (s, b)] = G[b] 1[state_post[b, j] = s]
                                     Y[(s, b), i] = F[s, state_pre[b, i]]

where ``S`` counts the postsynaptic states taken into the GEMM (``post_states`` of
:func:`delta_w`): all ``2(T+1)``, the ones that occur (one host read), or, when "fired" means
"active at some step" (:func:`fired_latency`, the recorder's default), the ``T + 1`` states a
unit can then be in (a fired unit's latency is below ``T``; all silent units share one latency),
a fixed set that needs no look at the data. States that do not occur give zero rows, so every
choice gives the same ``dW``. The batch is split into chunks whose
factors stay near :data:`FACTOR_BUDGET` bytes: memory is ``O(C_out C_in)`` for the output plus
that budget; no ``[B, C_out, C_in]`` tensor is ever built.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

LATENCY_MODES = ("first", "last")
POST_STATES = ("auto", "occurring", "all", "spiked")


class Activity(NamedTuple):
    """One population's summary: ``fired [B, C]`` (bool) and ``latency [B, C]`` (an integer
    tensor; :func:`fired_latency` and the recorder give int32, which indexes like long at half
    the memory)."""

    fired: Tensor
    latency: Tensor


def first_last_active(active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per unit: any step active, first active step, last active step.

    Args:
        active: ``[T, B, C]`` boolean activity.

    Returns:
        ``(any [B, C] bool, first [B, C] int32, last [B, C] int32)``; ``first``/``last`` are
        0 where ``any`` is False.
    """
    _check_time_major(active)
    T = active.shape[0]
    m_first = _step_max(active, "first")  # T - first step, 0 if silent
    m_last = _step_max(active, "last")  # last step + 1, 0 if silent
    fired = m_last > 0
    first = m_first.to(torch.int32).neg_().add_(T).mul_(fired)
    last = m_last.to(torch.int32).sub_(fired.to(torch.int32))
    return fired, first, last


def _step_max(active: Tensor, latency: str) -> Tensor:
    """``max_t active[t] * w[t]`` over time with weights ``w = T - t`` (``"first"``) or
    ``t + 1`` (``"last"``): 0 for a silent unit, else ``T - first`` or ``last + 1``.

    One broadcast multiply and one reduction in the smallest integer type that holds ``T``;
    on the CPU this is an order of magnitude faster than a loop of masked fills or an argmax.
    """
    T = active.shape[0]
    wdtype = torch.uint8 if T <= 255 else torch.int32
    steps = torch.arange(T, device=active.device, dtype=torch.int32)
    w = (T - steps if latency == "first" else steps + 1).to(wdtype).view(T, 1, 1)
    return (active.view(torch.uint8) if wdtype == torch.uint8 else active.to(wdtype)).mul(w).amax(0)


def _check_time_major(active: Tensor, any_dtype: bool = False) -> None:
    if active.dim() != 3 or active.shape[0] == 0:
        raise ValueError(f"activity must be [T, B, C] with T >= 1, got shape {tuple(active.shape)}")
    if not any_dtype and active.dtype != torch.bool:
        raise ValueError(f"activity must be a bool tensor here, got {active.dtype}")


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
        :class:`Activity` with ``fired [B, C]`` bool and ``latency [B, C]`` int32 in ``0..T``.
    """
    if latency not in LATENCY_MODES:
        raise ValueError(f"latency must be one of {LATENCY_MODES}, got {latency!r}")
    _check_time_major(active, any_dtype=True)
    active = active if active.dtype == torch.bool else active != 0
    T = active.shape[0]
    m = _step_max(active, latency)
    fired = m > 0
    tau = m.to(torch.int32)
    tau = tau.neg_().add_(T) if latency == "first" else tau.sub_(1)  # silent: T or -1
    fill = _silent_fill(T, silent)
    return Activity(fired, tau.masked_fill_(~fired, fill))


def finalize_latency(fired: Tensor, tau: Tensor, T: int, silent: int | None = None) -> Tensor:
    """Give silent units their latency (``T`` unless ``silent`` is set); checks the range."""
    return torch.where(fired, tau, torch.full_like(tau, _silent_fill(T, silent)))


def _silent_fill(T: int, silent: int | None) -> int:
    fill = T if silent is None else silent
    if not 0 <= fill <= T:
        raise ValueError(f"silent latency must be in 0..T={T}, got {fill}")
    return fill


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
    sigma: float | Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    sigma_grad: bool = False,
) -> Tensor:
    """Latency kernel ``K[v, u] = exp(-(v - u)^2 / (2 sigma^2))`` for ``v, u`` in ``0..T``.

    ``sigma = inf`` gives a table of ones (the no-kernel ablation). ``sigma`` may be a 0-d
    tensor on ``device`` (a learned width: nothing is read back to the host; it must be
    finite and > 0, which is not checked).

    With ``sigma_grad=True`` the derivative ``dK/dsigma = K (v - u)^2 / sigma^3`` is stacked
    behind ``K``: a ``[2, T+1, T+1]`` tensor (``K``, ``dK/dsigma``).

    Returns:
        ``[T+1, T+1]`` tensor (``[2, T+1, T+1]`` with ``sigma_grad``).
    """
    if T < 0:
        raise ValueError(f"T must be >= 0, got {T}")
    tensor = isinstance(sigma, Tensor)
    if not tensor and not sigma > 0:
        raise ValueError(f"sigma must be > 0 (inf allowed), got {sigma}")
    steps = torch.arange(T + 1, dtype=dtype, device=device)
    diff = steps[:, None] - steps[None, :]
    if not tensor and math.isinf(sigma):
        K = torch.ones_like(diff)
        return torch.stack((K, torch.zeros_like(diff))) if sigma_grad else K
    if tensor:
        sigma = sigma.to(dtype=dtype, device=diff.device)
    sq = diff**2
    K = torch.exp(-sq / (2.0 * sigma**2))
    if not sigma_grad:
        return K
    return torch.stack((K, K * sq / sigma**3))


def _check_delta_w_args(
    pre: Activity, post: Activity, T: int, *, post_states: str, check: bool
) -> None:
    """:func:`delta_w`'s checks of its activities (batch, dtypes; with ``check`` the latency
    range, read back to the host) and of ``post_states``."""
    _check_batch(pre.fired, post.fired)
    if post_states not in POST_STATES:
        raise ValueError(f"post_states must be one of {POST_STATES}, got {post_states!r}")
    _check_dtype(pre.latency, "pre")
    _check_dtype(post.latency, "post")
    if check:
        _check_latency(pre.latency, T, "pre")
        _check_latency(post.latency, T, "post")


def delta_w(
    pre: Activity,
    post: Activity,
    gate: Tensor | None,
    *,
    T: int,
    A_plus: float,
    A_minus: float,
    sigma: float | Tensor,
    clip: float | None = None,
    dtype: torch.dtype = torch.float32,
    chunk: int | None = None,
    post_states: str = "auto",
    silent_post: int | None = None,
    check: bool = True,
    sigma_grad: bool = False,
) -> Tensor:
    """The DA-SSDP weight change as one GEMM over unit states (module docstring).

    Args:
        pre: presynaptic :class:`Activity`, ``[B, C_in]`` each.
        post: postsynaptic :class:`Activity`, ``[B, C_out]`` each.
        gate: ``[B]`` per-sample dopamine gate ``G``; ``None`` means ``G = 1``.
        T: number of time steps (latencies lie in ``0..T``).
        A_plus, A_minus: potentiation / depression amplitudes.
        sigma: kernel width in time steps (``inf``: no kernel), or a 0-d tensor on the
            activity's device (a learned width; finite and > 0, not checked, not read back).
        clip: clip ``dW`` to ``[-clip, clip]``; ``None``: no clipping.
        dtype: compute dtype (float32 or float64).
        chunk: samples per GEMM; ``None`` sizes it so that one chunk's factors (``chunk * S *
            (C_in + C_out)`` elements) and state indices take about :data:`FACTOR_BUDGET` bytes.
        post_states: which postsynaptic states enter the GEMM (:data:`POST_STATES`):
            ``"occurring"`` (those that occur: fewest FLOPs, one host read and a boolean-mask
            selection), ``"all"`` (all ``2(T+1)``: no host read, up to twice the FLOPs),
            ``"spiked"`` (the ``T + 1`` states possible when ``post.fired`` means "active at some
            step" and silent units have latency ``silent_post``: no host read, the FLOPs of
            ``"occurring"``; the caller guarantees that structure, which ``check`` verifies),
            ``"auto"`` (``"occurring"`` on the CPU, ``"all"`` on other devices).
        silent_post: latency of a silent postsynaptic unit for ``post_states="spiked"``
            (``None``: ``T``).
        check: verify the latency range (and the ``"spiked"`` structure); each check reads a
            value back to the host, so the learner runs them in debug mode only.
        sigma_grad: also return ``dW/dsigma`` (the learned kernel width's hypergradient
            needs it), computed in the same pass: the table ``F`` and its derivative (``K``
            replaced by ``dK/dsigma = K (v-u)^2 / sigma^3``) are placed side by side, so each
            chunk is one gather and one GEMM with ``2 C_in`` output columns. Needs
            ``clip=None`` (the derivative of a clipped update is the caller's business).

    Returns:
        ``[C_out, C_in]`` weight change (unclipped when ``clip`` is None); with
        ``sigma_grad``, ``[2, C_out, C_in]``: the unclipped change and its ``d/dsigma``.
    """
    _check_delta_w_args(pre, post, T, post_states=post_states, check=check)
    B, C_out = post.fired.shape
    C_in = pre.fired.shape[1]
    device = post.fired.device
    if sigma_grad and clip is not None:
        raise ValueError(f"sigma_grad=True needs clip=None (dW is returned unclipped), got {clip}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
    F = state_table(T, sigma, A_plus, A_minus, dtype=dtype, device=device, sigma_grad=sigma_grad)
    k = 2 if sigma_grad else 1  # tables side by side: F[s, (k, s_pre)]
    if sigma_grad:
        F = torch.cat((F[0], F[1]), dim=1)  # [2(T+1), 2 * 2(T+1)]
    width = k * C_in  # output columns of the GEMM
    G = torch.ones(B, dtype=dtype, device=device) if gate is None else gate.to(dtype)
    if G.shape != (B,):
        raise ValueError(f"gate must have shape [B]=[{B}], got {tuple(G.shape)}")

    def samples(states: int) -> int:  # per chunk: two factors and one row of long states
        per_sample = states * (width + C_out) * F.element_size() + 8 * max(width, C_out)
        budget = FACTOR_BUDGET if device.type == "cpu" else FACTOR_BUDGET_GPU
        return chunk or max(1, budget // max(1, per_sample))

    E = torch.eye(F.shape[0], dtype=dtype, device=device)  # one-hot rows of the states
    if post_states == "auto":
        post_states = "occurring" if device.type == "cpu" else "all"
    if post_states == "occurring":
        # The postsynaptic states that occur (one host sync); X's rows for the others are zero.
        occurs = torch.zeros(F.shape[0], dtype=torch.bool, device=device)
        scan = samples(F.shape[0])
        for lo in range(0, B, scan):
            occurs.index_fill_(0, _states(post, slice(lo, lo + scan), T).flatten(), True)
        E, F = E[occurs], F[occurs]  # [S, 2(T+1)] each
    elif post_states == "spiked":
        # A fixed set in ascending order (as "occurring" would select them when all occur):
        # the silent state (latency silent_post, not fired), then fired with latency 0..T-1.
        fill = _silent_fill(T, silent_post)
        if check:
            _check_spiked(post, T, fill)
        E = torch.cat((E[fill : fill + 1], E[T + 1 : 2 * T + 1]))
        F = torch.cat((F[fill : fill + 1], F[T + 1 : 2 * T + 1]))
    S = F.shape[0]
    n = samples(S)
    dw = torch.zeros(C_out, width, dtype=dtype, device=device)
    for lo in range(0, B, n):
        part = slice(lo, lo + n)
        m = post.fired[part].shape[0]
        # X^T[(s, b), j] = G[b] E[s, state_post[b, j]];  Y[(s, b), i] = F[s, state_pre[b, i]]
        Xt = E.index_select(1, _states(post, part, T).flatten()).view(S, m, C_out)
        Xt.mul_(G[part].view(1, m, 1))
        pre_states = _states(pre, part, T)
        if sigma_grad:  # Y[(s, b), (k, i)] = F_k[s, state_pre[b, i]]: the k-th table's columns
            pre_states = torch.stack((pre_states, pre_states + 2 * (T + 1)), dim=1)
        Y = F.index_select(1, pre_states.flatten())  # [S, m * width]
        dw.addmm_(Xt.view(S * m, C_out).T, Y.view(S * m, width), alpha=1.0 / B)
        del Xt, Y
    if sigma_grad:
        return dw.view(C_out, 2, C_in).transpose(0, 1).contiguous()
    return dw.clamp_(-clip, clip) if clip is not None else dw


FACTOR_BUDGET = 1 << 18
"""Bytes the two factors of one :func:`delta_w` chunk take by default (256 KiB): small
enough to stay in cache and to keep the rule's peak memory near its output's, large enough
that the GEMM runs near full speed (``dassdp bench rule``)."""

FACTOR_BUDGET_GPU = 1 << 26
"""The same on a GPU (64 MiB): there a chunk costs kernel launches, not cache misses, and at
the paper's site sizes the whole batch is one chunk (measured on an H200: the CPU budget made
``delta_w`` launch-bound, slower than the pairwise form)."""


def state_table(
    T: int,
    sigma: float | Tensor,
    A_plus: float,
    A_minus: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    sigma_grad: bool = False,
) -> Tensor:
    """The per-pair term as a table over unit states ``s = v + (T+1) f`` (latency ``v``,
    fired ``f``): ``F[s_post, s_pre] = K[v, u] ((A+ + A-) q p - A-)``, ``[2(T+1), 2(T+1)]``.

    With ``sigma_grad=True``: ``[2, 2(T+1), 2(T+1)]``, ``F`` and ``dF/dsigma`` (the same
    table with ``K`` replaced by ``dK/dsigma``, :func:`kernel_table`)."""
    K = kernel_table(T, sigma, dtype=dtype, device=device, sigma_grad=sigma_grad)
    fired = torch.arange(2 * (T + 1), device=device) > T
    both = (fired[:, None] & fired[None, :]).to(dtype)
    reps = (1, 2, 2) if sigma_grad else (2, 2)
    return K.repeat(*reps) * ((A_plus + A_minus) * both - A_minus)


def _states(act: Activity, part: slice, T: int) -> Tensor:
    """``latency + (T+1) fired`` for the samples in ``part``: ``[m, C]`` long."""
    return torch.add(act.latency[part].long(), act.fired[part], alpha=T + 1)


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


def _check_dtype(latency: Tensor, name: str) -> None:
    if latency.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} latency must be int32 or int64, got {latency.dtype}")


def _check_latency(latency: Tensor, T: int, name: str) -> None:
    """Latencies in ``0..T`` (two host reads)."""
    if latency.numel() and (int(latency.min()) < 0 or int(latency.max()) > T):
        raise ValueError(f"{name} latency out of range 0..T={T}")


def _check_spiked(act: Activity, T: int, fill: int) -> None:
    """``post_states="spiked"``: fired units have latency ``< T``, silent ones ``fill`` (a host
    read). A unit outside these ``T + 1`` states would be dropped from ``dW`` without it."""
    fired = act.fired.to(torch.bool)
    ok = torch.where(fired, act.latency < T, act.latency == fill)
    if not bool(ok.all()):
        raise ValueError(
            f"post_states='spiked' needs fired post units to have latency < T={T} and silent "
            f"ones latency {fill}; some do not (use post_states='occurring' or 'all')"
        )
