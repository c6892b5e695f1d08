"""Paired statistics on hand-made rows with known mean, CI and p."""

import math

import numpy as np
import pytest

from dassdp.experiments.stats import bootstrap_ci, compare_paired, paired_ttest, wilcoxon_p


def test_known_paired_t_test_and_means():
    base = {0: 90.0, 1: 91.0, 2: 89.5, 3: 90.5, 4: 92.0}
    var = {s: v + d for (s, v), d in zip(base.items(), [1, 2, 3, 4, 5])}
    var[9] = 50.0  # an unpaired seed is ignored
    c = compare_paired(base, var)
    assert c.n == 5 and c.delta == pytest.approx(3.0)
    assert c.baseline.mean == pytest.approx(90.6) and c.variant.mean == pytest.approx(93.6)
    assert c.baseline.std == pytest.approx(np.std([90, 91, 89.5, 90.5, 92], ddof=1))
    # d = 1..5: mean 3, sd sqrt(2.5), t = 3 / (sqrt(2.5)/sqrt(5)) = 4.2426, df 4 -> p = 0.013236
    assert c.p_ttest == pytest.approx(0.013236, abs=1e-5)
    # exact Wilcoxon: all 5 differences positive -> p = 2 / 2^5 = 0.0625
    assert c.p_wilcoxon == pytest.approx(0.0625)
    assert 1.0 <= c.ci_low < 3.0 < c.ci_high <= 5.0


def test_bootstrap_ci_matches_the_resampling_distribution():
    d = np.array([0.1, -0.3, 0.5, 0.2, 0.0, 0.4, -0.1, 0.3])
    low, high = bootstrap_ci(d, n_resamples=20_000, seed=1)
    rng = np.random.default_rng(7)
    means = d[rng.integers(0, d.size, (20_000, d.size))].mean(1)
    assert low == pytest.approx(np.quantile(means, 0.025), abs=0.02)
    assert high == pytest.approx(np.quantile(means, 0.975), abs=0.02)
    assert bootstrap_ci(d, seed=3) == bootstrap_ci(d, seed=3)  # reproducible


def test_degenerate_inputs():
    assert bootstrap_ci(np.array([0.2, 0.2, 0.2])) == (0.2, 0.2)
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([1.0])))
    assert math.isnan(paired_ttest(np.zeros(4)))
    assert math.isnan(paired_ttest(np.array([1.0])))
    assert math.isnan(wilcoxon_p(np.zeros(3)))
    c = compare_paired({0: 1.0}, {1: 2.0})
    assert c.n == 0 and math.isnan(c.delta)


def test_paired_t_p_is_undefined_when_all_differences_are_equal():
    """Regression: two seeds that both moved by +1.0 gave p = 0 ("significant")."""
    assert math.isnan(paired_ttest(np.full(4, 0.5)))
    c = compare_paired({0: 80.0, 1: 82.0}, {0: 81.0, 1: 83.0})
    assert c.n == 2 and c.delta == pytest.approx(1.0) and math.isnan(c.p_ttest)
