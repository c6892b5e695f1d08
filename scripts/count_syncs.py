#!/usr/bin/env python3
"""Count host syncs and dispatched ops per training step with whatever dassdp is importable.

Runs :func:`dassdp.bench.syncs.measure` from *this* checkout's ``src/dassdp/bench/syncs.py``
(loaded by path) against the ``dassdp`` found on ``PYTHONPATH``, so an older version can be
measured with the same counting code. The "before" numbers of ``dassdp bench syncs``::

    git worktree add /tmp/base81 81cbbaa
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/base81/src python3 scripts/count_syncs.py \\
        --out docs/bench/syncs-before.csv
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

SYNCS_PY = Path(__file__).resolve().parent.parent / "src" / "dassdp" / "bench" / "syncs.py"


def load_counter():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("dassdp_count_syncs", SYNCS_PY)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


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
    syncs = load_counter()
    print(f"dassdp from {Path(dassdp.__file__).parent}", flush=True)
    rows = syncs.measure(
        args.model, backends=tuple(args.backends), T=args.T, batch=args.batch, size=args.size,
        lif_channels=args.lif_channels, device=args.device, log=print,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
