"""Combination rules: ten one-vs-rest specialist scores into one class distribution.

Every rule takes the specialists' log-odds z [N, K] (p_k = sigmoid(z_k)) and returns
float64 rows that sum to one. Work in log space: sigmoid underflows to exactly 0
below z of about -745 in float64 (-104 in float32), and a naive p / sum(p) then
divides 0 by 0.
"""

from __future__ import annotations

import numpy as np

RULES = ("prob_norm", "logit_softmax", "mean_prob")
_BIG = 1e300  # 2 * _BIG stays finite, so a - max(a) cannot overflow


def log_sigmoid(z: np.ndarray) -> np.ndarray:
    """log(sigmoid(z)) without overflow: -log(1 + exp(-z))."""
    return -np.logaddexp(0.0, -z)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """sigmoid(z) via log_sigmoid, so no exp(-z) overflow warning for very negative z."""
    return np.exp(log_sigmoid(z))


def _softmax(a: np.ndarray) -> np.ndarray:
    """Row softmax, shifted by the row max so exp never overflows."""
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def combine(logits: np.ndarray, rule: str) -> np.ndarray:
    """Class distribution s [N, K] from the K specialists' log-odds [N, K] under `rule`.

    prob_norm: s_c = p_c / sum_j p_j, computed as softmax(log sigmoid(z)) (the same
    number, but defined when every p_j underflows). logit_softmax: softmax(z).
    mean_prob: mean over specialists k of (p_k on class k, (1 - p_k)/(K - 1) elsewhere).
    """
    if rule not in RULES:
        raise ValueError(f"unknown combination rule {rule!r}; valid rules: {', '.join(RULES)}")
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be [N, K] with K >= 2, got shape {z.shape}")
    # Clip +-inf to a huge finite value: a row of -inf (every p exactly 0) then
    # becomes uniform instead of 0/0, and +inf wins outright instead of inf - inf.
    z = np.clip(z, -_BIG, _BIG)
    if rule == "prob_norm":
        return _softmax(log_sigmoid(z))
    if rule == "logit_softmax":
        return _softmax(z)
    # mean_prob: s_c = (p_c + sum_{k != c} (1 - p_k) / (K - 1)) / K. Within a row s is
    # an increasing affine map of p, so argmax s = argmax p; across rows the second
    # term moves with the other specialists, so s_c does not rank images as p_c does.
    k = z.shape[1]
    p, q = sigmoid(z), sigmoid(-z)  # q = 1 - p without cancellation near p = 1
    return (p + (q.sum(axis=1, keepdims=True) - q) / (k - 1)) / k
