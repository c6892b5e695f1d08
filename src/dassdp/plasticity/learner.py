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
``D_t``, all-reduced with it), so this too stays on the device and agrees on every rank
(:mod:`dassdp.plasticity.learned`).

The config is :mod:`dassdp.plasticity.config`, the controls :mod:`dassdp.plasticity.controls`.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dassdp._util.env import env_flag
from dassdp.plasticity import controls
from dassdp.plasticity import distributed as D
from dassdp.plasticity.config import DTYPES, DASSDPConfig
from dassdp.plasticity.gate import GateFit, GateStats, fit_gate, gate_values, to_device
from dassdp.plasticity.learned import LearnedRule
from dassdp.plasticity.recorder import Recorder, SiteRecord
from dassdp.plasticity.rule import delta_w, synchrony
from dassdp.plasticity.sites import DASSDPWarning, SiteSpec, normalize_sites

__all__ = ["COUNTERS", "DASSDP", "DASSDPConfig"]


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
        self._step_index = 0  # host-side: which step a stored D_t belongs to
        # learned sigma / amplitude (config.learn): their values and the last update
        self._learned = LearnedRule(self.config, self.sites) if self.config.learn else None

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
            if self._learned is not None:
                self._learned.forget(name)

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
        """One site's update: gate, (learned values,) ``dW``, all-reduce, clip, apply."""
        cfg, learned = self.config, self._learned
        G = gate_values(S, self.fits[name] if self.fits else None, cfg.gate)
        layer = self.recorder.layers[name]
        # learned sigma / a: first the hypergradient of the last step's update (apply="grad":
        # .grad is still the task gradient here, dW is subtracted below)
        metrics = {} if learned is None else learned.step(name, layer.weight, ok, self._step_index)
        sigma = learned.sigma(name) if self._learns_sigma else cfg.sigma
        dw = self._rule_dw(name, record, G, sigma)  # [C_out, C_in] or [2, C_out, C_in]
        D.all_reduce_(dw, "mean")  # with dD/dsigma stacked: one all-reduce for both
        if learned is not None:  # stores D_t (after the all-reduce); returns a D_t
            dw = learned.keep(name, dw, ok, self._step_index)
        if cfg.clip is not None:
            dw.clamp_(-cfg.clip, cfg.clip)
        if self.debug and not bool(torch.isfinite(dw).all()):
            raise RuntimeError(f"DA-SSDP debug: site {name!r} has a non-finite dW")
        dw.mul_(ok)  # a skipped step (on any rank) changes nothing
        self._apply(layer, dw)
        self._set_metrics(name, {**_site_metrics(record, S, G, dw), **metrics}, ok)

    def _rule_dw(self, name: str, record: SiteRecord, G: Tensor, sigma: float | Tensor) -> Tensor:
        """This rank's pre-clip ``dW`` of a site (``[C_out, C_in]``; with a learned sigma
        ``[2, C_out, C_in]``: ``D`` and ``dD/dsigma``), the rule's or the control's."""
        cfg, gen = self.config, self._generator
        if cfg.control == "uniform_drift":
            shape = self.recorder.layers[name].weight.shape[:2]
            return controls.uniform_drift(shape, cfg.A_plus, G, DTYPES[cfg.dtype])
        pre, post = record.pre, record.post
        if cfg.control == "shuffled_latency":
            pre, post = controls.shuffle(pre, gen), controls.shuffle(post, gen)
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
        return controls.randomise(dw, gen) if cfg.control == "random_update" else dw

    # ---------------------------------------------------------- learned sigma, a
    @property
    def _learns_sigma(self) -> bool:
        """sigma is learned and dW depends on it (not under the uniform-drift control)."""
        return self._learned is not None and self._learned.learns_sigma

    @property
    def _prev(self) -> dict[str, tuple[int, Tensor, Tensor | None, Tensor]]:
        """Per site the last update the next step learns from (:attr:`LearnedRule.prev`)."""
        return {} if self._learned is None else self._learned.prev

    @property
    def learned(self) -> dict[str, dict[str, float]]:
        """Per site, the current ``sigma`` and ``amplitude`` (learned ones move; the others
        show the config's sigma and 1). Empty without ``config.learn``. Two host reads a site."""
        return {} if self._learned is None else self._learned.floats()

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
        learned values (``learned``: per site ``log_sigma``, ``log_amplitude``, the last step's
        ``D``, ``dD_dsigma`` the next step learns from, and with ``hyper_step="normalized"``
        the running means ``h2_<x>``, counts ``steps_<x>`` and ``D_counted``: see
        :meth:`LearnedRule.state_dict`). Under DDP this is a collective
        (call it on every rank): warm-up sums are gathered on rank 0, which holds the total."""
        totals = {name: self._gather_sums(stats) for name, stats in self.stats.items()}
        learned = self._learned
        extra = {} if learned is None else {"learned": learned.state_dict(self._step_index)}
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

    def _load_learned(self, learned: Mapping[str, Any] | None) -> None:
        """Restore the learned values; without them (an older checkpoint, or one written
        without learning) they start from the config."""
        if self._learned is not None:
            self._learned.load_state_dict(learned, self._step_index)
        elif learned:
            warnings.warn(
                "the DA-SSDP checkpoint has learned sigma/amplitude values, but this "
                "learner's config.learn is empty: they are ignored",
                RuntimeWarning,
                stacklevel=3,
            )

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
