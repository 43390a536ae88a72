import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from ensemble_delta.combining import RULES, combine
from ensemble_delta.metrics import (
    METRIC_COLUMNS,
    METRICS,
    SUMMARY_COLUMNS,
    binary_auc,
    binary_metrics,
    combined_rows,
    specialist_rows,
    specialist_summary,
)

K = 10


def _sk(y, pred, score) -> dict:
    return {
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred, zero_division=0),
        "f1": f1_score(y, pred, zero_division=0),
        "auc": roc_auc_score(y, score) if 0 < y.sum() < y.size else math.nan,
        "accuracy": accuracy_score(y, pred),
    }


def _approx(got: dict, want: dict):
    for m in METRICS:
        if math.isnan(want[m]):
            assert math.isnan(got[m]), m
        else:
            assert got[m] == pytest.approx(want[m], abs=1e-12), m


def _scores(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    # Informative but imperfect log-odds; rounding creates ties for the AUC.
    z = np.round(rng.normal(-1.5, 1.5, (n, K)) + 3.0 * (labels[:, None] == np.arange(K)), 1).astype(np.float32)
    return z, labels


def test_binary_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    score = rng.integers(0, 5, 200).astype(float)  # heavy ties
    assert binary_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert math.isnan(binary_auc(np.ones(5, bool), np.arange(5.0)))
    assert math.isnan(binary_auc(np.zeros(5, bool), np.arange(5.0)))


@pytest.mark.parametrize("seed", range(4))
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(150) < 0.2
    score = rng.normal(size=150) + y
    pred = score > 0.7
    _approx(binary_metrics(y, pred, score), _sk(y, pred, score))


def test_binary_metrics_zero_division():
    y = np.array([False, False, True, True])
    none = np.zeros(4, bool)
    _approx(binary_metrics(y, none, np.arange(4.0)), _sk(y, none, np.arange(4.0)))
    neg = np.zeros(4, bool)
    _approx(binary_metrics(neg, neg, np.arange(4.0)), _sk(neg, neg, np.arange(4.0)))  # no positives: AUC NaN


def test_specialist_rows_match_sklearn():
    z, labels = _scores(1)
    rows = specialist_rows(z, labels)
    assert [r["class"] for r in rows] == list(range(K))
    for c, r in enumerate(rows):
        assert r["method"] == "specialist" and r["rule"] == ""
        assert all(r[f"d_{m}"] is None for m in METRICS)
        y = labels == c
        # p >= 0.5 thresholding, as a user would write it.
        _approx(r, _sk(y, 1 / (1 + np.exp(-z[:, c].astype(np.float64))) >= 0.5, z[:, c]))
    assert set(rows[0]) == set(METRIC_COLUMNS)


@pytest.mark.parametrize("rule", RULES)
def test_combined_rows_match_sklearn(rule):
    z, labels = _scores(2)
    spec = specialist_rows(z, labels)
    rows, summary = combined_rows("ensemble", rule, z, labels, spec)
    s = combine(z, rule)
    pred = s.argmax(axis=1)
    for c, r in enumerate(rows):
        assert (r["method"], r["rule"], r["class"]) == ("ensemble", rule, c)
        want = _sk(labels == c, pred == c, s[:, c])
        _approx(r, want)
        for m in METRICS:
            assert r[f"d_{m}"] == pytest.approx(want[m] - spec[c][m], abs=1e-12)
    assert set(rows[0]) == set(METRIC_COLUMNS)
    assert list(summary) == SUMMARY_COLUMNS
    assert summary["accuracy10"] == pytest.approx(accuracy_score(labels, pred))
    assert summary["macro_precision"] == pytest.approx(precision_score(labels, pred, average="macro", zero_division=0))
    assert summary["macro_recall"] == pytest.approx(recall_score(labels, pred, average="macro", zero_division=0))
    assert summary["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0))
    assert summary["macro_auc"] == pytest.approx(np.mean([roc_auc_score(labels == c, s[:, c]) for c in range(K)]))
    for m in ("precision", "recall", "f1", "auc"):
        assert summary[f"mean_d_{m}"] == pytest.approx(np.mean([r[f"d_{m}"] for r in rows]))


def test_specialist_summary():
    z, labels = _scores(3)
    rows = specialist_rows(z, labels)
    summary = specialist_summary(rows, z, labels)
    assert list(summary) == SUMMARY_COLUMNS
    assert summary["method"] == "specialist" and summary["rule"] == ""
    assert summary["accuracy10"] == pytest.approx(accuracy_score(labels, z.argmax(axis=1)))
    for m in ("precision", "recall", "f1", "auc"):
        assert summary[f"macro_{m}"] == pytest.approx(np.mean([r[m] for r in rows]))
        assert summary[f"mean_d_{m}"] is None


def test_class_absent_from_test_split():
    # A class with no test image has no AUC: NaN per class, left out of the macro mean.
    z, labels = _scores(4)
    labels = np.where(labels == 7, 6, labels)
    spec = specialist_rows(z, labels)
    assert math.isnan(spec[7]["auc"]) and spec[7]["recall"] == 0.0
    rows, summary = combined_rows("ensemble", "prob_norm", z, labels, spec)
    assert math.isnan(rows[7]["auc"]) and math.isnan(rows[7]["d_auc"])
    assert summary["macro_auc"] == pytest.approx(np.mean([r["auc"] for c, r in enumerate(rows) if c != 7]))


def test_bad_shapes_raise():
    z, labels = _scores(5, n=20)
    with pytest.raises(ValueError, match="labels"):
        specialist_rows(z, labels[:-1])
    with pytest.raises(ValueError, match="0..9"):
        specialist_rows(z, labels + 10)
