"""``dassdp demo``: prepare Fashion-MNIST offline and train ``configs/demo.yaml`` on it.

Real data (from the Debian package ``dataset-fashion-mnist``, hash-checked; see
``dassdp data prepare``), a small spiking CNN with DA-SSDP on its two Linear sites, a
one-epoch warm-up and then the fitted gate. Prints the test accuracy, the fitted gate of
every site, the wall time and the run folder. A few minutes on two CPU cores.

``dassdp demo --compare`` (what ``make demo`` runs) instead compares ``baseline`` and
``dassdp`` on the same config over paired seeds (``--seeds``, default 0-2) with
``dassdp compare`` and writes the report (``dassdp report``): prints its path and the
headline table. Rerunning with the same ``--out`` continues an interrupted demo.
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
    parser.add_argument(
        "--compare", action="store_true", help="paired baseline vs dassdp over --seeds + report"
    )
    parser.add_argument("--seeds", default="0-2", help="seeds of --compare (default 0-2)")


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


# --compare trains 2 variants x 3 seeds: a smaller training/test subset keeps the six runs
# to about 10-12 minutes on 2 shared CPU cores (key=value arguments override these).
COMPARE_OVERRIDES = ["subset=8000", "test_subset=5000"]


def run_compare(args: argparse.Namespace, overrides: list[str], start: float) -> int:
    """baseline vs dassdp over paired seeds on the demo config, then the report."""
    from dassdp.commands.report import headline
    from dassdp.experiments.report import write_report
    from dassdp.experiments.runner import parse_seeds, plan, run_sweep

    out = Path(args.out or Path("runs") / f"demo-compare-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = [*COMPARE_OVERRIDES, *overrides]
    specs = plan(
        find_config(args.config), parse_seeds(args.seeds), ["baseline", "dassdp"], out, overrides
    )
    result = run_sweep(specs, out)
    if not result.ok:
        raise RuntimeError(f"demo runs failed: {result.errors}")
    report = write_report(out)
    print(f"\nreport: {report}\n\n{headline(report.read_text())}")
    print(f"\nwall time: {(time.perf_counter() - start) / 60:.1f} min")
    return 0


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
    if args.compare:
        return run_compare(args, overrides, start)
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
