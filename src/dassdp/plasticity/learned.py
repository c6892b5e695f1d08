"""Learned kernel width and amplitude: ``DASSDPConfig(learn=("sigma", "amplitude"))``.

Per site the rule's kernel width ``sigma`` and an amplitude scale ``a`` (``dW_t = clip(a D_t)``)
are learned from the task loss by the one-step hypergradient of the next step's loss
``L_{t+1}``. The update ``D_t`` (and ``dD_t/dsigma``, computed in the same GEMM) is kept after
it is all-reduced; at the next step the gradient in the site weight's ``.grad`` is
``g_{t+1} = dL_{t+1}/dW`` at the weights ``dW_t`` moved, so::

    h_sigma = <g_{t+1}, a dD_t/dsigma>        h_a = <g_{t+1}, D_t>

(entries where the clip binds excluded: ``d clip(x)/dx = 0`` there) are the exact derivatives
of ``L_{t+1}`` in ``sigma`` and ``a``. Both values live in log space (float64 0-d tensors on the
steps' device): ``log v -= lr * v * h``, clamped to the configured range.

Everything stays on the device: whether a step counts is a 0/1 tensor ``ok``, a skipped step
moves neither value, and under DDP ``g`` (DDP's all-reduce) and ``D_t`` (the learner's) are
the same on every rank, so the learned values are too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from dassdp.plasticity.config import DASSDPConfig
from dassdp.plasticity.gate import to_device

__all__ = ["LearnedRule"]


class LearnedRule:
    """The learned ``sigma`` and ``a`` of every site, the last update the next step learns from,
    and the hypergradient step.

    Args:
        config: the learner's config (``learn``, the rates, the ranges, ``clip``, ``control``).
        sites: the site names.

    Attributes:
        values: per site ``{"log_sigma", "log_amplitude"}``, 0-d float64 tensors.
        prev: per site ``(step index, D_t, dD_t/dsigma or None)`` of the last update applied.
        learns_sigma: sigma is learned and ``dW`` depends on it (not under ``uniform_drift``).
    """

    def __init__(self, config: DASSDPConfig, sites: Iterable[str]) -> None:
        self.config = config
        self.sites = list(sites)
        self.learns_sigma = "sigma" in config.learn and config.control != "uniform_drift"
        self.values: dict[str, dict[str, Tensor]] = {}
        self.prev: dict[str, tuple[int, Tensor, Tensor | None]] = {}
        self.reset()

    def reset(self) -> None:
        """Every site's log sigma = log(config.sigma), log a = 0; no stored update."""
        log_sigma = math.log(self.config.sigma)  # inf for sigma=inf (then not learned)
        self.values = {
            name: {
                "log_sigma": torch.full((), log_sigma, dtype=torch.float64),
                "log_amplitude": torch.zeros((), dtype=torch.float64),
            }
            for name in self.sites
        }
        self.prev = {}

    def sigma(self, name: str) -> Tensor:
        """The site's current kernel width (0-d float64 on the device)."""
        return torch.exp(self.values[name]["log_sigma"])

    # --------------------------------------------------------------------- step
    def step(self, name: str, weight: Tensor, ok: Tensor, step_index: int) -> dict[str, Tensor]:
        """One hypergradient step of the site's log sigma and log a.

        Args:
            name: the site.
            weight: the site weight ``[C_out, C_in, ...]``; its ``.grad`` is ``g_{t+1}``.
            ok: 0-d bool, this step counts (on every rank).
            step_index: the learner's index of this step (the previous one is ``- 1``).

        Returns:
            The metrics ``sigma``, ``amplitude`` (after the step: the values this step's
            update uses) and ``hypergrad_sigma`` / ``hypergrad_amplitude`` for what is learned.
        """
        cfg, state = self.config, self.values[name]
        for key, value in state.items():
            if value.device != weight.device:  # the first step (or after a checkpoint)
                state[key] = to_device(value, weight.device)
        log_s, log_a = state["log_sigma"], state["log_amplitude"]
        h_sigma, h_amp = self._hypergradients(name, weight, torch.exp(log_a), ok, step_index)
        out = {}
        if "sigma" in cfg.learn:
            log_s = state["log_sigma"] = _log_step(log_s, cfg.sigma_lr, h_sigma, cfg.sigma_range)
            out["hypergrad_sigma"] = h_sigma
        if "amplitude" in cfg.learn:
            log_a = _log_step(log_a, cfg.amplitude_lr, h_amp, cfg.amplitude_range)
            state["log_amplitude"] = log_a
            out["hypergrad_amplitude"] = h_amp
        return {"sigma": torch.exp(log_s), "amplitude": torch.exp(log_a), **out}

    def _hypergradients(
        self, name: str, weight: Tensor, a: Tensor, ok: Tensor, step_index: int
    ) -> tuple[Tensor, Tensor]:
        """``(h_sigma, h_a)``, 0-d float64 on the device: the previous step's ``D_t`` and
        ``dD_t/dsigma`` against the gradient now in ``weight.grad`` (``[C_out, C_in, ...]``),
        where ``|a D_t| < clip``.

        0 when there is no previous update to learn from (the first step after warm-up, the
        previous step was skipped or had no records), no ``.grad``, or this step is skipped
        (``ok`` false: a ``where``, so a non-finite gradient cannot leak in).
        """
        zero = torch.zeros((), dtype=torch.float64, device=weight.device)
        prev, grad = self.prev.get(name), weight.grad
        if prev is None or prev[0] != step_index - 1 or grad is None:
            return zero, zero
        _, D_t, dD_t = prev
        D_t = to_device(D_t, weight.device).double()
        g = grad.detach().reshape(D_t.shape).double()
        if self.config.clip is not None:  # d clip(x)/dx = 0 where the clip binds
            g = g * ((a * D_t).abs() < self.config.clip)
        h_amp = torch.where(ok, (g * D_t).sum(), zero)
        if dD_t is None:  # sigma not learned, or dW does not depend on it
            return zero, h_amp
        dD_t = to_device(dD_t, weight.device).double()
        return torch.where(ok, a * (g * dD_t).sum(), zero), h_amp

    def keep(self, name: str, dw: Tensor, ok: Tensor, step_index: int) -> Tensor:
        """Store this step's all-reduced ``D_t`` (and ``dD_t/dsigma``: ``dw`` is then
        ``[2, C_out, C_in]``) for the next step's hypergradient (zero when the step is skipped:
        nothing was applied); return ``a D_t`` (``[C_out, C_in]``)."""
        dD = None
        if self.learns_sigma:
            dw, dD = dw[0], dw[1]
            dD = torch.where(ok, dD, 0.0)
        kept = torch.where(ok, dw, 0.0)
        self.prev[name] = (step_index, kept, dD)
        if "amplitude" not in self.config.learn:
            return dw
        return dw * torch.exp(self.values[name]["log_amplitude"]).to(dw.dtype)

    def forget(self, name: str) -> None:
        """No update this step (DDP: this rank had no records): nothing for the next to learn."""
        self.prev.pop(name, None)

    # ------------------------------------------------------------------- state
    def floats(self) -> dict[str, dict[str, float]]:
        """Per site, the current ``sigma`` and ``amplitude``; two host reads a site."""
        return {
            name: {
                "sigma": math.exp(float(state["log_sigma"])),
                "amplitude": math.exp(float(state["log_amplitude"])),
            }
            for name, state in self.values.items()
        }

    def state_dict(self, step_index: int) -> dict[str, dict[str, Any]]:
        """Per site ``log_sigma``, ``log_amplitude`` (floats: float64, exact) and the last
        step's ``D``, ``dD_dsigma`` (CPU tensors, or None when the next step ignores them)."""
        out = {}
        for name, state in self.values.items():
            prev = self.prev.get(name)
            if prev is None or prev[0] != step_index:  # stale: the next step ignores it
                prev = (0, None, None)
            D_t, dD = (None if t is None else t.detach().cpu().clone() for t in prev[1:])
            out[name] = {
                "log_sigma": float(state["log_sigma"]),
                "log_amplitude": float(state["log_amplitude"]),
                "D": D_t,
                "dD_dsigma": dD,
            }
        return out

    def load_state_dict(self, learned: Mapping[str, Any] | None, step_index: int) -> None:
        """Restore :meth:`state_dict`; ``None`` (an older checkpoint, or one written without
        learning) starts from the config."""
        self.reset()
        if learned is None:
            return
        missing = sorted(set(self.sites) - set(learned))
        if missing:
            raise ValueError(f"checkpoint DA-SSDP learned values lack the site(s) {missing}")
        for name in self.sites:
            item = learned[name]
            for key in ("log_sigma", "log_amplitude"):
                self.values[name][key] = torch.full((), float(item[key]), dtype=torch.float64)
            if item.get("D") is not None:
                self.prev[name] = (step_index, item["D"], item.get("dD_dsigma"))


def _log_step(
    log_value: Tensor, lr: float, h: Tensor, bounds: tuple[float, float] | None
) -> Tensor:
    """``log v - lr * v * h`` (gradient descent on ``log v`` for ``dL/dv = h``), clamped to
    ``log`` of ``bounds``."""
    log_value = log_value - lr * torch.exp(log_value) * h
    if bounds is None:
        return log_value
    return log_value.clamp(math.log(bounds[0]), math.log(bounds[1]))
