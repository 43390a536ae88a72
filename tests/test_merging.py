"""Task-vector algebra, streaming merges (hand-computed and against dense reimplementations), BN recalibration."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from ensemble_delta.merging import (
    MERGE_METHODS,
    TaskVector,
    merge,
    recalibrate_bn,
    task_arithmetic,
    ties_merge,
    weight_average,
)


def _linear_sd(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in nn.Linear(3, 2).state_dict().items()}


def _bn_net_sd(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net.train()
    net(torch.randn(5, 3) + seed)  # move the running stats and num_batches_tracked off their defaults
    return {k: v.clone() for k, v in net.state_dict().items()}


def _t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _loader(sds):
    return lambda i: sds[i]


# ---------------------------------------------------------------------------------------
# TaskVector
# ---------------------------------------------------------------------------------------

NAMES = ["weight", "bias"]


def test_task_vector_difference_applied_to_base_gives_tuned():
    a, b = _linear_sd(0), _linear_sd(1)
    tau = TaskVector.from_state_dicts(b, a, NAMES)  # a - b
    out = tau.apply_to(b)
    for n in NAMES:
        torch.testing.assert_close(out[n], a[n])
    assert set(out) == set(b)


def test_task_vector_scaling_addition_negation():
    base, a, b = _linear_sd(0), _linear_sd(1), _linear_sd(2)
    ta = TaskVector.from_state_dicts(base, a, NAMES)
    tb = TaskVector.from_state_dicts(base, b, NAMES)
    for n in NAMES:
        assert torch.equal((ta + tb)[n], (tb + ta)[n])  # commutes, bit for bit
        assert torch.equal((2 * ta)[n], ta[n] * 2)
        assert torch.equal((ta * 0.5)[n], (0.5 * ta)[n])
        assert torch.equal((ta - tb)[n], ta[n] - tb[n])
        assert torch.equal((-ta)[n], -ta[n])
        assert torch.equal((ta - ta)[n], torch.zeros_like(ta[n]))
        torch.testing.assert_close((ta + (-1) * ta)[n], torch.zeros_like(ta[n]))
    # applying 0.5 * tau moves halfway
    half = (0.5 * ta).apply_to(base)
    for n in NAMES:
        torch.testing.assert_close(half[n], (base[n] + a[n]) / 2)


def test_task_vector_sum_flatten_numel():
    base = _linear_sd(0)
    vs = [TaskVector.from_state_dicts(base, _linear_sd(s), NAMES) for s in (1, 2, 3)]
    total = TaskVector.sum(v for v in vs)  # a generator is fine
    builtin = sum(vs)
    for n in NAMES:
        torch.testing.assert_close(total[n], vs[0][n] + vs[1][n] + vs[2][n])
        torch.testing.assert_close(builtin[n], total[n])
    assert vs[0].numel() == 3 * 2 + 2
    flat = vs[0].flatten()
    assert flat.shape == (8,)
    assert torch.equal(flat[:6], vs[0]["weight"].reshape(-1)) and torch.equal(flat[6:], vs[0]["bias"])
    with pytest.raises(ValueError):
        TaskVector.sum([])


def test_apply_to_leaves_buffers_and_integer_tensors_bit_identical():
    base, tuned = _bn_net_sd(0), _bn_net_sd(1)
    names = ["0.weight", "0.bias", "1.weight", "1.bias"]  # backbone; head "2.*" and buffers excluded
    tau = TaskVector.from_state_dicts(base, tuned, names)
    out = tau.apply_to(base)
    assert set(out) == set(base)
    for key in base:
        if key in names:
            torch.testing.assert_close(out[key], tuned[key])
        else:
            assert out[key].dtype == base[key].dtype
            assert torch.equal(out[key], base[key]), key
            assert out[key].data_ptr() != base[key].data_ptr()  # a copy, not an alias
    assert out["1.num_batches_tracked"].dtype == torch.int64


def test_task_vector_mismatch_raises():
    base = _linear_sd(0)
    full = TaskVector.from_state_dicts(base, _linear_sd(1), NAMES)
    only_w = TaskVector.from_state_dicts(base, _linear_sd(1), ["weight"])
    with pytest.raises(ValueError, match="different parameters"):
        full + only_w
    with pytest.raises(ValueError):
        full - only_w
    with pytest.raises(ValueError):
        TaskVector.sum([full, only_w])
    with pytest.raises(ValueError, match="no parameter"):
        TaskVector.from_state_dicts(base, {"weight": base["weight"]}, NAMES)
    with pytest.raises(ValueError, match="shape"):
        TaskVector.from_state_dicts(base, {"weight": torch.zeros(3, 3), "bias": base["bias"]}, NAMES)
    bn = _bn_net_sd(0)
    with pytest.raises(ValueError, match="floating"):
        TaskVector.from_state_dicts(bn, bn, ["1.num_batches_tracked"])
    with pytest.raises(ValueError, match="missing"):
        full.apply_to({"weight": base["weight"]})


# ---------------------------------------------------------------------------------------
# weight averaging and task arithmetic
# ---------------------------------------------------------------------------------------


def test_weight_average_of_identical_models_is_that_model():
    base, tuned = _bn_net_sd(0), _bn_net_sd(1)
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    out = weight_average(base, _loader([tuned] * 3), 3, names)
    assert set(out) == set(names)
    for n in names:
        assert out[n].dtype == torch.float32
        assert torch.equal(out[n], tuned[n]), n


def test_task_arithmetic_hand_formula():
    base = {"w": _t(1.0, 2.0), "b": _t(0.0)}
    sds = [{"w": _t(2.0, 2.0), "b": _t(1.0)}, {"w": _t(1.0, 5.0), "b": _t(-3.0)}]
    out = task_arithmetic(base, _loader(sds), 2, ["w", "b"], lam=0.5)
    # taus: w [1, 0] and [0, 3]; b [1] and [-3]
    assert torch.equal(out["w"], _t(1.5, 3.5))
    assert torch.equal(out["b"], _t(-1.0))
    avg = weight_average(base, _loader(sds), 2, ["w", "b"])
    assert torch.equal(avg["w"], _t(1.5, 3.5)) and torch.equal(avg["b"], _t(-1.0))


def _random_sds(k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv": (4, 3, 3, 3), "fc": (5, 7), "bias": (5,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    base["count"] = torch.tensor(7)
    sds = []
    for _ in range(k):
        sd = {n: base[n] + 0.1 * torch.randn(s, generator=g) for n, s in shapes.items()}
        sd["count"] = torch.tensor(9)
        sds.append(sd)
    return base, sds, list(shapes)


def test_running_sums_match_naive_in_memory():
    base, sds, names = _random_sds(5)
    wa = weight_average(base, _loader(sds), 5, names)
    ta = task_arithmetic(base, _loader(sds), 5, names, lam=0.3)
    for n in names:
        taus = torch.stack([sd[n] - base[n] for sd in sds])
        torch.testing.assert_close(wa[n], base[n] + taus.mean(0))
        torch.testing.assert_close(ta[n], base[n] + 0.3 * taus.sum(0))
    # the TaskVector algebra says the same thing
    vs = [TaskVector.from_state_dicts(base, sd, names) for sd in sds]
    via_tv = (0.3 * TaskVector.sum(vs)).apply_to(base)
    for n in names:
        torch.testing.assert_close(ta[n], via_tv[n])
    assert "count" not in wa


# ---------------------------------------------------------------------------------------
# TIES
# ---------------------------------------------------------------------------------------


def _zeros_base(**shapes):
    return {n: torch.zeros(s) for n, s in shapes.items()}


def test_ties_trims_over_the_whole_vector_not_per_tensor():
    base = _zeros_base(a=2, b=3)
    sd = {"a": _t(5.0, -4.0), "b": _t(1.0, 2.0, 3.0)}
    # d = 5, density 0.4 -> keep the 2 largest magnitudes overall: both of `a`, nothing of `b`
    # (per-tensor trimming would keep 3.0 in `b`)
    out = ties_merge(base, _loader([sd]), 1, ["a", "b"], density=0.4)
    assert torch.equal(out["a"], _t(5.0, -4.0))
    assert torch.equal(out["b"], _t(0.0, 0.0, 0.0))
    # density 0.6 -> 3 kept: 5, -4 and 3
    out = ties_merge(base, _loader([sd]), 1, ["a", "b"], density=0.6)
    assert torch.equal(out["b"], _t(0.0, 0.0, 3.0))
    # the trim is per task vector: a second vector keeps its own top entries
    sd2 = {"a": _t(0.1, 0.2), "b": _t(0.3, -9.0, 0.4)}
    out = ties_merge(base, _loader([sd, sd2]), 2, ["a", "b"], density=0.2)
    # vector 1 keeps 5 (entry a0); vector 2 keeps -9 (entry b1); no overlap, each a mean of one
    assert torch.equal(out["a"], _t(5.0, 0.0))
    assert torch.equal(out["b"], _t(0.0, -9.0, 0.0))


def test_ties_sign_election_zero_sum_majority_and_disjoint_mean():
    base = _zeros_base(x=6)
    sds = [
        {"x": _t(2.0, -1.0, 3.0, 0.0, 1.0, 2.0)},
        {"x": _t(1.0, 3.0, -3.0, 0.0, 1.0, 0.0)},
        {"x": _t(-4.0, -1.0, 0.0, 0.0, 1.0, 4.0)},
    ]
    # density 1: nothing trimmed. sums: [-1, 1, 0, 0, 3, 6] -> signs [-, +, 0, 0, +, +];
    # majority = sign(-1 + 1 + 0 + 0 + 1 + 1) = +, so the zero-sum entries 2 and 3 elect +.
    # entry 0: only -4 agrees -> -4        entry 1: only 3 agrees (the two -1 do not) -> 3
    # entry 2: 3 agrees, -3 does not, the 0 does not count -> 3
    # entry 3: nobody has a value -> 0     entry 4: mean(1, 1, 1) = 1
    # entry 5: mean(2, 4) = 3, the zero excluded from the count (else 2)
    out = ties_merge(base, _loader(sds), 3, ["x"], density=1.0)
    assert torch.equal(out["x"], _t(-4.0, 3.0, 3.0, 0.0, 1.0, 3.0))


def test_ties_majority_sign_can_be_negative_and_lam_scales_around_base():
    base = {"x": _t(10.0, 20.0, 30.0)}
    sds = [{"x": base["x"] + _t(1.0, -2.0, -2.0)}, {"x": base["x"] + _t(-1.0, -3.0, -1.0)}]
    # sums [0, -5, -3] -> majority sign(0 - 1 - 1) = -, entry 0 elects - and keeps -1
    # merged tau = [-1, -2.5, -1.5]; lam 0.5 -> base + [-0.5, -1.25, -0.75]
    out = ties_merge(base, _loader(sds), 2, ["x"], density=1.0, lam=0.5)
    assert torch.equal(out["x"], _t(9.5, 18.75, 29.25))


def test_ties_entry_no_vector_keeps_stays_at_base():
    base = {"x": _t(1.0, 2.0, 3.0, 4.0)}
    sds = [
        {"x": base["x"] + _t(8.0, 0.5, 0.1, -0.2)},
        {"x": base["x"] + _t(-0.3, 6.0, 0.2, 0.1)},
    ]
    # density 0.25 of d = 4 -> each keeps one entry: vector 1 entry 0, vector 2 entry 1
    out = ties_merge(base, _loader(sds), 2, ["x"], density=0.25, lam=1.0)
    assert torch.equal(out["x"], _t(9.0, 8.0, 3.0, 4.0))


def _dense_ties(base, sds, names, density, lam):
    """Independent in-memory TIES: stack every trimmed vector, trim with topk (not kthvalue)."""
    taus = torch.stack([torch.cat([(sd[n] - base[n]).reshape(-1) for n in names]) for sd in sds])
    d = taus.shape[1]
    n_keep = max(1, int(d * density + 1e-6))
    idx = taus.abs().topk(n_keep, dim=1).indices
    trimmed = torch.zeros_like(taus).scatter_(1, idx, taus.gather(1, idx))
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    out, off = {}, 0
    for n in names:
        m = base[n].numel()
        out[n] = base[n] + lam * merged[off : off + m].view_as(base[n])
        off += m
    return out


@pytest.mark.parametrize("density,lam", [(0.2, 1.0), (0.5, 0.7), (1.0, 0.3)])
def test_ties_matches_dense_reimplementation(density, lam):
    base, sds, names = _random_sds(6, seed=1)  # continuous random values: no magnitude ties
    out = ties_merge(base, _loader(sds), 6, names, density=density, lam=lam)
    ref = _dense_ties(base, sds, names, density, lam)
    assert set(out) == set(names)
    for n in names:
        assert out[n].dtype == torch.float32 and out[n].shape == base[n].shape
        torch.testing.assert_close(out[n], ref[n])


def test_ties_bad_inputs_raise():
    base, sds, names = _random_sds(2)
    with pytest.raises(ValueError, match="density"):
        ties_merge(base, _loader(sds), 2, names, density=0.0)
    with pytest.raises(ValueError, match="density"):
        ties_merge(base, _loader(sds), 2, names, density=1.5)
    with pytest.raises(ValueError, match="specialist 1"):
        ties_merge(base, _loader([sds[0], {"conv": base["conv"]}]), 2, names)
    bad = {n: t.clone() for n, t in sds[1].items()}
    bad["fc"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ties_merge(base, _loader([sds[0], bad]), 2, names)
    with pytest.raises(ValueError, match="k must be"):
        weight_average(base, _loader(sds), 0, names)


# ---------------------------------------------------------------------------------------
# dispatch and lazy loading
# ---------------------------------------------------------------------------------------


class _SD(dict):
    """A dict that can be weak-referenced, to count how many loaded specialists are alive."""


class _CountingLoader:
    def __init__(self, sds):
        self.sds, self.calls, self.alive, self.peak = sds, [], 0, 0

    def _dead(self):
        self.alive -= 1

    def __call__(self, i):
        self.calls.append(i)
        sd = _SD({n: t.clone() for n, t in self.sds[i].items()})
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(sd, self._dead)
        return sd


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_merge_streams_one_specialist_at_a_time(method):
    k = 4
    base, sds, names = _random_sds(k)
    load = _CountingLoader(sds)
    out = merge(method, base, load, k, names, density=0.3, lam=0.8)
    passes = 2 if method == "ties" else 1
    assert load.calls == list(range(k)) * passes  # lazily, in order, at most 2 passes * k
    assert load.peak == 1  # never two specialists alive together
    direct = {
        "ties": lambda: ties_merge(base, _loader(sds), k, names, density=0.3, lam=0.8),
        "task_arithmetic": lambda: task_arithmetic(base, _loader(sds), k, names, lam=0.8),
        "weight_average": lambda: weight_average(base, _loader(sds), k, names),
    }[method]()
    for n in names:
        assert torch.equal(out[n], direct[n])


def test_merge_unknown_method_names_choices():
    base, sds, names = _random_sds(1)
    with pytest.raises(ValueError, match="ties, task_arithmetic, weight_average"):
        merge("soup", base, _loader(sds), 1, names, density=0.2, lam=1.0)


# ---------------------------------------------------------------------------------------
# BatchNorm recalibration
# ---------------------------------------------------------------------------------------


def test_recalibrate_bn_moves_running_stats_to_batch_statistics():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1)
    model = nn.Sequential(conv, bn, nn.ReLU())
    with torch.no_grad():
        bn.running_mean.fill_(100.0)  # garbage
        bn.running_var.fill_(1e-3)
    batches = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(2)]
    model.train()  # recalibration must leave it in eval mode whatever it was
    seen = recalibrate_bn(model, batches, "cpu")
    assert seen == 16
    assert not model.training and not bn.training
    assert bn.momentum == 0.1
    assert int(bn.num_batches_tracked) == 2
    with torch.no_grad():
        pre = [conv(x) for x in batches]
    # cumulative average over equal-size batches: mean of all activations; mean of per-batch unbiased variances
    torch.testing.assert_close(bn.running_mean, torch.cat(pre).mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    var = torch.stack([p.var(dim=(0, 2, 3), unbiased=True) for p in pre]).mean(0)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)


def test_recalibrate_bn_without_bn_is_a_noop():
    model = nn.Sequential(nn.Linear(2, 2))

    def never():
        raise AssertionError("batches must not be consumed without BatchNorm")
        yield

    assert recalibrate_bn(model, never(), "cpu") == 0


def test_recalibrate_bn_restores_a_merged_models_accuracy():
    # separable blobs far from the origin: with the base's (0, 1) running stats the BN
    # layer sees huge un-normalized activations; re-estimated stats fix that
    g = torch.Generator().manual_seed(0)
    n, dim = 256, 8
    y = torch.randint(0, 2, (n,), generator=g)
    direction = torch.randn(dim, generator=g)
    direction /= direction.norm()
    x = 10.0 + 0.3 * torch.randn(n, dim, generator=g) + (2 * y[:, None] - 1) * direction

    def make():
        return nn.Sequential(nn.Linear(dim, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    torch.manual_seed(0)
    base_model = make()
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    names = [k for k, _ in base_model.named_parameters()]

    specialists = []
    for seed in (1, 2):
        m = make()
        m.load_state_dict(base)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        gs = torch.Generator().manual_seed(seed)
        m.train()
        for _ in range(60):
            idx = torch.randint(0, n, (64,), generator=gs)
            loss = nn.functional.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        specialists.append({k: v.clone() for k, v in m.state_dict().items()})

    def accuracy(model):
        model.eval()
        with torch.no_grad():
            return (model(x).argmax(1) == y).float().mean().item()

    merged_params = weight_average(base, _loader(specialists), 2, names)
    merged = make()
    merged.load_state_dict({**base, **merged_params})  # buffers are the base's, as in the pipeline
    before = accuracy(merged)
    seen = recalibrate_bn(merged, x.split(64), "cpu")
    after = accuracy(merged)
    assert seen == n
    assert before < 0.7, before  # about chance: the stale statistics break the merged model
    assert after >= 0.95, after
