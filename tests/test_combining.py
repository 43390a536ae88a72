import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ensemble_delta.combining import RULES, combine


def _sig(v):
    return 1 / (1 + math.exp(-v))


Z = np.array([[0.0, math.log(3), -math.log(3)], [2.0, -1.0, 0.5]])


def test_prob_norm_by_hand():
    # Row 0: p = (1/2, 3/4, 1/4), sum 3/2.
    s = combine(Z, "prob_norm")
    assert s[0] == pytest.approx([1 / 3, 1 / 2, 1 / 6], rel=1e-12)
    p = [_sig(v) for v in Z[1]]
    assert s[1] == pytest.approx([v / sum(p) for v in p], rel=1e-12)


def test_logit_softmax_by_hand():
    # Row 0: exp(z) = (1, 3, 1/3), sum 13/3.
    s = combine(Z, "logit_softmax")
    assert s[0] == pytest.approx([3 / 13, 9 / 13, 1 / 13], rel=1e-12)
    e = [math.exp(v) for v in Z[1]]
    assert s[1] == pytest.approx([v / sum(e) for v in e], rel=1e-12)


def test_mean_prob_by_hand():
    # Row 0, K = 3: specialist 0 gives (1/2, 1/4, 1/4), 1 gives (1/8, 3/4, 1/8),
    # 2 gives (3/8, 3/8, 1/4); their mean is (1/3, 11/24, 5/24).
    s = combine(Z, "mean_prob")
    assert s[0] == pytest.approx([1 / 3, 11 / 24, 5 / 24], rel=1e-12)
    p = [_sig(v) for v in Z[1]]
    want = np.mean([[p[k] if c == k else (1 - p[k]) / 2 for c in range(3)] for k in range(3)], axis=0)
    assert s[1] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_rows_are_distributions(rule):
    z = np.random.default_rng(0).normal(scale=4, size=(200, 10)).astype(np.float32)
    s = combine(z, rule)
    assert s.dtype == np.float64 and s.shape == z.shape
    assert np.all(s >= 0)
    assert np.allclose(s.sum(axis=1), 1, atol=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_argmax_follows_p(rule):
    # All three rules are increasing in z_c within a row: the predicted class is argmax z.
    z = np.random.default_rng(1).normal(scale=3, size=(500, 10))
    assert np.array_equal(combine(z, rule).argmax(axis=1), z.argmax(axis=1))


def test_mean_prob_ranks_classes_by_p_within_each_image():
    z = np.random.default_rng(2).normal(scale=3, size=(300, 10))
    s = combine(z, "mean_prob")
    assert np.array_equal(np.argsort(s, axis=1, kind="stable"), np.argsort(z, axis=1, kind="stable"))


def test_mean_prob_column_auc_is_not_the_specialists():
    # Across images, s_c also moves with the other specialists' sum(1 - p_k), so the
    # per-class ranking of images, and the AUC, generally differ from p_c's. K = 2
    # makes it plain: s_0 = (p_0 + 1 - p_1) / 2.
    z = np.array([[1.0, 5.0], [0.0, -5.0]])
    s = combine(z, "mean_prob")
    assert z[0, 0] > z[1, 0] and s[0, 0] < s[1, 0]
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 400)
    z = rng.normal(size=(400, 10)) + 2 * (y[:, None] == np.arange(10))
    s = combine(z, "mean_prob")
    assert roc_auc_score(y == 0, s[:, 0]) != roc_auc_score(y == 0, z[:, 0])


@pytest.mark.parametrize("rule", RULES)
def test_extreme_logits_are_finite(rule):
    z = np.array([[-100.0] * 4, [100.0] * 4, [-100.0, 100.0, -100.0, -100.0], [-1000.0, -1001.0, -2000.0, -900.0],
                  [-np.inf] * 4, [np.inf, 0.0, -np.inf, 1.0]], dtype=np.float64)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = combine(z, rule)
        s32 = combine(z[:3].astype(np.float32), rule)  # what a model's scores file holds
    assert np.allclose(s32, s[:3], atol=1e-12)
    assert np.isfinite(s).all()
    assert np.allclose(s.sum(axis=1), 1, atol=1e-12)
    assert np.allclose(s[0], 0.25) and np.allclose(s[1], 0.25) and np.allclose(s[4], 0.25)
    assert s[2].argmax() == 1 and s[5].argmax() == 0


def test_prob_norm_when_every_p_underflows():
    # sigmoid(-1000) is 0 in float64; p / sum(p) would be 0 / 0. In the limit,
    # p_c ~ exp(z_c), so the rule tends to softmax(z).
    z = np.array([[-1000.0, -1001.0, -1003.0]])
    e = np.exp(z[0] - z[0].max())
    assert combine(z, "prob_norm")[0] == pytest.approx(e / e.sum(), rel=1e-12)


def test_unknown_rule_lists_valid_rules():
    with pytest.raises(ValueError, match="prob_norm, logit_softmax, mean_prob"):
        combine(Z, "vote")
