"""The stages as library functions: train, evaluate, correlate, report, run.

Each takes a config (or a run directory) and returns what it wrote; the CLI is a thin
layer over these, and tests call them directly.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import evaluation
from .config import Config, load_config
from .data import load_data
from .engine import data_on, resolve_runtime
from .errors import UserError
from .paths import LAST_POINTER, RunPaths
from .provenance import update_manifest, write_config
from .storage import read_csv, write_csv, write_text

DEFAULT_DATASET = "mnist-subset"
DEFAULT_OUT_ROOT = "results"  # the pointer to the last trained run lives here, whatever --out said
PACKAGE_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/ (editable install)


def config_for(dataset: str | None = None, config: str | Path | None = None, out: str | Path | None = None) -> Config:
    """Resolve --dataset / --config / --out into a validated Config."""
    if dataset and config:
        raise UserError("give either --dataset or --config, not both")
    if config is None:
        name = dataset or DEFAULT_DATASET
        candidates = [Path("configs") / f"{name}.yaml", PACKAGE_CONFIGS / f"{name}.yaml"]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            known = sorted({p.stem for d in (Path("configs"), PACKAGE_CONFIGS) if d.is_dir() for p in d.glob("*.yaml")})
            raise UserError(f"unknown dataset {name!r}: no configs/{name}.yaml; choose one of {', '.join(known) or 'none found'} or pass --config PATH")
        config = path
    cfg = load_config(config)
    if out is not None:
        out = Path(out)
        cfg.out_root, cfg.name = str(out.parent), out.name
    return cfg


def last_run() -> Path:
    pointer = Path(DEFAULT_OUT_ROOT) / LAST_POINTER
    if not pointer.exists():
        raise UserError(f"no run found ({pointer} is missing): run `ensemble-delta train` first, or pass --dataset/--config/--out")
    run = Path(pointer.read_text().strip())
    if not run.is_dir():
        raise UserError(f"{pointer} names {run}, which no longer exists: run `ensemble-delta train` again or pass --out")
    return run


def run_config(run_dir: str | Path) -> Config:
    """The resolved config a run was trained with (its config.yaml), pointing at that run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml): run `ensemble-delta train` first")
    cfg = load_config(run_dir / "config.yaml")
    cfg.out_root, cfg.name = str(run_dir.parent), run_dir.name
    return cfg


def train(cfg: Config, force: bool = False) -> RunPaths:
    """Base model, data cache and the specialists; resumes what an interrupted run left."""
    from .training import base_state, train_all

    paths = RunPaths(cfg.run_dir)
    t0 = time.perf_counter()
    rt = resolve_runtime(cfg.runtime)
    data = data_on(rt, load_data(cfg.data, cfg.num_classes))  # on the device once for pretraining and every group
    # only now that the data is there: a failed start must not overwrite an existing run's config
    paths.root.mkdir(parents=True, exist_ok=True)
    write_config(paths, cfg)
    print(f"train: {cfg.name} -> {paths.root} on {rt.device}; {len(data.train)} train, {len(data.val)} validation, {len(data.test)} test images of {cfg.data.image_size}px")
    t_data = time.perf_counter() - t0
    base_state(cfg, paths, data, rt, force=force)
    t_base = time.perf_counter() - t0 - t_data
    trained = train_all(cfg, paths, data, rt, force=force)
    write_text(Path(DEFAULT_OUT_ROOT) / LAST_POINTER, str(paths.root.resolve()) + "\n")
    seconds = time.perf_counter() - t0
    update_manifest(paths, cfg, "train", seconds, rt, timings={"data": t_data, "base": t_base, "specialists": seconds - t_data - t_base}, trained_now=trained)
    print(f"train: done in {seconds:.1f}s ({len(trained)} specialists trained now)")
    return paths


def evaluate(run_dir: str | Path, methods: list[str] | None = None, force: bool = False) -> RunPaths:
    cfg = run_config(run_dir)
    paths = RunPaths(cfg.run_dir)
    evaluation.evaluate(cfg, paths, methods, force=force)
    return paths


def correlate(run_dirs: list[str | Path]) -> list[RunPaths]:
    """correlations.csv (and figures) for each run; with two runs, the sign agreement of their fits."""
    from . import figures
    from .statistics import CORRELATION_COLUMNS, SIGN_COLUMNS, correlation_rows, sign_agreement_rows

    if not 1 <= len(run_dirs) <= 2:
        raise UserError(f"correlate takes one or two runs, got {len(run_dirs)}; pass --run A [--run B]")
    t0 = time.perf_counter()
    out = [RunPaths(Path(rd)) for rd in run_dirs]
    cfgs = [run_config(p.root) for p in out]  # also checks each is a run directory
    for paths, cfg in zip(out, cfgs):
        rows = correlation_rows(read_csv(paths.deltas), read_csv(paths.metrics), cfg.data.name)
        write_csv(paths.correlations, rows, CORRELATION_COLUMNS)
    if len(out) == 2:
        (a, b), (ca, cb) = out, cfgs
        rows = sign_agreement_rows(read_csv(a.correlations), read_csv(b.correlations), ca.data.name, cb.data.name)
        for p in out:
            write_csv(p.sign_agreement, rows, SIGN_COLUMNS)
    for i, (paths, cfg) in enumerate(zip(out, cfgs)):
        figures.make_figures(paths.root, out[1 - i].root if len(out) == 2 else None)
        update_manifest(paths, cfg, "correlate", time.perf_counter() - t0)
    return out


def report(run_dir: str | Path, other: str | Path | None = None) -> Path:
    from .reporting import write_report

    t0 = time.perf_counter()
    path = write_report(Path(run_dir), Path(other) if other else None)
    update_manifest(RunPaths(Path(run_dir)), run_config(run_dir), "report", time.perf_counter() - t0)
    return path


def run(cfg: Config, force: bool = False) -> RunPaths:
    """Every stage in order: train, evaluate, correlate, report."""
    t0 = time.perf_counter()
    paths = train(cfg, force=force)
    evaluate(paths.root, force=force)
    correlate([paths.root])
    report(paths.root)
    print(f"run: done in {time.perf_counter() - t0:.1f}s; report at {paths.report}")
    return paths
