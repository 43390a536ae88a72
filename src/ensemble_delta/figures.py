"""Figures of a run: pure functions of the tables earlier stages wrote, so they regenerate without a GPU.

Every figure is drawn on a bare matplotlib Figure (no pyplot: no global state, no GUI
backend, nothing to close) and saved through storage.atomic_path, so a crash never
leaves a half-written PNG that looks complete. Figure file names inside figures/ are
computed by the *_png functions below, which the report uses too.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .paths import RunPaths
from .statistics import GAINS, STATS
from .storage import atomic_path, newer_than, read_csv, usable_cores

STAT_LABELS = {"mean_abs": "E|Δ|", "var": "Var(Δ)", "q95_abs": "Q95|Δ|"}
GAIN_LABELS = {"precision": "Δ precision", "f1": "Δ F1", "auc": "Δ AUC"}
FREEZE_SHORT = {"head": "head", "layer4": "L4", "layer3": "L3", "full": "full"}
FREEZE_COLORS = {"head": "tab:gray", "layer4": "tab:blue", "layer3": "tab:green", "full": "tab:red"}
BLOCK_ORDER = ("stem", "layer1", "layer2", "layer3", "layer4", "head")
DPI = 150  # readable on screen and in a PDF; tests pass less


# ----------------------------------------------------------------------------- names


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def grid_png(fig_dir: Path, method: str, rule: str) -> Path:
    return Path(fig_dir) / (f"grid_{_safe(method)}_{_safe(rule)}.png" if rule else f"grid_{_safe(method)}.png")


def pair_png(fig_dir: Path, other_name: str) -> Path:
    return Path(fig_dir) / f"pair_{_safe(other_name)}.png"


def distribution_png(fig_dir: Path) -> Path:
    return Path(fig_dir) / "delta_distribution.png"


def blocks_png(fig_dir: Path) -> Path:
    return Path(fig_dir) / "delta_blocks.png"


# ----------------------------------------------------------------------------- table helpers


def num(v) -> float:
    """A table cell as float: None (an empty CSV cell) and text become NaN."""
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError):
        return math.nan


def rule_of(row: dict) -> str:
    v = row.get("rule")
    return "" if v is None else str(v)


def class_of(row: dict) -> int | None:
    """The class of a deltas row (`class` cell, else the class_<c> model name); None for the student."""
    c = row.get("class")
    if c is None:
        model = str(row.get("model", ""))
        c = model.removeprefix("class_") if model.startswith("class_") else None
    try:
        return None if c is None else int(c)
    except (TypeError, ValueError):
        return None


def strategy_label(freeze, augment) -> str:
    """Short strategy tag: freeze and augmentations, e.g. "L4+crop", "full", "head+flip"."""
    parts = [FREEZE_SHORT.get(str(freeze), str(freeze))]
    aug = "" if augment is None else str(augment)
    if aug and aug != "none":
        parts.append(aug)
    return "+".join(parts)


def method_rules(corr_rows: list[dict]) -> list[tuple[str, str]]:
    """The (method, rule) pairs of correlations.csv, in order of first appearance."""
    return list(dict.fromkeys((str(r["method"]), rule_of(r)) for r in corr_rows))


def run_name(run_dir: str | Path) -> str:
    """The dataset/run name: config.yaml's `name`, else the directory name."""
    p = RunPaths(Path(run_dir)).config
    if p.exists():
        cfg = yaml.safe_load(p.read_text()) or {}
        if isinstance(cfg, dict) and cfg.get("name"):
            return str(cfg["name"])
    return Path(run_dir).resolve().name


def dataset_of(corr_rows: list[dict], fallback: str) -> str:
    """The `dataset` column of correlations.csv (the pipeline labels sign agreement with it), else fallback."""
    names = [str(r["dataset"]) for r in corr_rows if r.get("dataset") is not None]
    return names[0] if names else fallback


def _title(name: str, dataset: str) -> str:
    return name if dataset == name else f"{name} ({dataset})"


def _points(deltas_rows, metrics_rows, method, rule, metric, stat) -> list[dict]:
    """One point per specialist c: x = its delta statistic, y = the gain of class c under (method, rule)."""
    gains = {
        int(m["class"]): num(m.get(f"d_{metric}"))
        for m in metrics_rows
        if m.get("method") == method and rule_of(m) == rule and m.get("class") is not None
    }
    pts = []
    for d in deltas_rows:
        c = class_of(d)
        if c is None or not str(d.get("model", "")).startswith("class_") or c not in gains:
            continue
        pts.append({"c": c, "x": num(d.get(stat)), "y": gains[c], "freeze": str(d.get("freeze")),
                    "label": f"{c} {strategy_label(d.get('freeze'), d.get('augment'))}"})  # fmt: skip
    return sorted(pts, key=lambda p: p["c"])


def _corr_row(corr_rows, method, rule, metric, stat) -> dict | None:
    for r in corr_rows:
        if r["method"] == method and rule_of(r) == rule and r["metric"] == metric and r["stat"] == stat:
            return r
    return None


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:  # the temp name has no .png suffix: name the format
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


# ----------------------------------------------------------------------------- panels


def _limits(v: np.ndarray, low: float, high: float, include_zero: bool = False) -> tuple[float, float] | None:
    """Axis limits around finite values v, padded by fractions of their range (low below, high above)."""
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    if include_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = hi - lo or abs(hi) or 1.0
    return lo - low * span, hi + high * span


def _place_labels(ax, pts: list[dict], fontsize: float = 6.5) -> None:
    """Label each point on its right (left near the edge); a label that would overlap one already placed
    moves up, with a leader line.

    A greedy pass from the lowest point up, in axes-fraction units, estimated from the
    font size and the panel size (the figure is laid out with fixed margins, so the
    panel size is known before drawing).
    """
    fig, pos = ax.figure, ax.get_position()
    w_pt = pos.width * fig.get_figwidth() * 72
    h_pt = pos.height * fig.get_figheight() * 72
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    char_w, line_h = 0.6 * fontsize / w_pt, 1.25 * fontsize / h_pt
    placed: list[tuple[float, float, float]] = []  # left, right, bottom of each label
    finite = [p for p in pts if math.isfinite(p["x"]) and math.isfinite(p["y"])]
    for p in sorted(finite, key=lambda p: (p["y"], p["x"])):
        fx, fy = (p["x"] - x0) / (x1 - x0), (p["y"] - y0) / (y1 - y0)
        width = char_w * len(p["label"])
        left = fx + 4 / w_pt
        if left + width > 0.99:  # no room on the right: label on the left of the point
            left = fx - 4 / w_pt - width
        right = left + width
        bottom = start = fy - line_h / 2
        # Each move lifts the label above one placed label; placed ones never move, so this ends.
        moved = True
        while moved:
            moved = False
            for pl, pr, pb in placed:
                if pl < right and left < pr and pb - line_h < bottom < pb + 0.999 * line_h:  # 0.999: float slack
                    bottom, moved = pb + line_h, True
        placed.append((left, right, bottom))
        leader = {"arrowstyle": "-", "lw": 0.4, "color": "0.6", "shrinkA": 0, "shrinkB": 2} if bottom - start > 0.5 * line_h else None
        ax.annotate(p["label"], (p["x"], p["y"]), xytext=(left, bottom), textcoords="axes fraction", va="bottom", ha="left",
                    fontsize=fontsize, color="0.25", arrowprops=leader, zorder=3.5)  # fmt: skip


def _panel(ax, pts: list[dict], corr: dict | None, metric: str, stat: str, label_points: bool = True) -> None:
    """Scatter of the specialists, the fitted line from the correlation row, r and p in the corner."""
    xs = np.array([p["x"] for p in pts], dtype=float)
    ys = np.array([p["y"] for p in pts], dtype=float)
    for p in pts:
        ax.scatter(p["x"], p["y"], s=22, color=FREEZE_COLORS.get(p["freeze"], "black"), zorder=3, edgecolors="white", linewidths=0.5)
    ax.axhline(0.0, color="0.8", lw=0.8, zorder=1)
    # Room on the right for the labels and on top for the r/p box; y = 0 (no gain) stays in view.
    xlim, ylim = _limits(xs, 0.06, 0.12), _limits(ys, 0.08, 0.35, include_zero=True)
    if xlim and ylim:
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
    ok = np.isfinite(xs) & np.isfinite(ys)
    slope, intercept = (num(corr.get("slope")), num(corr.get("intercept"))) if corr else (math.nan, math.nan)
    if ok.any() and math.isfinite(slope) and math.isfinite(intercept):
        lo, hi = xs[ok].min(), xs[ok].max()
        pad = 0.04 * (hi - lo)
        line_x = np.array([lo - pad, hi + pad])
        ax.plot(line_x, slope * line_x + intercept, color="black", lw=1.2, zorder=2)
    if label_points and xlim and ylim:
        _place_labels(ax, pts)
    if corr is None:
        text = "no correlation row"
    elif math.isfinite(num(corr.get("r"))):
        r, p = num(corr["r"]), num(corr["p"])
        star = "*" if p < 0.05 else ""
        text = f"r = {r:+.2f}, p = {p:.2g}{star}"
    else:
        text = "n/a: " + textwrap.fill(str(corr.get("note") or "no correlation"), 28)
    ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "0.7", "alpha": 0.9}, zorder=4)  # fmt: skip
    # Deltas sit at 1e-6..1e-2 (variances far lower): scientific ticks with one offset label.
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useMathText=True)
    ax.tick_params(labelsize=7)
    ax.xaxis.get_offset_text().set_fontsize(7)
    ax.grid(alpha=0.25, lw=0.5)


def _freeze_legend(fig: Figure, pts: list[dict]) -> None:
    present = [f for f in FREEZE_COLORS if any(p["freeze"] == f for p in pts)]
    if not present:
        return
    handles = [
        Line2D([], [], marker="o", ls="", ms=5, color=FREEZE_COLORS[f], label="head only" if f == "head" else f"trained from {f}")
        for f in present
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))


# ----------------------------------------------------------------------------- figures


def grid_figure(deltas_rows, metrics_rows, corr_rows, method: str, rule: str, path, *, title: str = "", dpi: int = DPI) -> Path:
    """3x3 grid: rows are the gains (precision, F1, AUC), columns the delta statistics; one point per specialist."""
    # Fixed margins, not constrained layout: the layout solver costs more than the drawing.
    fig = Figure(figsize=(13, 10.5))
    fig.subplots_adjust(left=0.07, right=0.985, top=0.935, bottom=0.085, hspace=0.22, wspace=0.18)
    axes = fig.subplots(len(GAINS), len(STATS), squeeze=False)
    pts0: list[dict] = []
    for i, metric in enumerate(GAINS):
        for j, stat in enumerate(STATS):
            ax = axes[i][j]
            pts = _points(deltas_rows, metrics_rows, method, rule, metric, stat)
            pts0 = pts0 or pts
            _panel(ax, pts, _corr_row(corr_rows, method, rule, metric, stat), metric, stat)
            if i == len(GAINS) - 1:
                ax.set_xlabel(STAT_LABELS[stat], fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{GAIN_LABELS[metric]} (combined − specialist)", fontsize=9)
    n = len(pts0)
    head = f"{title}: " if title else ""
    fig.suptitle(f"{head}{method}" + (f" ({rule})" if rule else "") + f" — gain of class c against specialist c's deltas, n = {n}",
                 fontsize=12)  # fmt: skip
    _freeze_legend(fig, pts0)
    return _save(fig, path, dpi)


def _run_tables(run_dir: str | Path) -> dict:
    p = RunPaths(Path(run_dir))
    t = {"name": run_name(run_dir), "deltas": read_csv(p.deltas), "metrics": read_csv(p.metrics), "corr": read_csv(p.correlations)}
    t["dataset"] = dataset_of(t["corr"], t["name"])
    return t


def pair_figure(run_a, run_b, path, method: str = "ensemble", rule: str = "prob_norm", metric: str = "precision",
                stat: str = "mean_abs", *, dpi: int = DPI) -> Path:  # fmt: skip
    """The paper's Figure 1: gain in `metric` against `stat` for two runs (datasets), side by side."""
    fig = Figure(figsize=(11, 4.8))
    fig.subplots_adjust(left=0.08, right=0.98, top=0.86, bottom=0.2, wspace=0.22)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    pts_all = []
    for ax, run in zip(axes, (run_a, run_b)):
        t = _run_tables(run)
        pts = _points(t["deltas"], t["metrics"], method, rule, metric, stat)
        pts_all += pts
        _panel(ax, pts, _corr_row(t["corr"], method, rule, metric, stat), metric, stat)
        ax.set_title(f"{_title(t['name'], t['dataset'])}, n = {len(pts)}", fontsize=10)
        ax.set_xlabel(STAT_LABELS[stat], fontsize=9)
        ax.set_ylabel(GAIN_LABELS[metric], fontsize=9)
    fig.suptitle(f"{method}" + (f" ({rule})" if rule else "") + f": {GAIN_LABELS[metric]} against {STAT_LABELS[stat]}", fontsize=11)
    _freeze_legend(fig, pts_all)
    return _save(fig, path, dpi)


def _count(n: float) -> str:
    n = int(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _model_colors(models: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len([m for m in models if m != "student"]) <= 10 else "tab20"]
    out, k = {}, 0
    for m in models:
        if m == "student":
            out[m] = (0.0, 0.0, 0.0, 1.0)
        else:
            out[m] = cmap(k % cmap.N)
            k += 1
    return out


def _models_in_order(rows: list[dict]) -> list[str]:
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    key = lambda m: (1, 0) if m == "student" else (0, int(m.removeprefix("class_"))) if m.removeprefix("class_").isdigit() else (0, 10**9)
    return sorted(models, key=key)


def delta_distribution_figure(hist_rows, path, *, labels: dict[str, str] | None = None, dpi: int = DPI) -> Path:
    """|Δ| distribution per model on a log x axis: step lines of the share of parameters per bin.

    Exact zeros (frozen parameters) cannot sit on a log axis: their count goes in the
    legend, with those below the first edge and above the last one when there are any.
    """
    labels = labels or {}
    models = _models_in_order(hist_rows)
    colors = _model_colors(models)
    # One grid of edges for all models (bins a writer skipped count as 0).
    finite = [r for r in hist_rows if num(r["bin_low"]) > 0 and math.isfinite(num(r["bin_high"]))]
    edges = np.array(sorted({num(r["bin_low"]) for r in finite} | {num(r["bin_high"]) for r in finite}))
    fig = Figure(figsize=(11, 5.2))
    fig.subplots_adjust(left=0.07, right=0.7, top=0.92, bottom=0.11)  # the legend sits on the right
    ax = fig.subplots()
    used = []
    for m in models:
        rows = [r for r in hist_rows if str(r["model"]) == m]
        total = sum(num(r["count"]) for r in rows)
        zero = sum(num(r["count"]) for r in rows if num(r["bin_low"]) == 0 and num(r["bin_high"]) == 0)
        below = sum(num(r["count"]) for r in rows if num(r["bin_low"]) == 0 and num(r["bin_high"]) > 0)
        above = sum(num(r["count"]) for r in rows if math.isinf(num(r["bin_high"])))
        name = labels.get(m, m)
        extra = f"zeros {_count(zero)} ({100 * zero / total:.0f}%)" if total else "no values"
        if below:
            extra += f", {_count(below)} < {edges[0]:.0e}" if edges.size else f", {_count(below)} tiny"
        if above:
            extra += f", {_count(above)} ≥ {edges[-1]:.0e}" if edges.size else f", {_count(above)} huge"
        style = {"color": colors[m], "lw": 1.6 if m == "student" else 1.2, "ls": "--" if m == "student" else "-"}
        if edges.size < 2 or not total:
            ax.plot([], [], label=f"{name}: {extra}", **style)
            continue
        values = np.zeros(edges.size - 1)
        index = {e: i for i, e in enumerate(edges[:-1])}
        for r in rows:
            lo = num(r["bin_low"])
            if lo > 0 and math.isfinite(num(r["bin_high"])) and lo in index:
                values[index[lo]] += num(r["count"])
        if values.any():
            used.append(np.flatnonzero(values))
            ax.stairs(values / total, edges, label=f"{name}: {extra}", **style)
        else:
            ax.plot([], [], label=f"{name}: {extra}", **style)  # all zeros: legend entry only
    ax.set_xscale("log")
    if used:
        nz = np.concatenate(used)
        ax.set_xlim(edges[max(nz.min() - 1, 0)], edges[min(nz.max() + 2, edges.size - 1)])
    else:
        ax.text(0.5, 0.5, "no nonzero |Δ| to plot", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("|Δ| (fine-tuned − base), log scale", fontsize=9)
    ax.set_ylabel("share of the model's parameters per bin", fontsize=9)
    ax.set_title("Distribution of |Δ| per model (exact zeros in the legend)", fontsize=11)
    ax.grid(alpha=0.25, lw=0.5)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path, dpi)


def block_figure(block_rows, path, *, labels: dict[str, str] | None = None, dpi: int = DPI) -> Path:
    """E|Δ| and Q95|Δ| per block (stem, layer1..4) per model, log y axis; frozen (all-zero) blocks leave gaps."""
    labels = labels or {}
    models = _models_in_order(block_rows)
    colors = _model_colors(models)
    seen = list(dict.fromkeys(str(r["block"]) for r in block_rows))
    blocks = [b for b in BLOCK_ORDER if b in seen] + [b for b in seen if b not in BLOCK_ORDER]
    fig = Figure(figsize=(13, 4.8))
    fig.subplots_adjust(left=0.06, right=0.84, top=0.9, bottom=0.1, wspace=0.22)  # the legend sits on the right
    axes = fig.subplots(1, 2, squeeze=False)[0]
    x = np.arange(len(blocks))
    for ax, stat in zip(axes, ("mean_abs", "q95_abs")):
        positive = False
        for m in models:
            val = {str(r["block"]): num(r.get(stat)) for r in block_rows if str(r["model"]) == m}
            y = np.array([val.get(b, math.nan) for b in blocks])
            y = np.where(y > 0, y, np.nan)  # a frozen block has exactly 0: no point on a log axis
            positive |= bool(np.isfinite(y).any())
            ax.plot(x, y, marker="o", ms=3.5, color=colors[m], ls="--" if m == "student" else "-", lw=1.1,
                    label=labels.get(m, m))  # fmt: skip
        if positive:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "every block is exactly zero", transform=ax.transAxes, ha="center", va="center")
        ax.set_xticks(x, blocks, fontsize=8)
        ax.set_ylabel(f"{STAT_LABELS[stat]} in the block", fontsize=9)
        ax.set_title(f"{STAT_LABELS[stat]} per block (missing point = frozen, Δ = 0)", fontsize=10)
        ax.grid(alpha=0.25, lw=0.5)
        ax.tick_params(labelsize=8)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path, dpi)


def model_labels(deltas_rows: list[dict]) -> dict[str, str]:
    """Legend labels from deltas.csv: class_3 -> "3 L4+crop", student -> "student full"."""
    out = {}
    for d in deltas_rows:
        c = class_of(d)
        head = str(c) if c is not None and str(d.get("model", "")).startswith("class_") else str(d.get("model"))
        out[str(d.get("model"))] = f"{head} {strategy_label(d.get('freeze'), d.get('augment'))}"
    return out


def pair_choice(corr_a: list[dict], corr_b: list[dict]) -> tuple[str, str] | None:
    """(method, rule) of the pair figure: ensemble/prob_norm when both runs have it, else the first common one."""
    common = [mr for mr in method_rules(corr_a) if mr in set(method_rules(corr_b))]
    if ("ensemble", "prob_norm") in common:
        return "ensemble", "prob_norm"
    return common[0] if common else None


def make_figures(run_dir, other_run_dir=None, *, dpi: int = DPI, workers: int | None = None) -> list[Path]:
    """Every figure of a run into its figures/ folder; returns their paths.

    One grid per (method, rule) in correlations.csv; the |Δ| distribution and per-block
    plots when deltas_hist.csv / deltas_blocks.csv exist; with a second run, the pair
    figure (the paper's Figure 1) named after that run. A figure newer than the tables it
    is drawn from is kept, so `correlate` then `report` draws each figure once. The
    figures to draw are drawn side by side in `workers` processes (default: one per
    core, see draw_all).
    """
    paths = RunPaths(Path(run_dir))
    t = _run_tables(run_dir)
    labels = model_labels(t["deltas"])
    tables = [paths.deltas, paths.metrics, paths.correlations]
    out, jobs = [], []
    for method, rule in method_rules(t["corr"]):
        target = grid_png(paths.figures, method, rule)
        if not newer_than([target], tables):
            jobs.append((grid_figure, (t["deltas"], t["metrics"], t["corr"], method, rule, target), {"title": _title(t["name"], t["dataset"]), "dpi": dpi}))
        out.append(target)
    if paths.deltas_hist.exists():
        target = distribution_png(paths.figures)
        if not newer_than([target], [paths.deltas_hist, paths.deltas]):
            jobs.append((delta_distribution_figure, (read_csv(paths.deltas_hist), target), {"labels": labels, "dpi": dpi}))
        out.append(target)
    if paths.deltas_blocks.exists():
        target = blocks_png(paths.figures)
        if not newer_than([target], [paths.deltas_blocks, paths.deltas]):
            jobs.append((block_figure, (read_csv(paths.deltas_blocks), target), {"labels": labels, "dpi": dpi}))
        out.append(target)
    if other_run_dir is not None:
        other = RunPaths(Path(other_run_dir))
        choice = pair_choice(t["corr"], read_csv(other.correlations))
        if choice is not None:
            target = pair_png(paths.figures, run_name(other_run_dir))
            if not newer_than([target], tables + [other.deltas, other.metrics, other.correlations]):
                jobs.append((pair_figure, (run_dir, other_run_dir, target, *choice), {"dpi": dpi}))
            out.append(target)
    draw_all(jobs, workers)
    return out


PARALLEL_FROM = 4  # figures; below this a worker's start-up (~1 s: Python, numpy, scipy, matplotlib) outweighs the drawing


def _draw(job: tuple) -> Path:
    fn, args, kwargs = job
    return fn(*args, **kwargs)


def draw_all(jobs: list[tuple], workers: int | None = None) -> list[Path]:
    """Run figure jobs (function, args, kwargs); in worker processes when there are several.

    Why processes: matplotlib draws on one core and holds the GIL, and a run's grids take
    ~0.7 s each, 15 of them at the offline default. Every figure is a pure function of
    its arguments and is written atomically, so the order does not matter and the files
    are the same as drawn one by one (tests/test_figures.py). Workers are spawned, not
    forked: the caller may hold torch's thread pools, which do not survive a fork.
    """
    if workers is None:
        workers = usable_cores()
    workers = min(workers, len(jobs))
    if workers <= 1 or len(jobs) < PARALLEL_FROM or multiprocessing.current_process().daemon:  # a daemon may not start processes
        return [_draw(job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_draw, jobs))
