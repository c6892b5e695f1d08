"""Robustness perturbations: identities, conservation laws, rates; and the eval hook/CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dassdp.cli import main
from dassdp.engine import evaluate_checkpoint, fit
from dassdp.experiments.robustness import (
    Perturbation,
    Perturber,
    drop_events,
    jitter_events,
    parse_conditions,
    repeat_time,
    spurious_events,
)
from engine_fixtures import tiny


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def frames() -> torch.Tensor:
    g = _gen(1)
    return torch.poisson(torch.full((8, 6, 2, 5, 5), 0.7), generator=g)  # [B, T, C, H, W]


def test_drop_zero_is_identity_and_one_removes_everything(frames: torch.Tensor) -> None:
    assert torch.equal(drop_events(frames, 0.0, _gen()), frames)
    assert drop_events(frames, 1.0, _gen()).count_nonzero() == 0
    kept = drop_events(torch.ones(200_000), 0.3, _gen()).mean().item()
    assert kept == pytest.approx(0.7, abs=0.01)


def test_jitter_keeps_counts_per_pixel_and_moves_events(frames: torch.Tensor) -> None:
    out = jitter_events(frames, 1.5, _gen())
    assert torch.equal(out.sum(1), frames.sum(1))  # every event stays within [0, T)
    assert not torch.equal(out, frames)
    assert torch.equal(jitter_events(frames, 0.0, _gen()), frames)


def test_jitter_shift_has_the_requested_spread() -> None:
    T = 41
    x = torch.zeros(20_000, T)
    x[:, T // 2] = 1.0  # one event in the middle, far from the clamped edges
    t = jitter_events(x, 2.0, _gen()).argmax(1).float() - T // 2
    assert t.mean().item() == pytest.approx(0.0, abs=0.05)
    assert t.std().item() == pytest.approx(math.sqrt(4 + 1 / 12), abs=0.05)  # + rounding


def test_noise_adds_events_at_rate_p() -> None:
    zeros = torch.zeros(100, 4, 2, 16, 16)
    out = spurious_events(zeros, 0.05, _gen(), frames=True)
    assert out.max() == 1.0 and out.mean().item() == pytest.approx(0.05, abs=0.003)
    assert torch.equal(spurious_events(zeros, 0.0, _gen(), frames=True), zeros)


def test_noise_on_images_sets_saturated_pixels_per_channel() -> None:
    x = repeat_time(torch.rand(64, 3, 8, 8) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1), 4)
    out = spurious_events(x, 0.1, _gen(), frames=False)
    for c in range(3):
        hit = out[:, :, c] != x[:, :, c]
        assert hit.float().mean().item() == pytest.approx(0.1, abs=0.01)
        assert torch.all(out[:, :, c][hit] == x[:, :, c].max())


def test_perturber_encodes_images_and_is_reproducible() -> None:
    x = torch.randn(4, 1, 6, 6)  # [B, C, H, W]
    clean = Perturber(Perturbation("clean"))(x, 3)
    assert clean.shape == (4, 3, 1, 6, 6) and torch.equal(clean[:, 2], x)
    a = Perturber(Perturbation("drop", 0.5), seed=3)(x, 3)
    b = Perturber(Perturbation("drop", 0.5), seed=3)(x, 3)
    assert torch.equal(a, b) and not torch.equal(a, clean)
    ev = torch.ones(2, 3, 2, 4, 4)  # event frames keep their own T
    assert Perturber(Perturbation("jitter", 1.0))(ev, 3).sum() == ev.sum()


def test_parse_conditions_and_errors() -> None:
    got = parse_conditions("jitter=1, drop=0.1,noise=0.05")
    assert [c.name for c in got] == ["jitter=1", "drop=0.1", "noise=0.05"]
    for bad in ("drop=1.5", "blur=1", "drop", "jitter=-1"):
        with pytest.raises(ValueError):
            parse_conditions(bad)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("robust")
    fit(tiny(epochs=1, plasticity=None), run)
    return run / "last.pt"


def test_eval_applies_the_transform_to_the_test_input(checkpoint: Path) -> None:
    shapes = []

    def spy(x: torch.Tensor, T: int) -> torch.Tensor:
        shapes.append((tuple(x.shape), T))
        return repeat_time(x, T)

    evaluate_checkpoint(checkpoint, transform=spy)
    assert shapes[0] == ((32, 1, 16, 16), 2) and len(shapes) == 2  # 64 test images

    def wrong_T(x: torch.Tensor, T: int) -> torch.Tensor:
        return repeat_time(x, T + 1)

    with pytest.raises(ValueError, match="T=3"):  # the transformed input reaches the model
        evaluate_checkpoint(checkpoint, transform=wrong_T)


def test_eval_cli_writes_robustness_json(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    out = checkpoint.parent
    rc = main(["eval", "--checkpoint", str(checkpoint), "--drop", "1", "--jitter", "1"])
    assert rc == 0 and "drop=1" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(checkpoint), "--noise", "0.5", "--out", str(out)]) == 0
    data = json.loads((out / "robustness.json").read_text())
    assert [c["name"] for c in data["conditions"]] == ["clean", "noise=0.5"]
    assert data["seed"] == 0 and data["conditions"][0]["samples"] == 64
