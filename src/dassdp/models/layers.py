"""Shared pieces of the spiking models: time-major helpers, pre-activation conv blocks and
activation checkpointing of a block (:func:`checkpointed`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dassdp._util.recompute import recomputing
from dassdp.neurons import LIF
from dassdp.plasticity.sites import SiteSpec

__all__ = [
    "NeuronLayer",
    "SpikeConvBN",
    "TimeSharedDropout",
    "check_stage_indices",
    "checkpointed",
    "pick_preset",
    "seq_apply",
    "to_time_major",
]

# A factory for a multi-step neuron module ([T, B, ...] -> [T, B, ...]), e.g. LIF or PLIF.
NeuronLayer = Callable[[], nn.Module]


def to_time_major(x: Tensor, T: int) -> Tensor:
    """Make a model input time-major.

    Static images ``[B, C, H, W]`` are repeated over ``T`` steps (direct encoding); event
    frames ``[B, T, C, H, W]`` are transposed. Returns ``[T, B, C, H, W]``.
    """
    if x.dim() == 4:
        return x.unsqueeze(0).expand(T, *x.shape)
    if x.dim() == 5:
        if x.shape[1] != T:
            raise ValueError(
                f"event frames [B, T, C, H, W] have T={x.shape[1]} but the model "
                f"was built with T={T}; build it with T={x.shape[1]}"
            )
        return x.transpose(0, 1)
    raise ValueError(
        f"expected images [B, C, H, W] or event frames [B, T, C, H, W], got shape {tuple(x.shape)}"
    )


def seq_apply(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a per-sample module to every step: ``[T, B, ...] -> [T*B, ...] -> [T, B, ...]``."""
    y = fn(x.flatten(0, 1))
    return y.unflatten(0, x.shape[:2])


class SpikeConvBN(nn.Module):
    """Pre-activation block ``BN(Conv(neuron(x)))``.

    Shapes: ``[T, B, C_in, H, W] -> [T, B, C_out, H', W']``.

    The neuron turns the real-valued residual stream into spikes, so every conv sees spikes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        neuron_layer: NeuronLayer = LIF,
    ) -> None:
        super().__init__()
        self.lif = neuron_layer()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            kernel_size // 2,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        s = self.lif(x)  # [T, B, C_in, H, W] spikes
        return seq_apply(lambda z: self.bn(self.conv(z)), s)


class TimeSharedDropout(nn.Module):
    """Dropout of whole units for a whole sample: one mask per sample, shared by every step.

    Shapes: ``[T, B, ...] -> [T, B, ...]``. In training each unit of a sample is zeroed with
    probability ``p`` at every time step together (the mask is drawn ``[1, B, ...]``) and
    the others are scaled by ``1 / (1 - p)``; in eval mode (or with ``p = 0``) the input is
    returned as it is. A dropped spiking unit is silent for the whole sample, as ordinary
    dropout silences a feature; masks drawn per step would add spike-time noise instead.
    ``0 <= p < 1``, else ``ValueError``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.empty((1, *x.shape[1:]), device=x.device, dtype=x.dtype)
        return x * keep.bernoulli_(1 - self.p).div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def pick_preset(
    model: str, preset: str, presets: Mapping[str, Callable[[], dict[str, SiteSpec]]]
) -> dict[str, SiteSpec]:
    """Return ``presets[preset]()``; an unknown preset is a ``ValueError`` listing them."""
    if preset not in presets:
        raise ValueError(
            f"{model}: unknown DA-SSDP site preset {preset!r}; choose one of {sorted(presets)}"
        )
    return presets[preset]()


def check_size(key: str, value: object) -> int:
    """``value`` as a layer size (channels, width, heads, a kernel side): an ``int >= 1``;
    anything else is a ``ValueError`` naming ``key`` (not a tensor-shape error from torch)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def check_sizes(key: str, values: object, length: int | None = None) -> tuple[int, ...]:
    """``values`` as a list of layer sizes (each :func:`check_size`, named ``key[i]``), of
    ``length`` items when given; else a ``ValueError`` naming ``key``."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ValueError(f"{key} must be a list of integers >= 1, got {values!r}")
    out = tuple(check_size(f"{key}[{i}]", v) for i, v in enumerate(values))
    if length is not None and len(out) != length:
        raise ValueError(f"{key} must list {length} sizes, got {len(out)}: {list(out)}")
    return out


def check_stage_indices(stages: Iterable[int], num_stages: int, key: str) -> tuple[int, ...]:
    """``stages`` as a sorted tuple of distinct stage indices in ``[0, num_stages)``; anything
    else (a non-integer, out of range, a repeat) is a ``ValueError`` naming ``key``."""
    if isinstance(stages, str | bytes) or not isinstance(stages, Iterable):
        raise ValueError(f"{key} must be a list of stage indices, got {stages!r}")
    out = list(stages)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_stages:
            raise ValueError(
                f"{key}: {i!r} is not a stage index; this model has stages 0..{num_stages - 1}"
            )
    if len(set(out)) != len(out):
        raise ValueError(f"{key} lists a stage twice: {out}")
    return tuple(sorted(out))


def checkpointed(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with activation checkpointing (``torch.utils.checkpoint``,
    ``use_reentrant=False``): the activations inside are not kept but recomputed in the
    backward. The result and every gradient are those of ``module(x)``.

    The recomputation is an exact replay: the module's buffers (BatchNorm running statistics,
    DSSA running firing rates) are set back to their values before the forward for it and
    restored afterwards, so they are updated once per forward and the recomputed activations
    equal the original ones; it runs under :func:`dassdp._util.recompute.recomputing`, so
    recording hooks (DA-SSDP recorder, firing rates) skip it. Without grad it is a plain call.
    """
    if not torch.is_grad_enabled():
        return module(x)
    before: list[Tensor] = []

    @contextlib.contextmanager
    def forward_ctx() -> Iterator[None]:
        before[:] = [b.detach().clone() for b in module.buffers()]
        yield

    @contextlib.contextmanager
    def recompute_ctx() -> Iterator[None]:
        buffers = list(module.buffers())
        after = [b.detach().clone() for b in buffers]
        try:
            with torch.no_grad():
                for b, v in zip(buffers, before, strict=True):
                    b.copy_(v)
            with recomputing():
                yield
        finally:  # also when the recomputation stops early
            with torch.no_grad():
                for b, v in zip(buffers, after, strict=True):
                    b.copy_(v)

    return checkpoint(  # type: ignore[no-any-return]
        module, x, use_reentrant=False, context_fn=lambda: (forward_ctx(), recompute_ctx())
    )
