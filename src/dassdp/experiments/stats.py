"""Paired statistics for seed-matched comparisons (a variant against the baseline).

Runs with the same seed share initial weights and data order, so the unit of analysis is
the per-seed *difference* ``d_s = variant_s - baseline_s``. We report its mean, a percentile
bootstrap 95% CI of that mean (``scipy.stats.bootstrap``, fixed seed), the paired t-test
and, where defined, the Wilcoxon signed-rank test (``scipy.stats``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Summary:
    """Mean, population-free sample std (ddof=1) and count of one set of values."""

    n: int
    mean: float
    std: float

    @classmethod
    def of(cls, values: np.ndarray) -> Summary:
        v = np.asarray(values, dtype=np.float64)
        std = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        return cls(int(v.size), float(v.mean()) if v.size else float("nan"), std)


@dataclass(frozen=True)
class PairedComparison:
    """Variant vs. baseline over matched seeds."""

    n: int
    baseline: Summary
    variant: Summary
    delta: float
    ci_low: float
    ci_high: float
    p_ttest: float
    p_wilcoxon: float

    def to_dict(self) -> dict[str, float | int]:
        d = asdict(self)
        out: dict[str, float | int] = {
            "n": self.n,
            "delta": self.delta,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "p_ttest": self.p_ttest,
            "p_wilcoxon": self.p_wilcoxon,
        }
        for side in ("baseline", "variant"):
            out[f"{side}_mean"], out[f"{side}_std"] = d[side]["mean"], d[side]["std"]
        return out


def bootstrap_ci(
    diffs: np.ndarray, *, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``diffs`` (NaN for fewer than 2 values)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size < 2:
        return float("nan"), float("nan")
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    res = sps.bootstrap(
        (d,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_ttest(diffs: np.ndarray) -> float:
    """Two-sided p of the paired t-test on the differences; NaN when undefined (fewer than 2
    differences, or all differences equal: zero variance)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size < 2 or np.all(d == d[0]):
        # all differences equal: the sample variance is 0, so t is 0/0 or +-inf; a p of 0
        # would read as "significant" from e.g. two seeds that moved by the same amount
        return float("nan")
    return float(sps.ttest_1samp(d, 0.0).pvalue)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided p of the Wilcoxon signed-rank test (NaN when all differences are zero)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size < 1 or np.all(d == 0):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sps.wilcoxon(d).pvalue)


def compare_paired(
    baseline: dict[int, float], variant: dict[int, float], **boot: float
) -> PairedComparison:
    """Compare two ``{seed: value}`` maps on the seeds they share."""
    seeds = sorted(set(baseline) & set(variant))
    b = np.array([baseline[s] for s in seeds], dtype=np.float64)
    v = np.array([variant[s] for s in seeds], dtype=np.float64)
    d = v - b
    low, high = bootstrap_ci(d, **boot)
    return PairedComparison(
        n=len(seeds),
        baseline=Summary.of(b),
        variant=Summary.of(v),
        delta=float(d.mean()) if d.size else math.nan,
        ci_low=low,
        ci_high=high,
        p_ttest=paired_ttest(d),
        p_wilcoxon=wilcoxon_p(d),
    )
