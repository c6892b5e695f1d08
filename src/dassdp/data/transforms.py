"""Image and event-frame transforms of the recipes, built with timm where timm has them.

**Images** (:func:`image_transform`, PIL image -> normalised ``[C, S, S]`` tensor). The train
split follows ``augment``:

- ``None`` / ``"none"``: the evaluation transform (no randomness);
- ``"standard"``: a crop (``train_crop``) and a horizontal flip (``hflip``);
- ``"rand-m7-n1-mstd0.5-inc1"`` etc.: ``"standard"`` followed by timm's RandAugment.

``train_crop``: ``"pad"`` (torchvision ``RandomCrop(S, padding=S // 8)``, the small-image
default), ``"resized"`` (timm ``RandomResizedCropAndInterpolation`` with ``scale`` and
``ratio``, built by :func:`timm.data.create_transform`; the ImageNet default, and with
``scale = ratio = [1, 1]`` the released CIFAR loader's no-op crop) or ``"none"``.
The evaluation transform is timm's: ``Resize(floor(S / crop_pct))`` then ``CenterCrop(S)``
(``crop_pct`` defaults to 0.875 on ImageNet and 1.0 elsewhere, where it resizes only when
``input_size`` differs from the dataset's). ``interpolation`` (``bilinear`` when unset) is
used by every resize and crop, and by RandAugment's geometric ops when it is set (unset,
RandAugment draws bilinear or bicubic at random, timm's default). ``mean``/``std``
override the dataset's normalisation. RandAugment's magnitude is capped at 9.9: at 10,
timm's increasing posterize keeps 0 bits, which Pillow rejects mid-training.

**Event frames** (:func:`event_transform`, ``[T, 2, H, W]`` -> ``[T, C, H, W]``): ``augment``
``"standard"`` is :class:`RandomFlipFrames`; ``"nda"`` is :class:`EventNDA`, the released
DVS augmentation (flip, then one of roll / rotate / cutout); ``event_channels=3`` appends
the sum of the two polarities as a third channel (:class:`AppendPolaritySum`), so an
ImageNet stem (3 input channels) transfers whole. Every random op draws from torch's
global generator, which DataLoader workers seed per worker: ``torch.manual_seed`` makes
them repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "AUGMENTS",
    "EVENT_AUGMENTS",
    "INTERPOLATIONS",
    "TRAIN_CROPS",
    "AppendPolaritySum",
    "Cutout",
    "EventCutout",
    "EventNDA",
    "EventRoll",
    "EventRotate",
    "RandomFlipFrames",
    "check_augment",
    "check_transform_options",
    "event_transform",
    "image_transform",
]

TRAIN_CROPS = ("pad", "resized", "none")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
AUGMENTS = ("none", "standard", "nda", "rand-...")  # for messages; "rand-" is a prefix
EVENT_AUGMENTS = ("standard", "nda")
EVENT_CHANNELS = (2, 3)
RAND_AUGMENT_MAX = 9.9  # magnitude cap: 10 makes timm's increasing posterize keep 0 bits


# ---------------------------------------------------------------- checks


def check_augment(augment: str | None, *, event: bool) -> str | None:
    """``augment`` normalised (``"none"`` -> ``None``); ``ValueError`` naming the choices."""
    if augment is None or augment == "none":
        return None
    if event:
        if augment in EVENT_AUGMENTS:
            return augment
        raise ValueError(
            f"augment for event frames must be null, 'none', 'standard' (flip) or 'nda' "
            f"(flip + roll / rotate / cutout), got {augment!r}"
        )
    if augment == "standard" or (isinstance(augment, str) and augment.startswith("rand-")):
        return augment
    raise ValueError(
        "augment must be None, 'none', 'standard' or a 'rand-...' string (or 'nda' for "
        f"event frames), got {augment!r}"
    )


def _pair(key: str, value: Sequence[float] | None, *, upper: float | None) -> None:
    if value is None:
        return
    ok = isinstance(value, Sequence) and len(value) == 2
    ok = ok and all(isinstance(v, int | float) and math.isfinite(v) for v in value)
    if not ok or not 0 < value[0] <= value[1] or (upper is not None and value[1] > upper):
        bound = f" <= {upper:g}" if upper is not None else ""
        raise ValueError(f"{key} must be [lo, hi] with 0 < lo <= hi{bound}, got {value!r}")


def check_transform_options(
    *,
    channels: int,
    event: bool = False,
    train_crop: str | None = None,
    scale: Sequence[float] | None = None,
    ratio: Sequence[float] | None = None,
    hflip: float | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    event_channels: int = 2,
) -> None:
    """Raise ``ValueError`` naming the first bad option and what is allowed.

    ``channels`` is the image channel count that ``mean``/``std`` must match; ``event``
    says whether the dataset is event frames (where only ``event_channels`` applies).
    """
    if train_crop is not None and train_crop not in TRAIN_CROPS:
        raise ValueError(
            f"train_crop must be null or one of {', '.join(TRAIN_CROPS)}, got {train_crop!r}"
        )
    _pair("scale", scale, upper=1.0)
    _pair("ratio", ratio, upper=None)
    if hflip is not None and not 0 <= hflip <= 1:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be null or one of {', '.join(INTERPOLATIONS)}, "
            f"got {interpolation!r}"
        )
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    for key, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        if event:
            raise ValueError(f"{key} applies to images; event frames are not normalised")
        if not isinstance(value, Sequence) or len(value) != channels:
            raise ValueError(
                f"{key} must list {channels} value(s) (one per channel), got {value!r}"
            )
        if key == "std" and not all(v > 0 for v in value):
            raise ValueError(f"std values must be > 0, got {value!r}")
    if event_channels not in EVENT_CHANNELS:
        raise ValueError(
            "event_channels must be 2 (the polarities) or 3 (plus their sum), "
            f"got {event_channels!r}"
        )
    if event_channels != 2 and not event:
        raise ValueError("event_channels applies to event datasets (cifar10dvs) only")


# ---------------------------------------------------------------- images


def _rand_augment(
    augment: str, mean: Sequence[float], size: int, interpolation: str | None
) -> Callable:
    """timm RandAugment with ``create_transform``'s hparams and the magnitude cap."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    hparams: dict[str, Any] = {
        "translate_const": int(size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
    }
    if interpolation is not None:
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    if "mmax" not in augment:
        hparams["magnitude_max"] = RAND_AUGMENT_MAX
    return rand_augment_transform(augment, hparams)


def _eval_transform(
    size: int,
    crop_pct: float,
    interpolation: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable:
    from timm.data import create_transform

    return create_transform(
        size,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
    )


def image_transform(
    info: Any,
    *,
    train: bool,
    input_size: int,
    augment: str | None,
    cutout: int = 0,
    train_crop: str | None = None,
    scale: Sequence[float] | None = None,
    ratio: Sequence[float] | None = None,
    hflip: float | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    event_channels: int = 2,
) -> Callable:
    """PIL image -> normalised ``[C, input_size, input_size]`` tensor (see the module doc).

    ``info`` is the dataset's :class:`~dassdp.data.DatasetInfo`; the other options default
    to the dataset's choices. Bad options raise ``ValueError`` naming the option.
    """
    from torchvision import transforms as T

    check_transform_options(
        channels=info.in_channels,
        train_crop=train_crop,
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        interpolation=interpolation,
        crop_pct=crop_pct,
        mean=mean,
        std=std,
        event_channels=event_channels,
    )
    mean, std = tuple(mean or info.mean), tuple(std or info.std)
    imagenet = info.name == "imagenet"
    interp = interpolation or "bilinear"
    augment = check_augment(augment, event=False) if train else None
    if augment is None:
        pct = crop_pct or (0.875 if imagenet else 1.0)
        tf = _eval_transform(input_size, pct, interp, mean, std)
        return T.Compose([*tf.transforms, Cutout(cutout)]) if train and cutout > 0 else tf
    crop = train_crop or ("resized" if imagenet else "pad")
    flip = hflip if hflip is not None else (0.5 if info.in_channels == 3 else 0.0)
    rand = augment if augment.startswith("rand-") else None
    if crop == "resized":
        from timm.data import create_transform

        tf = create_transform(
            input_size,
            is_training=True,
            scale=tuple(scale) if scale else None,
            ratio=tuple(ratio) if ratio else None,
            hflip=flip,
            color_jitter=None,
            interpolation=interp,
            mean=mean,
            std=std,
        )
        ops = list(tf.transforms)
        if rand:  # timm's RandAugment slot, with the magnitude cap (see the module doc)
            ops.insert(-2, _rand_augment(rand, mean, input_size, interp))
    else:
        ops = []
        if input_size != info.input_size:
            resize_interp = T.InterpolationMode(interp)
            ops.append(T.Resize(input_size, interpolation=resize_interp))
        if crop == "pad":
            ops.append(T.RandomCrop(input_size, padding=input_size // 8))
        if flip > 0:
            ops.append(T.RandomHorizontalFlip(flip))
        if rand:
            ops.append(_rand_augment(rand, mean, input_size, interpolation))
        ops += [T.ToTensor(), T.Normalize(mean, std)]
    if cutout > 0:
        ops.append(Cutout(cutout))
    return T.Compose(ops)


class Cutout:
    """Zero one ``length x length`` square at a random centre of a ``[C, H, W]`` tensor."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        y0, y1 = max(0, cy - self.length // 2), min(h, cy + self.length // 2)
        x0, x1 = max(0, cx - self.length // 2), min(w, cx + self.length // 2)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0
        return img

    def __repr__(self) -> str:
        return f"Cutout(length={self.length})"


# ---------------------------------------------------------------- event frames


class RandomFlipFrames:
    """Flip ``[T, C, H, W]`` frames horizontally (all time steps together) with prob 0.5."""

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.flip(-1) if torch.rand(()) < 0.5 else frames

    def __repr__(self) -> str:
        return "RandomFlipFrames()"


class EventRoll:
    """Roll ``[T, C, H, W]`` frames by integer offsets drawn uniformly from
    ``[-fraction * H, fraction * H]`` (rows) and ``[-fraction * W, fraction * W]`` (columns);
    pixels leaving one side re-enter on the other. Same offset for every step and channel."""

    def __init__(self, fraction: float = 1 / 3) -> None:
        self.fraction = fraction

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        h, w = frames.shape[-2:]
        ly, lx = int(h * self.fraction), int(w * self.fraction)
        dy = int(torch.randint(-ly, ly + 1, ()))
        dx = int(torch.randint(-lx, lx + 1, ()))
        return torch.roll(frames, shifts=(dy, dx), dims=(-2, -1))

    def __repr__(self) -> str:
        return f"EventRoll(fraction={self.fraction:.4g})"


class EventRotate:
    """Rotate ``[T, C, H, W]`` frames about the centre by an angle drawn uniformly from
    ``[-degrees, degrees]`` (nearest neighbour, zero fill), the same for every step."""

    def __init__(self, degrees: float = 30.0) -> None:
        self.degrees = degrees

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        angle = float(torch.empty(()).uniform_(-self.degrees, self.degrees))
        return TF.rotate(frames, angle)

    def __repr__(self) -> str:
        return f"EventRotate(degrees={self.degrees:g})"


class EventCutout:
    """Zero a ``fraction * H`` x ``fraction * W`` rectangle (clipped at the borders) at a
    random centre of ``[T, C, H, W]`` frames, the same region for every step."""

    def __init__(self, fraction: float = 1 / 3) -> None:
        self.fraction = fraction

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        h, w = frames.shape[-2:]
        hy, hx = int(h * self.fraction) // 2, int(w * self.fraction) // 2
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        out = frames.clone()
        out[..., max(0, cy - hy) : min(h, cy + hy), max(0, cx - hx) : min(w, cx + hx)] = 0
        return out

    def __repr__(self) -> str:
        return f"EventCutout(fraction={self.fraction:.4g})"


class EventNDA:
    """The released DVS augmentation: a horizontal flip with prob 0.5, then one op drawn
    uniformly from roll (1/3 of the side), rotate (+-30 degrees) and cutout (1/3 of the side)."""

    def __init__(self) -> None:
        self.flip = RandomFlipFrames()
        self.ops: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
            EventRoll(1 / 3),
            EventRotate(30.0),
            EventCutout(1 / 3),
        )

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        frames = self.flip(frames)
        return self.ops[int(torch.randint(0, len(self.ops), ()))](frames)

    def __repr__(self) -> str:
        return f"EventNDA(flip, one of {', '.join(map(repr, self.ops))})"


class AppendPolaritySum:
    """``[T, 2, H, W]`` -> ``[T, 3, H, W]``: the two polarity channels and their sum."""

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.cat([frames, frames.sum(dim=-3, keepdim=True)], dim=-3)

    def __repr__(self) -> str:
        return "AppendPolaritySum()"


class _Chain:
    def __init__(self, ops: list[Callable]) -> None:
        self.transforms = ops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.transforms:
            x = op(x)
        return x

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.transforms))})"


def event_transform(
    *, train: bool, augment: str | None, event_channels: int = 2
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The frame transform for ``augment`` (train split only) and ``event_channels``;
    ``None`` when there is nothing to do."""
    check_transform_options(channels=2, event=True, event_channels=event_channels)
    augment = check_augment(augment, event=True) if train else None
    ops: list[Callable] = []
    if augment == "standard":
        ops.append(RandomFlipFrames())
    elif augment == "nda":
        ops.append(EventNDA())
    if event_channels == 3:
        ops.append(AppendPolaritySum())
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else _Chain(ops)
