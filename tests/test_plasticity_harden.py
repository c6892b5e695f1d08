"""Hardening round two (issue 23) of the learner and its interop: a state loads only into the
learner of the same run, a model compiled before the learner attached is recorded, recomputed
forwards of torch.utils.checkpoint are not recorded twice, reset touches only neuron state,
gradient accumulation with the README loop learns from every micro-batch, and a layout that
cannot be known is an error at step()."""

import pytest
import torch
import torch.nn.functional as F

import dassdp
from dassdp import DASSDP, DASSDPConfig
from snn_fixtures import TinySNN, spike

B = 8


def trained(cfg=None, sites="default", steps=2, **model_kw):
    """A learner in warm-up after ``steps`` recorded steps (so its state holds records)."""
    torch.manual_seed(0)
    model = TinySNN(**model_kw)
    plast = DASSDP(model, cfg or DASSDPConfig(warmup_epochs=1), sites)
    for i in range(steps):
        x = torch.randn(B, model.fc1.in_features, generator=torch.Generator().manual_seed(i))
        loss = F.cross_entropy(model(x), torch.zeros(B, dtype=torch.long))
        loss.backward()
        plast.step(loss.detach())
        dassdp.reset(model)
    return model, plast


# ------------------------------------------------------ item 6: load_state_dict
@pytest.mark.parametrize(
    ("other", "match"),
    [
        (dict(hidden=11), r"site 'fc2': its weight is \[C_out, C_in\] = \[4, 10\] in the "),
        (dict(sites="classifier"), r"sites \['fc2', 'fc1'\] do not match .* \['fc2'\]"),
        (dict(cfg=DASSDPConfig(warmup_epochs=1, gate="one")), r"config.gate: 'fitted' in the"),
        (dict(cfg=DASSDPConfig(warmup_epochs=1, A_plus=3e-3)), r"config.A_plus: 0.0015 in "),
        (dict(cfg=DASSDPConfig(warmup_epochs=2)), r"config.warmup_epochs: 1 in the DA-SSDP"),
        (dict(T=5), r"recorded with T=4, this learner has T=5"),
        (
            dict(sites={"fc2": "output>0.5", "fc1": {"pre": "input>0", "post": "act1"}}),
            r"site 'fc2': post='output>0' in the DA-SSDP state, 'output>0.5' in this learner",
        ),
    ],
)
def test_a_state_of_another_learner_is_refused_and_nothing_is_loaded(other, match):
    _, source = trained()
    state = source.state_dict()
    assert state["stats"]["fc2"]["sums"][0] > 0  # warm-up records that must not leak
    kw = dict(other)
    T = kw.pop("T", None)
    torch.manual_seed(1)
    model = TinySNN(**{k: v for k, v in kw.items() if k == "hidden"})
    target = DASSDP(
        model, kw.get("cfg", DASSDPConfig(warmup_epochs=1)), kw.get("sites", "default"), T=T
    )
    before = {n: s.sums.clone() for n, s in target.stats.items()}
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert target.epoch == 0 and target.fits is None and target.counters["steps"] == 0
    assert all(torch.equal(target.stats[n].sums, v) for n, v in before.items())


def test_the_first_difference_is_named_and_debug_may_change():
    _, source = trained()
    state = source.state_dict()
    torch.manual_seed(1)
    twin = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=1, debug=True))
    twin.load_state_dict(state)  # debug changes no value: a resume may switch it
    assert twin.stats["fc2"].n == source.stats["fc2"].n == 2 * B
    other = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=3, gate="one", A_plus=1.0))
    with pytest.raises(ValueError, match=r"config.A_plus: 0.0015 in the DA-SSDP state, 1.0"):
        other.load_state_dict(state)  # A_plus comes first in the config's field order


def test_strict_false_loads_another_config_but_never_another_model():
    _, source = trained()
    state = source.state_dict()
    torch.manual_seed(1)
    other_cfg = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=1, A_plus=0.01))
    other_cfg.load_state_dict(state, strict=False)
    assert other_cfg.stats["fc1"].n == 2 * B and other_cfg.config.A_plus == 0.01
    other_model = DASSDP(TinySNN(d_in=13), DASSDPConfig(warmup_epochs=1))
    with pytest.raises(ValueError, match=r"site 'fc1': its weight is .* \[10, 12\] in the DA"):
        other_model.load_state_dict(state, strict=False)


def test_an_older_state_without_specs_shapes_or_new_config_fields_loads():
    _, source = trained()
    state = source.state_dict()
    for key in ("site_specs", "shapes", "T"):
        del state[key]
    state["config"] = {k: v for k, v in state["config"].items() if k != "amplitude_init"}
    torch.manual_seed(1)
    twin = DASSDP(TinySNN(), DASSDPConfig(warmup_epochs=1))
    twin.load_state_dict(state)
    assert twin.stats["fc2"].n == 2 * B


def test_a_model_state_dict_or_a_checkpoint_is_named_as_such():
    model, plast = trained()
    with pytest.raises(ValueError, match=r"this is a model's state_dict \(tensors such as "):
        plast.load_state_dict(model.state_dict())
    ckpt = {"model": model.state_dict(), "plasticity": plast.state_dict(), "epoch": 1}
    with pytest.raises(ValueError, match=r"pass its 'plasticity' entry"):
        plast.load_state_dict(ckpt)
    with pytest.raises(ValueError, match=r"lacks \['sites', 'stats'"):
        plast.load_state_dict({"epoch": 1})
    with pytest.raises(TypeError, match="got a list"):
        plast.load_state_dict([1, 2])


# ------------------------------------------- item 13: a layout that cannot be known
class PlainNet(torch.nn.Module):
    """Stateless: fed [B, D] once per time step by a loop outside its forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(spike(self.fc1(x)))


def test_per_step_calls_outside_the_forward_without_layout_or_T_apply_nothing():
    torch.manual_seed(0)
    model = PlainNet()
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=0, gate="one"), sites={"fc2": "output>0"})
    w = model.fc2.weight.detach().clone()
    x = torch.randn(3, B, 5) * 2
    sum(model(x[t]).sum() for t in range(3)).backward()  # no error in the forwards
    with pytest.raises(ValueError, match=r"layout is unknown.*pass\s+layout='step'"):
        plast.step(torch.tensor(1.0))
    assert torch.equal(model.fc2.weight, w) and plast.counters["applied"] == 0
    dassdp.reset(model)
    right = DASSDP(model, plast.config, sites={"fc2": {"post": "output>0", "layout": "step"}}, T=3)
    plast.close()
    sum(model(x[t]).sum() for t in range(3)).backward()
    assert right.step(torch.tensor(1.0))  # what the message says to pass
