"""Learned kernel width and amplitude: ``DASSDPConfig(learn=("sigma", "amplitude"))``.

Per site the rule's kernel width ``sigma`` and an amplitude scale ``a`` (``dW_t = clip(a D_t)``)
are learned from the task loss by the one-step hypergradient of the next step's loss
``L_{t+1}``. The update ``D_t`` (and ``dD_t/dsigma``, computed in the same GEMM) is kept after
it is all-reduced; at the next step the gradient in the site weight's ``.grad`` is
``g_{t+1} = dL_{t+1}/dW`` at the weights ``dW_t`` moved, so::

    h_sigma = <g_{t+1}, a dD_t/dsigma>        h_a = <g_{t+1}, D_t>

(entries where the clip binds excluded: ``d clip(x)/dx = 0`` there) are the exact derivatives
of ``L_{t+1}`` in ``sigma`` and ``a``. Both values live in log space (float64 0-d tensors on the
steps' device) and take one step per training step, clamped to the configured range:

- ``hyper_step="plain"``: ``log x -= lr * x * h`` (gradient descent on ``log x``; ``x h`` is
  ``dL/dlog x``), so the change scales with the task's gradients;
- ``hyper_step="normalized"``: ``log x -= hyper_lr * h / RMS(h)``, the RMS a bias-corrected
  running mean of ``h^2`` over the steps that had a hypergradient (:func:`normalized_step`),
  so a hypergradient of constant sign moves ``log x`` by ``hyper_lr`` a step at any scale.

Everything stays on the device: whether a step counts is a 0/1 tensor ``ok``, a skipped step
moves neither value, and under DDP ``g`` (DDP's all-reduce) and ``D_t`` (the learner's) are
the same on every rank, so ``h``, the running means and the learned values are too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from dassdp.plasticity.config import LEARNABLE, DASSDPConfig
from dassdp.plasticity.gate import to_device

__all__ = ["LearnedRule", "normalized_step"]


class LearnedRule:
    """The learned ``sigma`` and ``a`` of every site, the last update the next step learns from,
    and the hypergradient step.

    Args:
        config: the learner's config (``learn``, the rates, the ranges, ``clip``, ``control``).
        sites: the site names.

    Attributes:
        values: per site ``{"log_sigma", "log_amplitude"}`` and, with
            ``hyper_step="normalized"``, per learned ``x`` the running mean ``h2_x`` of
            ``h^2`` and the count ``steps_x`` of steps with a hypergradient: 0-d float64.
        prev: per site ``(step index, D_t, dD_t/dsigma or None, counted)`` of the last
            update (``counted``: 0-d bool on the device, that step was not skipped).
        learns_sigma: sigma is learned and ``dW`` depends on it (not under ``uniform_drift``).
    """

    def __init__(self, config: DASSDPConfig, sites: Iterable[str]) -> None:
        self.config = config
        self.sites = list(sites)
        self.learns_sigma = "sigma" in config.learn and config.control != "uniform_drift"
        self.values: dict[str, dict[str, Tensor]] = {}
        self.prev: dict[str, tuple[int, Tensor, Tensor | None, Tensor]] = {}
        self.normalized = config.hyper_step == "normalized"
        self.reset()

    def reset(self) -> None:
        """Every site's log sigma = log(config.sigma), log a = log(config.amplitude_init),
        running means and counts 0; no stored update."""
        cfg = self.config
        start = {"log_sigma": math.log(cfg.sigma), "log_amplitude": math.log(cfg.amplitude_init)}
        if self.normalized:  # (log sigma is inf for sigma=inf: then it is not learned)
            start |= {f"{k}_{x}": 0.0 for x in cfg.learn for k in ("h2", "steps")}
        self.values = {
            name: {k: torch.full((), v, dtype=torch.float64) for k, v in start.items()}
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
        a = torch.exp(state["log_amplitude"])
        h = self._hypergradients(name, weight, a, ok, step_index)
        out = {}
        for x in (x for x in LEARNABLE if x in cfg.learn):
            self._step_value(state, x, h[x], h["valid"])
            out[f"hypergrad_{x}"] = h[x]
        return {
            "sigma": torch.exp(state["log_sigma"]),
            "amplitude": torch.exp(state["log_amplitude"]),
            **out,
        }

    def _step_value(self, state: dict[str, Tensor], x: str, h: Tensor, valid: Tensor) -> None:
        """One ``hyper_step`` of ``log x`` (``x``: ``"sigma"`` or ``"amplitude"``) for its
        hypergradient ``h``; ``valid``: the step has one (a 0-d bool)."""
        cfg, key = self.config, f"log_{x}"
        bounds = cfg.sigma_range if x == "sigma" else cfg.amplitude_range
        if not self.normalized:
            lr = cfg.sigma_lr if x == "sigma" else cfg.amplitude_lr
            state[key] = _log_step(state[key], lr, h, bounds)
            return
        h2, steps = f"h2_{x}", f"steps_{x}"
        state[key], state[h2], state[steps] = normalized_step(
            state[key], h, state[h2], state[steps], valid,
            lr=cfg.hyper_lr, beta=cfg.hyper_beta, bounds=bounds,
        )  # fmt: skip

    def _hypergradients(
        self, name: str, weight: Tensor, a: Tensor, ok: Tensor, step_index: int
    ) -> dict[str, Tensor]:
        """``sigma``, ``amplitude``: ``h_sigma``, ``h_a``, 0-d float64 on the device, the
        previous step's ``D_t`` and ``dD_t/dsigma`` against the gradient now in
        ``weight.grad`` (``[C_out, C_in, ...]``), where ``|a D_t| < clip``; ``valid``: 0-d
        bool, there was an update to learn from and this step counts.

        ``h`` is 0 and ``valid`` false when there is no previous update to learn from (the
        first step after warm-up, the previous step was skipped or had no records), no
        ``.grad``, or this step is skipped (``ok`` false: a ``where``, so a non-finite
        gradient cannot leak in).
        """
        zero = torch.zeros((), dtype=torch.float64, device=weight.device)
        prev, grad = self.prev.get(name), weight.grad
        if prev is None or prev[0] != step_index - 1 or grad is None:
            return {"sigma": zero, "amplitude": zero, "valid": torch.zeros_like(ok)}
        _, D_t, dD_t, counted = prev
        D_t = to_device(D_t, weight.device).double()
        g = grad.detach().reshape(D_t.shape).double()
        if self.config.clip is not None:  # d clip(x)/dx = 0 where the clip binds
            g = g * ((a * D_t).abs() < self.config.clip)
        h = {"amplitude": torch.where(ok, (g * D_t).sum(), zero), "sigma": zero}
        if dD_t is not None:  # sigma learned, and dW depends on it
            dD_t = to_device(dD_t, weight.device).double()
            h["sigma"] = torch.where(ok, a * (g * dD_t).sum(), zero)
        return {**h, "valid": ok & to_device(counted, ok.device)}

    def keep(self, name: str, dw: Tensor, ok: Tensor, step_index: int) -> Tensor:
        """Store this step's all-reduced ``D_t`` (and ``dD_t/dsigma``: ``dw`` is then
        ``[2, C_out, C_in]``) for the next step's hypergradient (zero when the step is skipped:
        nothing was applied); return ``a D_t`` (``[C_out, C_in]``)."""
        dD = None
        if self.learns_sigma:
            dw, dD = dw[0], dw[1]
            dD = torch.where(ok, dD, 0.0)
        kept = torch.where(ok, dw, 0.0)
        self.prev[name] = (step_index, kept, dD, ok)
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
        """Per site the values as floats (float64: exact): ``log_sigma``, ``log_amplitude``
        and, with ``hyper_step="normalized"``, ``h2_<x>`` and ``steps_<x>`` per learned ``x``
        (with ``D_counted``, whether the step that made ``D`` counted); and the last step's
        ``D``, ``dD_dsigma`` (CPU tensors, or None when the next step ignores them)."""
        out = {}
        for name, state in self.values.items():
            prev = self.prev.get(name)
            fresh = prev is not None and prev[0] == step_index  # else the next step ignores it
            D_t, dD = (
                (None if t is None else t.detach().cpu().clone() for t in prev[1:3])
                if fresh
                else (None, None)
            )
            out[name] = {**{k: float(v) for k, v in state.items()}, "D": D_t, "dD_dsigma": dD}
            if self.normalized:
                out[name]["D_counted"] = bool(prev[3]) if fresh else False
        return out

    def load_state_dict(self, learned: Mapping[str, Any] | None, step_index: int) -> None:
        """Restore :meth:`state_dict`; ``None`` (an older checkpoint, or one written without
        learning) starts from the config, and so do running means it lacks (one written with
        ``hyper_step="plain"``)."""
        self.reset()
        if learned is None:
            return
        missing = sorted(set(self.sites) - set(learned))
        if missing:
            raise ValueError(f"checkpoint DA-SSDP learned values lack the site(s) {missing}")
        for name in self.sites:
            item, state = learned[name], self.values[name]
            for key in state:
                if key in item or key.startswith("log_"):  # the log values are required
                    state[key] = torch.full((), float(item[key]), dtype=torch.float64)
            if item.get("D") is not None:
                counted = torch.tensor(bool(item.get("D_counted", True)))
                self.prev[name] = (step_index, item["D"], item.get("dD_dsigma"), counted)


def _log_step(
    log_value: Tensor, lr: float, h: Tensor, bounds: tuple[float, float] | None
) -> Tensor:
    """``log v - lr * v * h`` (gradient descent on ``log v`` for ``dL/dv = h``), clamped to
    ``log`` of ``bounds``."""
    return _clamp(log_value - lr * torch.exp(log_value) * h, bounds)


def normalized_step(
    log_value: Tensor,
    h: Tensor,
    h2: Tensor,
    steps: Tensor,
    valid: Tensor,
    *,
    lr: float,
    beta: float,
    bounds: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One scale-free step of a learned value's log for its hypergradient ``h``.

    ``h2 <- beta h2 + (1 - beta) h^2`` and ``steps <- steps + 1`` where ``valid``, then
    ``log_value - lr * h / sqrt(h2 / (1 - beta^steps))`` (0 while ``h2`` is 0), clamped to
    ``log`` of ``bounds``. For ``h`` constant, of any sign and size, the bias-corrected mean
    is ``h^2`` exactly and every step moves ``log_value`` by ``lr``: ``lr`` is a rate in
    log-change per step; a noisy ``h`` moves it by less.

    Args:
        log_value, h, h2, steps: 0-d float64 tensors on one device.
        valid: 0-d bool, ``h`` is a hypergradient (else ``h`` is 0 and the running mean and
            count stay).
        lr: the rate, > 0. beta: the running mean's decay, in ``[0, 1)``.

    Returns:
        The new ``(log_value, h2, steps)``.
    """
    steps = steps + valid.to(steps.dtype)
    h2 = torch.where(valid, beta * h2 + (1 - beta) * h * h, h2)
    rms = torch.sqrt(h2 / (1 - beta**steps))
    step = torch.where(h2 > 0, h / rms, torch.zeros_like(h))
    return _clamp(log_value - lr * step, bounds), h2, steps


def _clamp(log_value: Tensor, bounds: tuple[float, float] | None) -> Tensor:
    if bounds is None:
        return log_value
    return log_value.clamp(math.log(bounds[0]), math.log(bounds[1]))
