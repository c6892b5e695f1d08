"""The report's PNG figures (matplotlib ``Figure`` objects, Agg canvas, no pyplot state).

Every function takes the long-form tables built by :mod:`dassdp.experiments.report`
(lists of dict rows) and writes one file; :func:`write_all` returns ``{name: file name}``
for the figures it wrote (a figure whose data is absent is skipped).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dassdp._util.io import atomic_write_bytes

__all__ = ["write_all"]

Rows = Sequence[dict[str, Any]]


def _colors(variants: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def _by_epoch(rows: Rows, key: str, **where: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs and the mean and std over seeds of ``key`` for the rows matching ``where``."""
    sel = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    epochs = sorted({r["epoch"] for r in sel})
    vals = [[_f(r[key]) for r in sel if r["epoch"] == e] for e in epochs]
    vals = [[x for x in v if math.isfinite(x)] for v in vals]  # absent (None): not a value
    mean = np.array([np.mean(v) if v else math.nan for v in vals])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals])
    return np.array(epochs) + 1, mean, std


def _f(x: Any) -> float:
    return math.nan if x is None else float(x)


def _save(fig: Figure, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())  # whole or not at all


def accuracy_curves(path: Path, curves: Rows, variants: Sequence[str]) -> None:
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for v, color in _colors(variants).items():
        x, mean, std = _by_epoch(curves, "test_acc1", variant=v)
        ax.plot(x, mean, color=color, label=v, marker="o", ms=3)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
        x, mean, _ = _by_epoch(curves, "train_acc1", variant=v)
        ax.plot(x, mean, color=color, ls="--", lw=1)  # train (running, augmented)
    ax.set(
        xlabel="epoch",
        ylabel="acc@1 (%)",
        title="Test accuracy (solid, mean ± std) and train accuracy (dashed)",
    )
    ax.legend(fontsize=8)
    _save(fig, path)


def final_paired(path: Path, runs_rows: Rows, variants: Sequence[str]) -> None:
    fig = Figure(figsize=(1.6 + 1.1 * len(variants), 4.0), layout="constrained")
    ax = fig.subplots()
    seeds = sorted({r["seed"] for r in runs_rows})
    value = {(r["variant"], r["seed"]): r["final_acc1"] for r in runs_rows if r["finished"]}
    for s in seeds:
        ys = [value.get((v, s), math.nan) for v in variants]
        ax.plot(range(len(variants)), ys, color="0.6", lw=0.8, marker="o", ms=4)
    for i, v in enumerate(variants):
        ys = [value[(v, s)] for s in seeds if (v, s) in value]
        ax.hlines(np.mean(ys) if ys else math.nan, i - 0.2, i + 0.2, color="k", lw=2)
    ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
    ax.set(ylabel="final test acc@1 (%)", title="Final accuracy per seed (lines: same seed)")
    _save(fig, path)


def delta_vs_baseline(
    path: Path, runs_rows: Rows, summary: Rows, variants: Sequence[str], ref: str
) -> None:
    others = [v for v in variants if v != ref]
    fig = Figure(figsize=(1.6 + 1.1 * max(len(others), 1), 4.0), layout="constrained")
    ax = fig.subplots()
    value = {(r["variant"], r["seed"]): r["final_acc1"] for r in runs_rows if r["finished"]}
    stats = {r["variant"]: r for r in summary}
    for i, v in enumerate(others):
        d = [value[(v, s)] - value[(ref, s)] for (vv, s) in value if vv == v and (ref, s) in value]
        ax.scatter([i] * len(d), d, color="0.5", s=14, zorder=2)
        st = stats[v]
        err = [[st["delta"] - st["ci_low"]], [st["ci_high"] - st["delta"]]]
        ax.errorbar([i + 0.15], [st["delta"]], yerr=err, fmt="D", color="C3", capsize=4)
        ax.annotate(f"p={st['p_ttest']:.2g}", (i + 0.2, st["delta"]), fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(others)), others, rotation=20, ha="right")
    ax.set(ylabel=f"Δ final acc@1 vs {ref} (points)", title="Paired difference, 95% CI")
    _save(fig, path)


def warmup_sync_loss(path: Path, plasticity: Rows, gate: Rows, variants: Sequence[str]) -> None:
    sites = list(dict.fromkeys(r["site"] for r in gate))
    fig = Figure(figsize=(4.2 * len(sites), 7.0), layout="constrained")
    axes = fig.subplots(2, len(sites), squeeze=False)
    colors = _colors(variants)
    for j, site in enumerate(sites):
        top, bottom = axes[0, j], axes[1, j]
        warm = [r for r in plasticity if r["site"] == site and r["phase"] == "warmup"]
        for v in variants:
            pts = [(r["synchrony"], r["train_loss"]) for r in warm if r["variant"] == v]
            if pts:
                top.scatter(*zip(*pts), color=colors[v], s=14, label=v)
        fits = [r for r in gate if r["site"] == site and r["valid"]]
        ks = [r["k"] for r in fits]
        sd = np.std(ks, ddof=1) if len(ks) > 1 else 0.0
        label = f"k = {np.mean(ks):+.3f} ± {sd:.3f} (n={len(ks)})" if ks else "no fit"
        top.set(title=f"{site}: warm-up epochs\nfitted {label}", xlabel="mean synchrony S")
        top.set_ylabel("mean train loss")
        _gate_curves(bottom, fits, colors)
        bottom.set(xlabel="synchrony S", ylabel="gate G(S)", title=f"{site}: fitted gates")
        if j == 0 and warm:
            top.legend(fontsize=7)
    _save(fig, path)


def _gate_curves(ax: Any, fits: Rows, colors: dict[str, Any]) -> None:
    """G(S) = clip(1 + k (S - mu) / sd, 0, 2) of each fitted run over mu ± 3 sd."""
    for r in fits:
        s = np.linspace(max(r["mu"] - 3 * r["sd"], 0.0), r["mu"] + 3 * r["sd"], 50)
        g = np.clip(1 + r["k"] * (s - r["mu"]) / r["sd"], 0, 2)
        ax.plot(s, g, color=colors.get(r["variant"], "0.5"), lw=0.8, alpha=0.8)
    ax.axhline(1, color="k", lw=0.5, ls=":")


def plasticity_over_time(path: Path, plasticity: Rows, variants: Sequence[str]) -> None:
    sites = list(dict.fromkeys(r["site"] for r in plasticity))
    fig = Figure(figsize=(4.2 * len(sites), 9.0), layout="constrained")
    axes = fig.subplots(3, len(sites), squeeze=False)
    for j, site in enumerate(sites):
        for v, color in _colors(variants).items():
            for i, key in enumerate(("synchrony", "gate_mean", "dw_abs_mean")):
                x, mean, _ = _by_epoch(plasticity, key, variant=v, site=site)
                if i == 2:
                    mean = np.where(mean > 0, mean, math.nan)  # warm-up: no update
                if np.isfinite(mean).any():
                    axes[i, j].plot(x, mean, color=color, marker="o", ms=3, label=v)
        axes[0, j].set(title=f"{site}", ylabel="synchrony S (epoch mean)")
        axes[1, j].set(ylabel="gate G (epoch mean)")
        axes[2, j].set(xlabel="epoch", ylabel="|dW| (epoch mean)", yscale="log")
        axes[0, j].legend(fontsize=7)
    _save(fig, path)


def learned_over_time(path: Path, plasticity: Rows, variants: Sequence[str]) -> None:
    """Learned sigma and amplitude scale per site over training (variants that learn them)."""
    sites = list(dict.fromkeys(r["site"] for r in plasticity))
    fig = Figure(figsize=(4.2 * len(sites), 6.0), layout="constrained")
    axes = fig.subplots(2, len(sites), squeeze=False)
    for j, site in enumerate(sites):
        for v, color in _colors(variants).items():
            for i, key in enumerate(("sigma", "amplitude")):
                x, mean, std = _by_epoch(plasticity, key, variant=v, site=site)
                if np.isfinite(mean).any():
                    axes[i, j].plot(x, mean, color=color, marker="o", ms=3, label=v)
                    axes[i, j].fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
        axes[0, j].set(title=f"{site}", ylabel="learned σ (epoch mean)", yscale="log")
        axes[1, j].set(xlabel="epoch", ylabel="learned amplitude a (epoch mean)", yscale="log")
        axes[0, j].legend(fontsize=7)
    _save(fig, path)


def firing_rates(path: Path, firing: Rows, variants: Sequence[str]) -> None:
    layers = list(dict.fromkeys(r["layer"] for r in firing))
    fig = Figure(figsize=(3.6 * len(layers), 3.4), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers):
        for v, color in _colors(variants).items():
            x, mean, std = _by_epoch(firing, "rate", variant=v, layer=layer)
            ax.plot(x, mean, color=color, marker="o", ms=3, label=v)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
        ax.set(title=layer, xlabel="epoch", ylabel="spikes / neuron / step")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def robustness(path: Path, summary: Rows, variants: Sequence[str]) -> None:
    conds = list(dict.fromkeys(r["condition"] for r in summary))
    fig = Figure(figsize=(1.5 + 1.3 * len(conds), 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(variants), 1)
    for i, (v, color) in enumerate(_colors(variants).items()):
        rows = {r["condition"]: r for r in summary if r["variant"] == v}
        x = [k + i * width for k, c in enumerate(conds) if c in rows]
        y = [rows[c]["mean"] for c in conds if c in rows]
        e = [np.nan_to_num(rows[c]["std"]) for c in conds if c in rows]
        ax.bar(x, y, width, yerr=e, color=color, label=v, capsize=2)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(conds))], conds)
    ax.set(ylabel="test acc@1 (%)", title="Accuracy under input perturbations")
    ax.legend(fontsize=7)
    _save(fig, path)


def write_all(
    root: Path, runs: Sequence[Any], variants: Sequence[str], ref: str, tables: dict[str, Rows]
) -> dict[str, str]:
    """Every figure that has data; returns ``{figure name: file name}``."""
    jobs: dict[str, tuple[bool, Callable[[Path], None]]] = {
        "accuracy_curves": (
            bool(tables["curves"]),
            lambda p: accuracy_curves(p, tables["curves"], variants),
        ),
        "final_paired": (True, lambda p: final_paired(p, tables["runs"], variants)),
        "delta_vs_baseline": (
            len(variants) > 1,
            lambda p: delta_vs_baseline(p, tables["runs"], tables["summary"], variants, ref),
        ),
        "warmup_sync_loss": (
            bool(tables["gate"]),
            lambda p: warmup_sync_loss(p, tables["plasticity"], tables["gate"], variants),
        ),
        "plasticity": (
            bool(tables["plasticity"]),
            lambda p: plasticity_over_time(p, tables["plasticity"], variants),
        ),
        "learned": (
            any(
                r.get("sigma") is not None or r.get("amplitude") is not None
                for r in tables["plasticity"]
            ),
            lambda p: learned_over_time(p, tables["plasticity"], variants),
        ),
        "firing_rates": (
            bool(tables["firing"]),
            lambda p: firing_rates(p, tables["firing"], variants),
        ),
        "robustness": (
            "robustness_summary" in tables,
            lambda p: robustness(p, tables.get("robustness_summary", []), variants),
        ),
    }
    written = {}
    for name, (has_data, draw) in jobs.items():
        if has_data:
            draw(root / f"{name}.png")
            written[name] = f"{name}.png"
    return written
