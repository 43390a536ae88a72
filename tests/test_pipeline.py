"""End to end on the tiny config: every stage through the CLI, files, reproducibility,
resume after an interruption (simulated and a real kill -9), merges against an
independent reimplementation, and the multi-device worker path on the CPU."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ensemble_delta import pipeline
from ensemble_delta.cli import app
from ensemble_delta.data import load_data
from ensemble_delta.engine import resolve_runtime
from ensemble_delta.evaluation import specialist_logits
from ensemble_delta.metrics import METRIC_COLUMNS, SUMMARY_COLUMNS
from ensemble_delta.models import backbone_param_names, build
from ensemble_delta.paths import RunPaths
from ensemble_delta.statistics import CORRELATION_COLUMNS
from ensemble_delta.storage import read_csv, read_json

TINY = Path(__file__).parent / "configs" / "tiny.yaml"
K = 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory with the data cache shared by every test here."""
    d = tmp_path_factory.mktemp("work")
    old = os.getcwd()
    os.chdir(d)
    yield d
    os.chdir(old)


@pytest.fixture(scope="module")
def run_a(workdir):
    """The whole study on the tiny config through the CLI, exactly as a user types it."""
    result = CliRunner().invoke(app, ["run", "--config", str(TINY), "--out", str(workdir / "results" / "a")])
    assert result.exit_code == 0, result.output
    return RunPaths(workdir / "results" / "a")


def seed_base(src: RunPaths, dst: Path) -> RunPaths:
    """A fresh run directory that reuses a finished run's base (skips pretraining)."""
    p = RunPaths(dst)
    p.root.mkdir(parents=True)
    for f in (src.base, src.base_log):
        shutil.copy(f, p.root / f.name)
    return p


def test_run_writes_every_file(run_a):
    p = run_a
    for f in [p.config, p.manifest, p.base, p.deltas, p.deltas_blocks, p.deltas_hist, p.metrics, p.summary, p.correlations, p.report, p.student]:
        assert f.exists() and f.stat().st_size > 0, f
    for c in range(K):
        assert p.specialist(c).exists() and p.specialist_log(c).exists()
        log = read_json(p.specialist_log(c))
        assert len(log["loss_per_epoch"]) >= 1 and all(np.isfinite(log["loss_per_epoch"]))
        assert build("resnet18", 1).load_state_dict(load_file(p.specialist(c)))  # torchvision's key names
    for m in ["ties", "task_arithmetic", "weight_average"]:
        assert build("resnet18", K).load_state_dict(load_file(p.merged(m)))  # all ten heads included
    for m in ["specialists", "ties", "task_arithmetic", "weight_average", "distill", "labels"]:
        assert p.scores(m).exists()
    assert list(read_csv(p.metrics)[0]) == METRIC_COLUMNS
    assert list(read_csv(p.summary)[0]) == SUMMARY_COLUMNS
    assert list(read_csv(p.correlations)[0]) == CORRELATION_COLUMNS
    assert list(read_csv(p.deltas)[0])[:8] == ["model", "class", "freeze", "augment", "n_params", "mean_abs", "var", "q95_abs"]
    assert any(f.suffix == ".png" for f in p.figures.iterdir())
    manifest = read_json(p.manifest)
    assert set(manifest["timings"]) >= {"train", "evaluate", "correlate"}
    assert manifest["lambdas"]["task_arithmetic"]["lambda"] in (0.3, 1.0)  # auto, from the grid
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0] or manifest["versions"]["torch"].startswith(torch.__version__.split("+")[0])


def test_numbers_are_sensible(run_a):
    deltas = {r["model"]: r for r in read_csv(run_a.deltas)}
    assert deltas["class_0"]["mean_abs"] == 0.0  # head-only: the backbone is exactly the base
    assert deltas["class_3"]["mean_abs"] > 0 and deltas["student"]["mean_abs"] > 0
    assert deltas["class_0"]["n_params"] == 11_176_512  # resnet18 without its head
    summary = {(r["method"], r["rule"]): r for r in read_csv(run_a.summary)}
    assert summary[("ensemble", "prob_norm")]["accuracy10"] > 0.6  # tiny training, still far above chance
    rows = read_csv(run_a.correlations)
    methods = {r["method"] for r in rows}
    assert methods == {"ensemble", "ties", "task_arithmetic", "weight_average", "distill"}
    assert len(rows) == 5 * 3 * 3 * 3  # methods x rules x metrics x statistics


def test_same_seed_gives_identical_tables(run_a, workdir):
    b = pipeline.run(pipeline.config_for(config=TINY, out=workdir / "results" / "b"))
    for name in ["deltas.csv", "metrics.csv", "correlations.csv", "summary.csv"]:
        assert (run_a.root / name).read_bytes() == (b.root / name).read_bytes(), name


def test_later_stages_find_the_last_run(run_a, workdir):
    # `train` wrote results/LAST; evaluate with no arguments acts on it and says which
    result = CliRunner().invoke(app, ["correlate"])
    assert result.exit_code == 0, result.output
    assert "using the last trained run" in result.output


def test_rerun_skips_completed_work(run_a):
    before = {c: run_a.specialist(c).stat().st_mtime_ns for c in range(K)}
    paths = pipeline.train(pipeline.run_config(run_a.root))
    assert read_json(paths.manifest)["trained_now"] == []
    assert before == {c: run_a.specialist(c).stat().st_mtime_ns for c in range(K)}


def test_rerun_of_every_stage_rewrites_no_table_and_redraws_no_figure(run_a, workdir, monkeypatch):
    """`run` again on a finished run: nothing is trained, scored or recomputed from the checkpoints,
    and the tables and figures keep their files (mtimes included); --force redoes the delta tables."""
    from ensemble_delta import evaluation

    p = RunPaths(workdir / "results" / "rerun")
    shutil.copytree(run_a.root, p.root)  # copies keep their relative ages (copy2 keeps mtimes)
    kept = [p.deltas, p.deltas_blocks, p.deltas_hist, p.metrics, p.summary, p.correlations, *sorted(p.figures.iterdir())]
    before = {f: f.stat().st_mtime_ns for f in kept}
    calls = []
    real = evaluation.delta_tables
    monkeypatch.setattr(evaluation, "delta_tables", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipeline.run(pipeline.run_config(p.root))
    assert calls == []  # the delta tables were current: no checkpoint was read again
    assert {f: f.stat().st_mtime_ns for f in kept} == before
    deltas = p.deltas.read_bytes()
    pipeline.evaluate(p.root, methods=["ensemble"], force=True)
    assert calls == [1] and p.deltas.read_bytes() == deltas  # recomputed, same numbers


def test_resume_after_simulated_crash(run_a, workdir):
    """A half-written checkpoint without its marker, and a stray temp file, are redone; the rest are not."""
    p = RunPaths(workdir / "results" / "crash")
    shutil.copytree(run_a.root, p.root)
    p.specialist_log(3).unlink()  # crashed before the marker
    p.specialist(3).write_bytes(p.specialist(3).read_bytes()[:1000])  # and mid-write
    (p.root / "specialists" / ".tmp-class_7.safetensors-abc").write_bytes(b"partial")
    before = {c: p.specialist(c).stat().st_mtime_ns for c in range(K) if c != 3}
    pipeline.train(pipeline.run_config(p.root))
    assert read_json(p.manifest)["trained_now"] == [3]
    assert before == {c: p.specialist(c).stat().st_mtime_ns for c in range(K) if c != 3}
    assert build("resnet18", 1).load_state_dict(load_file(p.specialist(3)))
    # a changed strategy retrains only the specialists it concerns
    cfg = pipeline.run_config(p.root)
    cfg.strategies[4].lr = 0.002  # classes 4 and 9
    pipeline.train(cfg)
    assert read_json(p.manifest)["trained_now"] == [4, 9]


def test_resume_after_kill_9(run_a, workdir):
    """Kill training for real mid-way; the rerun redoes only the unfinished specialists."""
    p = seed_base(run_a, workdir / "results" / "killed")
    cmd = [sys.executable, "-m", "ensemble_delta.cli", "train", "--config", str(TINY), "--out", str(p.root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.specialist_log(c).exists() for c in range(K)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [c for c in range(K) if p.specialist_log(c).exists()]
    assert 0 < len(done) < K, "the kill should land after the first group and before the last"
    for c in done:  # every marked checkpoint is complete and loads
        assert build("resnet18", 1).load_state_dict(load_file(p.specialist(c)))
    before = {c: p.specialist(c).stat().st_mtime_ns for c in done}
    pipeline.train(pipeline.config_for(config=TINY, out=p.root))
    assert sorted(read_json(p.manifest)["trained_now"]) == sorted(set(range(K)) - set(done))
    assert before == {c: p.specialist(c).stat().st_mtime_ns for c in done}


def _dense_ties(taus: np.ndarray, density: float) -> np.ndarray:
    """TIES-Merging written out densely in numpy, independent of merging.py."""
    k, d = taus.shape
    keep = max(1, int(d * density))
    trimmed = np.zeros_like(taus)
    for i in range(k):
        thr = np.sort(np.abs(taus[i]))[d - keep]
        trimmed[i] = np.where(np.abs(taus[i]) >= thr, taus[i], 0)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum()) or 1.0
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    return np.where(agree, trimmed, 0).sum(0) / np.maximum(agree.sum(0), 1)


def test_merged_parameters_match_an_independent_reimplementation(run_a):
    cfg = pipeline.run_config(run_a.root)
    names = backbone_param_names(build("resnet18", 1))
    base = load_file(run_a.base)
    flat = lambda sd: np.concatenate([sd[n].double().numpy().ravel() for n in names])
    b = flat(base)
    taus = np.stack([flat(load_file(run_a.specialist(c))) - b for c in range(K)]).astype(np.float32)
    lambdas = read_json(run_a.manifest)["lambdas"]
    expected = {
        "weight_average": b + taus.astype(np.float64).mean(0),
        "task_arithmetic": b + lambdas["task_arithmetic"]["lambda"] * taus.astype(np.float64).sum(0),
        "ties": b + cfg.merge.ties_lambda * _dense_ties(taus, cfg.merge.density),
    }
    for method, want in expected.items():
        got = flat(load_file(run_a.merged(method)))
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=method)
    # the heads are the specialists' own, stacked
    merged = load_file(run_a.merged("ties"))
    for c in range(K):
        assert torch.equal(merged["fc.weight"][c], load_file(run_a.specialist(c))["fc.weight"][0])


def test_two_worker_processes_give_the_same_specialists(run_a, workdir):
    """The multi-GPU path (one worker process per device), run here with two CPU workers."""
    cfg = pipeline.config_for(config=TINY, out=workdir / "results" / "two")
    cfg.runtime.devices = 2
    seed_base(run_a, cfg.run_dir)
    paths = pipeline.train(cfg)
    assert sorted(read_json(paths.manifest)["trained_now"]) == list(range(K))
    rt = resolve_runtime(cfg.runtime)
    images = load_data(cfg.data, K).test.images
    z_one = specialist_logits(cfg, run_a, images, rt)
    z_two = specialist_logits(cfg, paths, images, rt)
    for c in range(K):
        one, two = load_file(run_a.specialist(c)), load_file(paths.specialist(c))
        assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in two.items()}
        assert read_json(paths.specialist_log(c))["config_hash"] == read_json(run_a.specialist_log(c))["config_hash"]
        # the same computation up to float noise: the workers run 1 thread each, the reference 2, and
        # AdamW (class 4 and 9) turns summation-order noise in near-zero gradients into lr-sized steps
        if cfg.strategy(c).optimizer == "sgd":
            for k in one:
                assert torch.allclose(one[k].float(), two[k].float(), atol=1e-3, rtol=1e-3), (c, k)
        agree = ((z_one[:, c] > 0) == (z_two[:, c] > 0)).float().mean()
        assert agree > 0.97, (c, agree)


def test_every_correlation_recomputes_with_scipy(run_a):
    """Each row of correlations.csv, from deltas.csv and metrics.csv alone, with scipy."""
    from scipy import stats

    deltas = {r["class"]: r for r in read_csv(run_a.deltas) if r["model"].startswith("class_")}
    metrics = read_csv(run_a.metrics)
    checked = 0
    for row in read_csv(run_a.correlations):
        pts = [(deltas[m["class"]][row["stat"]], m["d_" + row["metric"]]) for m in metrics if m["method"] == row["method"] and (m["rule"] or "") == (row["rule"] or "")]
        x, y = map(np.array, zip(*pts))
        assert row["n"] == len(x) == K
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            assert np.isnan(row["r"]) and row["note"]
            continue
        r, p = stats.pearsonr(x, y)
        fit = stats.linregress(x, y)
        rho, sp = stats.spearmanr(x, y)
        np.testing.assert_allclose([row["r"], row["p"], row["slope"], row["intercept"], row["spearman_rho"], row["spearman_p"]], [r, p, fit.slope, fit.intercept, rho, sp], rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked >= 100  # most of the 135 tests are defined on this run
