"""The naive DA-SSDP rule, written straight from DESIGN §1 with the full [B, C_out, C_in]
pairwise tensors. It lives in the tests only, as the oracle the library's fast form must match."""

from __future__ import annotations

import torch
from torch import Tensor


def naive_latency(s: Tensor, mode: str, silent: int | None = None) -> Tensor:
    """[T, B, C] bool -> [B, C] long: min/max active t; silent -> T (or `silent`)."""
    T = s.shape[0]
    t = torch.arange(T).view(T, 1, 1).expand_as(s)
    if mode == "first":
        lat = torch.where(s, t, torch.full_like(t, 10**9)).min(0).values
    else:
        lat = torch.where(s, t, torch.full_like(t, -1)).max(0).values
    return torch.where(s.any(0), lat, torch.full_like(lat, T if silent is None else silent))


def naive_pairwise(p: Tensor, q: Tensor, tau_pre: Tensor, tau_post: Tensor, sigma: float):
    lam = q.double()[:, :, None] * p.double()[:, None, :]  # [B, C_out, C_in]
    diff = (tau_post[:, :, None] - tau_pre[:, None, :]).double()
    g = torch.ones_like(diff) if sigma == float("inf") else torch.exp(-(diff**2) / (2 * sigma**2))
    return lam, g


def naive_synchrony(p: Tensor, q: Tensor) -> Tensor:
    lam, _ = naive_pairwise(
        p, q, torch.zeros_like(p, dtype=torch.long), torch.zeros_like(q, dtype=torch.long), 1.0
    )
    return lam.mean(dim=(1, 2))


def naive_dw(p, q, tau_pre, tau_post, G, *, A_plus, A_minus, sigma, clip=None) -> Tensor:
    lam, g = naive_pairwise(p, q, tau_pre, tau_post, sigma)
    G = torch.ones(p.shape[0], dtype=torch.float64) if G is None else G.double()
    dw = (G[:, None, None] * g * (A_plus * lam - A_minus * (1 - lam))).mean(0)
    return dw if clip is None else dw.clamp(-clip, clip)


def naive_gate(S_records: Tensor, L_records: Tensor, S: Tensor, eps: float = 1e-8) -> Tensor:
    """Batch fit on explicit record lists, then the gate for S."""
    Sr, Lr = S_records.double(), L_records.double()
    mu, sd = Sr.mean(), Sr.std(unbiased=False) + eps
    zs = (Sr - Sr.mean()) / Sr.std(unbiased=False)
    zl = (Lr - Lr.mean()) / Lr.std(unbiased=False)
    k = -(zs * zl).mean()
    return (1 + k * (S.double() - mu) / sd).clamp(0, 2)


def naive_dw_from_activity(s_pre: Tensor, s_post: Tensor, G, *, latency="first", **kw) -> Tensor:
    """The oracle from raw ``[T, B, C]`` activity: any-step fired, min/max latency, naive dW."""
    return naive_dw(
        s_pre.any(0),
        s_post.any(0),
        naive_latency(s_pre, latency),
        naive_latency(s_post, latency),
        G,
        **kw,
    )
