"""Every path of a run directory, computed in exactly one place.

The skip-if-done check and the writer both ask this module, so they can never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LAST_POINTER = "LAST"  # results/LAST names the run that `train` last wrote


@dataclass(frozen=True)
class RunPaths:
    root: Path

    # provenance
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    # weights
    @property
    def base(self) -> Path:
        return self.root / "base.safetensors"

    @property
    def base_log(self) -> Path:
        return self.root / "base.json"

    def specialist(self, c: int) -> Path:
        return self.root / "specialists" / f"class_{c}.safetensors"

    def specialist_log(self, c: int) -> Path:
        return self.root / "specialists" / f"class_{c}.json"

    def merged(self, method: str) -> Path:
        return self.root / "merged" / f"{method}.safetensors"

    @property
    def student(self) -> Path:
        return self.root / "student.safetensors"

    @property
    def student_log(self) -> Path:
        return self.root / "student.json"

    # scores
    def scores(self, method: str) -> Path:
        """Test log-odds [N, K] of a method (`specialists` for the ten specialists)."""
        return self.root / "scores" / f"{method}.safetensors"

    @property
    def teacher_train(self) -> Path:
        """The specialists' log-odds on the training split: the distillation teacher."""
        return self.root / "scores" / "teacher_train.safetensors"

    @property
    def scores_done(self) -> Path:
        return self.root / "scores" / "done.json"

    # tables
    @property
    def deltas(self) -> Path:
        return self.root / "deltas.csv"

    @property
    def deltas_blocks(self) -> Path:
        return self.root / "deltas_blocks.csv"

    @property
    def deltas_hist(self) -> Path:
        return self.root / "deltas_hist.csv"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.csv"

    @property
    def correlations(self) -> Path:
        return self.root / "correlations.csv"

    @property
    def sign_agreement(self) -> Path:
        return self.root / "sign_agreement.csv"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def is_done(marker: Path, config_hash: str) -> bool:
    """A stage's output is complete when its marker (written last) records the same config hash."""
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("config_hash") == config_hash
    except (json.JSONDecodeError, OSError):
        return False  # a marker we cannot read is not a completion
