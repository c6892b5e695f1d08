"""``build_dataset``: torch Datasets with the transforms the recipes use.

Where each dataset is read from (``root`` is the data root, default
:func:`dassdp.data.default_root`):

=============== ============================================== ==========================
name            files                                          how to obtain
=============== ============================================== ==========================
cifar10         ``root/cifar-10-batches-py/``                  ``dassdp data prepare cifar10``
cifar100        ``root/cifar-100-python/{train,test,meta}``    official python tarball
fashion-mnist   ``root/FashionMNIST/raw/*-ubyte``              ``dassdp data prepare fashion-mnist``
mnist           ``root/MNIST/raw/*-ubyte``                     ``dassdp data prepare mnist``
imagenet        ``root/imagenet/{train,val}/<class>/*``        ILSVRC-2012, class folders
cifar10dvs      ``root/cifar10dvs/events_np/...`` or frames    SpikingJelly layout (dvs.py)
=============== ============================================== ==========================

Images come out as ``[C, H, W]`` float tensors normalised with the dataset's mean/std;
CIFAR10-DVS items are ``[T, 2, H, W]`` event-count frames (not normalised; ``[T, 3, H, W]``
with ``event_channels=3``). Static
images carry no time axis: the model's encoder repeats them over T.

``augment``, ``cutout`` and the transform options (``train_crop``, ``scale``, ``ratio``,
``hflip``, ``interpolation``, ``crop_pct``, ``mean``, ``std``, ``event_channels``) are
described in :mod:`dassdp.data.transforms`; augmentation applies to the train split only.
Mixup / CutMix act on batches and belong to the training loop (``timm.data.Mixup``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from dassdp.data.dvs import CIFAR10DVS, DVS_HOWTO
from dassdp.data.formats import (
    DataFormatError,
    DatasetNotFoundError,
    read_cifar_batch,
    read_cifar_meta,
    read_idx,
)
from dassdp.data.prepare import IDX_FILES, MANIFEST, OUTPUT_DIRS, check_prepared, resolve_root
from dassdp.data.transforms import (
    AppendPolaritySum,
    Cutout,
    RandomFlipFrames,
    event_transform,
    image_transform,
)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: classes, channels, default input size, mean/std."""

    name: str
    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    is_event: bool = False
    default_T: int | None = None


_INFO = {
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,)),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10dvs": DatasetInfo("cifar10dvs", 10, 2, 128, None, None, is_event=True, default_T=10),
}
DATASETS = tuple(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    """Facts for ``name`` (one of :data:`DATASETS`); ``ValueError`` naming the choices."""
    try:
        return _INFO[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None


# ---------------------------------------------------------------- readers


class CIFARBatches(Dataset):
    """CIFAR-10 / CIFAR-100 python batches read with a restricted unpickler.

    Same attributes as ``torchvision.datasets.CIFAR10``: ``data`` ``[N, 32, 32, 3]`` uint8,
    ``targets`` (list of int), ``classes``; items are ``(transform(PIL image), label)``.
    Unlike torchvision it does not require the official md5s (``dassdp data prepare``
    re-encodes CIFAR-10 from a registry copy); it never runs code from a pickle.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        train: bool,
        cifar100: bool = False,
        transform: Callable | None = None,
    ) -> None:
        folder = Path(folder)
        if cifar100:
            files, label_key, meta, meta_key = (
                ["train" if train else "test"],
                "fine_labels",
                "meta",
                "fine_label_names",
            )
        else:
            files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
            label_key, meta, meta_key = "labels", "batches.meta", "label_names"
        parts = [read_cifar_batch(folder / f, label_key) for f in files]
        self.data = np.concatenate([p[0] for p in parts])
        self.targets = np.concatenate([p[1] for p in parts]).tolist()
        self.classes = read_cifar_meta(folder / meta, meta_key)
        check_labels(np.asarray(self.targets), len(self.classes), f"{folder}/{'+'.join(files)}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[object, int]:
        from PIL import Image

        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


def check_labels(targets: np.ndarray, num_classes: int, where: str) -> None:
    """Raise :class:`DataFormatError` naming the file, the first bad label and its index when
    a label is outside ``0 .. num_classes - 1`` (else training fails later with a raw
    ``IndexError`` from inside the loss)."""
    bad = np.flatnonzero((targets < 0) | (targets >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataFormatError(
            f"{where}: label {int(targets[i])} at index {i} is outside 0..{num_classes - 1} "
            f"({bad.size} bad label(s)); the file is damaged: prepare the dataset again"
        )


def verify_prepared(name: str, root: Path) -> None:
    """Data made by ``dassdp data prepare`` still matches its manifest's sha256 (hashes are
    cached per file size and mtime, so this costs nothing until a file changes)."""
    if not (root / OUTPUT_DIRS[name] / MANIFEST).is_file():
        return  # user/torchvision files: nothing recorded to check against
    reason = check_prepared(name, root)
    if reason is not None:
        raise DataFormatError(
            f"{name}: {reason}; the prepared files changed after `dassdp data prepare`: "
            f"run `dassdp data prepare {name} --root {root} --force`"
        )


def _require(paths: list[Path], name: str, howto: str) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DatasetNotFoundError(
            f"{name}: not found: {', '.join(map(str, missing))}; to obtain it: {howto}"
        )


def _prepare_howto(name: str, root: Path) -> str:
    return f"run `dassdp data prepare {name} --root {root}`"


def _cifar10(root: Path, train: bool, tf: Callable) -> Dataset:
    folder = root / OUTPUT_DIRS["cifar10"]
    files = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
    _require([folder / f for f in files], "cifar10", _prepare_howto("cifar10", root))
    verify_prepared("cifar10", root)
    return CIFARBatches(folder, train=train, transform=tf)


def _cifar100(root: Path, train: bool, tf: Callable) -> Dataset:
    folder = root / "cifar-100-python"
    howto = (
        "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
        f"and extract it into {root}"
    )
    _require([folder / f for f in ("train", "test", "meta")], "cifar100", howto)
    return CIFARBatches(folder, train=train, cifar100=True, transform=tf)


class IDXImages(Dataset):
    """MNIST / Fashion-MNIST from their raw IDX files (``{split}-images-idx3-ubyte``,
    ``{split}-labels-idx1-ubyte`` in ``folder``; ``split`` is ``train`` or ``t10k``).

    Same attributes and items as ``torchvision.datasets.MNIST``: ``data`` ``[N, H, W]``
    uint8 tensor, ``targets`` ``[N]`` int64 tensor, ``classes``; items are
    ``(transform(PIL "L" image), label)``. Unlike torchvision it reads these two files and
    nothing else (torchvision prefers a ``processed/*.pt`` file when one exists, which a
    manifest does not cover), and it refuses images and labels of different counts.
    """

    def __init__(
        self, folder: str | Path, *, train: bool, classes: list[str], transform: Callable | None
    ) -> None:
        import torch

        split = "train" if train else "t10k"
        images_file = Path(folder) / f"{split}-images-idx3-ubyte"
        labels_file = Path(folder) / f"{split}-labels-idx1-ubyte"
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1:
            raise DataFormatError(
                f"{images_file} / {labels_file}: expected uint8 images [N, H, W] and labels "
                f"[N], got {images.dtype} {list(images.shape)} and {list(labels.shape)}"
            )
        if len(images) != len(labels):
            raise DataFormatError(
                f"{images_file} holds {len(images)} images but {labels_file} holds "
                f"{len(labels)} labels; the files do not belong together: prepare the "
                "dataset again"
            )
        check_labels(labels.astype(np.int64), len(classes), str(labels_file))
        self.data = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.classes, self.transform = list(classes), transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[object, int]:
        from PIL import Image

        img = Image.fromarray(self.data[index].numpy())  # [H, W] uint8: mode "L"
        return (self.transform(img) if self.transform else img), int(self.targets[index])


def _mnist_like(name: str, root: Path, train: bool, tf: Callable) -> Dataset:
    import torchvision.datasets as tvd

    folder = root / OUTPUT_DIRS[name]
    _require([folder / f for f in IDX_FILES], name, _prepare_howto(name, root))
    verify_prepared(name, root)
    classes = (tvd.MNIST if name == "mnist" else tvd.FashionMNIST).classes
    return IDXImages(folder, train=train, classes=classes, transform=tf)


def _imagenet(root: Path, train: bool, tf: Callable) -> Dataset:
    from torchvision.datasets import ImageFolder

    base = (
        root
        if (root / "train").is_dir() and not (root / "imagenet").is_dir()
        else root / "imagenet"
    )
    folder = base / ("train" if train else "val")
    howto = (
        f"put ILSVRC-2012 images in class folders {base}/train/<wnid>/*.JPEG "
        f"and {base}/val/<wnid>/*.JPEG"
    )
    _require([folder], "imagenet", howto)
    try:
        return ImageFolder(str(folder), transform=tf)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataFormatError(
            f"imagenet: {folder} has no usable class folders ({err}); {howto}"
        ) from err


# ---------------------------------------------------------------- entry point


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    train: bool,
    input_size: int | None = None,
    augment: str | None = None,
    T: int | None = None,
    cutout: int = 0,
    **options: Any,
) -> Dataset:
    """A torch Dataset for ``name`` read from ``root`` (default: the user data cache).

    Items are ``(x, label)``: ``x`` is ``[C, S, S]`` float (static images, S =
    ``input_size`` or the dataset default) or ``[T, C, S, S]`` float event frames
    (``cifar10dvs``; ``T`` defaults to 10, ``C`` is ``options["event_channels"]``, default
    2). ``augment``/``cutout`` apply to ``train=True`` only; ``options`` are the transform
    options of :func:`dassdp.data.transforms.image_transform` (see :mod:`dassdp.data.transforms`).
    Missing data raises :class:`DatasetNotFoundError` naming the path looked at and how to
    obtain it; bad files :class:`DataFormatError`; bad options ``ValueError``.
    """
    info = dataset_info(name)
    root = resolve_root(root)
    size = int(input_size or info.input_size)
    if info.is_event:
        image_only = sorted(
            k for k, v in options.items() if k != "event_channels" and v is not None
        )
        if image_only:
            raise ValueError(
                f"transform option(s) {', '.join(image_only)} apply to images, not to "
                f"{name} event frames (they take augment and event_channels)"
            )
        if cutout:
            raise ValueError(f"cutout applies to images; for {name} use augment: nda")
        tf = event_transform(
            train=train, augment=augment, event_channels=options.get("event_channels", 2)
        )
        return CIFAR10DVS(
            root, train=train, T=int(T or info.default_T), input_size=size, transform=tf
        )
    tf = image_transform(
        info, train=train, input_size=size, augment=augment, cutout=cutout, **options
    )
    if name in ("mnist", "fashion-mnist"):
        return _mnist_like(name, root, train, tf)
    readers = {"cifar10": _cifar10, "cifar100": _cifar100, "imagenet": _imagenet}
    return readers[name](root, train, tf)


def dataset_channels(info: DatasetInfo, event_channels: int = 2) -> int:
    """Input channels of the items ``build_dataset`` returns for ``info`` (event frames:
    ``event_channels``)."""
    return event_channels if info.is_event else info.in_channels


__all__ = [
    "DATASETS",
    "DVS_HOWTO",
    "AppendPolaritySum",
    "CIFARBatches",
    "Cutout",
    "DatasetInfo",
    "IDXImages",
    "RandomFlipFrames",
    "build_dataset",
    "check_labels",
    "dataset_channels",
    "dataset_info",
    "image_transform",
    "verify_prepared",
]
