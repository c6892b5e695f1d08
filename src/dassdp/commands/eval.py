"""``dassdp eval --checkpoint FILE [key=value ...] [--json]``: test metrics of a checkpoint.

Robustness: ``--jitter SIGMA_T``, ``--drop P``, ``--noise P`` (each may repeat) evaluate the
checkpoint clean and once per perturbation of the encoded input (spike-time jitter,
deletion, spurious events; defined in :mod:`dassdp.experiments.robustness`);
``--out PATH`` writes them as JSON: ``PATH/robustness.json`` if PATH is a folder (e.g. the
run folder, where ``dassdp report`` finds it) or ends with ``/`` (a folder, created if
missing), else the file PATH.

The model and the test data come from the config stored in the checkpoint; overrides such
as ``data_root=/data batch_size=256 device=cpu amp=bf16`` adjust where and how it runs. Prints
test loss, acc@1 and acc@5 and, for a DA-SSDP run, the fitted gate of each site.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dassdp.experiments.robustness import Perturbation

HELP = "evaluate a checkpoint on its dataset's test split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a last.pt / best.pt of a run")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. data_root=DIR batch_size=256"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    for flag, meta, what in (
        ("--jitter", "SIGMA_T", "spike-time jitter, Gaussian std in time steps"),
        ("--drop", "P", "delete each input event with probability P"),
        ("--noise", "P", "add a spurious input event with probability P"),
    ):
        parser.add_argument(flag, type=float, action="append", metavar=meta, help=what)
    parser.add_argument(
        "--perturb-seed", type=int, default=None, help="perturbation seed (default: run seed)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="write the robustness JSON to this file, or to robustness.json in this folder "
        "(an existing one, or a path ending with '/', created)",
    )


def _conditions(args: argparse.Namespace) -> list[Perturbation]:
    """One perturbation per value of ``--jitter``, ``--drop`` and ``--noise`` (in that order)."""
    from dassdp.experiments.robustness import Perturbation

    kinds = ("jitter", "drop", "noise")
    return [Perturbation(k, v) for k in kinds for v in (getattr(args, k, None) or [])]


def run_robustness(args: argparse.Namespace, conditions: list[Perturbation]) -> int:
    """Clean + one evaluation per perturbation; print a table, optionally write JSON."""
    from dassdp._util.io import atomic_write_json
    from dassdp.engine import load_checkpoint
    from dassdp.experiments.runner import evaluate_robustness

    seed = args.perturb_seed
    if seed is None:
        seed = int(load_checkpoint(args.checkpoint)["config"]["seed"])
    result = evaluate_robustness(args.checkpoint, conditions, seed, args.overrides)
    if args.out:
        out = robustness_path(args.out)
        atomic_write_json(out, result)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.checkpoint} (epoch {result['epoch']}), perturbation seed {seed}:")
    for c in result["conditions"]:
        print(f"  {c['name']:14s} acc@1 {c['acc1']:6.2f}%  loss {c['loss']:.4f}")
    if args.out:
        print(f"written: {out}")
    return 0


def robustness_path(out: str) -> Path:
    """Where ``--out OUT`` writes: ``OUT/robustness.json`` when OUT is a folder, or ends with
    ``/`` (a folder to create, with its parents); else the file OUT itself (its folder is
    created if needed)."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        return path / "robustness.json"
    return path


def run(args: argparse.Namespace) -> int:
    from dassdp.engine.train import evaluate_checkpoint

    conditions = _conditions(args)
    if conditions or args.out:
        return run_robustness(args, conditions)
    result = evaluate_checkpoint(args.checkpoint, args.overrides)
    if args.json:
        print(json.dumps(result))
        return 0
    test = result["test"]
    print(
        f"{args.checkpoint} (epoch {result['epoch']}, {result['model']} on {result['dataset']}): "
        f"test loss {test['loss']:.4f}  acc@1 {test['acc1']:.2f}%  acc@5 {test['acc5']:.2f}%  "
        f"({test['samples']} samples)"
    )
    for site, fit in (result.get("gate") or {}).items():
        print(f"  DA-SSDP gate {site}: {format_gate(fit)}")
    return 0


def format_gate(fit: dict) -> str:
    """One line for a fitted gate: k, mu, sd and whether it is valid."""
    if fit.get("k") is None:
        return "not fitted (still in warm-up)"
    line = f"k {fit['k']:+.4f}  mu {fit['mu']:.4f}  sd {fit['sd']:.4f}"
    return line if fit.get("valid", True) else f"{line}  (G = 1: {fit.get('reason')})"
