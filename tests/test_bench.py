"""scripts/bench.py runs end to end on a tiny synthetic config and prints every table it promises.

Nothing here is timed: the benchmark's figures are read by people, not asserted.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_prints_groups_ratio_stages_and_throughput(bench, tmp_path, capsys):
    bench.main([
        "--config", str(REPO / "tests" / "configs" / "tiny.yaml"),
        "--synthetic", "--image-size", "16", "--train-images", "120", "--test-images", "40",
        "--limit-classes", "3", "--num-workers", "0",
        "--full-finetune-throughput", "--ff-steps", "1", "--keep", str(tmp_path),
    ])  # fmt: skip
    out = capsys.readouterr().out
    # one row per strategy group of the first three specialists, each with both sides and a ratio
    for group in ("head/none", "layer4/flip", "layer3/crop"):
        row = next(line for line in out.splitlines() if line.startswith(group))
        assert re.search(r"\d+\.\d\dx$", row), row
    ratio = float(re.search(r"training ratio, plain / engine as `train` runs it: ([\d.]+)x", out).group(1))
    assert ratio > 0
    # the stages of a whole run, with each strategy group's time under specialists
    for stage in ("train", "base", "specialists", "evaluate", "distill", "merge_ties", "correlate", "total (wall)"):
        assert re.search(rf"^\s+{re.escape(stage)}\s+[\d.]+s$", out, re.M), stage
    assert re.search(r"^\s+full/color \(3,8\)\s+[\d.]+s$", out, re.M)  # strategies cycle over the classes
    assert "run stopped" not in out
    assert re.search(r"full fine-tuning through the engine: resnet18 at 16px, batch 64, 1 steps: \d+ images/s", out)
    assert (tmp_path / "stages" / "report.md").exists()
