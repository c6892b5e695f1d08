"""``dassdp report DIR``: tables, CSV files and plots of a paired comparison folder.

Reads only result files (``DIR/<variant>/seed<k>/{metrics.jsonl, config.yaml, run.json,
done.json, robustness.json}`` and ``DIR/compare.json``) and writes into ``DIR``:

- ``report.md``: the headline table (n, mean ± std of the final test acc@1, the paired
  difference to ``baseline`` with its bootstrap 95% CI, paired-t and Wilcoxon p, and the
  Holm-adjusted t p over the variants), per-seed values, the best epoch and the train-test
  gap, the fitted gates, plasticity and firing-rate summaries and, when ``robustness.json``
  files exist, a robustness table;
- CSV tables: ``runs.csv``, ``summary.csv``, ``generalization.csv``, ``curves.csv``,
  ``gate.csv``, ``plasticity.csv``, ``firing.csv`` (and ``robustness.csv``,
  ``robustness_summary.csv``);
- PNG plots (matplotlib, Agg): ``accuracy_curves.png``, ``final_paired.png``,
  ``delta_vs_baseline.png``, ``warmup_sync_loss.png``, ``plasticity.png``,
  ``firing_rates.png`` (and ``robustness.png``).

The unit of analysis is the seed: only finished runs (``done.json``) enter the statistics,
and a variant is compared with the baseline on the seeds both have. "Final" is the last
epoch's test accuracy as recorded in ``done.json`` when the run finished (the best epoch
would be selected on the test set), so a damaged ``metrics.jsonl`` line cannot change it.
Unfinished runs, damaged result files (unreadable metrics lines, bytes that are not UTF-8,
a ``done.json`` or ``config.yaml`` that cannot be read, fewer metrics rows than epochs) and
planned runs that are missing or never recorded an epoch (the plan: every variant times
every seed of ``compare.json`` and of the ``<variant>/seed<k>`` folders) are listed in
``report.md`` and on stderr; nothing is dropped silently. Every file is written whole
(a temporary file renamed into place); a folder that cannot be written is one
:class:`ReportWriteError` naming it. A paired t-test whose differences are all equal has zero
variance: its p is undefined (NaN, shown as "undefined"), not 0.

Best epoch and train-test gap (``generalization.csv``, and per run in ``runs.csv``): the
best epoch is the one with the highest test acc@1 (the first on a tie), so its accuracy is
chosen on the test set (no validation split): read it as the ceiling early stopping could
reach, not as an unbiased estimate. The gap is train acc@1 minus test acc@1, at the final
epoch and at the best epoch. Train acc@1 is what ``metrics.jsonl`` records: the running
accuracy over the epoch's training batches, augmented, in train mode, while the weights
move (not a clean pass over the training set), so it is a little below a clean evaluation
and the gap is, if anything, understated. Under Mixup/CutMix it is scored against the
unmixed labels and means little: the report says so when a run used it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dassdp._util.io import atomic_write_text
from dassdp._util.yamlfile import YAMLInputError, read_yaml_file
from dassdp.experiments.stats import PairedComparison, compare_paired

__all__ = [
    "ReportWriteError",
    "Run",
    "load_runs",
    "missing_runs",
    "planned_runs",
    "run_warnings",
    "summarize",
    "write_report",
]

BASELINE = "baseline"
ALPHA = 0.05


@dataclass
class Run:
    """One run folder's results: metrics rows (one per epoch), config, markers."""

    variant: str
    seed: int
    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    done: dict[str, Any] | None
    robustness: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)  # damaged result files, in words

    @property
    def final_test(self) -> dict[str, Any]:
        """The final test metrics: ``done.json``'s, else the last metrics row's."""
        done = self.done or {}
        if isinstance(done.get("final_test"), dict):
            return done["final_test"]
        last = self.rows[-1].get("test", {}) if self.rows else {}
        if done.get("final_test_acc1") is not None:  # done.json of an older dassdp
            return {**last, "acc1": done["final_test_acc1"]}
        return last

    @property
    def final_acc1(self) -> float:
        value = self.final_test.get("acc1")
        return math.nan if value is None else float(value)

    @property
    def best_row(self) -> dict[str, Any] | None:
        """The metrics row of the best epoch (highest test acc@1, the first on a tie), or
        ``None`` without rows or when the best value (``done.json``'s ``best_test_acc1``)
        is in no readable row (that row is damaged)."""
        rows = [r for r in self.rows if _finite(r["test"].get("acc1"))]
        if not rows:
            return None
        row = max(rows, key=lambda r: r["test"]["acc1"])  # max keeps the first of equals
        best = (self.done or {}).get("best_test_acc1")
        return row if best is None or best == row["test"]["acc1"] else None

    @property
    def final_train_acc1(self) -> float:
        """Train acc@1 of the final epoch (NaN when that epoch's row is missing or damaged)."""
        epochs = _int((self.done or {}).get("epochs")) or len(self.rows)
        last = self.rows[-1] if self.rows else {}
        if last.get("epoch") != epochs - 1:
            return math.nan
        return _float(last.get("train", {}).get("acc1"))

    @property
    def revision(self) -> str:
        meta = _read_json(self.path / "run.json") or {}
        return str((self.done or {}).get("revision") or meta.get("revision") or "unknown")


# ---------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable (a run killed mid-write,
    bytes that are not UTF-8, a file without read permission)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else None
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The readable rows of ``metrics.jsonl`` and the numbers of its damaged lines (skipped:
    a line cut by a kill or an edit loses that epoch only, never the rows after it)."""
    file = path / "metrics.jsonl"
    if not file.is_file():
        return [], []
    rows, damaged = [], []
    for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:  # line by line: bytes that are not UTF-8 damage their line only
            row = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError or JSONDecodeError
            row = None
        if isinstance(row, dict) and isinstance(row.get("test"), dict) and "epoch" in row:
            rows.append(row)
        else:
            damaged.append(number)
    return rows, damaged


def _read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    """A run's ``config.yaml`` as a mapping (``{}`` when absent or unreadable) and, when it
    exists but cannot be read as one, why (binary, not UTF-8, a repeated key, ...)."""
    if not path.is_file():
        return {}, None
    try:
        data = read_yaml_file(path)
    except (OSError, YAMLInputError) as err:
        return {}, f"config.yaml unreadable ({str(err).removeprefix(f'{path}: ')})"
    if not isinstance(data, dict):
        return {}, "config.yaml holds no mapping"
    return data, None


def _line_ranges(numbers: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"`` (a binary file damages every line: keep it short)."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _problems(folder: Path, rows: list[dict[str, Any]], damaged: list[int], done: Any) -> list[str]:
    out = []
    if damaged:
        out.append(f"metrics.jsonl line(s) {_line_ranges(damaged)} damaged (skipped)")
    if (folder / "done.json").is_file() and not isinstance(done, dict):
        out.append("done.json is damaged: treated as unfinished")
    elif isinstance(done, dict) and len(rows) < _int(done.get("epochs")):
        out.append(f"metrics.jsonl holds {len(rows)} of {done['epochs']} epochs")
    return out


def _int(x: Any) -> int:
    return x if isinstance(x, int) else 0


def _float(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else math.nan


def _finite(x: Any) -> bool:
    return math.isfinite(_float(x))


def load_runs(root: str | os.PathLike) -> list[Run]:
    """Every ``<variant>/seed<k>`` folder under ``root`` that has metrics or ``done.json``."""
    runs = []
    for folder in sorted(Path(root).glob("*/seed*")):
        seed = folder.name[4:]
        if not (folder.is_dir() and seed.isdigit()):
            continue
        rows, damaged = _read_rows(folder)
        done, robust = _read_json(folder / "done.json"), _read_json(folder / "robustness.json")
        if not rows and not damaged and not (folder / "done.json").is_file():
            continue  # never got to its first epoch: nothing to report (compare lists it)
        config, config_problem = _read_config(folder / "config.yaml")
        done = done if isinstance(done, dict) else None
        problems = _problems(folder, rows, damaged, _read_json(folder / "done.json"))
        problems += [config_problem] if config_problem else []
        run = Run(folder.parent.name, int(seed), folder, rows, config, done, robust, problems)
        runs.append(run)
    return runs


def run_warnings(runs: Sequence[Run]) -> list[str]:
    """One line per unfinished run or damaged result file (what the report leaves out)."""
    out = []
    for r in runs:
        if not r.done:
            out.append(f"{r.variant} seed{r.seed}: unfinished ({len(r.rows)} epochs), left out")
        out += [f"{r.variant} seed{r.seed}: {p}" for p in r.problems]
    return out


def planned_runs(root: Path) -> list[tuple[str, int]]:
    """Every ``(variant, seed)`` the folder plans: each variant of ``compare.json`` and of
    the ``<variant>/seed<k>`` folders, with each seed of either (a paired comparison runs
    every variant on every seed), in that order."""
    manifest = _read_json(root / "compare.json")
    manifest = manifest if isinstance(manifest, dict) else {}
    variants = [v for v in _list(manifest.get("variants")) if isinstance(v, str) and v]
    seeds = [s for s in _list(manifest.get("seeds")) if type(s) is int and s >= 0]
    for folder in sorted(root.glob("*/seed*")):
        if folder.is_dir() and folder.name[4:].isdigit():
            variants.append(folder.parent.name)
            seeds.append(int(folder.name[4:]))
    return [(v, s) for v in dict.fromkeys(variants) for s in sorted(set(seeds))]


def _list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, list) else []


def missing_runs(root: Path, runs: Sequence[Run]) -> list[str]:
    """One line per planned run (:func:`planned_runs`) without a single recorded epoch: no
    run folder at all, or a folder that holds only what a run writes before its first
    epoch (``config.yaml``, ``run.json``, ...). Runs with epochs but no ``done.json`` are
    :func:`run_warnings`' "unfinished"."""
    have = {(r.variant, r.seed) for r in runs}
    out = []
    for variant, seed in planned_runs(root):
        if (variant, seed) in have:
            continue
        folder = root / variant / f"seed{seed}"
        if not folder.is_dir():
            out.append(f"{variant} seed{seed}: missing (no run folder)")
            continue
        held = sorted(p.name for p in folder.iterdir())
        holds = f"only {', '.join(held)}" if held else "nothing"
        out.append(
            f"{variant} seed{seed}: incomplete, no epoch recorded (the folder holds {holds})"
        )
    return out


def variant_order(root: Path, runs: Sequence[Run]) -> list[str]:
    """The variants in ``compare.json`` order (baseline first), then any others found."""
    manifest = _read_json(root / "compare.json") or {}
    found = {r.variant for r in runs}
    order = [v for v in manifest.get("variants", []) if v in found]
    order += sorted(found - set(order))
    return sorted(order, key=lambda v: v != BASELINE)  # stable: baseline first


# ---------------------------------------------------------------- statistics


def _finals(runs: Iterable[Run], variant: str) -> dict[int, float]:
    return {r.seed: r.final_acc1 for r in runs if r.variant == variant and r.done}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (len(idx) - rank) * pvalues[i]))
        out[i] = running
    return out


def summarize(runs: Sequence[Run], variants: Sequence[str], ref: str) -> list[dict[str, Any]]:
    """One row per variant: n, mean, std, and the paired comparison with ``ref``."""
    base = _finals(runs, ref)
    rows = []
    for v in variants:
        finals = _finals(runs, v)
        values = np.array(list(finals.values()), dtype=np.float64)
        std = float(values.std(ddof=1)) if values.size > 1 else math.nan
        row: dict[str, Any] = {"variant": v, "n": values.size, "mean": _mean(values), "std": std}
        if v != ref:
            row.update(_paired(compare_paired(base, finals)))
        rows.append(row)
    others = [r for r in rows if r["variant"] != ref]
    for row, p in zip(others, holm([r["p_ttest"] for r in others])):
        row["p_holm"] = p
    return rows


def generalization(r: Run) -> dict[str, float]:
    """One run's best epoch (1-based) and test acc@1 there, its final and best-epoch train
    acc@1 and the train-test gaps (points; NaN where a needed row is missing or damaged)."""
    best = r.best_row
    best_acc = _float((r.done or {}).get("best_test_acc1"))
    if math.isnan(best_acc) and best is not None:
        best_acc = float(best["test"]["acc1"])
    train_best = math.nan if best is None else _float(best.get("train", {}).get("acc1"))
    return {
        "best_acc1": best_acc,
        "best_epoch": math.nan if best is None else best["epoch"] + 1,
        "final_train_acc1": r.final_train_acc1,
        "gap_final": r.final_train_acc1 - r.final_acc1,
        "best_train_acc1": train_best,
        "gap_best": train_best - best_acc,
    }


GENERALIZATION_KEYS = ("final", "best_acc1", "best_epoch", "final_train_acc1", "gap_final")
GENERALIZATION_KEYS += ("gap_best",)


def generalization_summary(
    runs: Sequence[Run], variants: Sequence[str], ref: str
) -> list[dict[str, Any]]:
    """Per variant (finished runs): mean and std over seeds of the final and best-epoch test
    acc@1, the best epoch, the final train acc@1 and both gaps; and the paired comparison
    of the best-epoch test acc@1 with ``ref`` (``*_best`` keys, Holm over the variants)."""
    per = {
        (r.variant, r.seed): {"final": r.final_acc1, **generalization(r)} for r in runs if r.done
    }
    rows = []
    for v in variants:
        mine = [m for (vv, _), m in per.items() if vv == v]
        row: dict[str, Any] = {"variant": v, "n": len(mine)}
        for key in GENERALIZATION_KEYS:
            values = np.array([m[key] for m in mine if math.isfinite(m[key])], dtype=np.float64)
            row[f"{key}_mean"] = _mean(values)
            row[f"{key}_std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        if v != ref:
            best = {s: m["best_acc1"] for (vv, s), m in per.items() if vv == v}
            base = {s: m["best_acc1"] for (vv, s), m in per.items() if vv == ref}
            paired = _paired(compare_paired(base, best))
            row.update({f"{k}_best": value for k, value in paired.items()})
        rows.append(row)
    others = [r for r in rows if r["variant"] != ref]
    for row, p in zip(others, holm([r["p_ttest_best"] for r in others])):
        row["p_holm_best"] = p
    return rows


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _paired(c: PairedComparison) -> dict[str, Any]:
    keys = ("delta", "ci_low", "ci_high", "p_ttest", "p_wilcoxon")
    return {"n_paired": c.n, **{k: getattr(c, k) for k in keys}}


# ---------------------------------------------------------------- tables


def _num(x: Any, fmt: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, fmt)


def _p(x: Any) -> str:
    return _num(x, ".3g")


def _p_t(r: dict[str, Any], key: str = "p_ttest") -> str:
    """A t-test p; "undefined" when there were pairs but all differences were equal."""
    p = r.get(key)
    if r.get("n_paired", 0) >= 2 and isinstance(p, float) and math.isnan(p):
        return "undefined"
    return _p(p)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def _summary_md(rows: Sequence[dict[str, Any]], ref: str) -> str:
    header = ["variant", "n", "final acc@1 (%)", f"Δ vs {ref}", "95% CI", "p (t)", "p (Wilcoxon)"]
    header.append("p (t, Holm)")
    body = []
    for r in rows:
        cells = [r["variant"], r["n"], f"{_num(r['mean'])} ± {_num(r['std'])}"]
        if r["variant"] == ref:
            cells += ["–"] * 5
        else:
            ci = f"[{_num(r['ci_low'], '+.2f')}, {_num(r['ci_high'], '+.2f')}]"
            cells += [_num(r["delta"], "+.2f"), ci, _p_t(r), _p(r["p_wilcoxon"])]
            cells.append(_p_t(r, "p_holm"))
        body.append(cells)
    return _md_table(header, body)


def _verdict(rows: Sequence[dict[str, Any]], ref: str) -> str:
    """Plain sentences: which differences are significant at ALPHA (Holm-adjusted t-test)."""
    lines = []
    for r in rows:
        if r["variant"] == ref:
            continue
        if r.get("n_paired", 0) < 2:
            lines.append(f"- **{r['variant']}**: fewer than 2 paired seeds, no test.")
            continue
        if math.isnan(r["p_ttest"]):
            lines.append(
                f"- **{r['variant']}** vs {ref}: Δ {r['delta']:+.2f} points on every one of "
                f"the {r['n_paired']} paired seeds: zero variance, so the paired t p is "
                "undefined; no test."
            )
            continue
        sig = r["p_holm"] < ALPHA and not (r["ci_low"] <= 0 <= r["ci_high"])
        word = "**significant**" if sig else "not significant"
        lines.append(
            f"- **{r['variant']}** vs {ref}: Δ {r['delta']:+.2f} points "
            f"(95% CI [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}], n = {r['n_paired']}, "
            f"paired t p = {_p(r['p_ttest'])}, Holm p = {_p(r['p_holm'])}): {word} "
            f"at α = {ALPHA}."
        )
    return "\n".join(lines) + "\n"


def _per_seed(runs: Sequence[Run], variants: Sequence[str]) -> str:
    seeds = sorted({r.seed for r in runs if r.done})
    finals = {v: _finals(runs, v) for v in variants}
    body = [[s, *[_num(finals[v].get(s)) for v in variants]] for s in seeds]
    return _md_table(["seed", *variants], body)


def _pm(r: dict[str, Any], key: str, fmt: str = ".2f") -> str:
    mean, std = r[f"{key}_mean"], r[f"{key}_std"]
    return _num(mean, fmt) if math.isnan(std) else f"{_num(mean, fmt)} ± {_num(std, fmt)}"


def _generalization_md(rows: Sequence[dict[str, Any]], ref: str) -> str:
    header = ["variant", "n", "final test acc@1", "best-epoch test acc@1", "best epoch"]
    header += ["final train acc@1", "gap, final", "gap, best epoch"]
    header += [f"Δ best vs {ref}", "95% CI", "p (t, Holm)"]
    body = []
    for r in rows:
        cells = [r["variant"], r["n"], _pm(r, "final"), _pm(r, "best_acc1")]
        cells += [_pm(r, "best_epoch", ".1f"), _pm(r, "final_train_acc1"), _pm(r, "gap_final")]
        cells.append(_pm(r, "gap_best"))
        if r["variant"] == ref:
            cells += ["–"] * 3
        else:
            ci = f"[{_num(r['ci_low_best'], '+.2f')}, {_num(r['ci_high_best'], '+.2f')}]"
            holm_p = _p_t({"n_paired": r["n_paired_best"], "p": r["p_holm_best"]}, "p")
            cells += [_num(r["delta_best"], "+.2f"), ci, holm_p]
        body.append(cells)
    return _md_table(header, body)


def _mixup_note(runs: Sequence[Run]) -> str:
    mixed = sorted({r.variant for r in runs if r.config.get("mixup")})
    if not mixed:
        return ""
    return (
        f"**Mixup/CutMix** was on in {', '.join(f'`{v}`' for v in mixed)}: train acc@1 is "
        "scored against the unmixed labels of mixed images, so the train accuracy and the "
        "gaps of those runs mean little.\n\n"
    )


# ---------------------------------------------------------------- long-form rows


def curve_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per (run, epoch): train/test loss and accuracy, learning rate."""
    out = []
    for r in runs:
        for row in r.rows:
            tr, te = row.get("train", {}), row.get("test", {})
            out.append(
                {
                    "variant": r.variant,
                    "seed": r.seed,
                    "epoch": row["epoch"],
                    "lr": row.get("lr"),
                    "train_loss": tr.get("loss"),
                    "train_acc1": tr.get("acc1"),
                    "test_loss": te.get("loss"),
                    "test_acc1": te.get("acc1"),
                }
            )
    return out


def plasticity_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per (run, epoch, site): phase, synchrony, gate mean, |dW|, train loss, and the
    learned sigma / amplitude with their hypergradients (``None`` where nothing is learned)."""
    keys = ("synchrony", "gate_mean", "dw_abs_mean", "dw_abs_max", "pre_fired", "post_fired")
    keys += LEARNED_KEYS
    out = []
    for r in runs:
        for row in r.rows:
            plast = row.get("plasticity") or {}
            if plast.get("phase") == "off":
                continue
            for site, m in (plast.get("sites") or {}).items():
                base = {"variant": r.variant, "seed": r.seed, "epoch": row["epoch"], "site": site}
                base["phase"] = plast.get("phase")
                base["train_loss"] = row.get("train", {}).get("loss")
                out.append({**base, **{k: m.get(k) for k in keys}})
    return out


LEARNED_KEYS = ("sigma", "amplitude", "hypergrad_sigma", "hypergrad_amplitude")


def gate_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The gate fit of each run and site (from the last epoch's metrics)."""
    out = []
    for r in runs:
        plast = (r.rows[-1].get("plasticity") if r.rows else None) or {}
        if plast.get("phase") == "off":
            continue
        for site, m in (plast.get("sites") or {}).items():
            fit = {k: m.get(f"gate_{k}") for k in ("k", "mu", "sd", "valid", "reason")}
            out.append({"variant": r.variant, "seed": r.seed, "site": site, **fit})
    return out


def firing_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per (run, epoch, neuron layer): mean spikes per neuron per time step."""
    out = []
    for r in runs:
        for row in r.rows:
            for layer, rate in (row.get("firing_rate") or {}).items():
                out.append(
                    {"variant": r.variant, "seed": r.seed, "epoch": row["epoch"], "layer": layer}
                    | {"rate": rate}
                )
    return out


def robustness_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per (finished run, condition) of the ``robustness.json`` files."""
    out = []
    for r in runs:
        for c in (r.robustness or {}).get("conditions", []) if r.done else []:
            out.append(
                {"variant": r.variant, "seed": r.seed, "condition": c["name"], "acc1": c["acc1"]}
            )
    return out


# ---------------------------------------------------------------- grouped summaries


def _mean_std(values: Sequence[float]) -> str:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not v.size:
        return "–"
    if v.size == 1:
        return f"{v.mean():.4g}"
    std = v.std(ddof=1)
    std = 0.0 if std <= 1e-12 * abs(v.mean()) else std  # float noise of equal values
    return f"{v.mean():.4g} ± {std:.2g}"


def _gate_md(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    sites = list(dict.fromkeys(r["site"] for r in rows))
    body = []
    for v in variants:
        for s in sites:
            sel = [r for r in rows if r["variant"] == v and r["site"] == s]
            fitted = [r for r in sel if r["valid"]]
            if not sel:
                continue
            cells = [_mean_std([r[k] for r in fitted]) for k in ("k", "mu", "sd")]
            body.append([v, s, f"{len(fitted)}/{len(sel)}", *cells])
    header = ["variant", "site", "fitted", "k = -corr(S, L)", "mu (mean S)", "sd (S)"]
    return _md_table(header, body) if body else "No DA-SSDP sites in these runs.\n"


def _plasticity_md(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    body = []
    for v in variants:
        for s in dict.fromkeys(r["site"] for r in rows if r["variant"] == v):
            act = [r for r in rows if r["variant"] == v and r["site"] == s]
            act = [r for r in act if r["phase"] == "active"]
            if not act:
                continue
            cells = [_mean_std([r[k] for r in act]) for k in ("synchrony", "gate_mean")]
            cells.append(_mean_std([r["dw_abs_mean"] for r in act]))
            body.append([v, s, len(act), *cells])
    header = ["variant", "site", "active epochs × seeds", "synchrony S", "gate G", "|dW| mean"]
    return _md_table(header, body) if body else "No active DA-SSDP epochs in these runs.\n"


def _learns(rows: Sequence[dict[str, Any]]) -> bool:
    return any(r.get("sigma") is not None or r.get("amplitude") is not None for r in rows)


def _over_training_md(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    """Per variant, site and epoch (mean ± std over seeds): synchrony S and gate G, and the
    learned sigma and amplitude where a variant learns them. This is where a gate that feeds
    on itself shows: S rising after warm-up and G climbing above 1 with it."""
    learned = _learns(rows)
    body = []
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        for s in dict.fromkeys(r["site"] for r in mine):
            for e in sorted({r["epoch"] for r in mine if r["site"] == s}):
                at = [r for r in mine if r["site"] == s and r["epoch"] == e]
                phase = at[0]["phase"]
                gate = "–" if phase != "active" else _mean_std([r["gate_mean"] for r in at])
                cells = [v, s, e + 1, phase, _mean_std([r["synchrony"] for r in at]), gate]
                if learned:
                    for k in ("sigma", "amplitude"):
                        vals = [r[k] for r in at if r.get(k) is not None]
                        cells.append(_mean_std(vals) if vals and phase == "active" else "–")
                body.append(cells)
    header = ["variant", "site", "epoch", "phase", "synchrony S", "gate G"]
    if learned:
        header += ["learned σ", "learned a"]
    return _md_table(header, body) if body else ""


def _firing_md(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    if not rows:
        return "No firing rates recorded.\n"
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    last = {}
    for r in rows:  # the final epoch's rate of each run and layer
        last[(r["variant"], r["seed"], r["layer"])] = r["rate"]

    def cell(v: str, layer: str) -> str:
        return _mean_std([x for (vv, _, ly), x in last.items() if vv == v and ly == layer])

    body = [[v, *[cell(v, layer) for layer in layers]] for v in variants]
    return _md_table(["variant", *layers], body)


def robustness_summary(
    rows: Sequence[dict[str, Any]], variants: Sequence[str], ref: str
) -> list[dict[str, Any]]:
    """Per (condition, variant): n, mean ± std acc@1, paired Δ vs ``ref`` with CI and p."""
    out = []
    for cond in dict.fromkeys(r["condition"] for r in rows):
        per = {
            v: {r["seed"]: r["acc1"] for r in rows if r["condition"] == cond and r["variant"] == v}
            for v in variants
        }
        for v in variants:
            if not per[v]:
                continue
            values = np.array(list(per[v].values()))
            std = float(values.std(ddof=1)) if values.size > 1 else math.nan
            row = {"condition": cond, "variant": v, "n": values.size, "mean": values.mean()}
            row["std"] = std
            if v != ref and per.get(ref):
                row.update(_paired(compare_paired(per[ref], per[v])))
            out.append(row)
    return out


def _robustness_md(rows: Sequence[dict[str, Any]], ref: str) -> str:
    body = []
    for r in rows:
        delta = "–"
        if "delta" in r:
            delta = f"{r['delta']:+.2f} [{_num(r['ci_low'], '+.2f')}, {_num(r['ci_high'], '+.2f')}]"
        p = f"{_p(r.get('p_ttest'))} / {_p(r.get('p_wilcoxon'))}" if "delta" in r else "–"
        body.append([r["condition"], r["variant"], r["n"], f"{_num(r['mean'])} ± {_num(r['std'])}"])
        body[-1] += [delta, p]
    header = ["condition", "variant", "n", "acc@1 (%)", f"Δ vs {ref} [95% CI]", "p (t / Wilcoxon)"]
    return _md_table(header, body)


# ---------------------------------------------------------------- the report


def _context(root: Path, runs: Sequence[Run], missing: Sequence[str]) -> str:
    manifest = _read_json(root / "compare.json") or {}
    cfg = runs[0].config if runs else {}
    plast = cfg.get("plasticity") or {}
    revisions = sorted({r.revision for r in runs})
    lines = [
        f"- config: `{manifest.get('config', 'unknown')}`; model `{cfg.get('model')}` on "
        f"`{cfg.get('dataset')}`, {cfg.get('epochs')} epochs, T = {cfg.get('T')}, "
        f"DA-SSDP warm-up {plast.get('warmup_epochs')} epoch(s)",
        f"- code revision(s): {', '.join(f'`{r}`' for r in revisions)}",
    ]
    invocations = manifest.get("invocations") or []
    if invocations:
        lines.append(f"- command: `{' '.join(invocations[-1].get('argv', []))}`")
    unfinished = [f"{r.variant} seed{r.seed} ({len(r.rows)} epochs)" for r in runs if not r.done]
    if unfinished:
        lines.append(f"- unfinished, left out of the statistics: {', '.join(unfinished)}")
    if missing:
        lines.append(
            "- planned but missing or without a recorded epoch, not in the statistics: "
            + " | ".join(missing)
        )
    damaged = [f"{r.variant} seed{r.seed}: {'; '.join(r.problems)}" for r in runs if r.problems]
    if damaged:
        lines.append(
            "- damaged result files (finished runs keep their final values from done.json): "
            + " | ".join(damaged)
        )
    return "\n".join(lines) + "\n"


class ReportWriteError(OSError):
    """The report's files cannot be written into the folder (read-only, disk full, ...)."""


def write_report(root: str | os.PathLike) -> Path:
    """Write ``report.md``, the CSV tables and the plots into ``root``; returns the report.

    Raises ``FileNotFoundError`` when no run has a recorded epoch and
    :class:`ReportWriteError` (naming the folder and the reason) when a file cannot be
    written; each file is replaced whole or not at all, never left half-written.
    """
    root = Path(root)
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run folders with metrics under {root} (<variant>/seed<k>/)")
    missing = missing_runs(root, runs)
    for line in [*run_warnings(runs), *missing]:
        print(f"[report] warning: {line}", file=sys.stderr)
    try:
        return _write_files(root, runs, missing)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ReportWriteError(f"cannot write the report into {root}: {reason}") from err


def _write_files(root: Path, runs: Sequence[Run], missing: Sequence[str]) -> Path:
    from dassdp.experiments import plots

    variants = variant_order(root, runs)
    ref = BASELINE if BASELINE in variants else variants[0]
    done = [r for r in runs if r.done]  # curves and summaries: finished runs only
    tables = {
        "runs": [_run_row(r) for r in runs],
        "summary": summarize(runs, variants, ref),
        "generalization": generalization_summary(runs, variants, ref),
        "curves": curve_rows(done),
        "gate": gate_rows(done),
        "plasticity": plasticity_rows(done),
        "firing": firing_rows(done),
    }
    robust = robustness_rows(runs)
    if robust:
        tables["robustness"] = robust
        tables["robustness_summary"] = robustness_summary(robust, variants, ref)
    for name, rows in tables.items():
        if rows:
            _write_csv(root / f"{name}.csv", rows)
    figures = plots.write_all(root, runs, variants, ref, tables)
    text = _markdown(root, runs, missing, variants, ref, tables, figures)
    atomic_write_text(root / "report.md", text)
    return root / "report.md"


def _run_row(r: Run) -> dict[str, Any]:
    gen = generalization(r)
    return {
        "variant": r.variant,
        "seed": r.seed,
        "epochs": (r.done or {}).get("epochs", len(r.rows)),
        "finished": bool(r.done),
        "final_acc1": r.final_acc1,
        "best_acc1": gen.pop("best_acc1"),
        "final_test_loss": r.final_test.get("loss", math.nan),
        "revision": r.revision,
        "problems": "; ".join(r.problems),
        **gen,
    }


def _markdown(
    root: Path,
    runs: Sequence[Run],
    missing: Sequence[str],
    variants: Sequence[str],
    ref: str,
    tables: dict[str, list[dict[str, Any]]],
    figures: dict[str, str],
) -> str:
    def fig(name: str, caption: str) -> str:
        return f"![{caption}]({figures[name]})\n\n*{caption}*\n\n" if name in figures else ""

    parts = [
        f"# Paired comparison: {root.name}\n\n",
        _context(root, runs, missing),
        "\n## Final test accuracy\n\n",
        "Seeds are paired (same seed: same initial weights and data order). Δ is the mean "
        f"per-seed difference to `{ref}`, with a percentile bootstrap 95% CI; p from the "
        "two-sided paired t-test and the Wilcoxon signed-rank test; Holm adjusts the t p over "
        "the variants shown.\n\n",
        _summary_md(tables["summary"], ref),
        "\n",
        _verdict(tables["summary"], ref),
        "\n",
        fig("final_paired", "Final test accuracy per seed; lines join the same seed."),
        fig("delta_vs_baseline", f"Per-seed difference to {ref}, mean and bootstrap 95% CI."),
        fig(
            "accuracy_curves",
            "Test accuracy over epochs (mean ± std over seeds) and train accuracy (dashed).",
        ),
        "### Per seed (final test acc@1, %)\n\n",
        _per_seed(runs, variants),
        "\n## Best epoch and train-test gap\n\n",
        "acc@1 in %, mean ± std over seeds; gap = train acc@1 − test acc@1 (points), at the "
        "final epoch and at the best epoch. The best epoch is chosen on the test set (there "
        "is no validation split): its accuracy is the ceiling early stopping could reach, "
        "optimistic by construction. Train acc@1 is the running accuracy over each epoch's "
        "augmented training batches in train mode, not a clean pass over the training set. "
        f"Δ best: paired difference of the best-epoch test acc@1 to `{ref}` (bootstrap 95% "
        "CI, Holm-adjusted paired t p).\n\n",
        _mixup_note(runs),
        _generalization_md(tables["generalization"], ref),
        "\n## The dopamine gate\n\n",
        "Fitted once after warm-up from all warm-up records (S[b], L): "
        "k = -corr(S, L), G = clip(1 + k (S - mu) / sd, 0, 2). The metrics hold per-epoch "
        "means, so the scatter shows each warm-up epoch's mean synchrony against its mean "
        "training loss; k itself comes from the per-sample records.\n\n",
        _gate_md(tables["gate"], variants),
        "\n",
        fig("warmup_sync_loss", "Warm-up synchrony vs loss and the fitted gate G(S)."),
        "## Plasticity after warm-up\n\n",
        _plasticity_md(tables["plasticity"], variants),
        "\n",
        fig("plasticity", "Synchrony S, gate mean and |dW| per site over training."),
        "### Over training (per epoch, mean ± std over seeds)\n\n",
        _over_training_md(tables["plasticity"], variants),
        "\n",
        fig(
            "learned",
            "Learned kernel width σ and amplitude scale a per site over training "
            "(epoch means; 1 = the configured amplitude).",
        ),
        "## Firing rates (final epoch, spikes per neuron per step)\n\n",
        _firing_md(tables["firing"], variants),
        "\n",
        fig("firing_rates", "Firing rate per neuron layer over training."),
    ]
    if "robustness_summary" in tables:
        parts += [
            "## Robustness (input perturbations, final checkpoint)\n\n",
            _robustness_md(tables["robustness_summary"], ref),
            "\n",
            fig("robustness", "Test accuracy under input perturbations (mean ± std)."),
        ]
    parts.append(f"CSV tables: {', '.join(f'`{n}.csv`' for n, rows in tables.items() if rows)}.\n")
    return "".join(parts)
