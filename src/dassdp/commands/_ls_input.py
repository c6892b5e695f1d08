"""What ``dassdp ls sites`` and its ``--effect`` part (:mod:`dassdp.commands.ls_effect`) both
read from their arguments: the model's keyword arguments and the input batches."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["model_kwargs", "sites_input"]


def sites_input(args: argparse.Namespace, model_T: int) -> tuple[Any, str, Any]:
    """``(info, description, batches)`` for ``--data``: real training images through the
    normal data builders, or random input of the same shape when none is prepared."""
    import torch
    from torch.utils.data import DataLoader

    from dassdp.data import DatasetNotFoundError, build_dataset, dataset_info
    from dassdp.data.prepare import resolve_root

    info = dataset_info(args.data)
    B, n = args.batch_size, args.batches
    if not args.random:
        try:
            dataset = build_dataset(args.data, args.root, train=True, T=model_T)
        except DatasetNotFoundError:
            reason = f"{args.data} is not prepared in {resolve_root(args.root)}"
        else:
            gen = torch.Generator().manual_seed(args.seed)
            loader = DataLoader(dataset, batch_size=B, shuffle=True, generator=gen)
            batches = [b for b, _ in zip(loader, range(n), strict=False)]
            seen = sum(len(b[0]) for b in batches)
            where = resolve_root(args.root)
            return info, f"real data: {seen} {args.data} training images in {where}", batches
    else:
        reason = "--random"
    gen = torch.Generator().manual_seed(args.seed)
    S = info.input_size
    if info.is_event:  # sparse event counts [B, T, 2, S, S]
        shape = (B, model_T, info.in_channels, S, S)
        batches = [torch.rand(shape, generator=gen).lt(0.05).float() for _ in range(n)]
    else:  # normalised images are roughly standard normal
        shape = (B, info.in_channels, S, S)
        batches = [torch.randn(shape, generator=gen) for _ in range(n)]
    return info, f"random input {tuple(shape)} x {n} ({reason})", batches


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from dassdp._util.yamlfile import load_yaml

    kwargs: dict[str, Any] = {}
    if args.model_args:
        kwargs = load_yaml(args.model_args, "--model-args") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model-args must be a YAML mapping, got {args.model_args!r}")
    return kwargs
