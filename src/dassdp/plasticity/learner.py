"""``DASSDP``: attach DA-SSDP to the sites of any PyTorch SNN.

The training step stays the user's; the learner adds one call after ``optimizer.step()``::

    plast = DASSDP(model, DASSDPConfig(warmup_epochs=100))
    for epoch in range(epochs):
        plast.set_epoch(epoch)
        for x, y in loader:
            loss = criterion(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            plast.step(loss)      # warm-up: record (S, L); after: dW, all-reduce, apply
            dassdp.reset(model)

Under DDP every decision that changes weights is collective: the gate statistics are
all-reduced before the fit, ``dW`` is all-reduced (mean) before it is clipped and applied,
and a step is skipped on every rank if any rank saw a non-finite loss. Nothing of the
learner is a parameter or buffer of the model.

The step reads nothing back to the host (no ``.item()``, no boolean masks, no tensors made
from Python data): whether a step counts is a 0/1 flag on the device that multiplies the
gate-statistics row and ``dW``, and the counters accumulate on the device. They are read
only when asked for (:attr:`DASSDP.counters`, :meth:`DASSDP.last_metrics`, ``bool()`` of the
value :meth:`DASSDP.step` returns, :meth:`DASSDP.state_dict`), and once when the gate is
fitted at the end of warm-up. ``DASSDPConfig(debug=True)`` (or ``DASSDP_DEBUG=1``) adds range
checks that do read values back.

``DASSDPConfig(learn=("sigma", "amplitude"))`` learns each site's kernel width and an
amplitude scale ``a`` (``dW = clip(a D)``) by the one-step hypergradient of the next step's
loss: the next step's gradient, already in the site weight's ``.grad`` when :meth:`DASSDP.step`
runs, is paired with the stored ``D_t`` and ``dD_t/dsigma`` (computed in the same GEMM as
``D_t``, all-reduced with it), so this too stays on the device and agrees on every rank.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from dassdp._util.env import env_flag
from dassdp.plasticity import distributed as D
from dassdp.plasticity.gate import (
    GATE_MODES,
    GateFit,
    GateStats,
    fit_gate,
    gate_values,
    to_device,
)
from dassdp.plasticity.recorder import Recorder, SiteRecord
from dassdp.plasticity.rule import LATENCY_MODES, Activity, delta_w, synchrony
from dassdp.plasticity.sites import DASSDPWarning, SiteSpec, normalize_sites

APPLY_MODES = ("post_step", "grad")
COUNTERS = (
    "steps",
    "recorded",
    "applied",
    "skipped_nonfinite",
    "skipped_optimizer",
    "skipped_no_records",
)
DEBUG_ENV = "DASSDP_DEBUG"
WARMUP_NOTICE_STEPS = 1000  # steps after which a never-set epoch is reported
CONTROLS = ("none", "shuffled_latency", "random_update", "uniform_drift")
LEARNABLE = ("sigma", "amplitude")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
            (initially 1), both in log space; the update becomes ``dW_t = clip(a D_t)`` with
            ``D_t`` the pre-clip rule. At the next step the one-step hypergradients of that
            step's loss ``L_{t+1}`` (whose gradient ``g_{t+1}`` is in the site weight's
            ``.grad``) are ``h_sigma = <g_{t+1}, a dD_t/dsigma>`` and
            ``h_a = <g_{t+1}, D_t>`` (entries where the clip binds excluded), and
            ``log sigma -= sigma_lr * sigma * h_sigma``, ``log a -= amplitude_lr * a * h_a``.
            ``apply="post_step"``: ``step`` runs after ``optimizer.step()``, whose ``.grad``
            (unscaled by a grad scaler, clipped if the loop clips it) is ``g_{t+1}`` at the
            weights ``dW_t`` moved. ``apply="grad"``: ``step`` runs before
            ``optimizer.step()``; the hypergradient reads ``.grad`` before ``dW`` is
            subtracted from it (unscale it first under a grad scaler), and is then exact up
            to the optimizer's per-step scaling of ``dW_t`` (``lr`` for SGD). Without a
            ``.grad`` (``zero_grad()`` called before ``step``), or after a step that applied
            nothing, ``h = 0``; a skipped step moves neither value.
        sigma_lr, amplitude_lr: step sizes of the two log-space updates (``>= 0``; default
            10: on ``configs/cifar10_cpu.yaml`` the per-step ``|h|`` is about 1e-4, so 10 moves
            a consistently signed value by a factor of about e over 1,000 steps; 1 barely
            moved it in a 5-epoch run).
        sigma_range, amplitude_range: ``(lo, hi)`` bounds (``0 < lo <= hi``, finite) the
            learned values are clamped to, or ``None``; the initial value must lie inside.
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

    def __post_init__(self) -> None:
        for name in ("A_plus", "A_minus"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.sigma, int | float) or not self.sigma > 0:
            raise ValueError(f"sigma must be > 0 (inf allowed: no kernel), got {self.sigma!r}")
        if self.clip is not None and not (isinstance(self.clip, int | float) and self.clip > 0):
            raise ValueError(f"clip must be > 0 or None, got {self.clip!r}")
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {self.warmup_epochs!r}")
        if not isinstance(self.eps, int | float) or not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        for name, allowed in (
            ("gate", GATE_MODES),
            ("latency", LATENCY_MODES),
            ("apply", APPLY_MODES),
            ("control", CONTROLS),
            ("dtype", tuple(DTYPES)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.sites, str) or not self.sites:
            raise ValueError(f"sites must be a preset name, got {self.sites!r}")
        if not isinstance(self.debug, bool):
            raise ValueError(f"debug must be true or false, got {self.debug!r}")
        self._check_learning()

    def _check_learning(self) -> None:
        learn = self.learn
        if isinstance(learn, str) or not isinstance(learn, tuple | list):
            raise ValueError(
                f"learn must be a tuple of names from {LEARNABLE} (e.g. ('sigma', 'amplitude'), "
                f"or () for none), got {learn!r}"
            )
        unknown = [x for x in learn if x not in LEARNABLE]
        if unknown or len(set(learn)) != len(learn):
            raise ValueError(
                f"learn must name each of {LEARNABLE} at most once, got {tuple(learn)!r}"
            )
        object.__setattr__(self, "learn", tuple(learn))
        for name in ("sigma_lr", "amplitude_lr"):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, init in (("sigma_range", self.sigma), ("amplitude_range", 1.0)):
            value = getattr(self, name)
            if value is None:
                continue
            pair = tuple(value) if isinstance(value, tuple | list) else ()
            numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
            if len(pair) != 2 or not numbers or not all(math.isfinite(v) for v in pair):
                raise ValueError(f"{name} must be None or (lo, hi) finite numbers, got {value!r}")
            lo, hi = float(pair[0]), float(pair[1])
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi, got {value!r}")
            object.__setattr__(self, name, (lo, hi))
            learned = name.removesuffix("_range") in self.learn
            if learned and not lo <= init <= hi:
                what = f"sigma={init!r}" if name == "sigma_range" else "the initial amplitude 1"
                raise ValueError(f"{name}={value!r} must contain {what}")
        if "sigma" in self.learn and math.isinf(self.sigma):
            raise ValueError("learn=('sigma', ...) needs a finite sigma to start from, got inf")

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


class DASSDP:
    """DA-SSDP learner over the sites of ``model``.

    Args:
        model: the SNN (a ``DistributedDataParallel`` wrapper is unwrapped).
        config: hyper-parameters; default :class:`DASSDPConfig`.
        sites: ``{layer name: SiteSpec | dict | post-source string}``, a preset name, or
            ``None`` for the model's own ``dassdp_sites(config.sites)``.
        T: time steps (to unflatten ``[T*B, ...]`` tensors); default ``model.T`` if present.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DASSDPConfig | None = None,
        sites: Mapping[str, Any] | str | None = None,
        *,
        T: int | None = None,
    ) -> None:
        self.config = config or DASSDPConfig()
        self.model = (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        )
        self.sites = _resolve_sites(self.model, sites, self.config.sites)
        T = T if T is not None else getattr(self.model, "T", None)
        self.recorder = Recorder(self.model, self.sites, T=T, latency=self.config.latency)
        self.recorder.enabled = self.config.enabled
        self.epoch = 0
        self.stats = {name: GateStats() for name in self.sites}
        self.fits: dict[str, GateFit] | None = None
        self._counts = torch.zeros(len(COUNTERS), dtype=torch.int64)  # on the steps' device
        self._last_recorded = torch.zeros((), dtype=torch.bool)
        # CPU generator for the controls: the same draws on every device and in checkpoints.
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self._metrics: dict[str, dict[str, Tensor]] = {}
        self._calls = 0  # step() calls, a Python int (the counters may live on the device)
        self._epoch_set = False
        self._warned: set[str] = set()
        # learned sigma / amplitude (config.learn): per site log sigma, log a (0-d float64 on
        # the steps' device) and the last step's (step index, D_t, dD_t/dsigma or None)
        self._step_index = 0
        self._learned: dict[str, dict[str, Tensor]] = {}
        self._prev: dict[str, tuple[int, Tensor, Tensor | None]] = {}
        if self.config.learn:
            self._init_learned()

    # ----------------------------------------------------------------- schedule
    @property
    def in_warmup(self) -> bool:
        return self.epoch < self.config.warmup_epochs

    def set_epoch(self, epoch: int) -> None:
        """Tell the learner the current (0-based) epoch; warm-up is ``epoch < warmup_epochs``.

        Any integer-like value is accepted (``int``, numpy integers, 0-d integer tensors:
        whatever ``operator.index`` takes); floats and bools are errors.
        """
        is_bool = isinstance(epoch, bool) or (
            isinstance(epoch, Tensor) and epoch.dtype == torch.bool
        )
        try:
            value = None if is_bool else operator.index(epoch)
        except TypeError:
            value = None
        if value is None or value < 0:
            raise ValueError(
                f"epoch must be an integer >= 0 (int, numpy integer or 0-d integer tensor), "
                f"got {epoch!r} of type {type(epoch).__name__}"
            )
        self.epoch = value
        self._epoch_set = True

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def debug(self) -> bool:
        """Debug checks: ``config.debug`` or the environment variable ``DASSDP_DEBUG`` set on
        (``0``, ``false``, ``no``, ``off`` or empty: off)."""
        return self.config.debug or env_flag(DEBUG_ENV)

    @property
    def counters(self) -> dict[str, int]:
        """``steps``, ``recorded``, ``applied`` and the skips by reason (non-finite loss,
        optimizer skipped, sites without records). They accumulate on the device; reading
        them is one host sync (once per epoch is cheap, once per step is not)."""
        return dict(zip(COUNTERS, (int(v) for v in self._counts.tolist()), strict=True))

    # --------------------------------------------------------------------- step
    def step(self, loss: Tensor | float, *, optimizer_stepped: bool | Tensor = True) -> Tensor:
        """Close this step's recording window and learn from it.

        In warm-up: add ``(S[b], L)`` to the gate statistics. Afterwards: fit the gate once,
        then compute ``dW`` per site, all-reduce its mean, clip and apply it.

        No value is read back to the host: a step that must be skipped (non-finite loss,
        optimizer skipped, a site without records, on any rank) is skipped by multiplying
        its statistics and ``dW`` by 0 on the device, and counted there. Such a step still
        computes ``dW`` (and draws the controls' random numbers) before discarding it; the
        gate is fitted at the first step after warm-up, whether or not that step counts.

        Args:
            loss: this step's scalar loss, a tensor on the model's device (a non-finite loss
                skips the step and is counted).
            optimizer_stepped: ``False`` when the optimizer did not step (an AMP grad scaler
                skipped it); the update is then skipped and counted. A Python bool or a
                one-element tensor on the device (non-zero: stepped), e.g. ``1 - found_inf``
                of a grad scaler, which keeps the decision on the device.

        Returns:
            A 0-d bool tensor on the step's device: True if a weight change was applied.
            Reading it (``bool()``, ``if``, ``assert``) is a host sync; ignoring it costs none.
        """
        self._check_call()
        records = self.recorder.collect()
        loss_t = loss.detach() if isinstance(loss, Tensor) else torch.as_tensor(loss)
        if not self.config.enabled:
            return torch.zeros((), dtype=torch.bool, device=loss_t.device)
        device = next(iter(records.values())).post.fired.device if records else loss_t.device
        missing = len(records) != len(self.sites)
        ok, first_skip, loss_t = self._agree(loss_t.to(device), optimizer_stepped, missing)
        active = not self.in_warmup
        self._count(ok, first_skip, active)
        self._last_recorded = ok
        if missing:  # known here without a sync: this rank cannot compute every site
            if active and D.is_distributed():
                self._join_skipped_update()
            return torch.zeros_like(ok)
        dtype = DTYPES[self.config.dtype]
        S = {n: synchrony(r.pre.fired, r.post.fired, dtype) for n, r in records.items()}
        if not active:
            for name, s in S.items():
                self.stats[name].update(s, loss_t, weight=ok)
                self._set_metrics(name, _site_metrics(records[name], s, None, None), ok)
            return torch.zeros_like(ok)
        if self.fits is None:
            self.fit()
        for name, record in records.items():
            self._update_site(name, record, S[name], ok)
        return ok

    def _check_call(self) -> None:
        """Turn the silent no-ops of a misplaced ``step()`` into errors or warnings (once).

        Python-side checks only (train flag, buffered records, weight version counters):
        nothing here reads a device tensor.
        """
        if self.recorder.closed:
            raise RuntimeError("DASSDP.step() after close(): the learner's hooks are removed")
        if not self.config.enabled:
            return
        self._calls += 1
        if not self.model.training:
            self._warn_once(
                "eval",
                "DASSDP.step() with the model in eval() mode: eval forwards are not "
                "recorded, so this step learns nothing (call model.train() before training)",
            )
        elif not self.recorder.passes and not self.recorder.has_records:
            self._warn_once(
                "no-forward",
                "DASSDP.step() without a training forward since the last step(): nothing "
                "was recorded (step() twice, or the forward ran under torch.no_grad())",
            )
        if self.config.apply == "grad":
            self._check_not_stepped()
        if (
            self._calls == WARMUP_NOTICE_STEPS
            and not self._epoch_set
            and self.config.warmup_epochs > 0
        ):
            self._warn_once(
                "warmup",
                f"DASSDP has run {WARMUP_NOTICE_STEPS} steps and set_epoch() was never "
                f"called: it is still in warm-up (epoch 0 < warmup_epochs="
                f"{self.config.warmup_epochs}) and changes no weight; call "
                "plast.set_epoch(epoch) at the start of every epoch",
            )

    def _check_not_stepped(self) -> None:
        """``apply='grad'``: a site weight changed since the forward means the optimizer has
        already stepped, so ``W.grad -= dW`` would be lost."""
        versions = self.recorder.versions
        for name, layer in self.recorder.layers.items():
            if name in versions and layer.weight._version != versions[name]:
                raise RuntimeError(
                    f"apply='grad': site {name!r}'s weight changed since the forward, so "
                    "optimizer.step() already ran and -dW would never be applied; call "
                    "plast.step(loss) after backward() and before optimizer.step() (or use "
                    "apply='post_step' to call it after optimizer.step())"
                )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, DASSDPWarning, stacklevel=4)

    def _agree(
        self, loss: Tensor, stepped: bool | Tensor, missing: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Agree over all ranks whether this step counts, why not, and on the loss.

        One all-reduce of ``[non-finite, optimizer skipped, sites missing, loss]``: a step is
        skipped everywhere if any rank must skip it, and the recorded loss is the mean over
        ranks, i.e. the loss of the global batch, as a single process would see it.

        Returns:
            ``ok`` (0-d bool: the step counts), ``first_skip`` (``[3]`` bool: the first of the
            three reasons that holds, the counter it bumps) and the agreed loss (float64).
        """
        loss = loss.double().mean()
        flags = torch.stack(
            (
                (~torch.isfinite(loss)).to(torch.float64),
                1.0 - _stepped_flag(stepped, loss),
                loss.new_full((), 1.0 if missing else 0.0),
                torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0),
            )
        )
        D.all_reduce_(flags, "sum")
        bad = flags[:3] > 0
        first_skip = bad & (bad.cumsum(0) == 1)
        return ~bad.any(), first_skip, flags[3] / D.world_size()

    def _count(self, ok: Tensor, first_skip: Tensor, active: bool) -> None:
        """Add this step to the device counters (order of :data:`COUNTERS`)."""
        head = torch.stack((torch.ones_like(ok), ok, ok & active))
        row = torch.cat((head, first_skip)).to(torch.int64)
        if self._counts.device != row.device:  # the first step (or after a checkpoint)
            self._counts = to_device(self._counts, row.device)
        self._counts += row
        self._step_index += 1  # host-side: which step a stored D_t belongs to

    def _join_skipped_update(self) -> None:
        """DDP, a rank without records after warm-up: the others all-reduce every site's dW
        (they learn that the step is skipped only on the device), so join with zeros."""
        if self.fits is None:
            self.fit()
        for name in self.sites:
            weight = self.recorder.layers[name].weight
            shape = (2, *weight.shape[:2]) if self._learns_sigma else weight.shape[:2]
            dw = torch.zeros(shape, dtype=DTYPES[self.config.dtype], device=weight.device)
            D.all_reduce_(dw, "mean")
            self._prev.pop(name, None)  # no update this step: nothing for the next one to learn

    def fit(self) -> dict[str, GateFit]:
        """Fit every site's gate from the (all-reduced) warm-up statistics; done once."""
        fits = {}
        for name, stats in self.stats.items():
            total = self._gather_sums(stats)
            with warnings.catch_warnings():
                if self.config.gate == "one":  # the fit is only reported; G = 1 regardless
                    warnings.simplefilter("ignore", RuntimeWarning)
                fits[name] = fit_gate(total, self.config.eps)
        self.fits = fits
        return fits

    @staticmethod
    def _gather_sums(stats: GateStats) -> Tensor:
        """All-ranks total of one site's sums; afterwards rank 0 alone holds it (sum-preserving),
        so a checkpoint written by rank 0 carries every rank's warm-up records."""
        if not D.is_distributed():
            return stats.sums
        total = D.all_reduce_(stats.sums.clone(), "sum")
        stats.sums = total.clone() if D.rank() == 0 else torch.zeros_like(total)
        return total

    def _update_site(self, name: str, record: SiteRecord, S: Tensor, ok: Tensor) -> None:
        cfg, dtype = self.config, DTYPES[self.config.dtype]
        G = gate_values(S, self.fits[name] if self.fits else None, cfg.gate)
        layer = self.recorder.layers[name]
        # learned sigma / a: first the hypergradient of the last step's update (apply="grad":
        # .grad is still the task gradient here, dW is subtracted below)
        learned = self._learn_step(name, layer, ok) if cfg.learn else {}
        sigma = torch.exp(self._learned[name]["log_sigma"]) if self._learns_sigma else cfg.sigma
        pre, post = record.pre, record.post
        if cfg.control == "shuffled_latency":
            pre, post = self._shuffle(pre), self._shuffle(post)
        if cfg.control == "uniform_drift":
            dw = (
                torch.full(layer.weight.shape[:2], cfg.A_plus, dtype=dtype, device=S.device)
                * G.mean()
            )
        else:
            spec = self.sites[name]
            # With fired="any" a unit is fired iff it has a latency < T, and silent units share
            # one latency: T + 1 fixed states, no look at the data (module rule, "spiked").
            # Shuffled latencies or fired="mean" break that pairing: then all states on CUDA,
            # those that occur on the CPU (fewer FLOPs, one host read).
            spiked = spec.fired == "any" and cfg.control != "shuffled_latency"
            dw = self._window_mean_dw(
                SiteRecord(pre, post, record.T, record.windows),
                G,
                post_states="spiked" if spiked else "auto",
                silent_post=spec.silent_post,
                sigma=sigma,
                sigma_grad=self._learns_sigma,  # then [2, C_out, C_in]: D and dD/dsigma
            )
        if cfg.control == "random_update":
            signs = torch.randint(0, 2, dw.shape[-2:], generator=self._generator).mul_(2).sub_(1)
            dw = _random_update(to_device(signs, dw.device).to(dw), dw)
        D.all_reduce_(dw, "mean")  # with dD/dsigma stacked: one all-reduce for both
        if cfg.learn:
            dw = self._keep_update(name, dw, ok)  # stores D_t (after the all-reduce); a D_t
        if cfg.clip is not None:
            dw.clamp_(-cfg.clip, cfg.clip)
        if self.debug and not bool(torch.isfinite(dw).all()):
            raise RuntimeError(f"DA-SSDP debug: site {name!r} has a non-finite dW")
        dw.mul_(ok)  # a skipped step (on any rank) changes nothing
        self._apply(layer, dw)
        self._set_metrics(name, {**_site_metrics(record, S, G, dw), **learned}, ok)

    # ---------------------------------------------------------- learned sigma, a
    @property
    def _learns_sigma(self) -> bool:
        """sigma is learned and dW depends on it (not under the uniform-drift control)."""
        return "sigma" in self.config.learn and self.config.control != "uniform_drift"

    def _init_learned(self) -> None:
        """Every site's log sigma = log(config.sigma), log a = 0; no stored update."""
        log_sigma = math.log(self.config.sigma)  # inf for sigma=inf (then not learned)
        self._learned = {
            name: {
                "log_sigma": torch.full((), log_sigma, dtype=torch.float64),
                "log_amplitude": torch.zeros((), dtype=torch.float64),
            }
            for name in self.sites
        }
        self._prev = {}

    def _learn_step(self, name: str, layer: nn.Module, ok: Tensor) -> dict[str, Tensor]:
        """One hypergradient step of the site's log sigma and log a (:meth:`_hypergradients`).

        Returns:
            The metrics ``sigma``, ``amplitude`` (after the step: the values this step's
            update uses) and ``hypergrad_sigma`` / ``hypergrad_amplitude`` for what is learned.
        """
        cfg, weight, state = self.config, layer.weight, self._learned[name]
        for key, value in state.items():
            if value.device != weight.device:  # the first step (or after a checkpoint)
                state[key] = to_device(value, weight.device)
        log_s, log_a = state["log_sigma"], state["log_amplitude"]
        h_sigma, h_amp = self._hypergradients(name, weight, torch.exp(log_a), ok)
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
        self, name: str, weight: Tensor, a: Tensor, ok: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(h_sigma, h_a)``, 0-d float64 on the device: the previous step's ``D_t`` and
        ``dD_t/dsigma`` against the gradient now in ``weight.grad`` (``[C_out, C_in, ...]``),
        where ``|a D_t| < clip``.

        0 when there is no previous update to learn from (the first step after warm-up, the
        previous step was skipped or had no records), no ``.grad``, or this step is skipped
        (``ok`` false: a ``where``, so a non-finite gradient cannot leak in).
        """
        zero = torch.zeros((), dtype=torch.float64, device=weight.device)
        prev, grad = self._prev.get(name), weight.grad
        if prev is None or prev[0] != self._step_index - 1 or grad is None:
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

    def _keep_update(self, name: str, dw: Tensor, ok: Tensor) -> Tensor:
        """Store this step's all-reduced ``D_t`` (and ``dD_t/dsigma``) for the next step's
        hypergradient (zero when the step is skipped: nothing was applied); return ``a D_t``."""
        dD = None
        if self._learns_sigma:
            dw, dD = dw[0], dw[1]
            dD = torch.where(ok, dD, 0.0)
        kept = torch.where(ok, dw, 0.0)
        self._prev[name] = (self._step_index, kept, dD)
        if "amplitude" not in self.config.learn:
            return dw
        return dw * torch.exp(self._learned[name]["log_amplitude"]).to(dw.dtype)

    @property
    def learned(self) -> dict[str, dict[str, float]]:
        """Per site, the current ``sigma`` and ``amplitude`` (learned ones move; the others
        show the config's sigma and 1). Empty without ``config.learn``. Two host reads a site."""
        return {
            name: {
                "sigma": math.exp(float(state["log_sigma"])),
                "amplitude": math.exp(float(state["log_amplitude"])),
            }
            for name, state in self._learned.items()
        }

    def _set_metrics(self, name: str, metrics: dict[str, Tensor], ok: Tensor) -> None:
        """Keep a site's metrics of the last step that counted (chosen on the device)."""
        old = self._metrics.get(name)
        if old is not None:  # (the learned values' metrics start after warm-up)
            metrics = {k: torch.where(ok, v, old[k]) if k in old else v for k, v in metrics.items()}
        self._metrics[name] = metrics

    def _window_mean_dw(
        self,
        record: SiteRecord,
        G: Tensor,
        *,
        post_states: str,
        silent_post: int | None,
        sigma: float | Tensor,
        sigma_grad: bool,
    ) -> Tensor:
        """``dW`` of the record, the mean over its windows (one per training forward); with
        ``sigma_grad`` ``[2, C_out, C_in]``: ``D`` and ``dD/dsigma``."""
        cfg, dws, start = self.config, [], 0
        for part in record.split():
            b = part.pre.fired.shape[0]
            dw = delta_w(
                part.pre,
                part.post,
                G[start : start + b],
                T=part.T,
                A_plus=cfg.A_plus,
                A_minus=cfg.A_minus,
                sigma=sigma,
                clip=None,
                dtype=DTYPES[cfg.dtype],
                post_states=post_states,
                silent_post=silent_post,
                check=self.debug,
                sigma_grad=sigma_grad,
            )
            dws.append(dw)
            start += b
        return dws[0] if len(dws) == 1 else torch.stack(dws).mean(0)

    def _shuffle(self, act: Activity) -> Activity:
        perm = torch.randperm(act.latency.shape[1], generator=self._generator)
        return Activity(act.fired, act.latency.index_select(1, to_device(perm, act.latency.device)))

    def _apply(self, layer: nn.Module, dw: Tensor) -> None:
        weight = layer.weight
        dw = dw.to(weight.dtype).view_as(weight)
        with torch.no_grad():
            if self.config.apply == "post_step":
                weight.add_(dw)
            elif weight.grad is None:
                raise RuntimeError(
                    "apply='grad' needs step() after backward() and before "
                    "optimizer.step(), but the site weight has no .grad"
                )
            else:
                weight.grad.sub_(dw)

    # ----------------------------------------------------------------- metrics
    def last_metrics(self, *, as_tensors: bool = False) -> dict[str, dict[str, Any]]:
        """Per site, from the last recorded step: ``synchrony`` (mean S), ``gate_mean``,
        ``dw_abs_mean``, ``dw_abs_max`` (0 in warm-up), ``pre_fired``, ``post_fired``; with
        ``config.learn``, after warm-up also ``sigma`` and ``amplitude`` (the values this
        step's update used) and ``hypergrad_sigma`` / ``hypergrad_amplitude`` (``h`` of
        what is learned; 0 when the previous step applied nothing).

        Floats (one host read each), or with ``as_tensors=True`` 0-d tensors on the device
        (no sync: to accumulate on the device, weighted by :attr:`last_step_recorded`).
        Before any step has counted, a site shows the values of the last step it saw.
        """
        if as_tensors:
            return {site: dict(m) for site, m in self._metrics.items()}
        return {site: {k: float(v) for k, v in m.items()} for site, m in self._metrics.items()}

    @property
    def last_step_recorded(self) -> Tensor:
        """0-d bool tensor on the device: the last :meth:`step` counted (it was not skipped),
        so :meth:`last_metrics` are its values."""
        return self._last_recorded

    def gate_summary(self) -> dict[str, dict[str, Any]]:
        """Per site: the fit (``k``, ``mu``, ``sd``, ``valid``, ``reason``) and record counts."""
        out = {}
        for name, stats in self.stats.items():
            fit = self.fits[name].to_dict() if self.fits else GateFit().to_dict()
            out[name] = {**fit, "records": stats.n, "skipped_records": stats.skipped}
        return out

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Epoch, gate sums, fitted gates, counters, generator, and with ``config.learn`` the
        learned values (``learned``: per site ``log_sigma``, ``log_amplitude`` and the last
        step's ``D``, ``dD_dsigma`` the next step learns from). Under DDP this is a collective
        (call it on every rank): warm-up sums are gathered on rank 0, which holds the total."""
        totals = {name: self._gather_sums(stats) for name, stats in self.stats.items()}
        extra = {"learned": self._learned_state()} if self.config.learn else {}
        return {
            "epoch": self.epoch,
            "sites": list(self.sites),
            "stats": {n: {"sums": t.cpu().tolist()} for n, t in totals.items()},
            "fits": None if self.fits is None else {n: f.to_dict() for n, f in self.fits.items()},
            "counters": self.counters,
            "generator": self._generator.get_state(),
            "config": self.config.to_dict(),
            **extra,
        }

    def _learned_state(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, state in self._learned.items():
            prev = self._prev.get(name)
            if prev is None or prev[0] != self._step_index:  # stale: the next step ignores it
                prev = (0, None, None)
            D_t, dD = (None if t is None else t.detach().cpu().clone() for t in prev[1:])
            out[name] = {
                "log_sigma": float(state["log_sigma"]),  # float64: exact
                "log_amplitude": float(state["log_amplitude"]),
                "D": D_t,
                "dD_dsigma": dD,
            }
        return out

    def _load_learned(self, learned: Mapping[str, Any] | None) -> None:
        """Restore :meth:`_learned_state`; without it (an older checkpoint, or one written
        without learning) the learned values start from the config."""
        if not self.config.learn:
            if learned:
                warnings.warn(
                    "the DA-SSDP checkpoint has learned sigma/amplitude values, but this "
                    "learner's config.learn is empty: they are ignored",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        self._init_learned()
        if learned is None:
            return
        missing = sorted(set(self.sites) - set(learned))
        if missing:
            raise ValueError(f"checkpoint DA-SSDP learned values lack the site(s) {missing}")
        for name in self.sites:
            item = learned[name]
            for key in ("log_sigma", "log_amplitude"):
                value = float(item[key])
                self._learned[name][key] = torch.full((), value, dtype=torch.float64)
            if item.get("D") is not None:
                self._prev[name] = (self._step_index, item["D"], item.get("dD_dsigma"))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the sites must match by name."""
        if list(state["sites"]) != list(self.sites):
            raise ValueError(
                f"checkpoint DA-SSDP sites {list(state['sites'])} do not match "
                f"this learner's sites {list(self.sites)}"
            )
        self.epoch = int(state["epoch"])
        for name, stats in self.stats.items():
            stats.load_state_dict(state["stats"][name])
            if D.rank() != 0:  # rank 0 carries the total; others restart from zero
                stats.sums.zero_()
        fits = state["fits"]
        self.fits = None if fits is None else {n: GateFit(**f) for n, f in fits.items()}
        counters = {**self.counters, **state["counters"]}
        unknown = sorted(set(counters) - set(COUNTERS))
        if unknown:
            raise ValueError(f"checkpoint DA-SSDP counters {unknown} unknown; known: {COUNTERS}")
        values = torch.zeros(len(COUNTERS), dtype=torch.int64)
        for index, key in enumerate(COUNTERS):
            values[index] = int(counters[key])
        self._counts = values.to(self._counts.device)
        self._generator.set_state(state["generator"])
        self._epoch_set = True
        self._load_learned(state.get("learned"))

    def close(self) -> None:
        """Remove every hook; the learner records nothing afterwards."""
        self.recorder.close()
        self._metrics.clear()

    def __repr__(self) -> str:
        return f"DASSDP(sites={list(self.sites)}, epoch={self.epoch}, config={self.config})"


def _stepped_flag(stepped: bool | Tensor, like: Tensor) -> Tensor:
    """``optimizer_stepped`` as a 0-d float64 0/1 on ``like``'s device, made on the device."""
    if isinstance(stepped, Tensor):
        if stepped.numel() != 1:
            raise ValueError(
                f"optimizer_stepped must be a bool or a one-element tensor, got a tensor of "
                f"shape {tuple(stepped.shape)}"
            )
        return stepped.detach().reshape(()).to(like.device).ne(0).to(torch.float64)
    if isinstance(stepped, bool | int):
        return like.new_full((), 1.0 if stepped else 0.0, dtype=torch.float64)
    raise TypeError(
        f"optimizer_stepped must be a bool or a one-element tensor, got {type(stepped).__name__}"
    )


def _log_step(
    log_value: Tensor, lr: float, h: Tensor, bounds: tuple[float, float] | None
) -> Tensor:
    """``log v - lr * v * h`` (gradient descent on ``log v`` for ``dL/dv = h``), clamped to
    ``log`` of ``bounds``."""
    log_value = log_value - lr * torch.exp(log_value) * h
    if bounds is None:
        return log_value
    return log_value.clamp(math.log(bounds[0]), math.log(bounds[1]))


def _random_update(signs: Tensor, dw: Tensor) -> Tensor:
    """The ``random_update`` control: ``signs`` times the RMS of ``dw``. With a stacked
    ``[2, C_out, C_in]`` (``D``, ``dD/dsigma``) also the derivative of that RMS,
    ``signs <D, dD> / (|D| sqrt(n))`` (0 where ``D = 0``)."""
    if dw.dim() == 2:
        return signs * (dw.norm() / math.sqrt(dw.numel()))
    D_t, dD = dw[0], dw[1]
    norm, root = D_t.norm(), math.sqrt(D_t.numel())
    slope = torch.where(norm > 0, (D_t * dD).sum() / (norm * root), 0.0)
    return torch.stack((signs * (norm / root), signs * slope))


def _site_metrics(
    record: SiteRecord, S: Tensor, G: Tensor | None, dw: Tensor | None
) -> dict[str, Tensor]:
    zero = torch.zeros((), device=S.device)
    return {
        "synchrony": S.mean(),
        "gate_mean": G.mean() if G is not None else torch.ones((), device=S.device),
        "dw_abs_mean": dw.abs().mean() if dw is not None else zero,
        "dw_abs_max": dw.abs().max() if dw is not None else zero,
        "pre_fired": record.pre.fired.float().mean(),
        "post_fired": record.post.fired.float().mean(),
    }


def _resolve_sites(
    model: nn.Module, sites: Mapping[str, Any] | str | None, preset: str
) -> dict[str, SiteSpec]:
    if sites is None or isinstance(sites, str):
        name = preset if sites is None else sites
        declare = getattr(model, "dassdp_sites", None)
        if declare is None:
            raise ValueError(
                f"{type(model).__name__} declares no DA-SSDP sites (no dassdp_sites method); "
                "pass sites={'layer.name': 'output>0', ...}"
            )
        sites = declare(name)
    return normalize_sites(sites)
