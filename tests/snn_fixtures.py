"""Tiny spiking models for the learner tests (no dependency on dassdp.models)."""

from __future__ import annotations

import torch
from torch import nn


def spike(x: torch.Tensor) -> torch.Tensor:
    """Heaviside forward, sigmoid-derivative backward."""
    sg = torch.sigmoid(4 * x)
    return (x > 0).to(x.dtype) + sg - sg.detach()


class Spike(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spike(x)


class TinySNN(nn.Module):
    """[B, D] -> repeat over T -> fc1 -> spikes -> fc2 -> mean over T. Time-major inside."""

    def __init__(self, d_in=12, hidden=10, classes=4, T=4):
        super().__init__()
        self.T = T
        self.fc1 = nn.Linear(d_in, hidden)
        self.act1 = Spike()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = x.unsqueeze(0).repeat(self.T, 1, 1)  # [T, B, D]
        x = x + 0.3 * torch.arange(self.T, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return self.fc2(self.act1(self.fc1(x))).mean(0)  # [B, classes]

    def dassdp_sites(self, preset="default"):
        sites = {
            "default": {
                "fc2": {"pre": "input", "post": "output>0"},
                "fc1": {"pre": "input>0", "post": "act1"},
            },
            "classifier": {"fc2": "output>0"},
        }
        return sites[preset]


class ConvSNN(nn.Module):
    """A 1x1-conv site fed flattened [T*B, C, H, W] tensors, as SpikingResformer does."""

    def __init__(self, c_in=3, c=8, classes=3, T=3):
        super().__init__()
        self.T = T
        self.conv = nn.Conv2d(c_in, c, 3, padding=1)
        self.act = Spike()
        self.proj = nn.Conv2d(c, c, 1)
        self.act2 = Spike()
        self.head = nn.Linear(c, classes)

    def forward(self, x):  # x: [B, C, H, W]
        B = x.shape[0]
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1).flatten(0, 1)  # [T*B, C, H, W]
        x = x * torch.arange(1, self.T + 1, dtype=x.dtype).repeat_interleave(B).view(-1, 1, 1, 1)
        y = self.act2(self.proj(self.act(self.conv(x))))  # [T*B, c, H, W]
        return self.head(y.mean((2, 3))).view(self.T, B, -1).mean(0)


class StepSNN(nn.Module):
    """The snnTorch idiom: layers called once per time step on [B, C]; neuron returns a tuple."""

    class TupleSpike(nn.Module):
        def forward(self, x):
            return spike(x), x

    def __init__(self, d_in=6, hidden=5, classes=3, steps=3):
        super().__init__()
        self.steps = steps
        self.fc1 = nn.Linear(d_in, hidden)
        self.lif1 = StepSNN.TupleSpike()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        outs = []
        for t in range(self.steps):
            spk, _ = self.lif1(self.fc1(x * (t + 1) / self.steps))
            outs.append(self.fc2(spk))
        return torch.stack(outs).mean(0)
