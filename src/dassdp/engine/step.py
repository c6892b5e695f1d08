"""The training step: what :class:`~dassdp.engine.train.Trainer` runs on every batch, and
what every ``dassdp bench`` that times a training step runs (so a bench measures the code a
user trains with). It reads top to bottom::

    [mixup] -> forward + loss under autocast -> [finite?] -> zero_grad -> backward
            -> [unscale_, clip] -> optimizer step (through the grad scaler)
            -> DA-SSDP step -> dassdp.reset(model) -> device-side meters

Without a Trainer::

    for x, y in loader:
        out = train_step(x, y, model=model, optimizer=opt, learner=plast)

Host reads per step (``aten._local_scalar_dense`` on a device tensor; counted in
``tests/test_engine_precision.py``), the optimizer's own CPU step counters excluded:

* float32 and bf16: **one**, :func:`_all_finite` of the loss: without a grad scaler nothing
  else can skip the optimizer step on a non-finite loss (it is also the DDP agreement: an
  all-reduce).
* fp16: **one**, inside ``GradScaler.step`` (torch reads its found-inf flag to decide whether
  to call ``optimizer.step``). The step adds none: a NaN/inf loss gives NaN gradients, which
  the scaler skips; whether it skipped reaches DA-SSDP as a device tensor
  (:func:`optimizer_stepped`), also in ``apply="grad"`` mode where the learner runs between
  ``unscale_`` and the optimizer step.
* ``DASSDP.step`` adds none (warm-up and after: skips are decided on the device).

This module imports only torch, :func:`dassdp.reset` and :mod:`dassdp.plasticity.distributed`,
so the before/after scripts in ``benchmarks/`` can load it over another checkout's library
and time both with the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dassdp
from dassdp.plasticity import distributed as D

__all__ = ["StepOutput", "autocast", "optimizer_stepped", "train_step"]

# what a missing grad scaler means: every call passes through (scale -> loss, step -> step)
_NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


class StepOutput(NamedTuple):
    """One step's results, all on the device (nothing read to the host)."""

    loss: Tensor  # 0-d, detached
    logits: Tensor  # [B, K], detached
    nonfinite: Tensor  # 0-d bool: the loss was NaN/inf (the optimizer step was skipped)


def train_step(
    x: Tensor,
    y: Tensor,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    learner: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: torch.dtype | None = None,
    grad_clip: float | None = None,
    mixup: Any = None,
    net: nn.Module | None = None,
    device: torch.device | None = None,
    meter: Any = None,
    plast: Any = None,
) -> StepOutput:
    """One training step on a batch: ``x`` ``[B, C, H, W]`` images (repeated over T by the
    model) or ``[B, T, C, H, W]`` frames, ``y`` ``[B]`` class indices.

    ``model``: the unwrapped model (DA-SSDP hooks, ``reset``, the clipped parameters);
    ``net``: what runs the forward (its DDP or compiled wrapper; default ``model``).
    ``learner``: a :class:`dassdp.DASSDP` or None. ``scaler``: a ``GradScaler`` (fp16) or
    None; ``amp``: the autocast dtype (None: float32). ``mixup``: timm ``Mixup`` (the loss
    then sees soft targets ``[B, K]``). ``device``: where ``x`` and ``y`` go (None: they stay).
    ``meter`` (a :class:`~dassdp.engine.metrics.LossMeter`) and ``plast`` (a
    :class:`~dassdp.engine.metrics.PlasticityMeter`): device-side meters, updated if given.
    """
    net = model if net is None else net
    scaler = _NO_SCALER if scaler is None else scaler
    grad_mode = learner is not None and learner.config.apply == "grad"
    if device is not None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    target = y
    if mixup is not None:
        x, target = _mix(mixup, x, y)  # target: soft labels [B, K]
    with autocast(x.device, amp):
        logits = net(x)  # [B, K]
        loss = criterion(logits, target)
    # fp16: a non-finite loss makes non-finite gradients, which the scaler skips, so no
    # read here; float32/bf16: one host read decides (and all ranks agree on it)
    finite = scaler.is_enabled() or _all_finite(loss)
    stepped: Tensor | bool = False
    if finite:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_mode:
            # apply="grad": dW joins the (unscaled) gradients before the optimizer step; the
            # scaler's skip decision is known after unscale_, so DA-SSDP skips with it
            scaler.unscale_(optimizer)
            learner.step(loss.detach(), optimizer_stepped=_stepped(scaler, optimizer))
        if grad_clip is not None:
            if not grad_mode:  # grad mode has unscaled already
                scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        stepped = _stepped(scaler, optimizer)  # before update(), which clears the flags
        scaler.update()
    if learner is not None and not (grad_mode and finite):
        # warm-up: record (S, L); afterwards dW (all-reduced), then W += dW
        learner.step(loss.detach(), optimizer_stepped=stepped)
    if plast is not None:
        plast.update()
    dassdp.reset(model)  # neuron states; closes the recording window (records kept)
    loss, logits = loss.detach(), logits.detach()
    if meter is not None:
        meter.update(loss, logits, y)
    return StepOutput(loss, logits, ~torch.isfinite(loss))


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _all_finite(loss: Tensor) -> bool:
    """Whether the loss is finite on every rank (so all ranks skip a bad step together)."""
    flag = torch.isfinite(loss.detach()).all().double().reshape(1)
    return bool(D.all_reduce_(flag, "min").item())


def _mix(mixup: Any, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """timm Mixup on ``[B, C, H, W]`` or event frames ``[B, T, C, H, W]`` (T folded into C)."""
    if x.dim() == 5:
        B, T, C, H, W = x.shape
        x, target = mixup(x.reshape(B, T * C, H, W), y)
        return x.reshape(B, T, C, H, W), target
    return mixup(x, y)


def _stepped(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Tensor | bool:
    """Whether the optimizer steps: a 0-d bool device tensor under a grad scaler (valid from
    ``unscale_`` until ``update``), else True."""
    if not scaler.is_enabled():
        return True
    return optimizer_stepped(scaler, optimizer)


def _found_inf_flags(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> list:
    """The scaler's per-device found-inf tensors for ``optimizer`` (private API; [] if the
    layout differs from torch 2.x's ``_per_optimizer_states[id]["found_inf_per_device"]``)."""
    try:
        per_device = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        return [t for t in per_device.values() if isinstance(t, Tensor)]
    except (AttributeError, KeyError, TypeError):
        return []


def _grads(optimizer: torch.optim.Optimizer) -> Iterable[Tensor]:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield p.grad


def optimizer_stepped(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Tensor:
    """0-d bool tensor: does (did) the scaler let ``optimizer`` step? No host read.

    Call after ``scaler.unscale_(optimizer)`` or ``scaler.step(optimizer)`` and before
    ``scaler.update()`` (which clears the flags). Reads the scaler's found-inf flags; if a
    future torch stores them elsewhere, it checks the (unscaled) gradients itself, which is
    the same decision: the scaler skips exactly when a gradient holds an inf or NaN.
    """
    flags = _found_inf_flags(scaler, optimizer)
    if flags:
        device = flags[0].device
        found = torch.stack([f.to(device).reshape(()) for f in flags]).sum()
        return found == 0
    grads = list(_grads(optimizer))
    if not grads:
        raise RuntimeError("optimizer_stepped: the optimizer holds no gradients")
    norms = torch._foreach_norm(grads)  # inf/NaN propagate into the norms
    return torch.isfinite(torch.stack([n.to(grads[0].device) for n in norms])).all()
