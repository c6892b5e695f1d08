r"""The dopamine gate: streaming warm-up statistics, the fit, and the gate itself.

During warm-up every sample ``b`` of every step contributes one record ``(S[b], L)``
(its synchrony and its batch's scalar loss). Records are never stored: six float64
running sums are (``n, sum S, sum S^2, sum L, sum L^2, sum S L``), so memory is O(1) and
under DDP the sums are all-reduced before the fit, giving every rank the same gate.

At the end of warm-up, once::

    mu = mean(S),  sd = std(S) (population) + eps,  k = -corr(S, L)  (Pearson)
    G[b] = clip(1 + k (S[b] - mu) / sd, 0, 2)

Mode ``"one"`` fixes ``G = 1`` (the two-factor SSDP rule). A degenerate fit (no records,
zero variance of S or L, non-finite sums) gives ``G = 1`` and a warning that says why.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

GATE_MODES = ("fitted", "one")
GATE_MIN, GATE_MAX = 0.0, 2.0
_N, _S, _S2, _L, _L2, _SL, _SKIP = range(7)


class GateStats:
    """Streaming float64 sums of warm-up records ``(S[b], L)``; non-finite pairs are skipped.

    The sums live on the device of the records (no host synchronisation per step); they
    move to the CPU only for :meth:`state_dict` and the fit.
    """

    def __init__(self) -> None:
        self.sums = torch.zeros(7, dtype=torch.float64)  # the six sums, then the skip count

    def update(self, S: Tensor, loss: float | Tensor, weight: Tensor | None = None) -> None:
        """Add one record per sample: ``S`` is ``[B]``, ``loss`` the batch's scalar loss.

        ``weight``: a 0-d bool (or 0/1) tensor; where false the step adds nothing (a skip
        decided on the device, without reading it back).
        """
        s = S.detach().to(torch.float64).reshape(-1)
        L = torch.as_tensor(loss, dtype=torch.float64, device=s.device).detach().reshape(())
        L = L.expand_as(s)
        ok = torch.isfinite(s) & torch.isfinite(L)
        okf = ok.to(torch.float64)
        s, L = torch.where(ok, s, 0.0), torch.where(ok, L, 0.0)
        row = torch.stack(
            (
                okf.sum(),
                s.sum(),
                (s * s).sum(),
                L.sum(),
                (L * L).sum(),
                (s * L).sum(),
                (1.0 - okf).sum(),
            )
        )
        if weight is not None:
            row = torch.where(weight.to(device=row.device, dtype=torch.bool), row, 0.0)
        if self.sums.device != row.device:
            self.sums = to_device(self.sums, row.device)
        self.sums += row

    @property
    def n(self) -> int:
        return int(self.sums[_N])

    @property
    def skipped(self) -> int:
        """Records dropped because S or L was not finite."""
        return int(self.sums[_SKIP])

    def state_dict(self) -> dict[str, object]:
        return {"sums": self.sums.cpu().tolist()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        sums = torch.tensor(state["sums"], dtype=torch.float64)
        if sums.shape != (7,):
            raise ValueError(f"gate statistics must hold 7 sums, got shape {tuple(sums.shape)}")
        self.sums = sums.to(self.sums.device)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a CPU tensor to ``device`` without a host sync (pinned, non-blocking on CUDA)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class GateFit:
    """A fitted gate: ``G = clip(1 + k (S - mu) / sd, 0, 2)``; ``valid=False`` means ``G = 1``."""

    mu: float = 0.0
    sd: float = 1.0
    k: float = 0.0
    n: int = 0
    valid: bool = False
    reason: str = "not fitted"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def fit_gate(sums: Tensor, eps: float = 1e-8) -> GateFit:
    """Fit ``(mu, sd, k)`` from the running sums (float64; a trailing skip count is ignored).

    Returns a :class:`GateFit`; when the records cannot define a gate it is invalid
    (``G = 1``), its ``reason`` says why and a :class:`RuntimeWarning` is issued.
    """
    n, sS, sS2, sL, sL2, sSL = sums[:6].to(torch.float64).tolist()  # one host read
    reason = _degenerate_reason(n, (sS, sS2, sL, sL2, sSL))
    if reason is None:
        mu, muL = sS / n, sL / n
        var_s = max(sS2 / n - mu * mu, 0.0)
        var_l = max(sL2 / n - muL * muL, 0.0)
        cov = sSL / n - mu * muL
        if var_s <= 0.0:
            reason = f"synchrony is constant over the {n:.0f} warm-up records (std 0)"
        elif var_l <= 0.0:
            reason = f"loss is constant over the {n:.0f} warm-up records (std 0)"
        else:
            # Pearson correlation: both sides normalised by their population std.
            k = -cov / (math.sqrt(var_s) * math.sqrt(var_l))
            k = max(-1.0, min(1.0, k))
            return GateFit(
                mu=mu, sd=math.sqrt(var_s) + eps, k=k, n=int(n), valid=True, reason="fitted"
            )
    warnings.warn(f"DA-SSDP gate set to G = 1: {reason}", RuntimeWarning, stacklevel=2)
    return GateFit(n=int(n), valid=False, reason=reason)


def _degenerate_reason(n: float, values: tuple[float, ...]) -> str | None:
    if not all(math.isfinite(v) for v in (n, *values)):
        return "the warm-up sums are not finite"
    if n < 2:
        return f"only {n:.0f} usable warm-up record(s) (need >= 2)"
    return None


def gate_values(S: Tensor, fit: GateFit | None, mode: str = "fitted") -> Tensor:
    """Per-sample gate ``G[b]`` for synchrony ``S [B]`` (same dtype and device as ``S``)."""
    if mode not in GATE_MODES:
        raise ValueError(f"gate must be one of {GATE_MODES}, got {mode!r}")
    if mode == "one" or fit is None or not fit.valid:
        return torch.ones_like(S)
    return (1.0 + fit.k * (S - fit.mu) / fit.sd).clamp(GATE_MIN, GATE_MAX)
