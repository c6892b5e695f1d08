"""``spiking_cnn``: a small convolutional SNN for 28x28 grey and 32x32 colour images.

Layout (``c1, c2 = channels``; every neuron multi-step over time-major tensors)::

    conv1 3x3 (in -> c1), bn1, lif1, pool1 (max 2)        [T, B, c1, H/2, W/2]
    conv2 3x3 (c1 -> c2), bn2, lif2, pool2 (max 2)        [T, B, c2, H/4, W/4]
    pool3 (adaptive max to 4x4), flatten                  [T, B, c2 * 16]   spikes
    fc1 (c2 * 16 -> hidden), bn3, lif3                    [T, B, hidden]    spikes
    classifier (hidden -> classes), mean over T           [B, classes]

Max pooling of spikes is again spikes, so both Linear layers see {0, 1} inputs: the two
DA-SSDP sites (``fc1`` and ``classifier``) have genuine spike activity on both sides.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from dassdp.models.layers import NeuronLayer, pick_preset, seq_apply, to_time_major
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
    ) -> None:
        super().__init__()
        if not isinstance(spike_saving, bool):
            raise ValueError(f"spike_saving must be true or false, got {spike_saving!r}")
        c1, c2 = channels
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
        self.classifier = nn.Linear(hidden, num_classes)

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
            return self.classifier(x).mean(0)  # [T, B, classes] -> [B, classes]

    def dassdp_sites(self, preset: str = "default") -> dict[str, SiteSpec]:
        """DA-SSDP sites: the classifier and the last hidden layer (post: its LIF spikes).

        Presets: ``"default"`` (both), ``"classifier"``, ``"hidden"`` (alias ``"projection"``).
        """
        return pick_preset("spiking_cnn", preset, self._site_presets())

    @property
    def dassdp_site_presets(self) -> tuple[str, ...]:
        """Names accepted by :meth:`dassdp_sites`."""
        return tuple(sorted(self._site_presets()))

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
