"""kdmtl_cli/report/stats.py against formulas written out here in float64 and against published
power-table values (two-sample t-test, α = 0.05, power 0.8: d = 1 needs 17 per group, d = 0.5 64)."""

from __future__ import annotations

import math
import statistics

import pytest

from kdmtl_cli.report import stats

A = [0.50, 0.55, 0.52, 0.58, 0.51]
B = [0.40, 0.42, 0.45, 0.41, 0.47]


def test_t_interval_is_mean_plus_minus_t_times_sem():
    mean, sd, n = statistics.mean(A), statistics.stdev(A), len(A)
    t_975_4 = 2.7764451051977987          # Student t, 0.975 quantile, 4 degrees of freedom (tables)
    low, high = stats.t_interval(A)
    assert low == pytest.approx(mean - t_975_4 * sd / math.sqrt(n), abs=1e-12)
    assert high == pytest.approx(mean + t_975_4 * sd / math.sqrt(n), abs=1e-12)
    assert stats.t_interval([0.5]) is None


def test_bootstrap_interval_is_affine_equivariant_and_brackets_the_mean():
    low, high, method = stats.bootstrap_interval(A)
    assert method == "BCa" and min(A) <= low < statistics.mean(A) < high <= max(A)
    # The same resamples of 3·x + 1: every resample mean moves the same way, BCa's corrections are
    # scale-free, so the interval is the image of the first.
    low2, high2, _ = stats.bootstrap_interval([3 * x + 1 for x in A])
    assert (low2, high2) == pytest.approx((3 * low + 1, 3 * high + 1), abs=1e-12)
    assert stats.bootstrap_interval([0.5, 0.5, 0.5])[:2] == (0.5, 0.5)
    assert stats.bootstrap_interval([0.5]) is None
    assert stats.bootstrap_interval([0.4, 0.6])[2] == "percentile"


def test_welch_and_paired_p_values_from_their_formulas():
    from scipy.stats import t as student_t

    ma, mb, va, vb, n = statistics.mean(A), statistics.mean(B), statistics.variance(A), statistics.variance(B), 5
    t = (ma - mb) / math.sqrt(va / n + vb / n)
    df = (va / n + vb / n) ** 2 / ((va / n) ** 2 / (n - 1) + (vb / n) ** 2 / (n - 1))   # Welch–Satterthwaite
    welch = 2 * student_t.sf(abs(t), df)
    deltas = [a - b for a, b in zip(A, B)]
    t_paired = statistics.mean(deltas) / (statistics.stdev(deltas) / math.sqrt(n))
    paired = 2 * student_t.sf(abs(t_paired), n - 1)
    result = stats.compare(dict(enumerate(A)), dict(enumerate(B)))
    assert result.difference == pytest.approx(ma - mb, abs=1e-15)
    assert result.welch_p == pytest.approx(welch, rel=1e-9)
    assert result.paired_p == pytest.approx(paired, rel=1e-9)
    # other seeds: no pairing
    assert stats.compare({0: 0.5, 1: 0.6}, {2: 0.4, 3: 0.45}).paired_p is None


def test_holm_adjustment():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005, 3·0.01, 2·0.03, max(0.06, 1·0.04)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.6, 0.9]) == [1.0, 1.0]


def test_seeds_needed_matches_the_power_tables():
    assert stats.power_two_sample(1.0, 17) == pytest.approx(0.807, abs=1e-3)
    assert stats.seeds_needed([0, 1, 2], [1, 2, 3]) == 17            # d = 1 (pooled sd 1)
    assert stats.seeds_needed([0, 1, 2], [0.5, 1.5, 2.5]) == 64      # d = 0.5
    assert stats.seeds_needed([1, 1], [2, 2]) is None                # no spread: nothing to estimate
    assert stats.seeds_needed([0, 1, 2], [0, 1, 2]) == stats.MAX_SEEDS


def test_judge_marks_only_what_survives_the_adjustment():
    strong = stats.compare(dict(enumerate(A)), dict(enumerate(B)))
    noise = stats.compare({0: 0.5, 1: 0.52, 2: 0.49}, {0: 0.51, 1: 0.5, 2: 0.5})
    stats.judge([strong, noise], higher_is_better=True)
    assert strong.verdict == "better" and noise.verdict == "no evidence"
    assert strong.adjusted_p == pytest.approx(min(1.0, 2 * min(strong.paired_p, noise.paired_p))
                                              if strong.paired_p < noise.paired_p else strong.paired_p)
    lower = stats.compare(dict(enumerate(A)), dict(enumerate(B)))
    stats.judge([lower], higher_is_better=False)                     # an error metric: higher is worse
    assert lower.verdict == "worse"
