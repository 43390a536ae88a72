"""Figures from a fake run directory whose tables come from the real metric and statistics functions."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from ensemble_delta import config as cfgmod
from ensemble_delta import figures
from ensemble_delta.deltas import BLOCKS, HIST_EDGES, abs_histogram, delta_stats
from ensemble_delta.metrics import METRIC_COLUMNS, SUMMARY_COLUMNS, combined_rows, specialist_rows, specialist_summary
from ensemble_delta.paths import RunPaths
from ensemble_delta.statistics import CORRELATION_COLUMNS, STATS, correlation_rows
from ensemble_delta.storage import read_csv, write_csv, write_json

DPI = 30  # tests check files, not looks
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DELTA_COLUMNS = ["model", "class", "freeze", "augment", "n_params", "mean_abs", "var", "q95_abs"]
BLOCK_COLUMNS = ["model", "class", "block", "n_params", "mean_abs", "var", "q95_abs"]
HIST_COLUMNS = ["model", "bin_low", "bin_high", "count"]
BLOCK_SIZES = {"stem": 60, "layer1": 120, "layer2": 180, "layer3": 240, "layer4": 300}
TRAINED = {"head": (), "layer4": ("layer4",), "layer3": ("layer3", "layer4"), "full": BLOCKS}
STRATEGIES = [  # two head-only specialists: their deltas are exactly zero
    {"freeze": "head", "augment": []}, {"freeze": "head", "augment": ["flip"]},
    {"freeze": "layer4", "augment": []}, {"freeze": "layer4", "augment": ["crop"]},
    {"freeze": "layer3", "augment": ["color"]}, {"freeze": "layer3", "augment": ["flip", "crop"], "optimizer": "adamw", "lr": 0.001},
    {"freeze": "full", "augment": []}, {"freeze": "full", "augment": ["crop", "color"]},
    {"freeze": "full", "augment": ["flip"]}, {"freeze": "full", "augment": ["color"]},
]  # fmt: skip
ALL_METHODS = {"ensemble": ("prob_norm", "mean_prob"), "ties": ("prob_norm",), "distill": ("prob_norm",)}
NAN_METHOD = ("distill", "prob_norm")  # its gains are made identical for every class: all nine tests NaN


def _hist_rows(model: str, delta: np.ndarray) -> list[dict]:
    h = abs_histogram(delta)
    rows = [{"model": model, "bin_low": 0.0, "bin_high": 0.0, "count": h["zero"]},
            {"model": model, "bin_low": 0.0, "bin_high": float(HIST_EDGES[0]), "count": h["below"]}]  # fmt: skip
    rows += [{"model": model, "bin_low": float(lo), "bin_high": float(hi), "count": int(n)}
             for lo, hi, n in zip(HIST_EDGES[:-1], HIST_EDGES[1:], h["counts"])]  # fmt: skip
    rows.append({"model": model, "bin_low": float(HIST_EDGES[-1]), "bin_high": float("inf"), "count": h["above"]})
    return rows


def _delta(rng, freeze: str) -> dict[str, np.ndarray]:
    scale = 10 ** rng.uniform(-4, -2)
    return {b: (rng.standard_normal(n) * scale if b in TRAINED[freeze] else np.zeros(n)) for b, n in BLOCK_SIZES.items()}


def make_run(
    root: Path, name: str = "fake-a", seed: int = 0, methods: dict | None = None, blocks: bool = True
) -> Path:
    """A run directory with every table the figures and the report read, from random scores."""
    methods = ALL_METHODS if methods is None else methods
    rng = np.random.default_rng(seed)
    run = Path(root) / name
    paths = RunPaths(run)
    raw = {
        "name": name, "num_classes": 10,
        "data": {"name": "synthetic", "image_size": 32, "negatives": "balanced"},
        "model": {"arch": "resnet18", "weights": "pretrain"},
        "strategies": [{"optimizer": "sgd", "lr": 0.01, "epochs": 2, "batch_size": 64, **s} for s in STRATEGIES],
        "merge": {"ties_lambda": "auto", "task_arithmetic_lambda": 0.3},
        "eval": {"methods": list(methods), "rules": ["prob_norm", "logit_softmax", "mean_prob"]},
    }  # fmt: skip
    cfg = cfgmod.from_dict(raw)
    run.mkdir(parents=True)
    paths.config.write_text(cfgmod.to_yaml(cfg))
    write_json(paths.manifest, {
        "config_hash": cfgmod.config_hash(cfg), "versions": {"numpy": np.__version__, "ensemble_delta": "0.1.0"},
        "git": {"commit": "0123abcd", "dirty": True}, "device": "cpu (fake)",
        "timings": {"train": 12.5, "evaluate": 3.25, "correlate": 0.5}, "lambdas": {"ties": {"lambda": 0.7, "val_accuracy_per_lambda": {"0.5": 0.61, "0.7": 0.66, "1.0": 0.64}}},
        "seeds": {"split_seed": 0, "init_seed": 0},
    })  # fmt: skip

    # deltas: ten specialists and the student
    d_rows, b_rows, h_rows = [], [], []
    models = [(f"class_{c}", c, cfg.strategy(c)) for c in range(10)] + [("student", None, cfg.distill)]
    for model, c, st in models:
        parts = _delta(rng, st.freeze)
        flat = np.concatenate(list(parts.values()))
        d_rows.append({"model": model, "class": c, "freeze": st.freeze, "augment": "+".join(st.augment) or "none",
                       **delta_stats(flat)})  # fmt: skip
        b_rows += [{"model": model, "class": c, "block": b, **delta_stats(v)} for b, v in parts.items()]
        h_rows += _hist_rows(model, flat)
    write_csv(paths.deltas, d_rows, DELTA_COLUMNS)
    if blocks:
        write_csv(paths.deltas_blocks, b_rows, BLOCK_COLUMNS)
        write_csv(paths.deltas_hist, h_rows, HIST_COLUMNS)

    # scores -> metrics, summary, correlations
    n = 400
    labels = rng.permutation(np.arange(n) % 10)
    strength = rng.uniform(0.5, 3.0, size=10)
    z = strength * np.where(labels[:, None] == np.arange(10), 1.0, -1.0) + rng.standard_normal((n, 10)) * 1.5
    spec = specialist_rows(z, labels)
    m_rows, s_rows = list(spec), [specialist_summary(spec, z, labels)]
    for method, rules in methods.items():
        zm = z if method == "ensemble" else z + rng.standard_normal(z.shape) * 0.8
        for rule in rules:
            rows, summary = combined_rows(method, rule, zm, labels, spec)
            if (method, rule) == NAN_METHOD:
                for r in rows:
                    r.update(d_precision=0.0, d_f1=0.0, d_auc=0.0)
            m_rows += rows
            s_rows.append(summary)
    write_csv(paths.metrics, m_rows, METRIC_COLUMNS)
    write_csv(paths.summary, s_rows, SUMMARY_COLUMNS)
    write_csv(paths.correlations, correlation_rows(d_rows, m_rows, name), CORRELATION_COLUMNS)
    return run


def _is_png(p: Path) -> bool:
    data = Path(p).read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 2000


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"), "fake-a", seed=0)


def test_fake_run_has_the_cases_the_figures_must_survive(run_a):
    corr = read_csv(RunPaths(run_a).correlations)
    nan_rows = [r for r in corr if (r["method"], r["rule"]) == NAN_METHOD]
    assert len(nan_rows) == 9 and all(r["r"] != r["r"] and r["note"] for r in nan_rows)  # NaN r, with a note
    defined = [r for r in corr if r["method"] == "ensemble"]
    assert all(r["r"] == r["r"] for r in defined)  # head-only zeros do not make the statistics constant
    zeros = [r for r in read_csv(RunPaths(run_a).deltas) if r["freeze"] == "head"]
    assert len(zeros) == 2 and all(r[s] == 0 for r in zeros for s in STATS)


def test_make_figures_writes_a_png_for_every_method_and_rule(run_a):
    paths = RunPaths(run_a)
    written = figures.make_figures(run_a, dpi=DPI)
    pairs = figures.method_rules(read_csv(paths.correlations))
    expected = {figures.grid_png(paths.figures, m, r) for m, r in pairs}
    expected |= {paths.figures / "delta_distribution.png", paths.figures / "delta_blocks.png"}
    assert set(written) == expected and len(written) == len(pairs) + 2
    assert paths.figures / "grid_ensemble_prob_norm.png" in expected
    assert all(_is_png(p) for p in written)
    assert not [p for p in paths.figures.iterdir() if p.name.startswith(".tmp")]  # no half-written leftovers


def test_figures_drawn_in_workers_are_those_drawn_in_turn(run_a, tmp_path):
    """make_figures in two worker processes writes the same files, byte for byte, as in one process."""
    runs = {}
    for how in ("in_turn", "workers"):
        runs[how] = tmp_path / how / Path(run_a).name  # same run name: it is in every title
        shutil.copytree(run_a, runs[how], ignore=shutil.ignore_patterns("figures"))
    in_turn = figures.make_figures(runs["in_turn"], dpi=DPI, workers=1)
    workers = figures.make_figures(runs["workers"], dpi=DPI, workers=2)
    assert len(in_turn) >= figures.PARALLEL_FROM  # enough figures for the pool to start
    assert [p.name for p in workers] == [p.name for p in in_turn]
    for a, b in zip(in_turn, workers):
        assert _is_png(b) and a.read_bytes() == b.read_bytes(), b.name


def test_pair_figure_of_two_runs(tmp_path):
    one = {"ensemble": ("prob_norm",)}
    run_a = make_run(tmp_path, "small-a", seed=2, methods=one, blocks=False)
    run_b = make_run(tmp_path, "small-b", seed=1, methods=one, blocks=False)
    out = figures.pair_figure(run_a, run_b, tmp_path / "pair.png", dpi=DPI)
    assert _is_png(out)
    # no block or histogram tables: only the grid, and the pair named after the other run
    written = figures.make_figures(run_a, run_b, dpi=DPI)
    figs = RunPaths(run_a).figures
    assert written == [figs / "grid_ensemble_prob_norm.png", figs / "pair_small-b.png"]
    assert all(_is_png(p) for p in written)


def test_grid_of_nan_rows_and_missing_method(run_a, tmp_path):
    p = RunPaths(run_a)
    d, m, c = read_csv(p.deltas), read_csv(p.metrics), read_csv(p.correlations)
    assert _is_png(figures.grid_figure(d, m, c, *NAN_METHOD, tmp_path / "nan.png", dpi=DPI))
    # a (method, rule) absent from every table still draws (empty panels, "no correlation row")
    assert _is_png(figures.grid_figure(d, m, c, "weight_average", "prob_norm", tmp_path / "none.png", dpi=DPI))


def test_distribution_and_blocks_when_every_delta_is_zero(tmp_path):
    zero = np.zeros(500)
    hist = _hist_rows("class_0", zero) + _hist_rows("class_1", zero)
    assert _is_png(figures.delta_distribution_figure(hist, tmp_path / "h.png", dpi=DPI))
    blocks = [{"model": "class_0", "block": b, "mean_abs": 0.0, "q95_abs": 0.0} for b in BLOCKS]
    assert _is_png(figures.block_figure(blocks, tmp_path / "b.png", dpi=DPI))


def test_labels_and_names():
    assert figures.strategy_label("layer4", "crop") == "L4+crop"
    assert figures.strategy_label("head", "none") == "head"
    assert figures.strategy_label("full", "flip+color") == "full+flip+color"
    assert figures.model_labels([{"model": "class_3", "class": 3, "freeze": "layer3", "augment": "none"}]) == {"class_3": "3 L3"}
    assert figures.grid_png(Path("f"), "ties", "") == Path("f/grid_ties.png")
    ties, ens = [{"method": "ties", "rule": "mean_prob"}], [{"method": "ensemble", "rule": "prob_norm"}]
    assert figures.pair_choice(ties, ties) == ("ties", "mean_prob")
    assert figures.pair_choice(ties + ens, ens + ties) == ("ensemble", "prob_norm")
    assert figures.pair_choice(ties, ens) is None
