"""``dassdp compare --config FILE --seeds 0-4 --variants baseline,dassdp --out DIR [key=value]``.

One training run per (variant, seed) in ``DIR/<variant>/seed<k>/``, paired by seed (same
initial weights and data order across variants). Rerunning the same command continues a
stopped sweep: finished runs are skipped, an interrupted run resumes from its
``last.pt``, nothing is overwritten. Variants (compose with ``+``, e.g.
``dassdp+no-kernel``): see ``dassdp.experiments.variants``. When the sweep is complete the
report (``dassdp report DIR``) is written.
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "paired multi-seed comparison of variants (baseline, dassdp, ssdp, controls ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dassdp.experiments.variants import VARIANTS

    parser.add_argument("--config", "-c", required=True, help="YAML config file (configs/*.yaml)")
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,3,7 (default 0-4)")
    parser.add_argument(
        "--variants",
        default="baseline,dassdp",
        help="comma-separated, composable with '+'; known: "
        + ", ".join(VARIANTS)
        + "; a part may be key=value (e.g. dassdp+A_plus=1.5e-4)",
    )
    parser.add_argument("--out", required=True, help="comparison folder")
    parser.add_argument(
        "--workers", type=int, default=1, help="parallel runs (processes; default 1)"
    )
    parser.add_argument(
        "--robustness",
        default=None,
        metavar="SPEC",
        help='also evaluate each final checkpoint under e.g. "jitter=1,drop=0.1,noise=0.05"',
    )
    parser.add_argument("--no-report", action="store_true", help="do not write the report")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. epochs=5"
    )


def _state(run_dir: str) -> str:
    from pathlib import Path

    folder = Path(run_dir)
    if (folder / "done.json").is_file():
        return "done"
    return "interrupted (will resume)" if (folder / "last.pt").is_file() else "to run"


def run(args: argparse.Namespace) -> int:
    from dassdp.experiments.robustness import parse_conditions
    from dassdp.experiments.runner import parse_seeds, plan, run_sweep
    from dassdp.experiments.variants import parse_variants

    seeds, variants = parse_seeds(args.seeds), parse_variants(args.variants)
    conditions = parse_conditions(args.robustness) if args.robustness else []
    specs = plan(args.config, seeds, variants, args.out, args.overrides, conditions)
    if args.dry_run:
        for spec in specs:
            spec.resolve()  # validates the run's config
            print(f"{spec.label:32s} {spec.run_dir}  {_state(spec.run_dir)}")
        return 0
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1 and (os.cpu_count() or 1) <= 2:
        print(
            f"warning: --workers {args.workers} on {os.cpu_count()} CPU cores: parallel runs "
            "compete for the cores and are rarely faster than one at a time",
            file=sys.stderr,
        )
    result = run_sweep(specs, args.out, workers=args.workers)
    counts = {s: list(result.status.values()).count(s) for s in ("done", "trained", "failed")}
    print(
        f"[compare] {len(specs)} runs: {counts['trained']} trained, "
        f"{counts['done']} already done, {counts['failed']} failed; folder {args.out}"
    )
    if not result.ok:
        for label, error in result.errors.items():
            print(f"  {label}: {error}", file=sys.stderr)
        return 1
    if not args.no_report:
        from dassdp.experiments.report import write_report

        path = write_report(args.out)
        print(f"[compare] report: {path}")
    return 0
