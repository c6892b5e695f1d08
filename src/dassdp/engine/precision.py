"""Precision, compilation and memory layout for the training engine.

* :func:`resolve_amp`: the config's ``amp`` and the device -> the autocast dtype actually
  used (``float16`` needs CUDA: on CPU it falls back to float32 with a log line, so one
  config runs on both; ``bfloat16`` runs on CPU and CUDA without a grad scaler).
* :func:`optimizer_stepped`: after ``GradScaler.unscale_`` (explicit or inside ``step``) and
  before ``update``, a 0-d bool tensor on the device, ``True`` when the optimizer steps
  (no inf/NaN gradient): the grad-scaler skip decision without a host read.
* :func:`prepare_model` / :func:`compile_model`: channels-last weights, cuDNN autotuning and
  ``torch.compile`` as the config asks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dassdp.engine.config import TrainConfig, amp_dtype

__all__ = ["autocast", "compile_model", "optimizer_stepped", "prepare_model", "resolve_amp"]

log = logging.getLogger("dassdp.train")


def resolve_amp(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (``None``: float32).

    ``"fp16"`` (or ``True``) on a CPU is float32 with a log line: CPU float16 autocast is
    slow and a grad scaler there buys nothing; ``"bf16"`` is bfloat16 everywhere.
    """
    dtype = amp_dtype(amp)
    if dtype == torch.float16 and device.type != "cuda":
        log.info(
            "amp: fp16 (with a grad scaler) is used on CUDA only; training in float32 "
            "(amp: bf16 runs on the CPU)"
        )
        return None
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Apply ``channels_last`` and ``cudnn_benchmark`` (a process-wide flag: the caller
    restores it) for ``device``."""
    if cfg.channels_last:
        # conv weights [C_out, C_in, k, k] go NHWC; the [T*B, C, H, W] activations follow
        model.to(memory_format=torch.channels_last)
    if cfg.cudnn_benchmark:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        else:
            log.info("cudnn_benchmark: a CUDA setting; ignored on %s", device.type)
    return model


def compile_model(module: nn.Module, cfg: TrainConfig) -> Any:
    """``torch.compile(module)`` with the config's mode and backend (the module's hooks are
    traced into the compiled forward, so DA-SSDP recording keeps working)."""
    return torch.compile(module, mode=cfg.compile_mode, backend=cfg.compile_backend)
