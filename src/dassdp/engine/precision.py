"""Precision, compilation and memory layout for the training engine.

* :func:`resolve_amp`: the config's ``amp`` and the device -> the autocast dtype actually
  used (``float16`` needs CUDA: on CPU it falls back to float32 with a log line, so one
  config runs on both; ``bfloat16`` runs on CPU and CUDA without a grad scaler).
* :func:`autocast` and :func:`optimizer_stepped` (the grad-scaler skip decision as a device
  flag) live with the step that uses them, :mod:`dassdp.engine.step`; re-exported here.
* :func:`prepare_model` / :func:`compile_model`: channels-last weights, cuDNN autotuning and
  ``torch.compile`` as the config asks.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from dassdp.engine.config import TrainConfig, amp_dtype
from dassdp.engine.step import autocast, optimizer_stepped

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
