"""SpikingResformer (Shi, Hao, Yu, CVPR 2024, arXiv 2403.14302), written from the paper.

A ResNet-like multi-stage spiking vision transformer. Every tensor between blocks is a
real-valued, time-major residual stream ``[T, B, C, H, W]``; each block turns it into
spikes with a neuron before its first conv (pre-activation) and adds its result back.

    stem          ImageNet: conv 7x7/2, BN, max-pool 3x3/2; CIFAR / DVS: conv 3x3/1, BN
    stage i       [downsample: neuron, conv 3x3/2, BN] then depth_i x (DSSA, GWFFN)
    head          average pool over H, W -> [T, B, C]; classifier per step; mean over T

**DSSA** (dual spike self-attention) with ``h`` heads of width ``d = C / h``, on spikes
``X = SN(x)`` ``[T, B, C, H*W]``:
``Y = BN(Conv_{p x p, stride p}(X))`` ``[T, B, 2C, N]`` (``N = HW / p^2``) split per head into
``Y1, Y2``; ``A = SN(Y1^T X * c1)``, ``O = SN(Y2 A * c2)``; output ``x + BN(W_proj O)``.
No softmax: both products are between spike tensors (one side binary), scaled by
``c1 = 1 / sqrt(r_X d)`` and ``c2 = 1 / sqrt(r_A N)`` where ``r`` are per-head running
firing rates (momentum 0.999, measured in training, frozen in eval).

**GWFFN** (group-wise FFN): ``u = BN(Conv1x1_up(SN(x)))`` (ratio 4),
``u = u + BN(GWConv3x3(SN(u)))`` (groups of ``group_size`` channels),
output ``x + BN(Conv1x1_down(SN(u)))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dassdp.models.layers import (
    NeuronLayer,
    SpikeConvBN,
    check_size,
    check_sizes,
    check_stage_indices,
    checkpointed,
    pick_preset,
    seq_apply,
    to_time_major,
)
from dassdp.models.registry import register_model
from dassdp.neurons import LIF, PLIF, spike_saving
from dassdp.plasticity.sites import SiteSpec

__all__ = ["DSSA", "GWFFN", "SpikingResformer"]

_MIN_RATE = 1e-6  # floor on a firing rate so that a silent layer scales by a finite factor


def _scaled(product: Tensor, scale: Tensor) -> Tensor:
    """``product * scale``, in place when that keeps the dtype (the matmul backward does not
    need its output): one ``[T, B, h, N, HW]`` temporary fewer, the same values. Under bf16
    autocast the product is bf16 and ``scale`` fp32: out of place, promoted as before."""
    if product.dtype == torch.result_type(product, scale):
        return product.mul_(scale)
    return product * scale


class DSSA(nn.Module):
    """Dual spike self-attention block with its residual add: ``[T, B, C, H, W] -> same``.

    Submodules: ``lif_in`` (input spikes), ``embed``/``embed_bn`` (the p x p patch conv giving
    Y1, Y2), ``lif_attn``, ``lif_out`` (the spikes entering ``proj``), ``proj`` (1x1 conv
    ``W_proj``, a DA-SSDP site) and ``proj_bn``. The block's output is the residual sum.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        patch_size: int,
        neuron_layer: NeuronLayer = LIF,
        momentum: float = 0.999,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DSSA dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.patch_size, self.momentum = num_heads, patch_size, momentum
        self.lif_in = neuron_layer()
        self.embed = nn.Conv2d(dim, 2 * dim, patch_size, patch_size, bias=False)
        self.embed_bn = nn.BatchNorm2d(2 * dim)
        self.lif_attn = neuron_layer()
        self.lif_out = neuron_layer()
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)
        self.proj_bn = nn.BatchNorm2d(dim)
        # Per-head running firing rates of X and of the attention map (0 = not yet measured).
        self.register_buffer("rate_x", torch.zeros(num_heads))
        self.register_buffer("rate_attn", torch.zeros(num_heads))

    def _rate(self, name: str, spikes: Tensor) -> Tensor:
        """Per-head firing rate ``[h]`` of ``spikes`` ``[T, B, h, ., .]``: running in training;
        in eval the running rates once all are measured, else the batch's (chosen on the
        device: no host read, no graph break under ``torch.compile``)."""
        running: Tensor = getattr(self, name)
        batch = spikes.detach().mean(dim=(0, 1, 3, 4)).clamp_min(_MIN_RATE)
        if self.training:
            fresh = running.eq(0)
            running.mul_(self.momentum).add_(batch, alpha=1 - self.momentum)
            running.copy_(torch.where(fresh, batch, running))
            return running.clone()
        return torch.where(running.gt(0).all(), running, batch)

    def forward(self, x: Tensor) -> Tensor:
        T, B, C, H, W = x.shape
        h, d = self.num_heads, C // self.num_heads
        s = self.lif_in(x)  # [T, B, C, H, W] spikes
        y = seq_apply(lambda z: self.embed_bn(self.embed(z)), s)  # [T, B, 2C, H/p, W/p]
        y = y.reshape(T, B, h, 2 * d, -1)  # [T, B, h, 2d, N]
        y1, y2 = y[:, :, :, :d], y[:, :, :, d:]
        sx = s.reshape(T, B, h, d, H * W)  # [T, B, h, d, HW]
        c1 = self._rate("rate_x", sx).mul(d).rsqrt().view(1, 1, h, 1, 1)
        attn = self.lif_attn(_scaled(y1.transpose(-1, -2) @ sx, c1))  # [T, B, h, N, HW] spikes
        c2 = self._rate("rate_attn", attn).mul(y.shape[-1]).rsqrt().view(1, 1, h, 1, 1)
        out = self.lif_out(_scaled(y2 @ attn, c2).reshape(T, B, C, H, W))  # [T, B, C, H, W]
        return x + seq_apply(lambda z: self.proj_bn(self.proj(z)), out)


class GWFFN(nn.Module):
    """Group-wise feed-forward block with residual adds: ``[T, B, C, H, W] -> same``."""

    def __init__(
        self, dim: int, ratio: int = 4, group_size: int = 64, neuron_layer: NeuronLayer = LIF
    ) -> None:
        super().__init__()
        inner = dim * ratio
        if inner % group_size:
            raise ValueError(
                f"GWFFN inner width {inner} is not a multiple of group_size {group_size}"
            )
        self.up = SpikeConvBN(dim, inner, 1, neuron_layer=neuron_layer)
        self.conv = SpikeConvBN(
            inner, inner, 3, groups=inner // group_size, neuron_layer=neuron_layer
        )
        self.down = SpikeConvBN(inner, dim, 1, neuron_layer=neuron_layer)

    def forward(self, x: Tensor) -> Tensor:
        u = self.up(x)  # [T, B, ratio*C, H, W]
        u = u + self.conv(u)
        return x + self.down(u)


class Stage(nn.Module):
    """Optional downsampling (neuron, conv 3x3/2, BN) then ``depth`` (DSSA, GWFFN) pairs."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        group_size: int,
        neuron_layer: NeuronLayer,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.downsample = (
            SpikeConvBN(in_dim, dim, 3, stride=2, neuron_layer=neuron_layer)
            if downsample
            else nn.Identity()
        )
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks.append(DSSA(dim, num_heads, patch_size, neuron_layer))
            blocks.append(GWFFN(dim, group_size=group_size, neuron_layer=neuron_layer))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class Stem(nn.Module):
    """Input stem on static or event input: ``[T, B, C_in, H, W] -> [T, B, C, H', W']``.

    ``"imagenet"``: conv 7x7/2, BN, max-pool 3x3/2 (H' = H/4); ``"small"``: conv 3x3/1, BN.
    """

    def __init__(self, in_channels: int, dim: int, kind: str = "imagenet") -> None:
        super().__init__()
        if kind == "imagenet":
            self.conv = nn.Conv2d(in_channels, dim, 7, 2, 3, bias=False)
            self.pool: nn.Module = nn.MaxPool2d(3, 2, 1)
        elif kind == "small":
            self.conv = nn.Conv2d(in_channels, dim, 3, 1, 1, bias=False)
            self.pool = nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {kind!r}")
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return seq_apply(lambda z: self.pool(self.bn(self.conv(z))), x)


class SpikingResformer(nn.Module):
    """SpikingResformer; input ``[B, C, H, W]`` (repeated over T) or ``[B, T, C, H, W]``.

    Output: logits ``[B, num_classes]``, the classifier applied per time step and averaged.
    The classifier sees ``[T, B, C]`` (time-major), so DA-SSDP recorders read per-step activity.

    ``spike_saving`` (default on): autograd keeps the spikes it saves for the backward as
    ``bool`` (:func:`dassdp.neurons.spike_saving`; bit-identical gradients, less memory).
    ``checkpoint_stages``: indices of stages run with activation checkpointing
    (:func:`dassdp.models.layers.checkpointed`): less memory, one more forward of those stages
    in the backward; same outputs, gradients and DA-SSDP records.
    """

    def __init__(
        self,
        dims: Sequence[int] = (64, 192, 384),
        depths: Sequence[int] = (1, 2, 3),
        num_heads: Sequence[int] = (1, 3, 6),
        patch_sizes: Sequence[int] = (4, 2, 1),
        num_classes: int = 1000,
        T: int = 4,
        in_channels: int = 3,
        stem: str = "imagenet",
        group_size: int = 64,
        neuron_layer: NeuronLayer = LIF,
        spike_saving: bool = True,
        checkpoint_stages: Sequence[int] = (),
    ) -> None:
        super().__init__()
        dims, depths = check_sizes("dims", dims), check_sizes("depths", depths)
        num_heads, patch_sizes = (
            check_sizes("num_heads", num_heads),
            check_sizes("patch_sizes", patch_sizes),
        )
        if not len(dims) == len(depths) == len(num_heads) == len(patch_sizes):
            raise ValueError("dims, depths, num_heads and patch_sizes must have the same length")
        for key, size in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("group_size", group_size),
        ):
            check_size(key, size)
        if not isinstance(spike_saving, bool):
            raise ValueError(f"spike_saving must be true or false, got {spike_saving!r}")
        self.T = int(T)
        self.spike_saving = spike_saving
        self.checkpoint_stages = check_stage_indices(
            checkpoint_stages, len(dims), "checkpoint_stages"
        )
        self.stem = Stem(in_channels, dims[0], stem)
        self.stages = nn.ModuleList(
            Stage(
                dims[max(i - 1, 0)],
                dims[i],
                depths[i],
                num_heads[i],
                patch_sizes[i],
                group_size,
                neuron_layer,
                downsample=i > 0,
            )
            for i in range(len(dims))
        )
        self.classifier = nn.Linear(dims[-1], num_classes, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Time-major residual stream after the last stage, pooled: ``[T, B, C]``."""
        with spike_saving(self.spike_saving):
            x = self.stem(to_time_major(x, self.T))  # [T, B, C0, H, W]
            for i, stage in enumerate(self.stages):
                x = checkpointed(stage, x) if i in self.checkpoint_stages else stage(x)
            return x.mean(dim=(-2, -1))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x)).mean(0)  # [T, B, K] -> [B, K]

    @property
    def projection_block(self) -> str:
        """Name of the first DSSA block of the last stage (its ``proj`` is a DA-SSDP site)."""
        return f"stages.{len(self.stages) - 1}.blocks.0"

    def dassdp_sites(self, preset: str = "default") -> dict[str, SiteSpec]:
        """DA-SSDP sites ("the deeper layers"): classifier and W_proj of the last stage's 1st DSSA.

        ``"default"``: classifier (pre: pooled features > 0, post: logits > 0) and W_proj
        (pre: the spikes entering it, post: the DSSA block's output > 0).
        ``"compat"``: the released code's pairing: classifier with ``fired="mean"``; W_proj
        with pre = the block's input > 0, post = the block's output > 0, silent latency 0.
        ``"classifier"`` / ``"projection"``: one of the two default sites.
        ``"mid"``: the paper's placement ablation, the mid-to-late stage instead of the deepest
        layers. Our reading: the stage before the last (``stages.1`` of the three-stage
        models), every DSSA block's W_proj there (``Ti``: two 192 x 192 sites), each paired as
        the default projection site (pre: the spikes entering it, post: its block's
        output > 0); no classifier site. See :attr:`mid_blocks`.
        """
        return pick_preset(type(self).__name__, preset, self._site_presets())

    @property
    def dassdp_site_presets(self) -> tuple[str, ...]:
        """Names accepted by :meth:`dassdp_sites`."""
        return tuple(sorted(self._site_presets()))

    @property
    def mid_blocks(self) -> list[str]:
        """Names of the DSSA blocks of the stage before the last (the ``"mid"`` preset)."""
        if len(self.stages) < 2:
            raise ValueError(
                f"{type(self).__name__} with {len(self.stages)} stage has no stage before the "
                "last: the 'mid' site preset needs at least 2 stages"
            )
        i = len(self.stages) - 2
        stage = self.stages[i].blocks
        return [f"stages.{i}.blocks.{j}" for j, m in enumerate(stage) if isinstance(m, DSSA)]

    @property
    def dassdp_site_norms(self) -> dict[str, str | None]:
        """The normalisation that follows each possible DA-SSDP site: every DSSA block's
        ``proj`` (``W_proj``) goes through its ``proj_bn``; the classifier feeds the logits
        directly (``None``). Read by :mod:`dassdp.experiments.site_effect`."""
        norms: dict[str, str | None] = {
            f"{name}.proj": f"{name}.proj_bn"
            for name, module in self.named_modules()
            if isinstance(module, DSSA)
        }
        return {**norms, "classifier": None}

    def _site_presets(self) -> dict[str, Callable[[], dict[str, SiteSpec]]]:
        block = self.projection_block
        classifier = {"classifier": SiteSpec(pre="input>0", post="output>0")}
        projection = {f"{block}.proj": SiteSpec(pre="input", post=f"{block}>0")}
        compat = {
            "classifier": SiteSpec(pre="input>0", post="output>0", fired="mean"),
            f"{block}.proj": SiteSpec(
                pre=f"{block}@input>0", post=f"{block}>0", fired="any", silent_pre=0, silent_post=0
            ),
        }
        return {
            "default": lambda: {**classifier, **projection},
            "compat": lambda: dict(compat),
            "classifier": lambda: dict(classifier),
            "projection": lambda: dict(projection),
            "mid": lambda: {
                f"{b}.proj": SiteSpec(pre="input", post=f"{b}>0") for b in self.mid_blocks
            },
        }

    def no_weight_decay(self) -> set[str]:
        """PLIF time-constant parameters, which should not be weight-decayed."""
        return {f"{n}.w" for n, m in self.named_modules() if isinstance(m, PLIF)}


_WIDTHS: dict[str, dict[str, Any]] = {
    "ti": dict(dims=(64, 192, 384), num_heads=(1, 3, 6)),
    "s": dict(dims=(64, 256, 512), num_heads=(1, 4, 8)),
    "m": dict(dims=(64, 384, 768), num_heads=(1, 6, 12)),
    "l": dict(dims=(128, 512, 1024), num_heads=(2, 8, 16)),
}


@register_model
def spikingresformer_ti(**kwargs: Any) -> SpikingResformer:
    """SpikingResformer-Ti: 64-192-384 wide, 1-3-6 heads, ImageNet stem."""
    return SpikingResformer(**{**_WIDTHS["ti"], **kwargs})


@register_model
def spikingresformer_s(**kwargs: Any) -> SpikingResformer:
    """SpikingResformer-S: 64-256-512 wide, 1-4-8 heads, ImageNet stem."""
    return SpikingResformer(**{**_WIDTHS["s"], **kwargs})


@register_model
def spikingresformer_m(**kwargs: Any) -> SpikingResformer:
    """SpikingResformer-M: 64-384-768 wide, 1-6-12 heads, ImageNet stem."""
    return SpikingResformer(**{**_WIDTHS["m"], **kwargs})


@register_model
def spikingresformer_l(**kwargs: Any) -> SpikingResformer:
    """SpikingResformer-L: 128-512-1024 wide, 2-8-16 heads, ImageNet stem."""
    return SpikingResformer(**{**_WIDTHS["l"], **kwargs})


@register_model
def spikingresformer_cifar(**kwargs: Any) -> SpikingResformer:
    """SpikingResformer-Ti* for CIFAR: Ti widths, 3x3 stride-1 stem, 10 classes by default."""
    return SpikingResformer(**{**_WIDTHS["ti"], "stem": "small", "num_classes": 10, **kwargs})


@register_model
def spikingresformer_dvsg(**kwargs: Any) -> SpikingResformer:
    """SpikingResformer for DVS128 Gesture: 32-96-192, 3x3 stem, groups of 32, PLIF, 2 inputs."""
    return SpikingResformer(
        **{
            "dims": (32, 96, 192),
            "num_heads": (1, 3, 6),
            "stem": "small",
            "group_size": 32,
            "neuron_layer": PLIF,
            "num_classes": 11,
            "in_channels": 2,
            **kwargs,
        }
    )
