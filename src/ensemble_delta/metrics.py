"""Per-class one-vs-rest metrics of the specialists and of every combined model, and the gains.

All metrics of all K classes come from one pass over [N, K] boolean matrices (no
per-sample Python). Conventions follow scikit-learn with zero_division=0: a class
never predicted has precision 0, a class absent from the labels has recall 0 and an
undefined (NaN) AUC.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

from .combining import combine

METRICS = ("precision", "recall", "f1", "auc", "accuracy")
GAIN_METRICS = ("precision", "f1", "auc")  # the gains the correlation study uses
METRIC_COLUMNS = ["method", "rule", "class", *METRICS, *(f"d_{m}" for m in METRICS)]
SUMMARY_COLUMNS = [
    "method", "rule", "accuracy10",
    "macro_precision", "macro_recall", "macro_f1", "macro_auc",
    "mean_d_precision", "mean_d_recall", "mean_d_f1", "mean_d_auc",
]  # fmt: skip
_MACRO = ("precision", "recall", "f1", "auc")


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den == 0 (sklearn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _auc_columns(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Binary AUC of every column: Mann-Whitney U / (n1 n0), average ranks for ties."""
    n = y.shape[0]
    n1 = y.sum(axis=0).astype(np.float64)
    n0 = n - n1
    ranks = rankdata(score, axis=0)  # "average" ties: a tie counts 1/2, as in roc_auc_score
    u = (ranks * y).sum(axis=0) - n1 * (n1 + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


def _metric_columns(y: np.ndarray, pred: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
    """The five metrics of each column of boolean truths y, predictions pred, scores score [N, K]."""
    tp = (y & pred).sum(axis=0)
    fp = (~y & pred).sum(axis=0)
    fn = (y & ~pred).sum(axis=0)
    return {
        "precision": _div(tp, tp + fp),
        "recall": _div(tp, tp + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),  # = 2PR/(P+R), and 0 where sklearn says 0
        "auc": _auc_columns(y, score),
        "accuracy": (y == pred).mean(axis=0),
    }


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of score for boolean labels y (rank based, ties averaged); NaN if one class only."""
    y = np.asarray(y, dtype=bool).reshape(-1, 1)
    return float(_auc_columns(y, np.asarray(score, dtype=np.float64).reshape(-1, 1))[0])


def binary_metrics(y: np.ndarray, pred: np.ndarray, score: np.ndarray) -> dict:
    """precision, recall, f1, auc, accuracy of one binary task (python floats)."""
    cols = _metric_columns(
        np.asarray(y, dtype=bool).reshape(-1, 1),
        np.asarray(pred, dtype=bool).reshape(-1, 1),
        np.asarray(score, dtype=np.float64).reshape(-1, 1),
    )
    return {m: float(cols[m][0]) for m in METRICS}


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 logits [N, K], int labels [N], and the one-hot truth [N, K]."""
    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if z.ndim != 2 or z.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be [N, K] with N = len(labels) = {labels.shape[0]}, got shape {z.shape}")
    k = z.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in 0..{k - 1} for {k} score columns, got {labels.min()}..{labels.max()}")
    return z, labels, labels[:, None] == np.arange(k)


def _nanmean(values) -> float:
    """Mean over the defined values (a class absent from the test split has no AUC); NaN if none."""
    a = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def specialist_rows(logits: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Specialist c on its own task "label == c" over the whole test split, threshold p >= 0.5.

    sigmoid(z) >= 0.5 exactly when z >= 0, so threshold the log-odds (no rounding at 0.5).
    """
    z, labels, y = _check(logits, labels)
    cols = _metric_columns(y, z >= 0, z)
    return [
        {"method": "specialist", "rule": "", "class": c, **{m: float(cols[m][c]) for m in METRICS},
         **{f"d_{m}": None for m in METRICS}}
        for c in range(z.shape[1])
    ]  # fmt: skip


def combined_rows(
    method: str, rule: str, logits: np.ndarray, labels: np.ndarray, specialists: list[dict]
) -> tuple[list[dict], dict]:
    """Per-class metrics of a combined model and its gains over each specialist, plus a summary row.

    s = combine(logits, rule); the predicted class is argmax s; class c's precision,
    recall, F1 and accuracy come from pred == c, its AUC from s[:, c]. The gain
    d_<metric> for class c is the combined metric minus specialist c's.
    """
    z, labels, y = _check(logits, labels)
    s = combine(z, rule)
    pred = s.argmax(axis=1)
    cols = _metric_columns(y, pred[:, None] == np.arange(z.shape[1]), s)
    by_class = {int(r["class"]): r for r in specialists}
    rows = []
    for c in range(z.shape[1]):
        spec = by_class.get(c)
        if spec is None:
            raise ValueError(f"no specialist row for class {c}: pass specialist_rows(...) of the same scores")
        row = {"method": method, "rule": rule, "class": c, **{m: float(cols[m][c]) for m in METRICS}}
        for m in METRICS:
            base = spec.get(m)
            row[f"d_{m}"] = math.nan if base is None else row[m] - float(base)
        rows.append(row)
    summary = {"method": method, "rule": rule, "accuracy10": float((pred == labels).mean())}
    summary.update({f"macro_{m}": _nanmean(r[m] for r in rows) for m in _MACRO})
    summary.update({f"mean_d_{m}": _nanmean(r[f"d_{m}"] for r in rows) for m in _MACRO})
    return rows, summary


def specialist_summary(rows: list[dict], logits: np.ndarray, labels: np.ndarray) -> dict:
    """Summary row of the specialists: macro averages, 10-class accuracy of argmax z, no gains."""
    z, labels, _ = _check(logits, labels)
    summary = {"method": "specialist", "rule": "", "accuracy10": float((z.argmax(axis=1) == labels).mean())}
    summary.update({f"macro_{m}": _nanmean(r[m] for r in rows) for m in _MACRO})
    summary.update({f"mean_d_{m}": None for m in _MACRO})
    return summary
