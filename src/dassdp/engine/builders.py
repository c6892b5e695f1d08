"""Builders: a :class:`~dassdp.engine.config.TrainConfig` in, plain torch/timm objects out.

Each builder reads the config keys it needs and calls a constructor with plain arguments
(the torchtune habit), so the training loop never reads raw config.

The ``synthetic`` dataset is for tests and smoke runs only: class-dependent random
images generated from a fixed seed in memory (no files), passed through the same image
transforms as the real datasets, so augmentation strings work on it too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from dassdp.data.datasets import DatasetInfo, image_transform
from dassdp.engine.config import SYNTHETIC, TrainConfig, dassdp_config
from dassdp.engine.distributed import DistInfo

__all__ = [
    "SYNTHETIC_INFO",
    "SyntheticImages",
    "build_criterion",
    "build_datasets",
    "build_learner",
    "build_loaders",
    "build_mixup",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "data_info",
    "load_pretrained",
]

log = logging.getLogger("dassdp.train")

SYNTHETIC_INFO = DatasetInfo(SYNTHETIC, 10, 1, 16, (0.5,), (0.25,))
SYNTHETIC_SIZES = {True: 512, False: 128}  # train / test samples


class SyntheticImages(Dataset):
    """Learnable random grey images: class prototype + noise, from a fixed seed.

    Items: ``(transform(PIL image), label)`` with images ``size x size`` uint8. Train and test
    share the prototypes (same ``seed``) but draw different noise.
    """

    def __init__(
        self,
        *,
        train: bool,
        size: int = 16,
        n: int | None = None,
        seed: int = 0,
        num_classes: int = 10,
        transform: Callable | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        protos = rng.uniform(0, 255, (num_classes, size, size))  # [K, S, S]
        rng = np.random.default_rng(seed + (1 if train else 2))
        n = n or SYNTHETIC_SIZES[train]
        self.targets = rng.integers(0, num_classes, n)  # [N]
        noise = rng.normal(0, 60, (n, size, size))
        self.data = np.clip(protos[self.targets] + noise, 0, 255).astype(np.uint8)  # [N, S, S]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        img = Image.fromarray(self.data[index])  # uint8 [S, S]: mode "L"
        return (self.transform(img) if self.transform else img), int(self.targets[index])


def data_info(cfg: TrainConfig) -> DatasetInfo:
    """Classes, channels and default size of the configured dataset (event frames: the
    config's ``transform.event_channels``)."""
    from dassdp.data import dataset_info

    if cfg.dataset == SYNTHETIC:
        return SYNTHETIC_INFO
    info = dataset_info(cfg.dataset)
    if info.is_event and info.in_channels != cfg.transform.event_channels:
        info = dataclasses.replace(info, in_channels=cfg.transform.event_channels)
    return info


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """Train and test datasets (with the config's augmentation and subsets)."""
    from dassdp.data import build_dataset

    options = dataclasses.asdict(cfg.transform)
    if cfg.dataset == SYNTHETIC:
        size = cfg.input_size or SYNTHETIC_INFO.input_size
        sets = [
            SyntheticImages(
                train=train,
                size=size,
                transform=image_transform(
                    SYNTHETIC_INFO,
                    train=train,
                    input_size=size,
                    augment=cfg.augment,
                    cutout=cfg.cutout,
                    **options,
                ),
            )
            for train in (True, False)
        ]
    else:
        kw = dict(input_size=cfg.input_size, T=cfg.T, **options)
        sets = [
            build_dataset(
                cfg.dataset, cfg.data_root, train=True, augment=cfg.augment, cutout=cfg.cutout, **kw
            ),
            build_dataset(cfg.dataset, cfg.data_root, train=False, **kw),
        ]
    train_set = _subset(sets[0], cfg.subset, cfg.seed)
    test_set = _subset(sets[1], cfg.test_subset, cfg.seed + 1)
    return train_set, test_set


def _subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """A fixed random subset of ``n`` samples (the same for every run with this seed)."""
    if n is None or n >= len(dataset):
        return dataset
    gen = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=gen)[:n].tolist())


def build_loaders(
    cfg: TrainConfig, train_set: Dataset, test_set: Dataset, dist: DistInfo
) -> tuple[DataLoader, DataLoader, torch.Generator]:
    """Loaders and the generator that seeds loader workers (its state is checkpointed).

    The training order is a ``DistributedSampler`` for any world size (``set_epoch`` each
    epoch): a permutation fixed by ``(seed, epoch)`` alone, rank ``r`` of ``N`` taking every
    N-th index. So ``N`` ranks with batch ``B`` see, step for step, the same global batches
    as one process with batch ``N*B``, and resuming needs no sampler state. The test set is
    a strided shard (no padding, so reduced test metrics count every sample once).
    """
    workers = cfg.workers if cfg.workers is not None else (4 if dist.device.type == "cuda" else 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    common = dict(
        batch_size=cfg.batch_size,
        num_workers=workers,
        pin_memory=dist.device.type == "cuda",
        persistent_workers=False,  # workers re-seed from `gen` each epoch: exact resume
    )
    drop_last = cfg.mixup  # timm Mixup needs an even batch
    sampler = DistributedSampler(
        train_set, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=drop_last
    )
    train = DataLoader(train_set, sampler=sampler, drop_last=drop_last, generator=gen, **common)
    if dist.distributed:
        test_set = Subset(test_set, list(range(dist.rank, len(test_set), dist.world_size)))
    test = DataLoader(test_set, shuffle=False, **common)
    return train, test, gen


def build_model(cfg: TrainConfig, info: DatasetInfo) -> nn.Module:
    """The registered model with the dataset's classes/channels and the config's T, its
    neuron layers set to the config's ``lif_backend``."""
    from dassdp.models.registry import create_model
    from dassdp.neurons import set_backend

    kwargs = {"num_classes": info.num_classes, "in_channels": info.in_channels, "T": cfg.T}
    model = create_model(cfg.model, **{**kwargs, **cfg.model_args})
    set_backend(model, cfg.lif_backend)  # every LIF / PLIF; resolved at the first forward
    return model


def load_pretrained(model: nn.Module, path: str) -> dict[str, list[str]]:
    """Load tensors of a checkpoint whose names and shapes match; report the rest.

    Accepts a dassdp checkpoint, ``{"model": state_dict}`` or a bare state dict. Returns
    ``{"loaded": [...], "skipped": [...]}`` (skipped: missing in the file or shape differs).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    own = model.state_dict()
    match = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(match, strict=False)
    skipped = sorted(set(own) - set(match))
    log.info("pretrained %s: loaded %d tensors, kept init for %s", path, len(match), skipped)
    return {"loaded": sorted(match), "skipped": skipped}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norm weights (1-D) and the model's ``no_weight_decay()``."""
    skip = set(getattr(model, "no_weight_decay", set)())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum, Nesterov off) over decay / no-decay parameter groups."""
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """timm ``CosineLRScheduler`` over ``epochs`` with linear warm-up from ``warmup_lr``."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer,
        t_initial=cfg.epochs,
        lr_min=cfg.min_lr,
        warmup_t=cfg.lr_warmup_epochs,
        warmup_lr_init=cfg.warmup_lr,
        t_in_epochs=True,
    )


def build_mixup(cfg: TrainConfig, info: DatasetInfo) -> Callable | None:
    """timm ``Mixup`` (batch mode, label smoothing folded into its soft targets) or None."""
    if not cfg.mixup:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode="batch",
        label_smoothing=cfg.label_smoothing,
        num_classes=info.num_classes,
    )


def build_criterion(cfg: TrainConfig) -> nn.Module:
    """Soft-target cross entropy under Mixup, else cross entropy with label smoothing."""
    if cfg.mixup:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def build_learner(cfg: TrainConfig, model: nn.Module) -> Any:
    """The :class:`dassdp.DASSDP` learner for the ``plasticity`` block, or None without one."""
    if cfg.plasticity is None:
        return None
    from dassdp.plasticity.learner import DASSDP

    return DASSDP(model, dassdp_config(cfg.plasticity, seed=cfg.seed))
