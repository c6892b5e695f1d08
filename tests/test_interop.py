"""DA-SSDP attached, unchanged, to models written with snnTorch and with SpikingJelly.

Both packages are test-only dependencies (installed by `make test` with --no-deps)."""

import snntorch as snn
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import layer, neuron
from torch import nn

import dassdp
from dassdp import DASSDP, DASSDPConfig
from oracle import naive_dw_from_activity

CFG = DASSDPConfig(warmup_epochs=0, gate="one", A_plus=0.05, A_minus=0.01)


class SnnTorchNet(nn.Module):
    """The snnTorch idiom: a Python loop over time, each layer called on [B, C] per step."""

    def __init__(self, steps=5):
        super().__init__()
        self.steps = steps
        self.fc1, self.lif1 = nn.Linear(12, 16), snn.Leaky(beta=0.8)
        self.fc2, self.lif2 = nn.Linear(16, 6), snn.Leaky(beta=0.8, threshold=0.2)

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        out = []
        for _ in range(self.steps):
            spk1, mem1 = self.lif1(self.fc1(x), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk2)
        return torch.stack(out).sum(0)


def test_snntorch_model_per_step_calls():
    torch.manual_seed(0)
    model = SnnTorchNet()
    plast = DASSDP(model, CFG, sites={"fc2": {"pre": "lif1", "post": "lif2"}})
    seen = {"pre": [], "post": []}
    model.lif1.register_forward_hook(lambda m, a, o: seen["pre"].append(o[0].detach()))
    model.lif2.register_forward_hook(lambda m, a, o: seen["post"].append(o[0].detach()))
    x = torch.rand(8, 12) * 4
    w = model.fc2.weight.detach().clone()
    loss = F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long))
    loss.backward()
    assert plast.step(loss)
    s_pre, s_post = torch.stack(seen["pre"]) > 0, torch.stack(seen["post"]) > 0
    assert s_pre.shape == (5, 8, 16) and s_pre.any() and s_post.any()
    expected = naive_dw_from_activity(
        s_pre,
        s_post,
        None,
        A_plus=0.05,
        A_minus=0.01,
        sigma=1.0,
        clip=1.0,
    )
    torch.testing.assert_close((model.fc2.weight - w).double(), expected, rtol=1e-5, atol=1e-7)


def spikingjelly_net():
    return nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, step_mode="m"),
        neuron.LIFNode(tau=2.0, step_mode="m"),
        layer.Conv2d(8, 8, 1, step_mode="m"),  # the 1x1 conv site
        neuron.LIFNode(tau=2.0, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(8 * 4 * 4, 3, step_mode="m"),
    )


def test_spikingjelly_multistep_conv_site_and_reset():
    torch.manual_seed(0)
    net = spikingjelly_net()
    plast = DASSDP(net, CFG, sites={"2": {"pre": "1", "post": "3"}})
    seen = {}
    net[1].register_forward_hook(lambda m, a, o: seen.update(pre=o.detach()))
    net[3].register_forward_hook(lambda m, a, o: seen.update(post=o.detach()))
    x = torch.rand(4, 6, 2, 4, 4) * 4  # [T, B, C, H, W]
    w = net[2].weight.detach().clone()
    loss = net(x).mean(0).sum()
    loss.backward()
    assert plast.step(loss)
    s_pre = seen["pre"].flatten(3).amax(3) > 0  # [T, B, C]: any position
    s_post = seen["post"].flatten(3).amax(3) > 0
    expected = naive_dw_from_activity(
        s_pre,
        s_post,
        None,
        A_plus=0.05,
        A_minus=0.01,
        sigma=1.0,
        clip=1.0,
    )
    torch.testing.assert_close(
        (net[2].weight - w).double().view(8, 8), expected, rtol=1e-5, atol=1e-7
    )
    assert isinstance(net[1].v, torch.Tensor)  # the neuron holds state after a forward
    dassdp.reset(net)  # SpikingJelly's MemoryModule.reset() is called
    assert not isinstance(net[1].v, torch.Tensor) and net[1].v == 0.0
