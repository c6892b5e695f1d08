"""``DASSDPConfig``: the learner's hyper-parameters, checked once, here.

Every other config layer (the engine's ``plasticity:`` block, the Lightning callback) passes
its values through to this class and reports its errors: a :class:`DASSDPConfigError` names
the field (``err.key``) so a caller can say where the value came from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from dassdp.plasticity.gate import GATE_MODES
from dassdp.plasticity.rule import LATENCY_MODES

__all__ = [
    "APPLY_MODES",
    "CONTROLS",
    "DTYPES",
    "HYPER_STEPS",
    "LEARNABLE",
    "DASSDPConfig",
    "DASSDPConfigError",
]

APPLY_MODES = ("post_step", "grad")
CONTROLS = ("none", "shuffled_latency", "random_update", "uniform_drift")
LEARNABLE = ("sigma", "amplitude")
HYPER_STEPS = ("plain", "normalized")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class DASSDPConfigError(ValueError):
    """A :class:`DASSDPConfig` value is not allowed; ``key`` is the field the message is about."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (e.g. raised in a DDP worker)
        return (type(self), (self.key, str(self)))


def _number(value: Any) -> bool:
    """A real number (int or float), not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_nonnegative(cfg: Any, *names: str) -> None:
    """Each field in ``names`` is a finite number >= 0."""
    for name in names:
        value = getattr(cfg, name)
        if not _number(value) or not math.isfinite(value) or value < 0:
            raise DASSDPConfigError(name, f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class DASSDPConfig:
    """DA-SSDP hyper-parameters (plain floats: never parameters of the model).

    Attributes:
        A_plus: potentiation amplitude for co-firing pairs (paper: 1.5e-3).
        A_minus: depression amplitude for the other pairs (paper: 1.0e-4).
        sigma: latency-kernel width in time steps (``inf``: no kernel).
        clip: elementwise bound on ``dW`` (``None``: none).
        warmup_epochs: epochs that only record ``(S, L)``; the gate is fitted after them.
        gate: ``"fitted"`` (DA-SSDP) or ``"one"`` (``G = 1``, two-factor SSDP).
        latency: ``"first"`` spike (paper) or ``"last"`` active step (released code).
        apply: ``"post_step"`` (``W += dW`` when ``step`` is called after ``optimizer.step()``)
            or ``"grad"`` (``W.grad -= dW`` when ``step`` is called between ``backward()``
            and ``optimizer.step()``, so the optimizer scales the change by its learning rate).
        sites: preset name passed to the model's ``dassdp_sites(preset)`` when no sites are
            given (built-in models: ``"default"``, ``"compat"``, ``"classifier"``,
            ``"projection"``).
        control: ``"none"`` or a control that tests whether synchrony carries the effect:
            ``"shuffled_latency"`` (latencies permuted across units each step),
            ``"random_update"`` (random-sign dW of the same norm), ``"uniform_drift"``
            (the constant ``A_plus * mean(G)`` the released code applies to its projection).
        enabled: ``False`` turns the learner into a no-op (hooks record nothing).
        eps: added to the std of S in the gate.
        dtype: compute dtype of dW, ``"float32"`` or ``"float64"``.
        seed: seed of the learner's own generator (controls only; never the global RNG).
        debug: check invariants in every step (latencies in ``0..T``, the unit states the
            rule assumes, a finite ``dW``); each check reads a value back to the host, so it
            is off by default. The environment variable ``DASSDP_DEBUG=1`` turns it on too.
        learn: what each site learns from the task loss, a tuple of ``"sigma"`` and/or
            ``"amplitude"`` (default ``()``: nothing, the fixed rule). Per site the learner
            keeps a kernel width ``sigma`` (initially ``sigma``) and an amplitude scale ``a``
            (initially ``amplitude_init``), both in log space; the update becomes
            ``dW_t = clip(a D_t)`` with
            ``D_t`` the pre-clip rule. At the next step the one-step hypergradients of that
            step's loss ``L_{t+1}`` (whose gradient ``g_{t+1}`` is in the site weight's
            ``.grad``) are ``h_sigma = <g_{t+1}, a dD_t/dsigma>`` and
            ``h_a = <g_{t+1}, D_t>`` (entries where the clip binds excluded), and each value
            takes a step of ``hyper_step`` on its log.
            ``apply="post_step"``: ``step`` runs after ``optimizer.step()``, whose ``.grad``
            (unscaled by a grad scaler, clipped if the loop clips it) is ``g_{t+1}`` at the
            weights ``dW_t`` moved. ``apply="grad"``: ``step`` runs before
            ``optimizer.step()``; the hypergradient reads ``.grad`` before ``dW`` is
            subtracted from it (unscale it first under a grad scaler), and is then exact up
            to the optimizer's per-step scaling of ``dW_t`` (``lr`` for SGD). Without a
            ``.grad`` (``zero_grad()`` called before ``step``), or after a step that applied
            nothing, ``h = 0``; a skipped step moves neither value.
        hyper_step: how a hypergradient moves its value (default ``"normalized"``, chosen
            from a pilot on Fashion-MNIST, docs/results.md §3). ``"plain"``: gradient descent on the
            log, ``log sigma -= sigma_lr * sigma * h_sigma``, ``log a -= amplitude_lr * a *
            h_a``; the change scales with the task's gradient. ``"normalized"``: each ``h``
            divided by a running RMS of itself (Adam's second moment, no first moment):
            ``v_n = hyper_beta v_{n-1} + (1 - hyper_beta) h^2``, ``log x -= hyper_lr * h /
            sqrt(v_n / (1 - hyper_beta^n))``, ``n`` counting the steps that had a
            hypergradient (the first after warm-up and the one after a skipped step have
            none); the change no longer depends on the scale of ``h``.
        sigma_lr, amplitude_lr: ``hyper_step="plain"``'s step sizes, in log-change per unit
            of ``dL/dlog x`` (``>= 0``; default 10: on ``configs/cifar10_cpu.yaml`` the
            per-step ``|h|`` is about 1e-4, so 10 moves a consistently signed value by a
            factor of about e over 1,000 steps; 1 barely moved it in a 5-epoch run).
        hyper_lr: ``hyper_step="normalized"``'s rate (``> 0``) in log-change per step: a
            hypergradient of constant sign and any scale moves ``log sigma`` and ``log a``
            by exactly ``hyper_lr`` a step (default 3e-3: a factor of e over ~330 steps, the
            best of 3e-4, 1e-3, 3e-3 in the pilot); a noisy one by less.
        hyper_beta: ``hyper_step="normalized"``'s decay of the running mean of ``h^2``, in
            ``[0, 1)`` (default 0.999: about the last 1,000 steps; 0: ``h / |h|``, signSGD).
        sigma_range, amplitude_range: ``(lo, hi)`` bounds (``0 < lo <= hi``, finite) the
            learned values are clamped to, or ``None``; the initial value must lie inside.
        amplitude_init: the learned amplitude's start ``a_0`` (``> 0``, default 1: the fixed
            rule's ``dW``); below 1 the rule starts weak and grows only where the
            hypergradient says the task gains from it. Only with ``"amplitude"`` in ``learn``.

    Raises:
        DASSDPConfigError: (a ``ValueError``) for a value that is not allowed; its ``key``
            names the field.
    """

    A_plus: float = 1.5e-3
    A_minus: float = 1.0e-4
    sigma: float = 1.0
    clip: float | None = 1.0
    warmup_epochs: int = 100
    gate: str = "fitted"
    latency: str = "first"
    apply: str = "post_step"
    sites: str = "default"
    control: str = "none"
    enabled: bool = True
    eps: float = 1e-8
    dtype: str = "float32"
    seed: int = 0
    debug: bool = False
    learn: tuple[str, ...] = ()
    sigma_lr: float = 10.0
    amplitude_lr: float = 10.0
    sigma_range: tuple[float, float] | None = None
    amplitude_range: tuple[float, float] | None = None
    hyper_step: str = "normalized"
    hyper_lr: float = 3e-3
    hyper_beta: float = 0.999
    amplitude_init: float = 1.0

    def __post_init__(self) -> None:
        _check_nonnegative(self, "A_plus", "A_minus")
        if not isinstance(self.sigma, int | float) or not self.sigma > 0:
            raise DASSDPConfigError(
                "sigma",
                f"sigma must be > 0 [time steps] (inf allowed: no kernel), got {self.sigma!r}",
            )
        if self.clip is not None and not (isinstance(self.clip, int | float) and self.clip > 0):
            raise DASSDPConfigError("clip", f"clip must be > 0 or None, got {self.clip!r}")
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise DASSDPConfigError(
                "warmup_epochs", f"warmup_epochs must be an int >= 0, got {self.warmup_epochs!r}"
            )
        if not isinstance(self.eps, int | float) or not self.eps >= 0:
            raise DASSDPConfigError("eps", f"eps must be >= 0, got {self.eps!r}")
        self._check_choices()
        if not isinstance(self.sites, str) or not self.sites:
            raise DASSDPConfigError("sites", f"sites must be a preset name, got {self.sites!r}")
        if not isinstance(self.debug, bool):
            raise DASSDPConfigError("debug", f"debug must be true or false, got {self.debug!r}")
        self._check_learning()

    def _check_choices(self) -> None:
        for name, allowed in (
            ("gate", GATE_MODES),
            ("latency", LATENCY_MODES),
            ("apply", APPLY_MODES),
            ("control", CONTROLS),
            ("dtype", tuple(DTYPES)),
            ("hyper_step", HYPER_STEPS),
        ):
            if getattr(self, name) not in allowed:
                raise DASSDPConfigError(
                    name, f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )

    def _check_learning(self) -> None:
        learn = self.learn
        if isinstance(learn, str) or not isinstance(learn, tuple | list):
            raise DASSDPConfigError(
                "learn",
                f"learn must be a tuple of names from {LEARNABLE} (e.g. ('sigma', 'amplitude'), "
                f"or () for none), got {learn!r}",
            )
        unknown = [x for x in learn if x not in LEARNABLE]
        if unknown or len(set(learn)) != len(learn):
            raise DASSDPConfigError(
                "learn", f"learn must name each of {LEARNABLE} at most once, got {tuple(learn)!r}"
            )
        object.__setattr__(self, "learn", tuple(learn))
        _check_nonnegative(self, "sigma_lr", "amplitude_lr")
        self._check_hyper_step()
        init = self.amplitude_init
        if not _number(init) or not math.isfinite(init) or init <= 0:
            raise DASSDPConfigError(
                "amplitude_init", f"amplitude_init must be a finite number > 0, got {init!r}"
            )
        if init != 1 and "amplitude" not in self.learn:
            raise DASSDPConfigError(
                "amplitude_init",
                f"amplitude_init={init!r} starts a learned amplitude: it needs 'amplitude' in "
                f"learn (got learn={self.learn!r}); to scale the fixed rule set A_plus, A_minus",
            )
        self._check_range("sigma_range", self.sigma, f"sigma={self.sigma!r}")
        self._check_range("amplitude_range", init, f"the initial amplitude {init!r}")
        if "sigma" in self.learn and math.isinf(self.sigma):
            raise DASSDPConfigError(
                "sigma", "learn=('sigma', ...) needs a finite sigma to start from, got inf"
            )

    def _check_hyper_step(self) -> None:
        """``hyper_lr`` > 0 and finite [log-change per step], ``hyper_beta`` in ``[0, 1)``."""
        lr, beta = self.hyper_lr, self.hyper_beta
        if not _number(lr) or not math.isfinite(lr) or lr <= 0:
            raise DASSDPConfigError(
                "hyper_lr",
                f"hyper_lr must be a finite number > 0 [log-change per step], got {lr!r}",
            )
        if not _number(beta) or not 0 <= beta < 1:
            raise DASSDPConfigError("hyper_beta", f"hyper_beta must be in [0, 1), got {beta!r}")

    def _check_range(self, name: str, init: float, what: str) -> None:
        """``name`` is None or a finite ``(lo, hi)`` with ``0 < lo <= hi`` (stored as floats),
        which holds ``init`` when the value is learned."""
        value = getattr(self, name)
        if value is None:
            return
        pair = tuple(value) if isinstance(value, tuple | list) else ()
        if len(pair) != 2 or not all(_number(v) and math.isfinite(v) for v in pair):
            raise DASSDPConfigError(
                name, f"{name} must be None or (lo, hi) finite numbers, got {value!r}"
            )
        lo, hi = float(pair[0]), float(pair[1])
        if not 0 < lo <= hi:
            raise DASSDPConfigError(name, f"{name} must satisfy 0 < lo <= hi, got {value!r}")
        object.__setattr__(self, name, (lo, hi))
        if name.removesuffix("_range") in self.learn and not lo <= init <= hi:
            raise DASSDPConfigError(name, f"{name}={value!r} must contain {what}")

    @classmethod
    def compat(cls, **overrides: Any) -> DASSDPConfig:
        """The released code's semantics: last-active-step latency, ``A_minus = 5e-4``, and the
        model's ``"compat"`` sites (mean-over-time fired indicator on the classifier,
        block input/output proxy with silent latency 0 on the projection)."""
        base = {"latency": "last", "A_minus": 5e-4, "sites": "compat"}
        return cls(**{**base, **overrides})

    def replace(self, **changes: Any) -> DASSDPConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DASSDPConfig:
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown DA-SSDP config key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)
