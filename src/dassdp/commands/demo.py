"""``dassdp demo``: prepare Fashion-MNIST offline and train ``configs/demo.yaml`` on it.

Real data (from the Debian package ``dataset-fashion-mnist``, hash-checked; see
``dassdp data prepare``), a small spiking CNN with DA-SSDP on its two Linear sites, a
one-epoch warm-up and then the fitted gate. Prints the test accuracy, the fitted gate of
every site, the wall time and the run folder. A few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "prepare Fashion-MNIST offline and train the demo config (a few minutes on a CPU)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="demo config (default: configs/demo.yaml of the checkout)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. epochs=2")
    parser.add_argument("--root", default=None, help="data root (default: the user data cache)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/demo-<time>)")


def find_config(given: str | None) -> Path:
    """``given``, else ``configs/demo.yaml`` next to the source tree or in the current folder."""
    import dassdp

    if given is not None:
        return Path(given)
    candidates = [
        Path(dassdp.__file__).resolve().parents[2] / "configs" / "demo.yaml",
        Path.cwd() / "configs" / "demo.yaml",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"configs/demo.yaml not found (looked in {', '.join(map(str, candidates))}); "
        "run from the dassdp checkout or pass --config FILE"
    )


def run(args: argparse.Namespace) -> int:
    from dassdp.commands.eval import format_gate
    from dassdp.commands.train import setup_logging
    from dassdp.data import prepare
    from dassdp.engine import fit, load_config

    setup_logging(main=True)
    start = time.perf_counter()
    root = prepare("fashion-mnist", args.root)
    print(f"Fashion-MNIST ready in {root}")
    overrides = [*args.overrides, *([f"data_root={root}"] if args.root else [])]
    cfg = load_config(find_config(args.config), overrides)
    run_dir = Path(args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    row = fit(cfg, run_dir)
    wall = time.perf_counter() - start
    test = row["test"]
    print(
        f"\nDA-SSDP demo: {cfg.model} on {cfg.dataset}, {cfg.epochs} epochs "
        f"(warm-up {cfg.plasticity.warmup_epochs if cfg.plasticity else '-'})\n"
        f"test accuracy: {test['acc1']:.2f}% (acc@5 {test['acc5']:.2f}%, "
        f"{test['samples']} test images)"
    )
    for site, m in row.get("plasticity", {}).get("sites", {}).items():
        fit = {k: m.get(f"gate_{k}") for k in ("k", "mu", "sd", "valid", "reason")}
        print(f"fitted gate {site}: {format_gate(fit)}  (|dW| mean {m['dw_abs_mean']:.2e})")
    print(f"wall time: {wall / 60:.1f} min\nrun folder: {run_dir}")
    return 0
