"""The ``--effect`` part of ``dassdp ls sites`` (see :mod:`dassdp.commands.ls`).

``dassdp ls sites MODEL --effect --data DATASET [--batches N --batch-size B]``: an
initialised model (``--seed``, ``--model-args``, ``--T``), its BatchNorm statistics
re-estimated on the batches, one DA-SSDP update per site with ``G = 1`` from the first
batch. ``--checkpoint FILE``: the trained model of a run with its config (model, data, T),
its DA-SSDP config, fitted gate and learned values (when the checkpoint's learner has the
same sites and a fitted gate; else ``G = 1``) and its own running statistics. The
measurement itself is :mod:`dassdp.experiments.site_effect`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

__all__ = ["format_effects", "site_effect_lines"]

HEAD = (
    "site", "part", "norm", "‖part‖/‖dW‖", "‖part‖/‖W‖", "site out", "norm eval",
    "norm train", "train/eval", "logits eval", "logits train",
)  # fmt: skip


@dataclasses.dataclass
class _Setup:
    """What the measurement needs: the model, its sites, the rule and the batches."""

    model: Any
    name: str
    preset: str
    specs: dict[str, Any]
    rule: Any
    learner_state: dict[str, Any] | None
    batches: list[tuple[Any, Any]]
    source: str
    gate: str
    stats: str
    T: int


def _as_batches(raw: list[Any]) -> list[tuple[Any, Any]]:
    """Loader batches ``[x, y]`` or bare inputs ``x`` -> ``(x, y or None)``."""
    return [(b[0], b[1]) if isinstance(b, list | tuple) else (b, None) for b in raw]


def _init_setup(args: argparse.Namespace) -> _Setup:
    import torch

    from dassdp.commands._ls_input import model_kwargs, sites_input
    from dassdp.data import dataset_info
    from dassdp.experiments.site_effect import calibrate_norms
    from dassdp.models import create_model
    from dassdp.plasticity import DASSDPConfig

    if args.data is None:
        raise ValueError(
            "--effect needs --data DATASET (the images to measure on), or --checkpoint FILE"
        )
    info = dataset_info(args.data)
    T = args.T or info.default_T or 4
    preset = args.preset or "default"
    torch.manual_seed(args.seed)
    model = create_model(
        args.pattern,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        T=T,
        **model_kwargs(args),
    )
    specs = _specs(model, preset)
    make = DASSDPConfig.compat if preset == "compat" else DASSDPConfig
    rule = make(gate="one", seed=args.seed)
    _, source, raw = sites_input(args, T)
    batches = _as_batches(raw)
    calibrate_norms(model, batches)
    return _Setup(
        model, args.pattern, preset, specs, rule, None, batches, source,
        gate="G = 1 (initialised model)", stats="re-estimated on these batches", T=T,
    )  # fmt: skip


def _specs(model: Any, preset: str) -> dict[str, Any]:
    if not hasattr(model, "dassdp_sites"):
        raise ValueError(f"{type(model).__name__} declares no DA-SSDP sites (no dassdp_sites)")
    return dict(model.dassdp_sites(preset))


def _checkpoint_setup(args: argparse.Namespace) -> _Setup:
    from dassdp.engine import load_checkpoint
    from dassdp.engine.builders import build_model, data_info
    from dassdp.engine.checkpoint import load_model_state
    from dassdp.engine.config import config_from_dict, dassdp_config
    from dassdp.plasticity import DASSDPConfig

    state = load_checkpoint(args.checkpoint)
    saved = {**state["config"], "pretrained": None}
    if args.root:
        saved["data_root"] = args.root
    cfg = config_from_dict(saved)
    _check_checkpoint_args(args, cfg)
    model = build_model(cfg, data_info(cfg))
    load_model_state(model, state["model"], args.checkpoint)
    p = cfg.plasticity
    rule = dassdp_config(p, seed=cfg.seed) if p is not None else DASSDPConfig(seed=cfg.seed)
    preset = args.preset or rule.sites
    specs = _specs(model, preset)
    plast = state.get("plasticity")
    learner_state = plast if plast and list(plast["sites"]) == list(specs) else None
    fitted = learner_state is not None and learner_state.get("fits") is not None
    if fitted and rule.gate == "fitted":
        gate = "the checkpoint's fitted gate"
    else:
        gate = "G = 1 (" + ("the rule's gate" if fitted else "no fitted gate for these sites") + ")"
        rule = rule.replace(gate="one")
    if learner_state is not None and rule.learn:
        gate += ", its learned sigma and amplitude"
    batches, source = _checkpoint_batches(args, cfg)
    return _Setup(
        model, cfg.model, preset, specs, rule, learner_state, batches, source, gate,
        stats=f"the checkpoint's (epoch {state['epoch']})", T=cfg.T,
    )  # fmt: skip


def _check_checkpoint_args(args: argparse.Namespace, cfg: Any) -> None:
    if args.pattern and args.pattern != cfg.model:
        raise ValueError(
            f"--checkpoint {args.checkpoint} holds {cfg.model!r}, not {args.pattern!r}"
        )
    if args.data and args.data != cfg.dataset:
        raise ValueError(
            f"--checkpoint {args.checkpoint} was trained on {cfg.dataset!r}, not {args.data!r}; "
            "drop --data (the checkpoint's dataset is used)"
        )
    given = [f for f, v in (("--model-args", args.model_args), ("--T", args.T)) if v]
    given += ["--random"] if args.random else []
    if given:
        raise ValueError(f"{', '.join(given)}: not with --checkpoint (its config sets them)")


def _checkpoint_batches(args: argparse.Namespace, cfg: Any) -> tuple[list[Any], str]:
    """The run's training images (its subset, no augmentation), shuffled by ``--seed``."""
    import torch
    from torch.utils.data import DataLoader

    from dassdp.engine.builders import build_datasets

    plain = dataclasses.replace(cfg, augment=None, cutout=0)
    train_set, _ = build_datasets(plain)
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen)
    batches = _as_batches([b for b, _ in zip(loader, range(args.batches), strict=False)])
    seen = sum(len(x) for x, _ in batches)
    return batches, f"{seen} {cfg.dataset} training images (no augmentation)"


def _num(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.3g}"


def _cells(e: Any) -> list[str]:
    values = (e.share, e.weight_ratio, e.site_change, e.norm_eval, e.norm_train)
    values += (e.passed_train, e.logits_eval, e.logits_train)
    return [e.site, e.part, e.norm or "–", *(_num(v) for v in values)]


def format_effects(effects: list[Any], markdown: bool = False) -> list[str]:
    """The rows of :func:`dassdp.experiments.site_effect.site_effects` as an aligned text
    table or a Markdown table."""
    rows = [_cells(e) for e in effects]
    if markdown:
        lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(r[c]) for r in [list(HEAD), *rows]) for c in range(len(HEAD))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [list(HEAD), *rows]
    ]


NOTES = (
    "changes are relative: |z' - z| / |z - channel mean of z| over the batches, at the site's "
    "output, the BatchNorm after it (its input from the training-mode forward, normalised "
    "with its running statistics = eval, with the batch's = train) and the logits (eval- and "
    "training-mode forwards); uniform = each row's mean of dW over the inputs, rest = dW - "
    "uniform; train/eval = norm train / norm eval, the part BN(train) lets through",
)


def site_effect_lines(args: argparse.Namespace) -> list[str]:
    """Run the measurement for ``args`` and return the printed lines (and write ``--csv``)."""
    from dassdp.experiments.site_effect import dassdp_updates, site_effects, site_norms

    setup = _checkpoint_setup(args) if args.checkpoint else _init_setup(args)
    first = setup.batches[0]
    updates = dassdp_updates(
        setup.model, setup.specs, setup.rule, first, learner_state=setup.learner_state,
        seed=args.seed,
    )  # fmt: skip
    norms = site_norms(setup.model, list(setup.specs), first[0])
    effects = site_effects(setup.model, updates, norms, setup.batches, seed=args.seed)
    if args.csv:
        _write_csv(Path(args.csv), setup, effects)
    header = [
        f"{setup.name}, site preset {setup.preset!r}: one DA-SSDP update per site from the "
        f"first batch, {setup.gate}; measured on {setup.source}, {len(setup.batches)} "
        f"batch(es), T={setup.T}; BatchNorm running statistics: {setup.stats}",
        "next normalisation: "
        + "; ".join(f"{s}: {n} ({how})" if n else f"{s}: none" for s, (n, how) in norms.items()),
    ]
    return [*header, *format_effects(effects, args.markdown), *(f"note: {n}" for n in NOTES)]


def _write_csv(path: Path, setup: _Setup, effects: list[Any]) -> None:
    rows = [{"model": setup.name, "preset": setup.preset, **e.to_dict()} for e in effects]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
