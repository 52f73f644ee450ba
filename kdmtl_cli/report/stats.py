"""Evidence over seeds for `kdmtl report`: how sure a mean is, and whether two groups differ.

- `t_interval`: the mean's 95% Student-t interval (right for few seeds if the metric is roughly
  normal across seeds).
- `bootstrap_interval`: the mean's 95% bootstrap interval (scipy.stats.bootstrap, BCa, or
  percentile where BCa is undefined: all values equal, or fewer than 3).
- `compare`: a group against the reference group: Welch's t-test (unequal variances), the paired
  t-test when both groups ran the same seeds, and the number of seeds per group a two-sample
  t-test needs to detect the observed difference with 80% power at α = 0.05.
- `holm`: Holm's step-down adjustment of p-values for the number of comparisons.

scipy computes the tests and distributions; only Holm's adjustment and the power search, which
scipy does not offer, are written here (tests/test_report_stats.py checks them against the
formulas written out independently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 10_000      # beyond this the difference is, for a seed sweep, not detectable


def t_interval(values: Sequence[float], level: float = LEVEL) -> Optional[Tuple[float, float]]:
    """mean ± t_{(1+level)/2, n-1} · s / √n; None with fewer than 2 values."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sem = stats.sem(values)
    half = stats.t.ppf((1 + level) / 2, n - 1) * sem
    return float(mean - half), float(mean + half)


def bootstrap_interval(values: Sequence[float], level: float = LEVEL, resamples: int = 9999,
                       seed: int = 0) -> Optional[Tuple[float, float, str]]:
    """(low, high, method) of the mean by bootstrap over seeds; None with fewer than 2 values."""
    import numpy as np
    from scipy import stats

    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        return None
    if np.all(data == data[0]):
        return float(data[0]), float(data[0]), "all equal"
    method = "BCa" if data.size >= 3 else "percentile"
    result = stats.bootstrap((data,), np.mean, confidence_level=level, n_resamples=resamples,
                             method=method, random_state=np.random.default_rng(seed))
    low, high = result.confidence_interval
    if not (math.isfinite(low) and math.isfinite(high)):      # BCa degenerate: fall back
        result = stats.bootstrap((data,), np.mean, confidence_level=level, n_resamples=resamples,
                                 method="percentile", random_state=np.random.default_rng(seed))
        low, high = result.confidence_interval
        method = "percentile"
    return float(low), float(high), method


def power_two_sample(effect: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided two-sample t-test with n per group at standardised effect d:
    P(|T| > t_{1-α/2, 2n-2}) with T noncentral t, df 2n-2, noncentrality d·√(n/2)."""
    from scipy import stats

    df = 2 * n - 2
    critical = stats.t.ppf(1 - alpha / 2, df)
    noncentrality = effect * math.sqrt(n / 2)
    return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality))


def seeds_needed(a: Sequence[float], b: Sequence[float], power: float = POWER, alpha: float = ALPHA) -> Optional[int]:
    """The smallest number of seeds per group at which a two-sample t-test detects the observed
    difference of means (in units of the pooled standard deviation) with `power`; None when the
    groups have no spread (nothing to estimate) or fewer than 2 seeds each."""
    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var_a = sum((x - mean_a) ** 2 for x in a) / (len(a) - 1)
    var_b = sum((x - mean_b) ** 2 for x in b) / (len(b) - 1)
    pooled = math.sqrt(((len(a) - 1) * var_a + (len(b) - 1) * var_b) / (len(a) + len(b) - 2))
    if pooled == 0:
        return None
    effect = abs(mean_a - mean_b) / pooled
    if effect == 0 or power_two_sample(effect, MAX_SEEDS, alpha) < power:
        return MAX_SEEDS
    low, high = 1, 2            # power grows with n: double to a bound, then bisect
    while power_two_sample(effect, high, alpha) < power:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if power_two_sample(effect, middle, alpha) >= power else (middle, high)
    return high


def holm(p_values: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values, in the input's order: sorted ascending, the i-th
    (0-based) of m becomes max over j ≤ i of min(1, (m - j) · p_(j))."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


@dataclass
class Comparison:
    difference: float                 # mean(group) - mean(reference)
    welch_p: Optional[float]
    paired_p: Optional[float]         # when both ran the same seeds
    seeds_needed: Optional[int]
    adjusted_p: Optional[float] = None
    verdict: str = "no evidence"      # better / worse / no evidence, after adjustment and direction


def compare(group: Dict[int, float], reference: Dict[int, float]) -> Comparison:
    """`group` against `reference`, each {seed: value}."""
    from scipy import stats

    a, b = list(group.values()), list(reference.values())
    difference = sum(a) / len(a) - sum(b) / len(b)
    welch = None
    if len(a) >= 2 and len(b) >= 2 and (len(set(a)) > 1 or len(set(b)) > 1):
        welch = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    paired = None
    seeds = sorted(set(group) & set(reference))
    if len(seeds) >= 2 and seeds == sorted(group) == sorted(reference):
        deltas = [group[s] - reference[s] for s in seeds]
        # differences equal up to rounding (a constant shift per seed) have no spread to test:
        # scipy would turn the rounding into t ~ 1e16 and p ~ 1e-32
        scale = max(abs(v) for v in [*a, *b])
        if max(deltas) - min(deltas) > 1e-12 * scale:
            paired = float(stats.ttest_rel([group[s] for s in seeds], [reference[s] for s in seeds]).pvalue)
    return Comparison(difference, welch, paired, seeds_needed(a, b))


def judge(comparisons: List[Comparison], higher_is_better: bool, alpha: float = ALPHA) -> None:
    """Adjust the comparisons' p-values (the paired one where there is one, else Welch's) together
    by Holm, and mark each better / worse / no evidence."""
    tested = [(c, c.paired_p if c.paired_p is not None else c.welch_p) for c in comparisons]
    tested = [(c, p) for c, p in tested if p is not None and math.isfinite(p)]
    for (c, _), adjusted in zip(tested, holm([p for _, p in tested]), strict=True):
        c.adjusted_p = adjusted
        if adjusted < alpha:
            c.verdict = "better" if (c.difference > 0) == higher_is_better else "worse"


def check_reference(reference: Optional[str], groups: Sequence) -> Optional[str]:
    """The label of the group `reference=` names (None when not given): a group's label (as in
    report.csv), its column header in the terminal (`loss=none`, as typed on the command line), or
    `KEY:VALUE` for the one group whose runs all have that setting (`loss:none`, `loss:fitnet+kd`,
    `weighting:pcgrad`; report/runs.groups_with_setting). Checked before anything is printed or
    written: no such group, or several, is an error that lists the groups."""
    if reference is None:
        return None
    labels = [g.label for g in groups]
    if reference in labels:
        return reference
    headed = [g.label for g in groups if getattr(g, "short_label", "") == reference]
    if len(headed) == 1:
        return headed[0]
    from kdmtl_cli.errors import KdmtlError
    from kdmtl_cli.report.runs import groups_with_setting

    choose = f"choose a group label or KEY:VALUE (e.g. loss:none) of one of: {'; '.join(labels)}"
    key, sep, value = reference.partition(":")
    if not sep:
        raise KdmtlError(f"reference={reference} is not a group of this report; {choose}")
    found = groups_with_setting(groups, key, value)
    if len(found) != 1:
        which = "no group" if not found else f"{len(found)} groups ({'; '.join(g.label for g in found)})"
        raise KdmtlError(f"reference={reference} matches {which} of this report; {choose}")
    return found[0].label


def add_evidence(table: List[dict], reference: Optional[str] = None) -> Optional[str]:
    """The report's rows (report/table.rows, each with its `_values` {seed: value}) get their test
    mean's intervals and, per student metric, the comparison of each group with the reference
    group (`reference`: a group's label, as check_reference resolves it; default the first group),
    Holm-adjusted over the groups compared on that metric. Returns the reference group's label."""
    groups = list(dict.fromkeys(row["group"] for row in table))
    reference = reference or (groups[0] if groups else None)
    for row in table:
        values = list(row["_values"].values())
        boot, t = bootstrap_interval(values), t_interval(values)
        row.update({"CI95 low": boot[0] if boot else None, "CI95 high": boot[1] if boot else None,
                    "CI method": boot[2] if boot else None, "t CI95 low": t[0] if t else None,
                    "t CI95 high": t[1] if t else None})
    by_metric: Dict[str, Dict[str, dict]] = {}
    for row in table:
        by_metric.setdefault(row["metric"], {})[row["group"]] = row
    for metric, rows in by_metric.items():
        if metric.startswith("teacher/") or reference not in rows or len(rows) < 2:
            continue
        base = rows[reference]
        base["reference"] = reference
        compared = [(row, compare(row["_values"], base["_values"])) for g, row in rows.items() if g != reference]
        judge([c for _, c in compared], higher_is_better=metric.endswith("↑"))
        for row, c in compared:
            row.update({"reference": reference, "Δ vs reference": c.difference, "Welch p": c.welch_p,
                        "paired p": c.paired_p, "Holm p": c.adjusted_p, "evidence": c.verdict,
                        "seeds needed": c.seeds_needed})
    return reference
