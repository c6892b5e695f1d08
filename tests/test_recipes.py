"""The paper's recipes resolve to the released scripts' data pipelines; DVS augmentation ops;
the ``transform:`` block's errors name the key."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from dassdp.data import dataset_info
from dassdp.data.transforms import (
    AppendPolaritySum,
    EventCutout,
    EventNDA,
    EventRoll,
    EventRotate,
    RandomFlipFrames,
    event_transform,
    image_transform,
)
from dassdp.engine import ConfigError, config_from_dict, load_config
from dassdp.engine.builders import build_model, data_info, load_pretrained
from dassdp.models.spikingresformer import SpikingResformer
from engine_fixtures import tiny_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BICUBIC = T.InterpolationMode.BICUBIC


def recipe_transform(name: str, train: bool, **changes):
    cfg = load_config(CONFIGS / name)
    info = data_info(cfg)
    options = {**dataclasses.asdict(cfg.transform), **changes}
    augment = options.pop("augment", cfg.augment)
    size = cfg.input_size or info.input_size
    tf = image_transform(info, train=train, input_size=size, augment=augment, **options)
    return cfg, tf


def of_type(tf, cls):
    return [op for op in tf.transforms if isinstance(op, cls)]


def image(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["cifar10.yaml", "cifar100.yaml"])
def test_cifar_recipes_use_the_released_loader(name):
    cfg, tf = recipe_transform(name, train=True)
    assert not of_type(tf, T.RandomCrop)  # no RandomCrop(32, padding=4)
    (crop,) = of_type(tf, RandomResizedCropAndInterpolation)
    assert (crop.scale, crop.ratio, crop.size) == ((1.0, 1.0), (1.0, 1.0), (32, 32))
    assert crop.interpolation == BICUBIC
    (flip,) = of_type(tf, T.RandomHorizontalFlip)
    assert flip.p == 0.5
    (ra,) = of_type(tf, RandAugment)
    assert len(ra.ops) == 15 and ra.num_layers == 1
    assert {op.hparams["interpolation"] for op in ra.ops} == {Image.BICUBIC}
    assert {op.magnitude for op in ra.ops} == {7} and {op.magnitude_std for op in ra.ops} == {0.5}
    (norm,) = of_type(tf, T.Normalize)
    if name == "cifar10.yaml":
        assert cfg.seed == 12450
        released = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    else:
        assert cfg.seed == 310
        released = ([n / 255 for n in (129.3, 124.1, 112.4)], [n / 255 for n in (68.2, 65.4, 70.4)])
    np.testing.assert_allclose(torch.as_tensor(norm.mean), released[0], atol=1e-6)
    np.testing.assert_allclose(torch.as_tensor(norm.std), released[1], atol=1e-6)
    _, test_tf = recipe_transform(name, train=False)
    (resize,) = of_type(test_tf, T.Resize)
    assert resize.interpolation == BICUBIC and resize.size == 32  # crop_pct 1.0
    assert cfg.mixup and cfg.mixup_alpha == 0.5 and cfg.label_smoothing == 0.1


def test_cifar_scale_one_crop_is_a_no_op_beside_the_eval_transform():
    # without flip and RandAugment, the released train crop leaves a 32x32 image as it is
    _, train = recipe_transform("cifar10.yaml", train=True, augment="standard", hflip=0.0)
    _, test = recipe_transform("cifar10.yaml", train=False)
    img = image()
    for _ in range(5):
        assert torch.equal(train(img), test(img))


def test_imagenet_recipe_eval_is_crop_095_bicubic():
    _, test = recipe_transform("imagenet.yaml", train=False)
    (resize,) = of_type(test, T.Resize)
    (center,) = of_type(test, T.CenterCrop)
    assert resize.size == 235 and resize.interpolation == BICUBIC  # floor(224 / 0.95)
    assert tuple(center.size) == (224, 224)
    _, train = recipe_transform("imagenet.yaml", train=True)
    (crop,) = of_type(train, RandomResizedCropAndInterpolation)
    assert crop.scale == (0.08, 1.0) and crop.interpolation == BICUBIC
    assert not of_type(train, T.ColorJitter)  # timm turns it off under RandAugment
    (ra,) = of_type(train, RandAugment)
    assert ra.num_layers == 3 and {op.magnitude for op in ra.ops} == {9}
    assert {op.magnitude_max for op in ra.ops} == {9.9}  # the posterize guard
    assert test(image(300)).shape == (3, 224, 224)


def test_dvs_recipe_feeds_three_channels_and_transfers_the_whole_stem(tmp_path):
    cfg = load_config(CONFIGS / "cifar10dvs.yaml")
    assert (cfg.augment, cfg.transform.event_channels, cfg.label_smoothing) == ("nda", 3, 0.0)
    assert not cfg.mixup
    info = data_info(cfg)
    assert info.in_channels == 3
    small = dict(dims=(8, 16, 16), depths=(1, 1, 1), num_heads=(1, 1, 1), group_size=8)
    imagenet = SpikingResformer(**small, num_classes=1000, in_channels=3, T=2)
    torch.save({"model": imagenet.state_dict()}, tmp_path / "imagenet.pt")
    cfg = dataclasses.replace(cfg, model="spikingresformer_s", model_args=small, T=2)
    model = build_model(cfg, info)
    report = load_pretrained(model, str(tmp_path / "imagenet.pt"))
    assert report["skipped"] == ["classifier.weight"]  # the stem conv is transferred
    assert torch.equal(model.stem.conv.weight, imagenet.stem.conv.weight)
    tf = event_transform(train=False, augment=None, event_channels=3)
    frames = torch.rand(2, 2, 16, 16)
    assert model(tf(frames)[None]).shape == (1, 10)


# ---------------------------------------------------------------- DVS ops


def frames(seed: int = 0) -> torch.Tensor:
    return torch.rand(4, 2, 12, 12, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "op",
    [RandomFlipFrames(), EventRoll(), EventRotate(), EventCutout(), EventNDA()],
    ids=lambda op: type(op).__name__,
)
def test_dvs_ops_keep_shape_and_repeat_under_a_seed(op):
    x = frames()
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append([op(x) for _ in range(6)])
    for a, b in zip(*outs, strict=True):
        assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert torch.equal(x, frames())  # the input is not modified in place


def test_event_roll_is_a_bounded_cyclic_shift():
    x = frames()
    torch.manual_seed(0)
    for _ in range(10):
        y = EventRoll(1 / 3)(x)
        shifts = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(y, torch.roll(x, (dy, dx), dims=(-2, -1)))
        ]
        assert shifts  # int(12 / 3) = 4: every shift within [-4, 4]


def test_event_rotate_turns_every_step_alike_and_keeps_the_centre():
    x = torch.zeros(3, 2, 11, 11)
    x[:, :, 5, 5] = 1.0
    x[:, :, 5, 9] = 1.0
    torch.manual_seed(1)
    y = EventRotate(30.0)(x)
    assert torch.equal(y[0], y[1]) and torch.equal(y[0], y[2])
    assert y[0, 0, 5, 5] == 1.0
    torch.manual_seed(0)
    turned = [EventRotate(90.0)(x) for _ in range(8)]
    assert any(not torch.equal(t, x) for t in turned)  # the off-centre point moves


def test_event_cutout_zeroes_one_third_square_on_every_step():
    x = torch.ones(3, 2, 30, 30)
    torch.manual_seed(0)
    for _ in range(10):
        y = EventCutout(1 / 3)(x)
        zero = y[0, 0] == 0
        assert 0 < int(zero.sum()) <= 10 * 10  # a 10 x 10 square, clipped at the border
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        assert int(zero.sum()) == len(rows) * len(cols)  # one rectangle
        assert all(torch.equal(y[t, c] == 0, zero) for t in range(3) for c in range(2))


def test_event_nda_applies_one_op_after_the_flip():
    x = frames()
    torch.manual_seed(0)
    nda = EventNDA()
    outs = [nda(x) for _ in range(30)]
    assert all(o.shape == x.shape for o in outs)
    assert len({o.sum().item() for o in outs}) > 3  # cutout / rotate change the mass
    assert any(torch.allclose(o.sum(), x.sum()) for o in outs)  # roll and flip keep it


def test_polarity_sum_and_event_transform_choices():
    x = frames()
    y = AppendPolaritySum()(x)
    assert y.shape == (4, 3, 12, 12) and torch.equal(y[:, 2], x[:, 0] + x[:, 1])
    assert event_transform(train=False, augment="nda") is None
    assert isinstance(event_transform(train=True, augment="standard"), RandomFlipFrames)
    torch.manual_seed(0)
    out = event_transform(train=True, augment="nda", event_channels=3)(x)
    assert out.shape == (4, 3, 12, 12)
    with pytest.raises(ValueError, match="augment for event frames"):
        event_transform(train=True, augment="rand-m7-n1")
    with pytest.raises(ValueError, match="event_channels must be 2"):
        event_transform(train=True, augment=None, event_channels=4)


# ---------------------------------------------------------------- errors


def config_error(**changes) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(tiny_dict(**changes))
    return str(info.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"transform": {"crop": "pad"}}, "unknown config key(s) transform.crop"),
        ({"transform": {"train_crop": "random"}}, "transform.train_crop must be null or one of"),
        ({"transform": {"interpolation": "cubic"}}, "transform.interpolation must be null or one"),
        ({"transform": {"scale": [0.5]}}, "transform.scale must be [lo, hi]"),
        ({"transform": {"scale": [0.5, 1.5]}}, "transform.scale must be [lo, hi]"),
        ({"transform": {"scale": "big"}}, "transform.scale must be a list of float or null"),
        ({"transform": {"ratio": [2.0, 1.0]}}, "transform.ratio must be [lo, hi]"),
        ({"transform": {"hflip": 1.5}}, "transform.hflip must be a probability"),
        ({"transform": {"crop_pct": 0.0}}, "transform.crop_pct must be in (0, 1]"),
        ({"transform": {"mean": [0.5, 0.5, 0.5]}}, "transform.mean must list 1 value(s)"),
        ({"transform": {"std": [0.0]}}, "transform.std values must be > 0"),
        ({"transform": {"mean": ["a"]}}, "transform.mean[0] must be float"),
        ({"transform": {"event_channels": 3}}, "transform.event_channels applies to event"),
        ({"augment": "nda"}, "augment: augment must be None, 'none', 'standard'"),
    ],
)
def test_bad_transform_keys_are_clear_errors(changes, expected):
    assert expected in config_error(**changes)


def test_event_dataset_rejects_image_options():
    def dvs_error(**changes) -> str:
        data = {**tiny_dict(dataset="cifar10dvs", T=10), **changes}
        with pytest.raises(ConfigError) as info:
            config_from_dict(data)
        return str(info.value)

    assert "transform.interpolation: image options" in dvs_error(
        transform={"interpolation": "bicubic"}
    )
    assert "augment for event frames" in dvs_error(augment="rand-m7-n1-mstd0.5-inc1")
    assert "cutout applies to images" in dvs_error(cutout=8)
    assert "event_channels must be 2" in dvs_error(transform={"event_channels": 1})
    assert dataset_info("cifar10dvs").in_channels == 2  # the dataset default is unchanged
