"""A user error on the command line: one line on stderr, status 2, no traceback, nothing computed lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ensemble_delta.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every command runs in an empty folder: no results/ pointer, no configs/ of the repository's cwd."""
    monkeypatch.chdir(tmp_path)


def user_error(args: list[str], *fragments: str) -> str:
    """Invoke the CLI; check it failed as a user error should, and return its one stderr line."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata:\n  name: mnist\n root: data\n")  # `root` is indented by one space
    user_error(["train", "--config", str(path)], str(path), "malformed YAML at line 4", "indentation")


def test_unknown_key(write_config):
    path = write_config({"data": {"foo": 1}})
    user_error(["train", "--config", str(path)], "data.foo: unknown key", "image_size")


def test_bad_value(write_config):
    path = write_config({"strategies": [{"freeze": "layers"}]})
    user_error(["run", "--config", str(path)], "strategies[0].freeze", "head, layer4, layer3, full")


def test_unknown_dataset():
    user_error(["train", "--dataset", "nope"], "unknown dataset 'nope'", "mnist-subset", "--config")


def test_dataset_and_config_together(write_config):
    user_error(["train", "--dataset", "mnist-subset", "--config", str(write_config())], "either --dataset or --config")


def test_missing_config_file(tmp_path):
    user_error(["train", "--config", str(tmp_path / "absent.yaml")], "absent.yaml not found")


def test_missing_data(tmp_path, write_config):
    path = write_config({"data": {"name": "mnist", "root": str(tmp_path / "empty"), "download": False}})
    user_error(["train", "--config", str(path)], "MNIST not found under", "data.download: true")


def test_unreadable_image(write_config, folder_tree):
    bad = folder_tree / "val" / "emu" / "emu_1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    path = write_config({"num_classes": 3, "data": {"name": "folder", "root": str(folder_tree)}})
    user_error(["train", "--config", str(path)], f"cannot decode image {bad}", "remove or replace the file")


@pytest.mark.parametrize("command", ["evaluate", "correlate", "report"])
def test_later_stage_on_a_directory_that_is_not_a_run(tmp_path, command):
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "notes.txt").write_text("mine\n")
    user_error([command, "--out", str(tmp_path / "notarun")], "notarun")
    assert sorted(p.name for p in (tmp_path / "notarun").iterdir()) == ["notes.txt"]


def test_evaluate_not_a_run_says_so(tmp_path):
    (tmp_path / "notarun").mkdir()
    user_error(["evaluate", "--out", str(tmp_path / "notarun")], "is not a run directory", "ensemble-delta train")


def test_evaluate_before_any_training():
    user_error(["evaluate"], "no run found", "run `ensemble-delta train` first")


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_run(tmp_path):
    """A run directory with earlier work in it: a config, a specialist, a table."""
    run = tmp_path / "results" / "earlier"
    (run / "specialists").mkdir(parents=True)
    (run / "config.yaml").write_text("# the config the specialists below were trained with\nname: earlier\n")
    (run / "specialists" / "class_0.safetensors").write_bytes(b"weights that took an hour")
    (run / "metrics.csv").write_text("method,class\nensemble,0\n")
    return run


def test_bad_config_keeps_an_existing_run(existing_run, write_config):
    before = _snapshot(existing_run)
    path = write_config({"merge": {"density": 0}})
    user_error(["train", "--config", str(path), "--out", str(existing_run)], "merge.density")
    user_error(["run", "--config", str(path), "--out", str(existing_run), "--force"], "merge.density")
    assert _snapshot(existing_run) == before


def test_missing_data_keeps_an_existing_run(tmp_path, existing_run, write_config):
    before = _snapshot(existing_run)
    path = write_config({"data": {"name": "mnist", "root": str(tmp_path / "empty"), "download": False}})
    user_error(["train", "--config", str(path), "--out", str(existing_run)], "MNIST not found")
    assert _snapshot(existing_run) == before


def test_console_script_prints_no_traceback(tmp_path, write_config):
    """One real process: what reaches a terminal is one line and status 2, not a Python traceback."""
    script = Path(sys.executable).parent / "ensemble-delta"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ensemble_delta.cli"]
    path = write_config({"data": {"name": "mnist", "root": str(tmp_path / "empty"), "download": False}})
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run(
        [*cmd, "train", "--config", str(path), "--out", str(tmp_path / "run")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MNIST not found under"), proc.stderr
