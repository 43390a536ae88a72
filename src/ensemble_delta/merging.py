"""Task vectors, weight-space merges of the specialists, and BatchNorm recalibration.

A task vector tau_k = theta_k - theta_base over the backbone parameters (DESIGN.md,
"Merging and distillation"). The merges stream over the specialists through a
`load(k)` callable, so ten ResNet50 checkpoints are never in memory together
(model-soups' uniform soup): weight averaging and task arithmetic keep one running sum;
TIES-Merging makes two passes (trim + sign sum, then re-trim + disjoint mean) and holds
O(1) flat vectors whatever the number of specialists.

TIES follows the reference implementation (prateeksr/TIES-Merging, `topk_values_mask`,
`resolve_sign`, `disjoint_merge` with merge_func="mean"), including its edge cases:
magnitudes tied with the threshold are all kept, an entry whose trimmed sum is exactly
zero takes the majority sign (the sign of the sum of the elected signs), and an entry
no vector keeps merges to 0. One deliberate difference: trimming keeps exactly
int(d * density) entries, where the reference keeps one more (see `_trim_threshold`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

StateDict = Mapping[str, Tensor]
Loader = Callable[[int], StateDict]

MERGE_METHODS = ("ties", "task_arithmetic", "weight_average")


# ---------------------------------------------------------------------------------------
# Task vectors
# ---------------------------------------------------------------------------------------


def _check_names(base: StateDict, names: list[str]) -> None:
    if not names:
        raise ValueError("no parameter names to merge (names is empty)")
    if len(set(names)) != len(names):
        raise ValueError("parameter names contain duplicates")
    for n in names:
        if n not in base:
            raise ValueError(f"parameter {n!r} is not in the base state dict")
        if not base[n].is_floating_point():
            # integer buffers (num_batches_tracked) are counters, not weights
            raise ValueError(f"{n!r} is a {base[n].dtype} tensor; only floating-point parameters have a task vector")


def _param(sd: StateDict, n: str, base: StateDict, who: str) -> Tensor:
    """sd[n], checked against base[n]'s shape, as a float32 tensor on base's device."""
    if n not in sd:
        raise ValueError(f"{who} has no parameter {n!r}")
    t = sd[n]
    if t.shape != base[n].shape:
        raise ValueError(f"{who}: {n!r} has shape {tuple(t.shape)}, base has {tuple(base[n].shape)}")
    return t.to(device=base[n].device, dtype=torch.float32)


class TaskVector:
    """A dict name -> float tensor with vector algebra: +, -, unary -, scalar *, sum.

    Operands must cover exactly the same names (ValueError otherwise); the result keeps
    the left operand's name order.
    """

    def __init__(self, tensors: Mapping[str, Tensor]):
        for n, t in tensors.items():
            if not t.is_floating_point():
                raise ValueError(f"task vector entry {n!r} is {t.dtype}; task vectors are floating point")
        self.tensors: dict[str, Tensor] = dict(tensors)

    @classmethod
    def from_state_dicts(cls, base: StateDict, tuned: StateDict, names: list[str]) -> "TaskVector":
        """tau = tuned - base over `names` (the backbone parameters), in float32."""
        _check_names(base, names)
        return cls({n: _param(tuned, n, base, "tuned state dict") - base[n].float() for n in names})

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors, {self.numel()} entries)"

    def _check_same(self, other: "TaskVector") -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"expected a TaskVector, got {type(other).__name__}")
        if set(self.tensors) != set(other.tensors):
            only_a = sorted(set(self.tensors) - set(other.tensors))
            only_b = sorted(set(other.tensors) - set(self.tensors))
            raise ValueError(f"task vectors cover different parameters: only left {only_a[:5]}, only right {only_b[:5]}")
        for n, t in self.tensors.items():
            if t.shape != other.tensors[n].shape:
                raise ValueError(f"task vectors disagree on the shape of {n!r}: {tuple(t.shape)} vs {tuple(other.tensors[n].shape)}")

    def __add__(self, other: "TaskVector") -> "TaskVector":
        self._check_same(other)
        return TaskVector({n: t + other.tensors[n] for n, t in self.tensors.items()})

    def __radd__(self, other):
        # lets the builtin sum() start from 0
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        self._check_same(other)
        return TaskVector({n: t - other.tensors[n] for n, t in self.tensors.items()})

    def __neg__(self) -> "TaskVector":
        return TaskVector({n: -t for n, t in self.tensors.items()})

    def __mul__(self, scalar: float) -> "TaskVector":
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        return TaskVector({n: t * scalar for n, t in self.tensors.items()})

    __rmul__ = __mul__

    @staticmethod
    def sum(vectors: Iterable["TaskVector"]) -> "TaskVector":
        """Sum of task vectors, accumulated one at a time (the iterable may be a generator)."""
        it = iter(vectors)
        try:
            first = next(it)
        except StopIteration:
            raise ValueError("TaskVector.sum of no task vectors") from None
        if not isinstance(first, TaskVector):
            raise TypeError(f"expected TaskVectors, got {type(first).__name__}")
        acc = {n: t.clone() for n, t in first.tensors.items()}
        for v in it:
            first._check_same(v)
            for n in acc:
                acc[n] += v.tensors[n]
        return TaskVector(acc)

    def flatten(self) -> Tensor:
        """All entries as one 1-D tensor, in name order."""
        return torch.cat([t.reshape(-1) for t in self.tensors.values()])

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def apply_to(self, base: StateDict) -> dict[str, Tensor]:
        """A new full state dict: base[n] + tau[n] for n in the vector, every other key copied from base.

        The result keeps base's dtypes; keys outside the vector (head, BN buffers, integer
        num_batches_tracked) are cloned unchanged.
        """
        missing = [n for n in self.tensors if n not in base]
        if missing:
            raise ValueError(f"task vector parameters missing from the base state dict: {missing[:5]}")
        out: dict[str, Tensor] = {}
        for key, b in base.items():
            if key not in self.tensors:
                out[key] = b.clone()
                continue
            t = self.tensors[key]
            if not b.is_floating_point():
                raise ValueError(f"cannot add a task vector to the {b.dtype} tensor {key!r}")
            if t.shape != b.shape:
                raise ValueError(f"{key!r}: task vector shape {tuple(t.shape)} vs base {tuple(b.shape)}")
            out[key] = (b.float() + t.to(b.device)).to(b.dtype)
        return out


# ---------------------------------------------------------------------------------------
# Streaming merges
# ---------------------------------------------------------------------------------------


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"number of specialists k must be a positive integer, got {k!r}")


def _sum_of_deltas(base: StateDict, load: Loader, k: int, names: list[str]) -> dict[str, Tensor]:
    """sum_k (theta_k - theta_base) over names, one specialist in memory at a time.

    The accumulator is float64 so the sum of float32 deltas is exact for any realistic k;
    this makes the merge of k identical specialists return that specialist bit for bit.
    """
    _check_k(k)
    _check_names(base, names)
    acc = {n: torch.zeros(base[n].shape, dtype=torch.float64, device=base[n].device) for n in names}
    for i in range(k):
        sd = load(i)
        for n in names:
            acc[n] += _param(sd, n, base, f"specialist {i}").double() - base[n].double()
        del sd  # drop the specialist before loading the next
    return acc


def weight_average(base: StateDict, load: Loader, k: int, names: list[str]) -> dict[str, Tensor]:
    """theta_base + mean_k tau_k over `names`, float32, streaming (one specialist + one accumulator)."""
    acc = _sum_of_deltas(base, load, k, names)
    return {n: (base[n].double() + acc[n] / k).float() for n in names}


def task_arithmetic(base: StateDict, load: Loader, k: int, names: list[str], lam: float) -> dict[str, Tensor]:
    """theta_base + lam * sum_k tau_k over `names`, float32, streaming."""
    acc = _sum_of_deltas(base, load, k, names)
    return {n: (base[n].double() + lam * acc[n]).float() for n in names}


def _flat_delta(sd: StateDict, base: StateDict, names: list[str], out: Tensor, who: str) -> Tensor:
    """Write theta - theta_base over names into the preallocated flat float32 buffer `out`."""
    off = 0
    for n in names:
        m = base[n].numel()
        seg = out[off : off + m]
        seg.copy_(_param(sd, n, base, who).reshape(-1))
        seg.sub_(base[n].reshape(-1))
        off += m
    if not torch.isfinite(out).all():
        raise ValueError(f"{who} has non-finite weights (nan or inf); cannot merge it")
    return out


def _trim_threshold(tau: Tensor, density: float) -> float:
    """Magnitude threshold keeping the top `density` fraction of the whole flat vector.

    Keeps |tau| >= the n-th largest magnitude, n = int(d * density) (at least 1), so
    exactly n entries survive unless magnitudes tie with the threshold (then all tied
    entries are kept, as in the reference). The reference's `topk_values_mask` takes the
    (d - n)-th smallest instead and so keeps n + 1 entries; we keep n, the documented
    fraction. kthvalue, because quantile() refuses more than 2^24 elements (a ResNet50
    backbone has 23.5M).
    """
    d = tau.numel()
    n_keep = max(1, int(d * density + 1e-6))  # + 1e-6: 0.29 * 100 is 28.999999999999996
    if n_keep >= d:
        return 0.0  # density 1: keep everything
    return torch.kthvalue(tau.abs(), d - n_keep + 1).values.item()


def _trim_(tau: Tensor, threshold: float) -> Tensor:
    """Zero, in place, the entries below the magnitude threshold."""
    return tau.masked_fill_(tau.abs() < threshold, 0.0)


def ties_merge(
    base: StateDict, load: Loader, k: int, names: list[str], density: float = 0.2, lam: float = 1.0
) -> dict[str, Tensor]:
    """TIES-Merging (trim, elect sign, disjoint mean) over `names`, float32, in two streaming passes.

    Pass 1 loads each specialist, trims its flat task vector to the top `density` by
    magnitude (over all names together) and adds it to a signed sum; the elected sign is
    the sign of that sum, with exact zeros given the majority sign. Pass 2 reloads each
    specialist, re-trims it with the threshold saved in pass 1 (same float32 arithmetic,
    so the same mask), and accumulates the values agreeing with the elected sign and
    their count. Result: base + lam * (agreeing sum / count); entries nobody keeps get 0.

    Memory: one flat float32 accumulator, one reused flat float32 delta buffer, an int8
    sign vector, a small-integer count vector, transient per-specialist temporaries
    (|tau|, kthvalue's copy, boolean masks) and one loaded specialist: a handful of flat
    vectors, independent of k.
    """
    _check_k(k)
    _check_names(base, names)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density!r}")
    d = sum(base[n].numel() for n in names)
    device = base[names[0]].device
    tau = torch.empty(d, dtype=torch.float32, device=device)  # reused for every specialist
    acc = torch.zeros(d, dtype=torch.float32, device=device)

    # 1. trim each task vector and accumulate the signed sum
    thresholds: list[float] = []
    for i in range(k):
        sd = load(i)
        _flat_delta(sd, base, names, tau, f"specialist {i}")
        del sd
        thresholds.append(_trim_threshold(tau, density))
        acc += _trim_(tau, thresholds[-1])

    # 2. elect a sign per entry; exact zeros take the majority sign (reference `resolve_zero_signs`)
    sign = torch.sign(acc).to(torch.int8)
    majority = int(torch.sign(sign.sum()).item())
    sign[sign == 0] = majority
    positive = sign > 0
    del sign

    # 3. disjoint mean: per entry, average the trimmed values agreeing with the elected sign
    acc.zero_()
    count = torch.zeros(d, dtype=torch.uint8 if k < 256 else torch.int32, device=device)
    for i in range(k):
        sd = load(i)
        _flat_delta(sd, base, names, tau, f"specialist {i}")
        del sd
        _trim_(tau, thresholds[i])
        # reference `disjoint_merge`: where(sign > 0, tau > 0, tau < 0); zeros never agree
        agree = torch.where(positive, tau > 0, tau < 0)
        acc += tau.mul_(agree)
        count += agree
        del agree
    del tau, positive
    acc /= count.clamp_(min=1)
    del count
    acc *= lam

    out: dict[str, Tensor] = {}
    off = 0
    for n in names:
        m = base[n].numel()
        out[n] = base[n].float() + acc[off : off + m].view(base[n].shape)
        off += m
    return out


def merge(
    method: str, base: StateDict, load: Loader, k: int, names: list[str], density: float, lam: float
) -> dict[str, Tensor]:
    """Dispatch to one of MERGE_METHODS. weight_average ignores density and lam; task_arithmetic ignores density."""
    if method == "ties":
        return ties_merge(base, load, k, names, density=density, lam=lam)
    if method == "task_arithmetic":
        return task_arithmetic(base, load, k, names, lam)
    if method == "weight_average":
        return weight_average(base, load, k, names)
    raise ValueError(f"unknown merge method {method!r}; valid choices: {', '.join(MERGE_METHODS)}")


# ---------------------------------------------------------------------------------------
# BatchNorm recalibration
# ---------------------------------------------------------------------------------------


def recalibrate_bn(model: nn.Module, batches: Iterable[Tensor], device) -> int:
    """Re-estimate every BatchNorm's running statistics of a merged network; return images seen.

    Averaged weights do not match averaged (or base) running statistics, and a merged
    backbone's features collapse without this (DESIGN.md). Stats are reset and then
    re-estimated as a cumulative average (momentum=None) over `batches` (normalized float
    inputs; an (inputs, labels) pair is also accepted), in train mode under no_grad. Each
    layer's momentum is restored and the model is left in eval mode. No BN: returns 0.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    seen = 0
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every batch weighs the same
        model.train()
        with torch.no_grad():
            for x in batches:
                if isinstance(x, (tuple, list)):
                    x = x[0]
                x = x.to(device, non_blocking=True)
                model(x)
                seen += x.shape[0]
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval()
    if seen == 0:
        raise ValueError("recalibrate_bn got no batches: BatchNorm statistics were reset and not re-estimated")
    return seen
