#!/usr/bin/env python3
"""Count host syncs and dispatched ops per training step of whatever ``dassdp`` is importable.

Runs ``dassdp bench syncs``'s counting (:func:`dassdp.bench.syncs.measure`) from *this*
checkout, with this checkout's engine step and bench harness, over the ``dassdp`` found on
``PYTHONPATH`` (the models, neurons and learner it counts), so another version is measured
with the same counting code. The *before* column of ``dassdp bench syncs``::

    mkdir -p ../base && git archive 81cbbaa src | tar -x -C ../base
    OMP_NUM_THREADS=1 PYTHONPATH=../base/src python benchmarks/count_syncs.py \\
        --out docs/bench/syncs-before.csv

A ``dassdp`` whose ``LIF`` has no ``backend=`` argument (the base commit) counts ``loop`` as
``LIF(fused=False)`` and ``torch`` as its default, fused LIF.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _checkout

# this checkout's counting code (and what it imports), over the importable dassdp
GRAFT = ("dassdp._util", "dassdp.engine.step", "dassdp.bench.harness", "dassdp.bench.counters",
         "dassdp.bench.syncs")  # fmt: skip


def factories(backends: list[str]) -> dict[str, Callable[..., Any]] | None:
    """Neuron factories for a ``LIF`` without ``backend=`` (None: ``LIF(backend=...)`` works)."""
    from dassdp.neurons import LIF

    if "backend" in inspect.signature(LIF).parameters:
        return None
    if "triton" in backends:
        raise ValueError("backend 'triton': this dassdp's LIF has no backend= argument")
    return {"loop": functools.partial(LIF, fused=False), "torch": functools.partial(LIF)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument("--backends", nargs="+", default=["loop", "torch"])
    parser.add_argument("--model", default="spikingresformer_ti")
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--lif-channels", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch

    import dassdp

    torch.set_num_threads(1)
    _checkout.graft(GRAFT)
    from dassdp.bench import harness, syncs

    print(f"dassdp from {Path(dassdp.__file__).parent}", flush=True)
    rows = syncs.measure(
        args.model, backends=tuple(args.backends), T=args.T, batch=args.batch, size=args.size,
        lif_channels=args.lif_channels, device=args.device, log=print,
        factories=factories(args.backends),
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    harness.write_csv(args.out, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
