import numpy as np
import pytest
import torch

from ensemble_delta.deltas import BLOCKS, HIST_EDGES, abs_histogram, block_of, block_stats, delta_stats, flat_delta
from ensemble_delta.errors import UserError


def _numpy_stats(d: np.ndarray) -> dict:
    d64 = d.astype(np.float64)
    return {"mean_abs": np.abs(d64).mean(), "var": d64.var(), "q95_abs": float(np.quantile(np.abs(d), 0.95))}


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "conv1.weight": (4, 3, 3, 3), "bn1.weight": (4,), "bn1.bias": (4,),
        "layer1.0.conv1.weight": (4, 4, 1, 1), "layer2.0.bn2.bias": (8,),
        "layer3.1.conv2.weight": (8, 8, 3, 3), "layer4.2.downsample.0.weight": (16, 8, 1, 1),
    }  # fmt: skip
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize(
    "name, block",
    [("conv1.weight", "stem"), ("bn1.bias", "stem"), ("layer1.0.conv1.weight", "layer1"),
     ("layer3.0.conv1.weight", "layer3"), ("layer4.2.downsample.1.running_mean", "layer4"),
     ("fc.weight", "head"), ("fc.bias", "head"), ("heads.3.weight", "head")],
)  # fmt: skip
def test_block_of(name, block):
    assert block_of(name) == block


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 20_001])
def test_delta_stats_match_numpy(n):
    d = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-3
    got = delta_stats(d)
    want = _numpy_stats(d.numpy())
    assert got["n_params"] == n and isinstance(got["n_params"], int)
    assert all(isinstance(got[k], float) for k in want)
    assert got["mean_abs"] == pytest.approx(want["mean_abs"], rel=1e-12)
    assert got["var"] == pytest.approx(want["var"], rel=1e-12, abs=1e-300)
    assert got["q95_abs"] == want["q95_abs"]  # bit-exact: numpy's linear interpolation


def test_delta_stats_above_torch_quantile_limit():
    # torch.quantile refuses more than 2^24 elements; ResNet50 has 23.5M backbone values.
    n = 2**24 + 3
    d = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 1e-3
    got = delta_stats(d)
    a = np.abs(d.numpy())
    assert got["n_params"] == n
    assert got["q95_abs"] == float(np.quantile(a, 0.95))
    # Independent check of the interpolation through torch.kthvalue (1-based ranks).
    h = (n - 1) * 0.95
    lo = int(np.floor(h))
    v_lo = torch.kthvalue(d.abs(), lo + 1).values.item()
    v_hi = torch.kthvalue(d.abs(), lo + 2).values.item()
    assert got["q95_abs"] == pytest.approx(v_lo + (h - lo) * (v_hi - v_lo), rel=1e-6)
    assert got["mean_abs"] == pytest.approx(a.mean(dtype=np.float64), rel=1e-12)
    assert got["var"] == pytest.approx(d.double().var(correction=0).item(), rel=1e-12)


def test_delta_stats_all_zero():
    got = delta_stats(torch.zeros(5000))
    assert got == {"n_params": 5000, "mean_abs": 0.0, "var": 0.0, "q95_abs": 0.0}


def test_flat_delta_order_and_dtype():
    base = _state(0)
    tuned = {k: v + 0.5 * torch.randn_like(v) for k, v in base.items()}
    names = ["layer3.1.conv2.weight", "conv1.weight", "bn1.bias"]
    d = flat_delta(base, tuned, names)
    assert d.dtype == torch.float32 and d.ndim == 1
    assert torch.equal(d, torch.cat([(tuned[n] - base[n]).flatten() for n in names]))


def test_flat_delta_float64_subtracts_before_cast():
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    tuned = {"w": torch.tensor([1.0 + 1e-12, 2.0], dtype=torch.float64)}
    d = flat_delta(base, tuned, ["w"])
    assert d.dtype == torch.float32 and d[0].item() == pytest.approx(1e-12, rel=1e-3) and d[1].item() == 0.0


def test_flat_delta_missing_key_and_shape():
    base = _state(0)
    tuned = dict(base)
    del tuned["bn1.bias"]
    with pytest.raises(UserError, match="bn1.bias") as err:
        flat_delta(base, tuned, ["conv1.weight", "bn1.bias"])
    assert "\n" not in str(err.value)
    tuned = dict(base, **{"bn1.bias": torch.zeros(5)})
    with pytest.raises(UserError, match="bn1.bias"):
        flat_delta(base, tuned, ["bn1.bias"])


def test_block_stats_partition_the_delta():
    base = _state(0)
    tuned = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    tuned["layer1.0.conv1.weight"] = base["layer1.0.conv1.weight"].clone()  # frozen block: delta 0
    names = list(base)
    rows = block_stats(base, tuned, names)
    assert [r["block"] for r in rows] == list(BLOCKS)
    assert sum(r["n_params"] for r in rows) == delta_stats(flat_delta(base, tuned, names))["n_params"]
    layer1 = rows[1]
    assert layer1["mean_abs"] == layer1["var"] == layer1["q95_abs"] == 0.0
    stem = flat_delta(base, tuned, ["conv1.weight", "bn1.weight", "bn1.bias"])
    assert rows[0] == {"block": "stem", **delta_stats(stem)}


def test_abs_histogram_counts_everything():
    d = np.array([0.0, -0.0, 1e-12, -3e-4, 3e-4, 1e-3, 50.0, -1e-10, float(HIST_EDGES[-1])], dtype=np.float64)
    h = abs_histogram(torch.from_numpy(d))
    assert h["zero"] == 2 and h["below"] == 1 and h["above"] == 2
    assert h["zero"] + h["below"] + h["counts"].sum() + h["above"] == d.size
    assert len(h["counts"]) == len(HIST_EDGES) - 1
    # Bins are [e_i, e_{i+1}): 1e-10 is the first edge and lands in bin 0.
    assert h["counts"][0] == 1
    i = np.searchsorted(HIST_EDGES, 3e-4, side="right") - 1
    assert h["counts"][i] == 2


def test_abs_histogram_matches_numpy_histogram():
    d = torch.randn(50_000, generator=torch.Generator().manual_seed(1)) * 1e-3
    h = abs_histogram(d)
    a = np.abs(d.numpy()).astype(np.float64)
    want, _ = np.histogram(a[(a >= HIST_EDGES[0]) & (a < HIST_EDGES[-1])], bins=HIST_EDGES)
    assert np.array_equal(h["counts"], want)
    assert h["zero"] + h["below"] + h["counts"].sum() + h["above"] == d.numel()
