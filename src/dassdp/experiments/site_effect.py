r"""How much of one DA-SSDP update reaches what follows its site (``dassdp ls sites --effect``).

For each site ``W [C_out, C_in]`` (a Linear or 1x1 conv, ``y = W s``) the tool takes one
DA-SSDP update ``dW`` (:func:`dassdp_updates`: one training-mode forward of a batch, then
the learner's step, exactly what training applies after an optimizer step) and splits it::

    uniform = dW.mean(dim=1, keepdim=True)   broadcast over the inputs: row j is the constant
                                             c_j, the mean of row j
    rest    = dW - uniform                   every row sums to 0

(:func:`split_update`; the two are orthogonal, so ``|uniform|² + |rest|² = |dW|²``). Each
of ``dW``, ``uniform`` and ``rest`` is then added to ``W`` alone and the model run on the
measurement batches (:func:`measure_site`), and the change is measured at four points:

- **site**: the site's own output ``y``;
- **norm eval / norm train**: the output of the normalisation that follows the site (a
  BatchNorm, as declared by the model's ``dassdp_site_norms`` or traced, :func:`site_norms`),
  applied to its input as recorded in the training-mode forward, once with its running
  statistics (eval mode) and once with the batch's statistics (train mode);
- **logits eval / logits train**: the model's output in eval mode and in training mode.

Every change is **relative**: ``sqrt(sum |z' - z|²) / sqrt(sum |z - mean_c(z)|²)`` over all
measurement batches, where ``z`` is the point's value with ``W``, ``z'`` with ``W + part``,
and ``mean_c`` the per-channel mean over the batch (and time steps and positions: the axes a
BatchNorm averages over). So a change is in units of the spread of that point's values
across samples, the scale a BatchNorm removes; it is comparable from one point to the next.

What a uniform part does, exactly: ``dW[j, :] = c_j`` adds ``c_j sum_i s_i`` to output
``j``, a shift proportional to the input's total activity, which is one number per sample
(and time step and position). A BatchNorm in **train** mode subtracts each channel's batch
mean, so it removes the shift up to its deviation from the batch mean: when the total
input activity is the same for every sample, step and position, BN(train) removes a uniform
update entirely (``norm train = 0``, and nothing of it reaches the logits in training mode).
A BatchNorm in **eval** mode is a fixed per-channel affine map ``gamma (y - mu_run) /
sqrt(var_run + eps) + beta``: it removes nothing, it only scales each channel (with equal
``gamma / sqrt(var_run + eps)`` over the channels, ``norm eval`` equals ``site``). Eval mode
forgets a persistent shift only as its running mean catches up over later training steps.
The ``rest`` (rows summing to zero) is not a shift of the total activity and passes BN(train)
except for its own batch-mean part. ``dW`` itself is nearly uniform when almost every pre and
post unit fires (then nearly every pair gets the same term).

The model's weights and buffers (BatchNorm statistics, running firing rates) are restored
after every forward, and the random number generator is re-seeded the same way for each
forward of a batch, so the forwards with ``W`` and with ``W + part`` differ in the weight
only (dropout draws the same mask).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PARTS",
    "SiteEffect",
    "calibrate_norms",
    "dassdp_updates",
    "measure_site",
    "site_effects",
    "site_norms",
    "split_update",
]

PARTS = ("dW", "uniform", "rest")
POINTS = ("site", "norm_eval", "norm_train", "logits_eval", "logits_train")
Batch = tuple[Tensor, Tensor | None]  # (model input, labels or None)


@dataclasses.dataclass(frozen=True)
class SiteEffect:
    """One site and one part of its update: sizes and the relative changes it causes.

    Attributes:
        site, part: the site's layer name; ``"dW"``, ``"uniform"`` or ``"rest"``.
        norm: the module name of the normalisation after the site (``None``: none).
        norm_found: ``"declared"`` (the model's ``dassdp_site_norms``), ``"traced"`` or
            ``"none"``.
        share: ``|part| / |dW|`` (Frobenius norms; 1 for ``dW``).
        weight_ratio: ``|part| / |W|``.
        site, norm_eval, norm_train, logits_eval, logits_train: relative changes (see the
            module docstring; NaN where there is no normalisation or no spread).
    """

    site: str
    part: str
    norm: str | None
    norm_found: str
    share: float
    weight_ratio: float
    site_change: float
    norm_eval: float
    norm_train: float
    logits_eval: float
    logits_train: float

    @property
    def passed_train(self) -> float:
        """``norm_train / norm_eval``: the part of the change BN(train) lets through,
        relative to what a BatchNorm with fixed statistics would (1: nothing absorbed)."""
        if self.norm_eval > 0:
            return self.norm_train / self.norm_eval
        return math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed_train": self.passed_train}


# ---------------------------------------------------------------- the update


def split_update(dw: Tensor) -> tuple[Tensor, Tensor]:
    """``dW [C_out, C_in, ...]`` -> ``(uniform, rest)``: ``uniform`` holds each output row's
    mean over the input units (broadcast to ``dW``'s shape), ``rest = dW - uniform``."""
    flat = dw.reshape(dw.shape[0], dw.shape[1], -1)  # [C_out, C_in, k] (k = 1: 1x1 conv)
    uniform = flat.mean(dim=1, keepdim=True).expand_as(flat).reshape(dw.shape)
    return uniform, dw - uniform


def dassdp_updates(
    model: nn.Module,
    sites: Mapping[str, Any],
    config: Any,
    batch: Batch,
    *,
    learner_state: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """One DA-SSDP update of every site from one training-mode forward of ``batch``.

    ``config`` (a :class:`dassdp.DASSDPConfig`) runs with no warm-up and
    ``apply="post_step"``; ``learner_state`` (a learner's :meth:`~dassdp.DASSDP.state_dict`
    with the same sites, e.g. from a checkpoint) brings its fitted gate and learned values.
    Without a fitted gate use ``gate="one"`` (``G = 1``). The loss the learner sees is the
    cross entropy of the batch's labels (0 without labels; it only decides whether the
    step counts). Returns ``{site: dW}`` (the weight's change, its shape); the model's
    parameters and buffers are as before.
    """
    import dassdp
    from dassdp.plasticity.learner import DASSDP

    config = config.replace(warmup_epochs=0, apply="post_step", enabled=True)
    learner = DASSDP(model, config, sites=dict(sites), T=getattr(model, "T", None))
    try:
        if learner_state is not None:
            learner.load_state_dict(learner_state)
        learner.set_epoch(config.warmup_epochs)
        layers = learner.recorder.layers
        with _restored(model):
            before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
            x, y = batch
            model.train()
            with torch.enable_grad(), _seeded(seed):
                logits = model(x)
            loss = F.cross_entropy(logits.detach().float(), y) if y is not None else None
            learner.step(loss if loss is not None else logits.new_zeros(()))
            out = {n: (layers[n].weight.detach() - before[n]).clone() for n in layers}
            dassdp.reset(model)
    finally:
        learner.close()
    return out


# ---------------------------------------------------------------- the next normalisation


def site_norms(
    model: nn.Module, sites: Sequence[str], x: Tensor | None = None
) -> dict[str, tuple[str | None, str]]:
    """``{site: (norm module name or None, how it was found)}``.

    Declared: the model's ``dassdp_site_norms`` mapping (site -> module name or ``None``).
    Otherwise traced on one training-mode forward of ``x``: the first BatchNorm whose
    forward runs after the site's and whose channel count is the site's ``C_out`` (a
    heuristic: it can pick a BatchNorm of a parallel branch; declare the mapping to be
    sure). A declared name that is not a BatchNorm is a ``ValueError``.
    """
    declared = getattr(model, "dassdp_site_norms", None)
    if declared is not None:
        out = {}
        for site in sites:
            name = declared.get(site)
            if name is not None and not isinstance(model.get_submodule(name), _BatchNorm):
                raise ValueError(f"dassdp_site_norms[{site!r}] = {name!r} is not a BatchNorm")
            out[site] = (name, "declared" if name else "none")
        return out
    if x is None:
        raise ValueError(
            f"{type(model).__name__} declares no dassdp_site_norms: pass an input to trace them"
        )
    return _trace_norms(model, sites, x)


_BatchNorm = nn.modules.batchnorm._BatchNorm


def _trace_norms(
    model: nn.Module, sites: Sequence[str], x: Tensor
) -> dict[str, tuple[str | None, str]]:
    import dassdp

    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    watched = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    watched += [model.get_submodule(s) for s in sites]
    hooks = [m.register_forward_hook(lambda m, a, o: order.append(names[m])) for m in watched]
    try:
        with _restored(model), torch.no_grad(), _seeded(0):
            model.train()(x)
            dassdp.reset(model)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, tuple[str | None, str]] = {}
    for site in sites:
        c_out = model.get_submodule(site).weight.shape[0]
        after = order[order.index(site) + 1 :] if site in order else []
        found = next(
            (
                n
                for n in after
                if n not in sites and model.get_submodule(n).num_features == c_out  # type: ignore[union-attr]
            ),
            None,
        )
        out[site] = (found, "traced" if found else "none")
    return out


def calibrate_norms(model: nn.Module, batches: Sequence[Batch]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (cumulative average
    over them, train-mode forwards without grad), so that eval mode of an initialised model
    sees statistics of this data. Other buffers (e.g. running firing rates) update as a
    training forward updates them."""
    import dassdp

    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration forwards
    try:
        model.train()
        with torch.no_grad():
            for i, (x, _) in enumerate(batches):
                with _seeded(i):
                    model(x)
                dassdp.reset(model)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


# ---------------------------------------------------------------- measuring


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Parameters, buffers and the train flag of ``model`` as they were, afterwards."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    training = model.training
    try:
        yield
    finally:
        model.load_state_dict(saved)
        model.train(training)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The global RNG seeded with ``seed`` inside, as it was afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _channels_last(z: Tensor, channel_dim: int) -> Tensor:
    """``z`` as ``[N, C]``: the channel axis last, every other axis folded into N."""
    return z.movedim(channel_dim, -1).reshape(-1, z.shape[channel_dim]).double()


def _spread(z: Tensor) -> float:
    """Sum of squared deviations from each channel's mean (``z``: ``[N, C]``)."""
    return float((z - z.mean(0, keepdim=True)).square().sum())


class _Probe:
    """Captures, during a training-mode forward, the site's output and the norm's input (a
    module called once per time step gives one tensor per call, joined along dim 0; the
    norm's batch statistics then span all the calls)."""

    def __init__(self, model: nn.Module, site: str, norm: str | None) -> None:
        self.site_layer = model.get_submodule(site)
        self.norm = None if norm is None else model.get_submodule(norm)
        self.on = False
        self.seen: dict[str, list[Tensor]] = {}
        self.hooks = [self.site_layer.register_forward_hook(self._keep("site", out=True))]
        if self.norm is not None:
            self.hooks.append(self.norm.register_forward_hook(self._keep("norm_in", out=False)))

    def _keep(self, key: str, out: bool) -> Any:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self.on:
                self.seen.setdefault(key, []).append((output if out else args[0]).detach())

        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _points(model: nn.Module, probe: _Probe, x: Tensor, seed: int) -> dict[str, Tensor]:
    """One batch with the model's current weights: the five points as ``[N, C]`` float64."""
    import dassdp

    out: dict[str, Tensor] = {}
    probe.seen.clear()
    for train in (True, False):
        with _restored(model), torch.no_grad(), _seeded(seed):
            probe.on = train
            logits = model.train(train)(x)
            probe.on = False
            dassdp.reset(model)
        out["logits_train" if train else "logits_eval"] = _channels_last(logits, -1)
    site = torch.cat(probe.seen["site"])
    conv = isinstance(probe.site_layer, nn.Conv2d)
    out["site"] = _channels_last(site, 1 if conv else -1)
    if probe.norm is not None:
        out.update(_norm_outputs(probe.norm, torch.cat(probe.seen["norm_in"])))
    return out


@torch.no_grad()
def _norm_outputs(bn: nn.Module, z: Tensor) -> dict[str, Tensor]:
    """The BatchNorm ``bn`` applied to its recorded input ``z`` with its running statistics
    (eval; batch statistics when it keeps none) and with the batch's (train)."""
    affine = (bn.weight, bn.bias)
    stats = (bn.running_mean, bn.running_var)
    has_stats = stats[0] is not None
    return {
        "norm_eval": _channels_last(
            F.batch_norm(z, *stats, *affine, training=not has_stats, eps=bn.eps), 1
        ),
        "norm_train": _channels_last(
            F.batch_norm(z, None, None, *affine, training=True, eps=bn.eps), 1
        ),
    }


def measure_site(
    model: nn.Module,
    site: str,
    norm: str | None,
    parts: Mapping[str, Tensor],
    batches: Sequence[Batch],
    *,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Relative changes ``{part: {point: value}}`` when ``W += part`` alone (see the module
    docstring), summed over ``batches``; points without a normalisation are NaN. The
    model's weights, buffers and train flag are restored afterwards."""
    layer = model.get_submodule(site)
    probe = _Probe(model, site, norm)
    spread = dict.fromkeys(POINTS, 0.0)
    diff = {p: dict.fromkeys(POINTS, 0.0) for p in parts}
    w0 = layer.weight.detach().clone()
    try:
        for b, (x, _) in enumerate(batches):
            ref = _points(model, probe, x, seed + b)
            for key, z in ref.items():
                spread[key] += _spread(z)
            for name, part in parts.items():
                with torch.no_grad():
                    layer.weight.copy_(w0 + part.to(w0))
                got = _points(model, probe, x, seed + b)
                with torch.no_grad():
                    layer.weight.copy_(w0)
                for key, z in got.items():
                    diff[name][key] += float((z - ref[key]).square().sum())
    finally:
        probe.close()
        with torch.no_grad():
            layer.weight.copy_(w0)
    return {p: {k: _ratio(diff[p][k], spread[k], k, ref) for k in POINTS} for p in parts}


def _ratio(diff: float, spread: float, key: str, seen: Mapping[str, Tensor]) -> float:
    if key not in seen or spread <= 0:
        return math.nan
    return math.sqrt(diff / spread)


def site_effects(
    model: nn.Module,
    updates: Mapping[str, Tensor],
    norms: Mapping[str, tuple[str | None, str]],
    batches: Sequence[Batch],
    *,
    seed: int = 0,
) -> list[SiteEffect]:
    """For every site of ``updates``: its ``dW``, uniform and rest parts, each measured
    alone by :func:`measure_site` on ``batches``. Three :class:`SiteEffect` rows a site."""
    rows = []
    for site, dw in updates.items():
        uniform, rest = split_update(dw)
        parts = {"dW": dw, "uniform": uniform, "rest": rest}
        norm, found = norms[site]
        changes = measure_site(model, site, norm, parts, batches, seed=seed)
        w_norm = float(model.get_submodule(site).weight.detach().double().norm())
        dw_norm = float(dw.double().norm())
        for part, tensor in parts.items():
            size = float(tensor.double().norm())
            c = changes[part]
            rows.append(
                SiteEffect(
                    site=site,
                    part=part,
                    norm=norm,
                    norm_found=found,
                    share=size / dw_norm if dw_norm > 0 else math.nan,
                    weight_ratio=size / w_norm if w_norm > 0 else math.nan,
                    site_change=c["site"],
                    norm_eval=c["norm_eval"],
                    norm_train=c["norm_train"],
                    logits_eval=c["logits_eval"],
                    logits_train=c["logits_train"],
                )
            )
    return rows
