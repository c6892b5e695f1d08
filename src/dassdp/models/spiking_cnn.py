"""``spiking_cnn``: a small convolutional SNN for 28x28 grey and 32x32 colour images.

Layout (``c1, c2 = channels``; every neuron multi-step over time-major tensors)::

    conv1 3x3 (in -> c1), bn1, lif1, pool1 (max 2)        [T, B, c1, H/2, W/2]
    conv2 3x3 (c1 -> c2), bn2, lif2, pool2 (max 2)        [T, B, c2, H/4, W/4]
    pool3 (adaptive max to 4x4), flatten                  [T, B, c2 * 16]   spikes
    fc1 (c2 * 16 -> hidden), bn3, lif3                    [T, B, hidden]    spikes
    [drop: dropout p, one mask per sample for all T]      (``dropout > 0`` only)
    classifier (hidden -> classes)                        [T, B, classes]
    [classifier_bn: BatchNorm1d over classes]             (``site_norm=True`` only)
    mean over T                                           [B, classes]

Max pooling of spikes is again spikes, so both Linear layers see {0, 1} inputs: the two
DA-SSDP sites (``fc1`` and ``classifier``) have genuine spike activity on both sides.
``fc1`` is followed by a BatchNorm (``bn3``, with ``norm=True``); ``site_norm=True`` puts
one after the classifier too, so that every default site is followed by a BatchNorm, as
SpikingResformer's ``W_proj`` is (:attr:`SpikingCNN.dassdp_site_norms` names them).
With the defaults (``dropout=0``, ``site_norm=False``) neither extra module exists: the
model, its parameters, its initialisation and its outputs are those of earlier versions.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from dassdp.models.layers import (
    NeuronLayer,
    TimeSharedDropout,
    check_size,
    check_sizes,
    pick_preset,
    seq_apply,
    to_time_major,
)
from dassdp.models.registry import register_model
from dassdp.neurons import LIF, mark_spikes, spike_saving
from dassdp.plasticity.sites import SiteSpec

__all__ = ["SpikingCNN", "spiking_cnn"]


class SpikingCNN(nn.Module):
    """Two conv layers and a spiking MLP head; input ``[B, C, H, W]`` or ``[B, T, C, H, W]``.

    ``norm=False`` removes the three BatchNorms (batch statistics are per rank under DDP on
    CPU); ``v_threshold`` is passed to every neuron (lower it to keep a norm-free net firing).
    ``spike_saving`` (default on): autograd keeps the spikes it saves (the neurons' outputs
    and their max pools) as ``bool`` (:func:`dassdp.neurons.spike_saving`; bit-identical
    gradients, less memory).

    Regularizer and site variants (defaults: today's model, bit for bit):
    ``dropout`` (probability in ``[0, 1)``): dropout of the hidden spikes before the
    classifier, one mask per sample shared by all T steps
    (:class:`dassdp.models.layers.TimeSharedDropout`); the classifier then sees
    ``{0, 1/(1-p)}`` and a dropped unit counts as silent for DA-SSDP's classifier site.
    ``site_norm``: a ``BatchNorm1d(num_classes)`` (``classifier_bn``) on the classifier's
    per-step output, so the classifier site, like ``fc1``, is followed by a BatchNorm.
    """

    def __init__(
        self,
        num_classes: int = 10,
        T: int = 4,
        in_channels: int = 1,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 128,
        norm: bool = True,
        v_threshold: float = 1.0,
        neuron_layer: NeuronLayer = LIF,
        spike_saving: bool = True,
        dropout: float = 0.0,
        site_norm: bool = False,
    ) -> None:
        super().__init__()
        for key, flag in (("spike_saving", spike_saving), ("site_norm", site_norm)):
            if not isinstance(flag, bool):
                raise ValueError(f"{key} must be true or false, got {flag!r}")
        c1, c2 = check_sizes("channels", channels, length=2)
        for key, size in (
            ("in_channels", in_channels),
            ("hidden", hidden),
            ("num_classes", num_classes),
        ):
            check_size(key, size)
        self.T = int(T)
        self.spike_saving = spike_saving
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1) if norm else nn.Identity()
        self.lif1 = neuron_layer(v_threshold=v_threshold)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2) if norm else nn.Identity()
        self.lif2 = neuron_layer(v_threshold=v_threshold)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.AdaptiveMaxPool2d((4, 4))
        self.fc1 = nn.Linear(c2 * 16, hidden)
        # BatchNorm keeps lif3 firing at init, so the head trains; norm=False drops all three
        # (batch statistics are per rank under DDP on CPU, where SyncBatchNorm is unavailable)
        self.bn3 = nn.BatchNorm1d(hidden) if norm else nn.Identity()
        self.lif3 = neuron_layer(v_threshold=v_threshold)
        # optional modules exist only when asked for: the default model is unchanged
        drop = TimeSharedDropout(dropout)  # checks 0 <= dropout < 1
        self.drop = drop if drop.p > 0 else None
        self.classifier = nn.Linear(hidden, num_classes)
        self.classifier_bn = nn.BatchNorm1d(num_classes) if site_norm else None

    def forward(self, x: Tensor) -> Tensor:
        with spike_saving(self.spike_saving):
            x = to_time_major(x, self.T)  # [T, B, C, H, W]
            x = self.lif1(seq_apply(lambda z: self.bn1(self.conv1(z)), x))
            # Max pools of spikes are spikes: marked, so that autograd may save them as bool.
            x = seq_apply(lambda z: mark_spikes(self.pool1(z)), x)
            x = self.lif2(seq_apply(lambda z: self.bn2(self.conv2(z)), x))
            x = seq_apply(lambda z: mark_spikes(self.pool2(z)), x)
            x = seq_apply(lambda z: mark_spikes(self.pool3(z)), x).flatten(2)  # [T, B, c2*16]
            x = self.lif3(seq_apply(self.bn3, self.fc1(x)))  # [T, B, hidden] spikes
            if self.drop is not None:
                x = self.drop(x)  # [T, B, hidden], a unit dropped for all T
            logits = self.classifier(x)  # [T, B, classes]
            if self.classifier_bn is not None:
                logits = seq_apply(self.classifier_bn, logits)
            return logits.mean(0)  # [T, B, classes] -> [B, classes]

    def dassdp_sites(self, preset: str = "default") -> dict[str, SiteSpec]:
        """DA-SSDP sites: the classifier and the last hidden layer (post: its LIF spikes).

        Presets: ``"default"`` (both), ``"classifier"``, ``"hidden"`` (alias ``"projection"``).
        """
        return pick_preset("spiking_cnn", preset, self._site_presets())

    @property
    def dassdp_site_presets(self) -> tuple[str, ...]:
        """Names accepted by :meth:`dassdp_sites`."""
        return tuple(sorted(self._site_presets()))

    @property
    def dassdp_site_norms(self) -> dict[str, str | None]:
        """The normalisation that follows each DA-SSDP site (every preset's sites): the
        module name of the BatchNorm its output goes through next, or ``None`` (the
        classifier without ``site_norm`` feeds the logits directly). Read by
        :mod:`dassdp.experiments.site_effect`."""
        fc1 = "bn3" if isinstance(self.bn3, nn.BatchNorm1d) else None
        classifier = "classifier_bn" if self.classifier_bn is not None else None
        return {"fc1": fc1, "classifier": classifier}

    def _site_presets(self) -> dict[str, Callable[[], dict[str, SiteSpec]]]:
        classifier = {"classifier": SiteSpec(pre="input", post="output>0")}
        hidden = {"fc1": SiteSpec(pre="input", post="lif3")}
        return {
            "default": lambda: {**classifier, **hidden},
            "classifier": lambda: dict(classifier),
            "hidden": lambda: dict(hidden),
            "projection": lambda: dict(hidden),
        }


@register_model
def spiking_cnn(**kwargs) -> SpikingCNN:
    """Small conv SNN (16-32 channels, 128 hidden): MNIST-size or CIFAR-size inputs on a CPU."""
    return SpikingCNN(**kwargs)
