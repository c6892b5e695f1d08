"""``dassdp ls models [PATTERN]``: list registered models with their parameter counts."""

from __future__ import annotations

import argparse
from collections.abc import Callable

HELP = "list what is available (models)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=sorted(_LISTERS), help="what to list")
    parser.add_argument(
        "pattern",
        nargs="?",
        default=None,
        help="fnmatch pattern on names, e.g. 'spikingresformer_*'",
    )


def count_parameters(name: str) -> int:
    """Parameter count of model ``name`` at its default arguments (built on the meta device)."""
    import torch

    from dassdp.models import create_model

    with torch.device("meta"):  # no memory, no init cost: only shapes are needed
        model = create_model(name)
    return sum(p.numel() for p in model.parameters())


def _list_models(pattern: str | None) -> list[str]:
    from dassdp.models import list_models

    names = list_models(pattern)
    if not names:
        raise ValueError(f"no model matches {pattern!r}; run `dassdp ls models` to see all")
    width = max(len(n) for n in names)
    lines = [f"{'model':<{width}}  {'params':>12}"]
    lines += [f"{n:<{width}}  {count_parameters(n):>12,}" for n in names]
    return lines


_LISTERS: dict[str, Callable[[str | None], list[str]]] = {"models": _list_models}


def run(args: argparse.Namespace) -> int:
    print("\n".join(_LISTERS[args.what](args.pattern)))
    return 0
