"""The replica digest behind the per-epoch DDP consistency check."""

import copy

import torch

import dassdp
from dassdp.engine.distributed import replicas_identical, state_digest


def test_digest_sees_every_bit_and_handles_zero_dim_buffers():
    model = dassdp.create_model("spiking_cnn", in_channels=1, num_classes=3, T=2)
    twin = copy.deepcopy(model)
    assert state_digest(model) == state_digest(twin)  # incl. BatchNorm's 0-d counters
    with torch.no_grad():
        w = twin.classifier.weight
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(10.0))  # one ulp
    assert state_digest(model) != state_digest(twin)
    assert state_digest(model, b"gate") != state_digest(model)
    twin = copy.deepcopy(model)
    twin.bn1.num_batches_tracked += 1
    assert state_digest(model) != state_digest(twin)
    assert replicas_identical(model) is None  # single process: nothing to compare
