r"""Input perturbations for robustness evaluation: spike-time jitter, deletion, spurious events.

Every perturbation acts on the model's input *after* temporal encoding, i.e. on a
``[B, T, C, H, W]`` tensor whose element ``x[b, t, c, h, w]`` is the input "event" of
pixel ``(c, h, w)`` at time step ``t``:

- **Event frames** (CIFAR10-DVS, ``[B, T, C, H, W]`` counts) are used as they are.
- **Static images** ``[B, C, H, W]`` with direct encoding are first repeated over ``T``
  (exactly what the model does itself), so each step carries the normalised pixel value as
  an analog input current; the perturbations then act on these ``T`` copies.

With ``g`` a seeded generator (same seed -> the same perturbation for every variant, so
robustness is paired across variants like accuracy):

``jitter`` (sigma_t in time steps)
    every element moves to step ``clamp(t + round(N(0, sigma_t^2)), 0, T-1)``, adding to
    whatever lands there; the per-pixel total over time (the event count) is kept exactly.
    For direct encoding the pixel's current is redistributed over time (some steps get a
    double dose, others none).
``drop`` (p)
    every element is set to 0 with probability ``p`` (a deleted spike / a step without
    input current; in normalised image units 0 is the dataset mean). ``p = 0`` is the
    identity, ``p = 1`` removes every input.
``noise`` (p)
    spurious events: with probability ``p`` an element gets one extra event. Event frames:
    ``+1`` count. Static images: the element is set to the brightest value of its channel
    in the batch (a saturated "salt" pixel at that step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "KINDS",
    "Perturbation",
    "Perturber",
    "drop_events",
    "jitter_events",
    "parse_conditions",
    "repeat_time",
    "spurious_events",
]

KINDS = ("jitter", "drop", "noise")


@dataclass(frozen=True)
class Perturbation:
    """One robustness condition: ``kind`` in :data:`KINDS` (or ``"clean"``) and its value."""

    kind: str
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in (*KINDS, "clean"):
            raise ValueError(f"perturbation must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.value >= 0 or (self.kind in ("drop", "noise") and self.value > 1):
            unit = "a probability in [0, 1]" if self.kind != "jitter" else ">= 0 [time steps]"
            raise ValueError(f"{self.kind} must be {unit}, got {self.value}")

    @property
    def name(self) -> str:
        return "clean" if self.kind == "clean" else f"{self.kind}={self.value:g}"


def parse_conditions(spec: str | Sequence[str]) -> list[Perturbation]:
    """``"jitter=1,drop=0.1,noise=0.05"`` -> one :class:`Perturbation` per item."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (i.strip() for i in items if i.strip()):
        kind, sep, value = item.partition("=")
        try:
            out.append(Perturbation(kind.strip(), float(value)))
        except ValueError as err:
            why = err if sep else f"{item!r} must look like kind=value, e.g. drop=0.1"
            raise ValueError(f"robustness condition: {why}") from None
    return out


def repeat_time(x: Tensor, T: int) -> Tensor:
    """Direct encoding made explicit: images ``[B, C, H, W]`` -> ``[B, T, C, H, W]`` copies."""
    return x.unsqueeze(1).expand(x.shape[0], T, *x.shape[1:]).clone()


def _uniform(shape: torch.Size, g: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=g).to(device)  # drawn on the CPU: device-independent


def jitter_events(x: Tensor, sigma: float, g: torch.Generator) -> Tensor:
    """Move every element of ``x [B, T, ...]`` by a rounded Gaussian number of steps
    (clamped to ``[0, T-1]``); sums over ``T`` are kept. ``sigma = 0`` is the identity."""
    if sigma == 0:
        return x.clone()
    T = x.shape[1]
    shift = torch.randn(x.shape, generator=g).mul_(sigma).round_().long().to(x.device)
    t = torch.arange(T, device=x.device).view(1, T, *([1] * (x.dim() - 2)))
    target = (t + shift).clamp_(0, T - 1)  # [B, T, ...] destination step of each element
    return torch.zeros_like(x).scatter_add_(1, target, x)


def drop_events(x: Tensor, p: float, g: torch.Generator) -> Tensor:
    """Zero every element of ``x`` with probability ``p`` (deleted spikes)."""
    keep = _uniform(x.shape, g, x.device) >= p
    return x * keep.to(x.dtype)


def spurious_events(x: Tensor, p: float, g: torch.Generator, *, frames: bool) -> Tensor:
    """Add one event with probability ``p`` per element of ``x [B, T, C, ...]``.

    ``frames``: event counts get ``+1``; otherwise (direct-encoded images) the element is set
    to its channel's maximum over the batch (a saturated pixel at that step).
    """
    hit = _uniform(x.shape, g, x.device) < p
    if frames:
        return x + hit.to(x.dtype)
    dims = [d for d in range(x.dim()) if d != 2]
    bright = x.amax(dim=dims, keepdim=True).expand_as(x)  # [1, 1, C, 1, 1] -> x's shape
    return torch.where(hit, bright, x)


class Perturber:
    """``perturber(x, T)``: the encoded, perturbed input ``[B, T, C, H, W]`` for one condition.

    ``x``: images ``[B, C, H, W]`` (repeated over ``T``) or event frames ``[B, T, C, H, W]``.
    The generator is seeded once, so a pass over a fixed-order test set is reproducible.
    """

    def __init__(self, perturbation: Perturbation, seed: int = 0) -> None:
        self.perturbation = perturbation
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: Tensor, T: int) -> Tensor:
        frames = x.dim() == 5
        x = x if frames else repeat_time(x, T)  # [B, T, C, H, W]
        kind, value, g = self.perturbation.kind, self.perturbation.value, self.generator
        if kind == "jitter":
            return jitter_events(x, value, g)
        if kind == "drop":
            return drop_events(x, value, g)
        if kind == "noise":
            return spurious_events(x, value, g, frames=frames)
        return x
