"""Weight deltas of a fine-tuned specialist against its base, and their statistics.

delta = tuned - base over the parameters the two share (the backbone; the new head is
excluded by the caller through `names`). Buffers such as BatchNorm running statistics
are not parameters and must not be passed in `names`.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import UserError

BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4")

# Log-spaced bins for |delta|: 6 per decade from 1e-10 to 10 (66 bins). Fine-tuning
# deltas sit around 1e-6..1e-2; the wide range keeps float32 rounding noise (~1e-9)
# and divergent runs visible instead of clipped.
HIST_EDGES = np.logspace(-10, 1, 67)

# Histogram chunk size: bounds the float64/int64 temporaries to ~32 MiB each
# whatever the model size (ResNet50 has 23.5M backbone values).
_CHUNK = 1 << 22


def block_of(name: str) -> str:
    """The ResNet block a torchvision parameter name belongs to: stem, layer1..4 or head."""
    first = name.split(".", 1)[0]
    if first in ("conv1", "bn1"):
        return "stem"
    if first in BLOCKS:
        return first
    return "head"


def flat_delta(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """float32 1-D concatenation of (tuned[n] - base[n]).flatten() over `names`, in order (on CPU)."""
    for n in names:
        for label, sd in (("base", base), ("fine-tuned", tuned)):
            if n not in sd:
                raise UserError(f"parameter {n!r} is missing from the {label} weights: were both saved from the same architecture?")
        if base[n].shape != tuned[n].shape:
            raise UserError(
                f"parameter {n!r} has shape {tuple(tuned[n].shape)} in the fine-tuned weights but "
                f"{tuple(base[n].shape)} in the base: were both saved from the same architecture?"
            )
    sizes = [base[n].numel() for n in names]
    # Fill one preallocated vector instead of torch.cat, so peak memory is one delta
    # (94 MB for ResNet50) rather than two.
    out = torch.empty(sum(sizes), dtype=torch.float32)
    start = 0
    for n, size in zip(names, sizes):
        b, t = base[n].detach(), tuned[n].detach()
        # Subtract in the wider dtype (float64 checkpoints keep their precision), then cast.
        dtype = torch.promote_types(torch.promote_types(b.dtype, t.dtype), torch.float32)
        d = t.to(dtype) - b.to(device=t.device, dtype=dtype)
        out[start : start + size] = d.flatten().to("cpu", torch.float32)
        start += size
    return out


def _numpy(delta: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(delta, torch.Tensor):
        delta = delta.detach().to("cpu")
        if delta.dtype not in (torch.float32, torch.float64):
            delta = delta.float()  # numpy has no bfloat16
        delta = delta.numpy()
    return np.asarray(delta).reshape(-1)


def delta_stats(delta: torch.Tensor | np.ndarray) -> dict:
    """n_params, mean_abs = E|d|, var = population Var(d), q95_abs = 95th percentile of |d|.

    Sums run in float64 (a float32 running sum over 23.5M values loses ~3 digits).
    q95_abs is numpy.quantile's linear interpolation, exactly: torch.quantile refuses
    inputs above 2^24 elements, and ResNet50's backbone has 23.5M.
    """
    d = _numpy(delta)
    n = int(d.size)
    if n == 0:
        nan = float("nan")
        return {"n_params": 0, "mean_abs": nan, "var": nan, "q95_abs": nan}
    a = np.abs(d)
    mean_abs = float(a.mean(dtype=np.float64))
    var = float(np.var(d, dtype=np.float64))
    # `a` is our own copy, so let quantile partition it in place (no second copy).
    q95 = float(np.quantile(a, 0.95, overwrite_input=True))
    return {"n_params": n, "mean_abs": mean_abs, "var": var, "q95_abs": q95}


def block_stats(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], names: list[str]) -> list[dict]:
    """delta_stats per block present in `names` (stem, layer1..4, then head), one row each."""
    by_block: dict[str, list[str]] = {}
    for n in names:
        by_block.setdefault(block_of(n), []).append(n)
    order = [b for b in (*BLOCKS, "head") if b in by_block]
    return [{"block": b, **delta_stats(flat_delta(base, tuned, by_block[b]))} for b in order]


def abs_histogram(delta: torch.Tensor | np.ndarray) -> dict:
    """Counts of |delta| on HIST_EDGES, for a log-scale distribution plot.

    zero: exactly 0 (frozen parameters; a log axis cannot show them); below: 0 < |d| <
    HIST_EDGES[0]; counts[i]: HIST_EDGES[i] <= |d| < HIST_EDGES[i+1]; above: |d| >=
    HIST_EDGES[-1] (NaN counts here too). The four parts add up to delta's size.
    """
    d = _numpy(delta)
    nb = len(HIST_EDGES)
    tally = np.zeros(nb + 1, dtype=np.int64)
    zero = 0
    for i in range(0, d.size, _CHUNK):
        a = np.abs(d[i : i + _CHUNK]).astype(np.float64)
        zero += int(np.count_nonzero(a == 0))
        # side="right": index j means HIST_EDGES[j-1] <= a < HIST_EDGES[j]; NaN sorts last.
        tally += np.bincount(np.searchsorted(HIST_EDGES, a, side="right"), minlength=nb + 1)
    return {"zero": zero, "below": int(tally[0]) - zero, "counts": tally[1:nb], "above": int(tally[nb])}
