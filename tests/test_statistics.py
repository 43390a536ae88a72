import math

import numpy as np
import pytest
from scipy import stats

from ensemble_delta.statistics import (
    AGREEMENT_COLUMNS,
    CORRELATION_COLUMNS,
    GAINS,
    SIGN_COLUMNS,
    STATS,
    agreement_counts,
    correlate,
    correlation_rows,
    fisher_ci,
    holm,
    r_critical,
    sign_agreement_rows,
)

pytestmark = pytest.mark.filterwarnings("error")  # NaN rows must come without scipy warnings

NUMERIC = ("r", "p", "r_ci_low", "r_ci_high", "slope", "intercept", "spearman_rho", "spearman_p")


def _scipy(x, y) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    pr, fit, sp = stats.pearsonr(x, y), stats.linregress(x, y), stats.spearmanr(x, y)
    z = stats.norm.ppf(0.975) / math.sqrt(n - 3)
    return {
        "n": n, "r": pr.statistic, "p": pr.pvalue, "slope": fit.slope, "intercept": fit.intercept,
        "spearman_rho": sp.statistic, "spearman_p": sp.pvalue,
        "r_ci_low": math.tanh(math.atanh(pr.statistic) - z), "r_ci_high": math.tanh(math.atanh(pr.statistic) + z),
    }  # fmt: skip


def _same(got: dict, want: dict):
    for k, v in want.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("seed", range(5))
def test_correlate_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.lognormal(-8, 1, 10)  # delta statistics are tiny numbers
    y = 0.3 * (x - x.mean()) / x.std() + rng.normal(0, 0.5, 10)
    got = correlate(x, y)
    _same(got, _scipy(x, y))
    assert got["r_crit"] == pytest.approx(r_critical(10)) and got["note"] == ""
    assert got["r_ci_low"] < got["r"] < got["r_ci_high"]


def test_correlate_drops_missing_pairs():
    x = [1.0, 2.0, None, 4.0, 5.0, float("nan"), 7.0]
    y = [2.0, 1.0, 3.0, None, 6.0, 1.0, 8.0]
    got = correlate(x, y)
    assert got["n"] == 4
    _same(got, _scipy([1.0, 2.0, 5.0, 7.0], [2.0, 1.0, 6.0, 8.0]))


def test_r_critical():
    assert r_critical(10) == pytest.approx(0.632, abs=5e-4)
    for n in (5, 10, 30):
        r = r_critical(n)
        # A sample whose Pearson r is exactly r_crit has p = alpha, by scipy's own test.
        e = np.random.default_rng(n).normal(size=n)
        x = np.random.default_rng(n + 1).normal(size=n)
        x, e = x - x.mean(), e - e.mean()
        e -= x * (e @ x) / (x @ x)  # orthogonal to x, so r is set exactly below
        y = r * x / np.linalg.norm(x) + math.sqrt(1 - r * r) * e / np.linalg.norm(e)
        res = stats.pearsonr(x, y)
        assert res.statistic == pytest.approx(r, abs=1e-12)
        assert res.pvalue == pytest.approx(0.05, abs=1e-9)
    assert math.isnan(r_critical(2)) and math.isnan(r_critical(0))


def test_fisher_ci():
    r, n = 0.5, 10
    z = 1.959963984540054 / math.sqrt(7)
    assert fisher_ci(r, n) == pytest.approx((math.tanh(math.atanh(r) - z), math.tanh(math.atanh(r) + z)))
    z90 = stats.norm.ppf(0.95) / math.sqrt(7)
    assert fisher_ci(-0.2, 10, 0.9) == pytest.approx((math.tanh(math.atanh(-0.2) - z90), math.tanh(math.atanh(-0.2) + z90)))
    assert fisher_ci(1.0, 10) == (1.0, 1.0) and fisher_ci(-1.0, 10) == (-1.0, -1.0)
    assert all(math.isnan(v) for v in fisher_ci(0.5, 3) + fisher_ci(float("nan"), 10))


def test_holm_by_hand():
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06.
    got = holm([0.01, float("nan"), 0.04, 0.03, 0.005])
    assert got[0] == pytest.approx(0.03) and math.isnan(got[1])
    assert got[2:] == pytest.approx([0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.3, 0.9, 0.2]) == pytest.approx([0.6, 0.9, 0.6])
    assert holm([]) == [] and math.isnan(holm([None])[0])


@pytest.mark.parametrize(
    "x, y, note",
    [([1e-4] * 6, [0.1, 0.2, 0.0, 0.5, 0.3, 0.1], "delta statistic is identical for every specialist"),
     ([0.0] * 10, list(range(10)), "delta statistic is identical for every specialist"),
     ([1, 2, 3, 4], [0.02] * 4, "gain is identical for every specialist"),
     ([1, 2], [3, 1], "fewer than 3 points"),
     ([1, 2, None, 4], [3, 1, 2, float("nan")], "fewer than 3 points")],
)  # fmt: skip
def test_correlate_degenerate_is_nan_with_note(x, y, note):
    got = correlate(x, y)
    assert got["note"] == note
    assert all(math.isnan(got[k]) for k in NUMERIC)
    assert got["n"] == sum(a is not None and b is not None and not math.isnan(a) and not math.isnan(b) for a, b in zip(x, y))
    assert math.isnan(got["r_crit"]) if got["n"] < 3 else got["r_crit"] == pytest.approx(r_critical(got["n"]))


def _tables():
    """Five specialists plus noise rows; q95_abs is the same for all (as with a frozen backbone)."""
    rng = np.random.default_rng(7)
    deltas = [{"model": f"class_{c}", "class": c, "freeze": "full", "augment": "flip", "n_params": 100,
               "mean_abs": float(rng.lognormal(-7, 0.5)), "var": float(rng.lognormal(-14, 0.5)), "q95_abs": 2e-3}
              for c in range(5)]  # fmt: skip
    deltas += [{"model": "student", "class": None, "mean_abs": 9.0, "var": 9.0, "q95_abs": 9.0},
               {"model": "class_5", "class": 5, "mean_abs": 9.0, "var": 9.0, "q95_abs": 9.0}]  # fmt: skip
    metrics = [{"method": "specialist", "rule": None, "class": c, "d_precision": None, "d_f1": None, "d_auc": None}
               for c in range(5)]  # fmt: skip
    for method, rule in (("ensemble", "prob_norm"), ("ties", "prob_norm"), ("ensemble", "mean_prob")):
        for c in (3, 1, 0, 4, 2):  # any row order: the join is on class
            metrics.append({"method": method, "rule": rule, "class": c,
                            **{f"d_{m}": float(rng.normal(0, 0.05)) for m in GAINS}})  # fmt: skip
    return deltas, metrics


def test_correlation_rows_recomputable_with_scipy():
    deltas, metrics = _tables()
    rows = correlation_rows(deltas, metrics, "mnist-subset")
    assert len(rows) == 3 * 9 and all(list(r) == CORRELATION_COLUMNS for r in rows)
    groups = [(r["method"], r["rule"]) for r in rows[::9]]
    assert groups == [("ensemble", "prob_norm"), ("ties", "prob_norm"), ("ensemble", "mean_prob")]
    assert [(r["metric"], r["stat"]) for r in rows[:9]] == [(m, s) for m in GAINS for s in STATS]
    delta_of = {d["class"]: d for d in deltas[:5]}
    for g in range(3):
        block = rows[9 * g : 9 * g + 9]
        method, rule = groups[g]
        gain_of = {m["class"]: m for m in metrics if (m["method"], m["rule"]) == (method, rule)}
        for r in block:
            assert r["dataset"] == "mnist-subset" and r["n"] == 5
            x = [delta_of[c][r["stat"]] for c in range(5)]
            y = [gain_of[c][f"d_{r['metric']}"] for c in range(5)]
            if r["stat"] == "q95_abs":
                assert r["note"] == "delta statistic is identical for every specialist"
                assert math.isnan(r["r"]) and math.isnan(r["p_holm"])
            else:
                _same(r, _scipy(x, y))
                assert r["r_crit"] == pytest.approx(r_critical(5)) and r["note"] == ""
        # Holm over the six defined tests of this (method, rule).
        ps = [r["p"] for r in block if not math.isnan(r["p"])]
        m = len(ps)
        order = np.argsort(ps)
        want = np.minimum(np.maximum.accumulate([(m - i) * ps[j] for i, j in enumerate(order)]), 1)
        got = [r["p_holm"] for r in block if not math.isnan(r["p"])]
        assert [got[j] for j in order] == pytest.approx(want)


def _corr(method, rule, metric, stat, slope, intercept):
    return {"dataset": "d", "method": method, "rule": rule, "metric": metric, "stat": stat,
            "slope": slope, "intercept": intercept}  # fmt: skip


def test_sign_agreement_by_hand():
    nan = float("nan")
    a = [_corr("ensemble", "prob_norm", "auc", "var", 2.0, -0.1),
         _corr("ensemble", "prob_norm", "f1", "var", -3.0, 0.0),
         _corr("ensemble", "prob_norm", "f1", "mean_abs", nan, nan),
         _corr("ties", "", "f1", "var", 1.0, 1.0),
         _corr("ties", "", "auc", "var", 1.0, 1.0)]  # fmt: skip
    b = [_corr("ensemble", "prob_norm", "f1", "var", -0.5, 0.0),
         _corr("ensemble", "prob_norm", "auc", "var", 1.0, 0.2),
         _corr("ensemble", "prob_norm", "f1", "mean_abs", 1.0, None),
         _corr("ties", None, "f1", "var", -1.0, 2.0)]  # fmt: skip  (None rule: an empty CSV cell)
    rows = sign_agreement_rows(a, b, "mnist", "imagenette")
    assert all(list(r) == SIGN_COLUMNS for r in rows)
    got = [(r["method"], r["metric"], r["stat"], r["slope_sign_a"], r["slope_sign_b"], r["slope_agree"],
            r["intercept_sign_a"], r["intercept_sign_b"], r["intercept_agree"]) for r in rows]  # fmt: skip
    assert got == [
        ("ensemble", "auc", "var", "+", "+", True, "-", "+", False),
        ("ensemble", "f1", "var", "-", "-", True, "0", "0", True),
        ("ensemble", "f1", "mean_abs", "", "+", False, "", "", False),
        ("ties", "f1", "var", "+", "-", False, "+", "+", True),
    ]
    assert {(r["dataset_a"], r["dataset_b"]) for r in rows} == {("mnist", "imagenette")}
    counts = agreement_counts(rows)
    assert all(list(c) == AGREEMENT_COLUMNS for c in counts)
    assert counts == [
        {"method": "ensemble", "rule": "prob_norm", "n_pairs": 3, "slope_agree": 2, "intercept_agree": 1},
        {"method": "ties", "rule": "", "n_pairs": 1, "slope_agree": 0, "intercept_agree": 1},
    ]
