"""The evaluate stage: scores of every method, then the delta and metric tables.

Scores (test log-odds, one column per specialist) are computed once per method and
saved; every rule and metric reads them. A score file carries its config hash in its
safetensors metadata and is written atomically, so it is its own completion marker.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from . import deltas as dl
from . import metrics as mt
from . import models
from .config import Config, config_hash
from .data import Data, load_data
from .distillation import train_student
from .engine import Runtime, data_on, images_on, logits, resolve_runtime, run_prefix
from .errors import UserError
from .merging import MERGE_METHODS, merge, recalibrate_bn
from .paths import RunPaths, is_done
from .provenance import update_manifest
from .storage import load_tensors, newer_than, read_csv, save_tensors, usable_cores, write_csv, write_json
from .training import base_state, specialist_hash

TRAINED = ("num_classes", "data", "model", "pretrain", "strategies")


def method_hash(cfg: Config, method: str) -> str:
    """What a method's scores depend on: the trained specialists plus its own section."""
    extra = {"ties": ("merge",), "task_arithmetic": ("merge",), "weight_average": ("merge",), "distill": ("distill",)}
    return config_hash(cfg, sections=TRAINED + extra.get(method, ()))


def _hash_of(path) -> str | None:
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("config_hash")


def _save_scores(path, logits: torch.Tensor, h: str, **meta) -> None:
    save_tensors(path, {"logits": logits.float()}, metadata={"config_hash": h, **{k: str(v) for k, v in meta.items()}})


def _head(path) -> tuple[torch.Tensor, torch.Tensor]:
    with safe_open(str(path), "pt") as f:  # read only the head, not the whole checkpoint
        return f.get_tensor("fc.weight"), f.get_tensor("fc.bias")


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def _run_tail(tail: nn.Module, feats: torch.Tensor, rt: Runtime, batch_size: int) -> torch.Tensor:
    tail.eval()
    out = []
    for s in range(0, len(feats), batch_size):
        with rt.autocast():
            out.append(tail(feats[s : s + batch_size]).float())
    return torch.cat(out).cpu()


def load_specialist(cfg: Config, paths: RunPaths, c: int) -> nn.Module:
    m = models.build(cfg.model.arch, 1)
    m.load_state_dict(load_tensors(paths.specialist(c)))
    return m


@torch.no_grad()
def specialist_logits(cfg: Config, paths: RunPaths, images: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Log-odds [N, K] of every specialist; specialists with one freeze point share one prefix pass."""
    k = cfg.num_classes
    out = torch.empty(len(images), k)
    by_freeze: dict[str, list[int]] = {}
    for c in range(k):
        by_freeze.setdefault(cfg.strategy(c).freeze, []).append(c)
    idx = torch.arange(len(images))
    for freeze, classes in by_freeze.items():
        feats = None
        for c in classes:
            m = rt.prepare(load_specialist(cfg, paths, c))
            prefix, tail = models.split(m, freeze)
            if feats is None:  # frozen prefixes hold the base weights: one pass serves the group
                feats = run_prefix(prefix, images, idx, rt, cfg.eval.batch_size)
            out[:, c] = _run_tail(tail, feats, rt, cfg.eval.batch_size)[:, 0]
    return out


# ----------------------------------------------------------------------------- merging


def _bn_batches(cfg: Config, data: Data, images: torch.Tensor, rt: Runtime):
    """Training images (no augmentation) for BatchNorm recalibration, in a seeded order."""
    m = cfg.merge
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.data.split_seed + 5))
    order = order[: m.bn_batches * m.bn_batch_size]
    for s in range(0, len(order), m.bn_batch_size):
        rows = order[s : s + m.bn_batch_size]
        yield rt.input(images[rows.to(images.device)])


def merged_model(cfg: Config, paths: RunPaths, base: dict, delta: dict, lam: float, heads: dict, data: Data, images, rt: Runtime) -> nn.Module:
    """base + lam * delta over the backbone, the K specialists' heads stacked, BatchNorm re-estimated."""
    state = {k: v.clone() for k, v in base.items() if not k.startswith("fc.")}
    for n, d in delta.items():
        state[n] = base[n].float() + lam * d
    state.update(heads)
    model = models.build(cfg.model.arch, cfg.num_classes)
    model.load_state_dict(state)
    model = rt.prepare(model)
    if cfg.merge.bn_recalibrate:
        recalibrate_bn(model, _bn_batches(cfg, data, images, rt), rt.device)
    return model.eval()


def merge_method(cfg: Config, paths: RunPaths, method: str, base: dict, data: Data, rt: Runtime) -> tuple[nn.Module, float, dict]:
    """Merge the specialists with `method`; lambda `auto` is chosen on the validation split."""
    k = cfg.num_classes
    names = models.backbone_param_names(models.build(cfg.model.arch, 1))
    load = lambda c: load_tensors(paths.specialist(c))
    merged = merge(method, base, load, k, names, cfg.merge.density, 1.0)  # streams over the specialists
    delta = {n: merged[n] - base[n].float() for n in names}  # every rule is linear in lambda past this point
    del merged
    heads = models.stack_heads([_head(paths.specialist(c)) for c in range(k)])
    images = images_on(rt, data.train.images)
    lam_cfg = {"ties": cfg.merge.ties_lambda, "task_arithmetic": cfg.merge.task_arithmetic_lambda}.get(method, 1.0)
    info: dict = {}
    if lam_cfg == "auto":
        if len(data.val) == 0:
            raise UserError(f"merge: lambda auto for {method} needs a validation split; set data.val_fraction > 0")
        val_images = images_on(rt, data.val.images)
        scores = {}
        for lam in cfg.merge.lambda_grid:  # validation accuracy, never the test split
            z = logits(merged_model(cfg, paths, base, delta, lam, heads, data, images, rt), val_images, rt, cfg.eval.batch_size)
            scores[lam] = float((z.argmax(1) == data.val.labels).float().mean())
        lam_cfg = max(scores, key=lambda x: (scores[x], -abs(x - 1.0)))  # ties go to the scale nearer 1
        info["val_accuracy_per_lambda"] = scores
        print(f"merge {method}: lambda auto -> {lam_cfg} (validation accuracy {scores[lam_cfg]:.4f})")
    model = merged_model(cfg, paths, base, delta, float(lam_cfg), heads, data, images, rt)
    info["lambda"] = float(lam_cfg)
    return model, float(lam_cfg), info


# ----------------------------------------------------------------------------- tables


DELTA_COLUMNS = ["model", "class", "freeze", "augment", "n_params", "mean_abs", "var", "q95_abs"]


def _delta_tables_current(cfg: Config, paths: RunPaths, with_student: bool) -> bool:
    """The three delta tables are newer than the base and every checkpoint they describe, and
    hold a student row exactly when the student is current: loading ten checkpoints again
    would give the same numbers."""
    sources = [paths.base] + [paths.specialist(c) for c in range(cfg.num_classes)] + ([paths.student] if with_student else [])
    if not newer_than([paths.deltas, paths.deltas_blocks, paths.deltas_hist], sources):
        return False
    rows = read_csv(paths.deltas)
    return len(rows) == cfg.num_classes + with_student and any(r["model"] == "student" for r in rows) == with_student


def _delta_rows(base: dict, names: list[str], entry: tuple) -> tuple[dict, list, list]:
    """One model's row of deltas.csv, and its rows of deltas_blocks.csv and deltas_hist.csv."""
    name, c, path, freeze, augment = entry
    tuned = load_tensors(path)
    d = dl.flat_delta(base, tuned, names)
    row = {"model": name, "class": c, "freeze": freeze, "augment": augment, **dl.delta_stats(d)}
    blocks = [{"model": name, "class": c, **b} for b in dl.block_stats(base, tuned, names)]
    h, edges = dl.abs_histogram(d), dl.HIST_EDGES
    hist = [{"model": name, "bin_low": 0.0, "bin_high": 0.0, "count": h["zero"]}, {"model": name, "bin_low": 0.0, "bin_high": float(edges[0]), "count": h["below"]}]
    hist += [{"model": name, "bin_low": float(lo), "bin_high": float(hi), "count": int(n)} for lo, hi, n in zip(edges[:-1], edges[1:], h["counts"])]
    hist.append({"model": name, "bin_low": float(edges[-1]), "bin_high": float("inf"), "count": h["above"]})
    return row, blocks, hist


def delta_tables(cfg: Config, paths: RunPaths, base: dict, with_student: bool) -> tuple[list, list, list]:
    """deltas.csv, deltas_blocks.csv and deltas_hist.csv rows for every specialist (and the student).

    The models run side by side in threads: each is a few passes of single-threaded numpy
    over its flat delta (1.7 s for ResNet50's 23.5M values here), and numpy releases the
    GIL in them. Rows come back in the models' order, whatever finishes first.
    """
    names = models.backbone_param_names(models.build(cfg.model.arch, 1))
    entries = [(f"class_{c}", c, paths.specialist(c), cfg.strategy(c).freeze, "+".join(cfg.strategy(c).augment) or "none") for c in range(cfg.num_classes)]
    if with_student:
        entries.append(("student", None, paths.student, cfg.distill.freeze, "+".join(cfg.distill.augment) or "none"))
    workers = min(len(entries), usable_cores(), 8)  # 8: each holds ~4 copies of a delta
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(functools.partial(_delta_rows, base, names), entries))
    return [row for row, _, _ in parts], [b for _, blocks, _ in parts for b in blocks], [h for _, _, hist in parts for h in hist]


def metric_tables(cfg: Config, paths: RunPaths, methods: list[str], labels: np.ndarray) -> tuple[list, list]:
    spec_z = load_tensors(paths.scores("specialists"))["logits"].double().numpy()
    spec_rows = mt.specialist_rows(spec_z, labels)
    rows, summary = list(spec_rows), [mt.specialist_summary(spec_rows, spec_z, labels)]
    for method in methods:
        z = spec_z if method == "ensemble" else load_tensors(paths.scores(method))["logits"].double().numpy()
        for rule in cfg.eval.rules:
            per_class, summ = mt.combined_rows(method, rule, z, labels, spec_rows)
            rows += per_class
            summary.append(summ)
    return rows, summary


# ----------------------------------------------------------------------------- the stage


def evaluate(cfg: Config, paths: RunPaths, methods: list[str] | None = None, force: bool = False) -> dict:
    """Scores, deltas and metrics for every method in the config (or `methods`). Returns timings."""
    methods = list(methods or cfg.eval.methods)
    unknown = [m for m in methods if m not in cfg.eval.methods]
    if unknown:
        raise UserError(f"--method {unknown[0]}: not in this run's eval.methods ({', '.join(cfg.eval.methods)}); add it to the config")
    missing = [c for c in range(cfg.num_classes) if not is_done(paths.specialist_log(c), specialist_hash(cfg, c))]
    if missing:
        raise UserError(f"specialists {missing} of {paths.root} are missing or stale: run `ensemble-delta train` first")
    t_stage = time.perf_counter()
    times: dict[str, float] = {}
    rt = resolve_runtime(cfg.runtime)
    data = data_on(rt, load_data(cfg.data, cfg.num_classes))  # on the device once for every stage below
    base = base_state(cfg, paths)
    labels = data.test.labels.numpy()
    test_images = images_on(rt, data.test.images)  # once: every method scores the same images
    save_tensors(paths.scores("labels"), {"labels": data.test.labels})
    lambdas = {}

    # 1. the specialists' scores: test (every method reads them) and train (the distillation teacher)
    h = method_hash(cfg, "ensemble")
    if force or _hash_of(paths.scores("specialists")) != h:
        t0 = time.perf_counter()
        _save_scores(paths.scores("specialists"), specialist_logits(cfg, paths, test_images, rt), h)
        times["score_specialists"] = time.perf_counter() - t0
    # 2. merged networks
    for method in [m for m in methods if m in MERGE_METHODS]:
        h = method_hash(cfg, method)
        if not force and _hash_of(paths.scores(method)) == h and _hash_of(paths.merged(method)) == h:
            continue
        t0 = time.perf_counter()
        model, lam, info = merge_method(cfg, paths, method, base, data, rt)
        save_tensors(paths.merged(method), model.state_dict(), metadata={"config_hash": h, "lambda": str(lam)})
        _save_scores(paths.scores(method), logits(model, test_images, rt, cfg.eval.batch_size), h, **{"lambda": lam})
        lambdas[method] = info
        times[f"merge_{method}"] = time.perf_counter() - t0
    # 3. distillation
    if "distill" in methods:
        h = method_hash(cfg, "distill")
        if force or _hash_of(paths.scores("distill")) != h or not is_done(paths.student_log, h):
            t0 = time.perf_counter()
            th = method_hash(cfg, "ensemble")
            if force or _hash_of(paths.teacher_train) != th:
                _save_scores(paths.teacher_train, specialist_logits(cfg, paths, images_on(rt, data.train.images), rt), th)
            teacher = load_tensors(paths.teacher_train)["logits"]
            state, log = train_student(cfg, data, base, teacher, rt)
            save_tensors(paths.student, state)
            write_json(paths.student_log, {"config_hash": h, **log})
            student = models.build(cfg.model.arch, cfg.num_classes)
            student.load_state_dict(state)
            _save_scores(paths.scores("distill"), logits(student, test_images, rt, cfg.eval.batch_size), h)
            times["distill"] = time.perf_counter() - t0

    # 4. tables, from the saved checkpoints and scores; tables whose content does not change
    #    are not rewritten (storage.write_text), so the figures drawn from them stay current
    t0 = time.perf_counter()
    done_methods = [m for m in cfg.eval.methods if m == "ensemble" or _hash_of(paths.scores(m)) == method_hash(cfg, m)]
    with_student = "distill" in done_methods
    if force or not _delta_tables_current(cfg, paths, with_student):
        rows, blocks, hist = delta_tables(cfg, paths, base, with_student)
        write_csv(paths.deltas_blocks, blocks)
        write_csv(paths.deltas_hist, hist)
        write_csv(paths.deltas, rows, DELTA_COLUMNS)
    metric_rows, summary = metric_tables(cfg, paths, done_methods, labels)
    write_csv(paths.summary, summary, mt.SUMMARY_COLUMNS)
    write_csv(paths.metrics, metric_rows, mt.METRIC_COLUMNS)
    times["tables"] = time.perf_counter() - t0
    update_manifest(paths, cfg, "evaluate", time.perf_counter() - t_stage, rt, timings=times, lambdas=lambdas)
    ens = next((s for s in summary if s["method"] == "ensemble" and s["rule"] == cfg.eval.rules[0]), None)
    if ens:
        print(f"evaluate: ensemble ({ens['rule']}) 10-class test accuracy {ens['accuracy10']:.4f}")
    return times
