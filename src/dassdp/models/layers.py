"""Shared pieces of the spiking models: time-major helpers and pre-activation conv blocks."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from dassdp.neurons import LIF
from dassdp.plasticity.sites import SiteSpec

__all__ = ["NeuronLayer", "SpikeConvBN", "pick_preset", "seq_apply", "to_time_major"]

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


def pick_preset(
    model: str, preset: str, presets: Mapping[str, Callable[[], dict[str, SiteSpec]]]
) -> dict[str, SiteSpec]:
    """Return ``presets[preset]()``; an unknown preset is a ``ValueError`` listing them."""
    if preset not in presets:
        raise ValueError(
            f"{model}: unknown DA-SSDP site preset {preset!r}; choose one of {sorted(presets)}"
        )
    return presets[preset]()
