"""Do the delta statistics predict the gains? Pearson, linear fit, Spearman, Holm, sign agreement.

With one point per specialist (ten per method and dataset) the tests are weak: only
|r| above r_critical(10) = 0.632 reaches p < 0.05, and the report says so. A statistic
that is the same for every specialist (e.g. every backbone frozen, all deltas 0) has
no correlation: its row holds NaN and a note, and nothing raises.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

STATS = ("mean_abs", "var", "q95_abs")
GAINS = ("precision", "f1", "auc")  # the gain column of metric m is "d_" + m
CORRELATION_COLUMNS = [
    "dataset", "method", "rule", "metric", "stat", "n", "r", "p", "p_holm", "r_ci_low", "r_ci_high",
    "slope", "intercept", "spearman_rho", "spearman_p", "r_crit", "note",
]  # fmt: skip
SIGN_COLUMNS = [
    "method", "rule", "metric", "stat", "dataset_a", "dataset_b",
    "slope_sign_a", "slope_sign_b", "slope_agree", "intercept_sign_a", "intercept_sign_b", "intercept_agree",
]  # fmt: skip
AGREEMENT_COLUMNS = ["method", "rule", "n_pairs", "slope_agree", "intercept_agree"]
_NUMERIC = ("r", "p", "r_ci_low", "r_ci_high", "slope", "intercept", "spearman_rho", "spearman_p")


def _float(v) -> float:
    """A table cell as float: None (an empty CSV cell) becomes NaN."""
    return math.nan if v is None else float(v)


def r_critical(n: int, alpha: float = 0.05) -> float:
    """Smallest |r| whose two-sided Pearson p-value reaches alpha with n points; NaN for n < 3.

    Inverts t = r sqrt(n - 2) / sqrt(1 - r^2), which has n - 2 degrees of freedom.
    """
    if n < 3:
        return math.nan
    t = stats.t.ppf(1 - alpha / 2, n - 2)
    return float(t / math.sqrt(n - 2 + t * t))


def fisher_ci(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a Pearson r by Fisher's z: tanh(atanh(r) +- z / sqrt(n - 3)).

    NaN for n <= 3 (no standard error) or r NaN; |r| = 1 gives the degenerate (r, r).
    """
    r = _float(r)
    if n <= 3 or math.isnan(r):
        return math.nan, math.nan
    r = min(max(r, -1.0), 1.0)  # pearsonr can return 1 + 1e-16
    if abs(r) == 1.0:
        return r, r  # atanh(+-1) is infinite: the interval collapses onto r
    half = stats.norm.ppf(0.5 + level / 2) / math.sqrt(n - 3)
    z = math.atanh(r)
    return math.tanh(z - half), math.tanh(z + half)


def holm(pvals: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (monotone, capped at 1); NaN stays NaN and is not counted."""
    p = np.array([_float(v) for v in pvals], dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m:
        order = ok[np.argsort(p[ok], kind="stable")]
        # The i-th smallest of m p-values is multiplied by (m - i); the running max
        # keeps the adjusted values in the order of the raw ones.
        adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
        out[order] = np.minimum(adj, 1.0)
    return out.tolist()


def correlate(x, y) -> dict:
    """Pearson r and p, least-squares line, Spearman rho and p, Fisher CI of r, r_crit; never raises.

    Pairs where either value is NaN or None are dropped first. With fewer than three
    points or a constant side there is no correlation: numeric fields are NaN and
    `note` says why.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)  # None -> NaN
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    row = {"n": n, **{k: math.nan for k in _NUMERIC}, "r_crit": r_critical(n), "note": ""}
    if n < 3:
        row["note"] = "fewer than 3 points"
    elif x.min() == x.max():
        row["note"] = "delta statistic is identical for every specialist"
    elif y.min() == y.max():
        row["note"] = "gain is identical for every specialist"
    if row["note"]:
        return row
    # Nearly constant inputs (e.g. var ~1e-12 apart) still have a defined r; scipy
    # warns about precision there, which a table cell cannot show, so silence it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = stats.pearsonr(x, y)
        fit = stats.linregress(x, y)
        sp = stats.spearmanr(x, y)
    r = float(pr.statistic)
    low, high = fisher_ci(r, n)
    row.update(
        r=r, p=float(pr.pvalue), r_ci_low=low, r_ci_high=high, slope=float(fit.slope),
        intercept=float(fit.intercept), spearman_rho=float(sp.statistic), spearman_p=float(sp.pvalue),
    )  # fmt: skip
    return row


def _class_key(v):
    """Join key for a class cell: 3, 3.0 and "3" are the same class."""
    try:
        return int(v)
    except (TypeError, ValueError):
        return str(v)


def _rule(v) -> str:
    return "" if v is None else str(v)  # read_csv turns an empty rule cell into None


def correlation_rows(deltas: list[dict], metrics: list[dict], dataset: str) -> list[dict]:
    """Correlate each delta statistic with each gain, per (method, rule), joined on class.

    deltas: rows of deltas.csv (only models named class_<c> count). metrics: rows of
    metrics.csv (method "specialist" has no gains and is skipped). p_holm is adjusted
    over the nine tests (3 gains x 3 statistics) of one (method, rule).
    """
    by_class: dict = {}
    for d in deltas:
        model = str(d.get("model", ""))
        if model.startswith("class_"):
            c = d.get("class")
            by_class[_class_key(model.removeprefix("class_") if c is None else c)] = d
    groups: dict[tuple[str, str], dict] = {}  # insertion order = first appearance
    for m in metrics:
        if m["method"] == "specialist":
            continue
        key = (m["method"], _rule(m.get("rule")))
        group = groups.setdefault(key, {})
        c = _class_key(m["class"])
        if c in group:
            raise ValueError(f"metrics rows hold class {c} twice for method {key[0]!r}, rule {key[1]!r}")
        group[c] = m
    out = []
    for (method, rule), group in groups.items():
        classes = [c for c in group if c in by_class]
        block = []
        for metric in GAINS:
            y = [group[c][f"d_{metric}"] for c in classes]
            for stat in STATS:
                x = [by_class[c][stat] for c in classes]
                block.append({"dataset": dataset, "method": method, "rule": rule, "metric": metric, "stat": stat,
                              **correlate(x, y)})  # fmt: skip
        for row, p_holm in zip(block, holm([r["p"] for r in block])):
            row["p_holm"] = p_holm
        out += block
    return [{c: r[c] for c in CORRELATION_COLUMNS} for r in out]


def _sign(v) -> str:
    v = _float(v)
    if math.isnan(v):
        return ""
    return "+" if v > 0 else "-" if v < 0 else "0"


def sign_agreement_rows(a: list[dict], b: list[dict], name_a: str, name_b: str) -> list[dict]:
    """Signs of slope and intercept in two runs' correlation rows, and whether they agree.

    One row per (method, rule, metric, stat) present in both, in a's order. A NaN
    coefficient has sign "" and never agrees.
    """

    def key(r):
        return r["method"], _rule(r.get("rule")), r["metric"], r["stat"]

    b_by_key = {key(r): r for r in b}
    rows = []
    for ra in a:
        rb = b_by_key.get(key(ra))
        if rb is None:
            continue
        row = dict(zip(("method", "rule", "metric", "stat"), key(ra)), dataset_a=name_a, dataset_b=name_b)
        for coef in ("slope", "intercept"):
            sa, sb = _sign(ra.get(coef)), _sign(rb.get(coef))
            row.update({f"{coef}_sign_a": sa, f"{coef}_sign_b": sb, f"{coef}_agree": bool(sa) and sa == sb})
        rows.append({c: row[c] for c in SIGN_COLUMNS})
    return rows


def agreement_counts(rows: list[dict]) -> list[dict]:
    """Per (method, rule) of sign_agreement_rows: pairs compared and how many signs agree."""
    counts: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["method"], _rule(r.get("rule")))
        c = counts.setdefault(key, {"method": key[0], "rule": key[1], "n_pairs": 0, "slope_agree": 0, "intercept_agree": 0})
        c["n_pairs"] += 1
        c["slope_agree"] += bool(r["slope_agree"])
        c["intercept_agree"] += bool(r["intercept_agree"])
    return list(counts.values())
