"""``dassdp ls models [PATTERN]`` and ``dassdp ls sites MODEL``.

``ls models`` lists registered models with their parameter counts. ``ls sites MODEL
[--preset P] [--data DATASET --batches N]`` prints each DA-SSDP site of a site preset: the
layer, its kind (Linear / 1x1 conv), ``C_out x C_in`` and the weight's shape, and its pre/post
sources; with ``--data``, the firing fractions of the pre and post units at initialisation
(:func:`site_firing`), measured on the dataset's training images through the normal data
builders, or on random input when the dataset is not prepared (the output says which).

``ls sites MODEL --effect --data DATASET [--checkpoint FILE] [--csv F] [--markdown]``: how
much of one DA-SSDP update per site reaches what follows it, the site's output, the next
BatchNorm in eval and train mode, and the logits, for the whole update and its uniform and
non-uniform parts (:mod:`dassdp.experiments.site_effect`). It lives here because it is a
property of a model's sites, measured the way ``--data`` measures their firing: same
model building, same data path, same flags. An initialised model gets ``G = 1`` and its
BatchNorm statistics re-estimated on the batches; ``--checkpoint`` takes a trained model, its
config, its fitted gate and learned values, and its own running statistics.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from dassdp.commands._ls_input import model_kwargs, sites_input

HELP = "list what is available (models; a model's DA-SSDP sites)"
DRIFT_LEVEL = 0.9  # pre and post both fire at least this often: dW is a near-uniform drift


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("models", "sites"), help="what to list")
    parser.add_argument(
        "pattern",
        nargs="?",
        default=None,
        help="models: fnmatch pattern on names, e.g. 'spikingresformer_*'; sites: the model",
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="sites: the site preset (default: 'default', or the checkpoint's sites)",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="DATASET",
        help="sites: measure firing fractions on this dataset's training images "
        "(random input when it is not prepared)",
    )
    parser.add_argument("--batches", type=int, default=1, help="sites: batches to measure on")
    parser.add_argument("--batch-size", type=int, default=16, help="sites: images per batch")
    parser.add_argument("--root", default=None, help="sites: data root (default: the cache)")
    parser.add_argument(
        "--random", action="store_true", help="sites: random input even if the data is there"
    )
    parser.add_argument("--T", type=int, default=None, help="sites: time steps (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="sites: model init and data order")
    parser.add_argument(
        "--model-args",
        default=None,
        metavar="YAML",
        help="sites: model constructor arguments, e.g. '{channels: [8, 16], hidden: 32}'",
    )
    effect = parser.add_argument_group("sites --effect: what one DA-SSDP update changes")
    effect.add_argument(
        "--effect",
        action="store_true",
        help="apply one DA-SSDP update per site (from the first batch) and measure its "
        "relative change at the site's output, the next BatchNorm (eval and train mode) and "
        "the logits, for dW, its uniform part and the rest",
    )
    effect.add_argument(
        "--checkpoint",
        default=None,
        help="a trained run's last.pt / best.pt: its model, config, data, gate and learned "
        "values (default: an initialised model, G = 1)",
    )
    effect.add_argument("--csv", default=None, metavar="FILE", help="also write the rows here")
    effect.add_argument(
        "--markdown", action="store_true", help="print the table as Markdown (for docs)"
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


# ---------------------------------------------------------------- sites


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """One site of a preset: layer name, kind, ``(C_out, C_in)``, weight shape, sources."""

    name: str
    kind: str
    c_out: int
    c_in: int
    weight_shape: tuple[int, ...]
    pre: str
    post: str


def site_infos(model: Any, preset: str = "default") -> list[SiteInfo]:
    """The sites of ``model.dassdp_sites(preset)`` with their shapes; ``ValueError`` for a
    model without DA-SSDP sites or an unknown preset (naming the allowed ones)."""
    from torch import nn

    from dassdp.plasticity.recorder import resolve_module, site_shape

    if not hasattr(model, "dassdp_sites"):
        raise ValueError(f"{type(model).__name__} declares no DA-SSDP sites (no dassdp_sites)")
    out = []
    for name, spec in model.dassdp_sites(preset).items():
        layer = resolve_module(model, name, what=f"site {name!r}")
        c_out, c_in = site_shape(layer, name)
        kind = "Linear" if isinstance(layer, nn.Linear) else "1x1 conv"
        shape = tuple(layer.weight.shape)
        out.append(SiteInfo(name, kind, c_out, c_in, shape, spec.pre, spec.post))
    return out


def site_firing(
    model: Any, preset: str, batches: Iterable[Any], T: int | None = None
) -> dict[str, tuple[float, float]]:
    """Firing fractions ``{site: (pre, post)}`` of ``model`` as it is (e.g. at initialisation).

    For each sample, the fraction of a site's pre (post) units that are active at least once
    over the T steps (its sources as DA-SSDP reads them, ``fired="any"``); the mean over
    the samples of every batch. ``batches`` yields model inputs (or ``(input, label)``
    pairs). The model runs in training mode (batch statistics, as the rule sees it) under
    ``no_grad``; BatchNorm running statistics are restored afterwards.
    """
    import torch

    from dassdp.plasticity.recorder import Recorder

    specs = {
        name: dataclasses.replace(spec, fired="any")
        for name, spec in model.dassdp_sites(preset).items()
    }
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    recorder = Recorder(model, specs, T=T, grad_only=False)  # it runs under no_grad
    sums = {name: [0.0, 0.0] for name in specs}
    count = 0
    try:
        model.train()
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, list | tuple) else batch
                model(x)
                records = recorder.collect()
                for name, rec in records.items():
                    sums[name][0] += rec.pre.fired.float().mean(1).sum().item()
                    sums[name][1] += rec.post.fired.float().mean(1).sum().item()
                count += x.shape[0]
    finally:
        recorder.close()
        model.load_state_dict(saved)
        model.train(was_training)
    if count == 0:
        raise ValueError("site_firing: no batches to measure on")
    return {name: (pre / count, post / count) for name, (pre, post) in sums.items()}


def format_sites(
    infos: list[SiteInfo], firing: dict[str, tuple[float, float]] | None = None
) -> list[str]:
    """A table of ``infos`` (plus firing columns and drift notes when ``firing`` is given)."""
    head = ["site", "kind", "C_out x C_in", "weight", "pre", "post"]
    rows = [
        [i.name, i.kind, f"{i.c_out} x {i.c_in}", str(i.weight_shape), i.pre, i.post] for i in infos
    ]
    if firing is not None:
        head += ["pre fired", "post fired"]
        for row, info in zip(rows, infos, strict=True):
            pre, post = firing[info.name]
            row += [f"{pre:.1%}", f"{post:.1%}"]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]
    for info in infos:
        if firing is not None and min(firing[info.name]) >= DRIFT_LEVEL:
            pre, post = firing[info.name]
            lines.append(
                f"note: {info.name}: pre {pre:.0%} and post {post:.0%} of units fire: "
                "dW is a near-uniform drift here"
            )
    return lines


def _check_sites_args(args: argparse.Namespace) -> None:
    if not args.pattern and not (args.effect and args.checkpoint):
        raise ValueError(
            "ls sites needs a model name, e.g. `dassdp ls sites spikingresformer_cifar`"
        )
    if args.batches < 1 or args.batch_size < 1:
        raise ValueError(
            f"--batches and --batch-size must be >= 1, got {args.batches}, {args.batch_size}"
        )
    effect_only = {"--checkpoint": args.checkpoint, "--csv": args.csv, "--markdown": args.markdown}
    misplaced = [flag for flag, value in effect_only.items() if value and not args.effect]
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: only with --effect")


def _list_sites(args: argparse.Namespace) -> list[str]:
    import torch

    from dassdp.models import create_model

    _check_sites_args(args)
    if args.effect:
        from dassdp.commands.ls_effect import site_effect_lines

        return site_effect_lines(args)
    preset = args.preset or "default"
    kwargs = model_kwargs(args)
    T = args.T
    if args.data is None:
        with torch.device("meta"):  # shapes only
            model = create_model(args.pattern, **({"T": T} if T else {}), **kwargs)
        infos = site_infos(model, preset)
        return [
            f"{args.pattern}, site preset {preset!r}: {len(infos)} site(s)",
            *format_sites(infos),
        ]
    from dassdp.data import dataset_info

    info = dataset_info(args.data)
    T = T or info.default_T or 4
    torch.manual_seed(args.seed)
    model = create_model(
        args.pattern, num_classes=info.num_classes, in_channels=info.in_channels, T=T, **kwargs
    )
    infos = site_infos(model, preset)
    _, source, batches = sites_input(args, T)
    firing = site_firing(model, preset, batches, T=T)
    return [
        f"{args.pattern}, site preset {preset!r}: {len(infos)} site(s); firing at "
        f"initialisation (T={T}) on {source}",
        *format_sites(infos, firing),
    ]


_LISTERS: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "models": lambda args: _list_models(args.pattern),
    "sites": _list_sites,
}


def run(args: argparse.Namespace) -> int:
    print("\n".join(_LISTERS[args.what](args)))
    return 0
