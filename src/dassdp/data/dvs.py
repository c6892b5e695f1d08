"""CIFAR10-DVS in SpikingJelly's on-disk layouts, integrated into frames with numpy.

Accepted layouts under the dataset folder (``ROOT/cifar10dvs``; SpikingJelly's
``CIFAR10DVS(root)`` writes the same):

- ``frames_number_{T}_split_by_number/<class>/<sample>.npz`` with key ``frames``
  ``[T, 2, H, W]`` (used when present for the requested T);
- ``events_np/<class>/<sample>.npz`` with keys ``t, x, y, p`` (1-D arrays; ``p`` in {0, 1}),
  integrated here into T frames split by event count (SpikingJelly's ``split_by="number"``).

Train/test split: per class, files in sorted order, the first ``ceil(0.9 * n)`` train and
the rest test, as SpikingJelly's ``split_to_train_test_set(0.9, ..., random_split=False)``
used by the paper's code; deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dassdp.data.formats import DataFormatError, DatasetNotFoundError

SENSOR_SIZE = (128, 128)  # (H, W) of the CIFAR10-DVS DVS128 sensor
TRAIN_RATIO = 0.9
DVS_HOWTO = (
    "download CIFAR10-DVS (https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671) "
    "and convert it with SpikingJelly (`spikingjelly.datasets.cifar10_dvs.CIFAR10DVS(root)`), "
    "so that ROOT/cifar10dvs/events_np/<class>/*.npz exist"
)


def events_to_frames(
    t: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    T: int,
    size: tuple[int, int] = SENSOR_SIZE,
) -> np.ndarray:
    """Integrate events into ``[T, 2, H, W]`` float32 count frames, split by event count.

    Events are ordered by ``t``; with N events, frame i holds events
    ``[i * (N // T), (i + 1) * (N // T))`` and the last frame also takes the remainder.
    Channel 0 counts ``p == 0`` events, channel 1 ``p == 1`` (pixel ``[y, x]``).
    """
    H, W = size
    order = np.argsort(np.asarray(t), kind="stable")
    x, y, p = (np.asarray(a, dtype=np.int64)[order] for a in (x, y, p))
    _check_events(x, y, p, size)
    n = len(x)
    step = n // T
    frames = np.zeros((T, 2 * H * W), dtype=np.float32)
    flat = p * (H * W) + y * W + x
    for i in range(T):
        lo, hi = i * step, (n if i == T - 1 else (i + 1) * step)
        frames[i] = np.bincount(flat[lo:hi], minlength=2 * H * W)
    return frames.reshape(T, 2, H, W)


def _check_events(x: np.ndarray, y: np.ndarray, p: np.ndarray, size: tuple[int, int]) -> None:
    if not (len(x) == len(y) == len(p)):
        raise DataFormatError(f"event arrays differ in length: x {len(x)}, y {len(y)}, p {len(p)}")
    if len(x) and (x.min() < 0 or y.min() < 0 or x.max() >= size[1] or y.max() >= size[0]):
        raise DataFormatError(f"event coordinates outside the {size[0]}x{size[1]} sensor")
    if len(p) and (p.min() < 0 or p.max() > 1):
        raise DataFormatError("event polarity p must be 0 or 1")


def find_dvs_folder(root: Path) -> Path:
    """The CIFAR10-DVS folder under ``root`` (``cifar10dvs``, ``CIFAR10DVS`` or ``root``)."""
    for folder in (root / "cifar10dvs", root / "CIFAR10DVS", root):
        if (folder / "events_np").is_dir() or any(folder.glob("frames_number_*_split_by_number")):
            return folder
    raise DatasetNotFoundError(
        f"cifar10dvs: no events_np/ or frames_number_*_split_by_number/ in {root / 'cifar10dvs'} "
        f"(nor in {root}); to obtain it: {DVS_HOWTO}"
    )


def list_samples(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted folder names) and all ``(file, label)`` pairs, sorted per class."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"cifar10dvs: no class folders in {folder}; {DVS_HOWTO}")
    samples = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).glob("*.npz"))]
    if not samples:
        raise DatasetNotFoundError(f"cifar10dvs: no .npz files under {folder}; {DVS_HOWTO}")
    return classes, samples


def split_per_class(
    samples: list[tuple[Path, int]], train: bool, ratio: float = TRAIN_RATIO
) -> list[tuple[Path, int]]:
    """First ``ceil(ratio * n)`` samples of each class (train) or the rest (test)."""
    out = []
    for label in sorted({lab for _, lab in samples}):
        group = [s for s in samples if s[1] == label]
        cut = math.ceil(len(group) * ratio)
        out.extend(group[:cut] if train else group[cut:])
    return out


class CIFAR10DVS(Dataset):
    """CIFAR10-DVS frames: item ``(frames [T, 2, S, S] float32, label)``, S = ``input_size``.

    ``transform`` (optional) maps the resized frame tensor to a tensor.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        train: bool,
        T: int = 10,
        input_size: int = 128,
        transform=None,
    ) -> None:
        folder = find_dvs_folder(Path(root))
        frames_dir = folder / f"frames_number_{T}_split_by_number"
        self.from_frames = frames_dir.is_dir()
        self.folder = frames_dir if self.from_frames else folder / "events_np"
        self.classes, samples = list_samples(self.folder)
        self.samples = split_per_class(samples, train)
        self.targets = [label for _, label in self.samples]
        self.T, self.input_size, self.transform = T, input_size, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        frames = torch.from_numpy(self._load(path))  # [T, 2, H, W]
        if frames.shape[-2:] != (self.input_size, self.input_size):
            frames = F.interpolate(frames, size=(self.input_size,) * 2, mode="bilinear")
        if self.transform is not None:
            frames = self.transform(frames)
        return frames, label

    def _load(self, path: Path) -> np.ndarray:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if self.from_frames:
                    frames = np.asarray(npz["frames"], dtype=np.float32)
                else:
                    frames = events_to_frames(npz["t"], npz["x"], npz["y"], npz["p"], self.T)
        except (KeyError, ValueError, OSError) as err:
            raise DataFormatError(f"cifar10dvs: cannot read {path} ({err})") from err
        if frames.ndim != 4 or frames.shape[:2] != (self.T, 2):
            raise DataFormatError(
                f"cifar10dvs: {path} has frames {frames.shape}, want [{self.T}, 2, H, W]"
            )
        return frames
