"""provenance.git_state: the commit, and `dirty` for changes to the code, not to the outputs folder."""

import shutil
import subprocess

import pytest

from ensemble_delta.provenance import git_state

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "run").mkdir(parents=True)
    (tmp_path / "results" / "run" / "metrics.csv").write_text("a\n1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "start")
    return tmp_path


def test_clean_then_outputs_rewritten_then_code_changed(repo):
    outputs = repo / "results"
    clean = git_state(outputs, repo=repo / "src")
    assert clean["dirty"] is False and len(clean["commit"]) == 40
    (outputs / "run" / "metrics.csv").write_text("a\n2\n")  # a rerun rewrote the reference outputs
    assert git_state(outputs, repo=repo / "src")["dirty"] is False
    assert git_state(None, repo=repo / "src")["dirty"] is True  # without the exclusion they count
    (repo / "src" / "code.py").write_text("x = 2\n")
    assert git_state(outputs, repo=repo / "src")["dirty"] is True


def test_outputs_outside_the_repository_and_no_repository(repo, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    assert git_state(elsewhere, repo=repo)["dirty"] is False
    assert git_state(None, repo=elsewhere) == {"commit": None, "dirty": None}
