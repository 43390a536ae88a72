"""report.md: the run's tables and figures in one readable page, a pure function of the run's files.

It reads config.yaml, manifest.json and the CSV tables (never weights or scores), draws
the figures through figures.make_figures so that `ensemble-delta report` alone works,
and writes report.md atomically. The same files give the same text: nothing in it
depends on the clock or on the machine that writes it.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import yaml

from . import figures as figs
from .figures import STAT_LABELS, num, rule_of, strategy_label
from .paths import RunPaths
from .statistics import GAINS, STATS, agreement_counts, sign_agreement_rows
from .storage import read_csv, read_json, write_text

ALPHA = 0.05
GAIN_ROWS = ("f1", "precision", "auc")  # the paper's row order
GAIN_NAMES = {"precision": "Precision", "f1": "F1", "auc": "AUC"}
STAT_CELLS = {k: v.replace("|", "\\|") for k, v in STAT_LABELS.items()}  # a bare | splits a Markdown cell
METHOD_TEXT = {
    "ensemble": "output ensemble: every specialist runs, their ten scores are combined",
    "ties": "TIES-Merging of the ten backbones (trim, elect sign, disjoint mean), each specialist's head kept",
    "task_arithmetic": "task arithmetic: base + λ · Σ task vectors, heads kept",
    "weight_average": "weight averaging: base + mean of the task vectors, heads kept",
    "distill": "knowledge distillation: one student with ten sigmoid outputs trained on the ensemble's scores",
}
WEIGHTS_TEXT = {
    "imagenet": "torchvision's ImageNet weights (IMAGENET1K_V2)",
    "imagenet_v1": "torchvision's ImageNet weights (IMAGENET1K_V1)",
    "none": "a seeded random initialisation, saved in the run so that deltas stay defined",
    "pretrain": "trained in this run as a 10-class classifier from a seeded random init "
    "(the offline stand-in for ImageNet weights)",
}


# ----------------------------------------------------------------------------- formatting


def fmt(v, digits: int = 4) -> str:
    """A number with `digits` significant digits; None and NaN as n/a."""
    if v is None or isinstance(v, str):
        return "n/a" if v in (None, "") else str(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    v = float(v)
    if math.isnan(v):
        return "n/a"
    return f"{v:.{digits}g}"


def _signed(v, digits: int = 3) -> str:
    v = num(v)
    return "n/a" if math.isnan(v) else f"{v:+.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _method_rule(method: str, rule: str) -> str:
    return f"{method} ({rule})" if rule else method


# ----------------------------------------------------------------------------- inputs


def _load(run_dir: Path) -> dict:
    p = RunPaths(run_dir)
    cfg = yaml.safe_load(p.config.read_text()) if p.config.exists() else {}
    return {
        "paths": p,
        "name": figs.run_name(run_dir),
        "config": cfg if isinstance(cfg, dict) else {},
        "manifest": read_json(p.manifest) if p.manifest.exists() else {},
        "deltas": read_csv(p.deltas),
        "metrics": read_csv(p.metrics),
        "summary": read_csv(p.summary) if p.summary.exists() else [],
        "corr": read_csv(p.correlations),
    }


def _strategy(cfg: dict, c: int) -> dict:
    strategies = cfg.get("strategies") or [{}]
    return strategies[c % len(strategies)] or {}


def _aug(v) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(v) or "none"
    return "none" if v in (None, "") else str(v)


# ----------------------------------------------------------------------------- sections


def _setup(run: dict) -> str:
    cfg, name = run["config"], run["name"]
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    k = cfg.get("num_classes", len([d for d in run["deltas"] if str(d.get("model", "")).startswith("class_")]))
    weights = str(model.get("weights", "n/a"))
    weights_text = WEIGHTS_TEXT.get(weights, "read from that checkpoint")
    if weights == "pretrain" and (cfg.get("pretrain") or {}).get("epochs"):
        weights_text = weights_text.replace(" (", f" for {cfg['pretrain']['epochs']} epochs (", 1)
    neg = data.get("negatives", "n/a")
    neg_text = {
        "balanced": "as many negatives as positives, drawn stratified over the other classes, seeded",
        "all": "every other image as a negative, the loss weighted for the imbalance",
    }.get(neg, str(neg))
    n_params = next((d.get("n_params") for d in run["deltas"] if d.get("n_params") is not None), None)
    if not cfg:
        para = (f"config.yaml is missing from this run directory, so its dataset, architecture and strategies are "
                f"unknown here. Deltas are over {fmt(n_params)} backbone parameters.")  # fmt: skip
    else:
        para = (
            f"Dataset **{data.get('name', 'n/a')}**, images resized to {data.get('image_size', 'n/a')} px. "
            f"Each of the {k} classes gets a one-vs-rest specialist fine-tuned from a **{model.get('arch', 'n/a')}** "
            f"base whose weights (`{weights}`) are {weights_text}; each specialist trains on every image of its class plus "
            f"negatives `{neg}` ({neg_text}). Deltas are fine-tuned minus base over the "
            f"{fmt(n_params)} backbone parameters every model shares with the base (the new heads excluded); "
            "E|Δ| is their mean absolute value, Var(Δ) their population variance, Q95|Δ| the 95th percentile of |Δ|."
        )
    header = ["Model", "Freeze", "Augment", "Optimizer", "LR", "Epochs", STAT_CELLS["mean_abs"], STAT_CELLS["var"], STAT_CELLS["q95_abs"]]
    rows = []
    for d in run["deltas"]:
        c = figs.class_of(d)
        is_student = str(d.get("model")) == "student"
        st = (cfg.get("distill") or {}) if is_student else _strategy(cfg, c) if c is not None else {}
        label = "student (distill)" if is_student else f"class {c}" if c is not None else str(d.get("model"))
        rows.append([
            label, d.get("freeze") or st.get("freeze", "n/a"), _aug(d.get("augment") if d.get("augment") else st.get("augment")),
            st.get("optimizer", "n/a"), fmt(st.get("lr")), fmt(st.get("epochs")),
            fmt(d.get("mean_abs"), 3), fmt(d.get("var"), 3), fmt(d.get("q95_abs"), 3),
        ])  # fmt: skip
    title = f"# {name}: do weight deltas predict the gain of combining specialists?"
    return "\n\n".join([title, "## Setup", para, _table(header, rows)])


def _primary(metrics: list[dict]) -> tuple[str, str] | None:
    """The combined model of the per-class table: ensemble/prob_norm if present, else the first one."""
    pairs = list(dict.fromkeys((str(m["method"]), rule_of(m)) for m in metrics if m["method"] != "specialist"))
    if ("ensemble", "prob_norm") in pairs:
        return "ensemble", "prob_norm"
    return pairs[0] if pairs else None


def _metrics(run: dict) -> str:
    out = ["## Individual and combined metrics", "### Summary"]
    if run["summary"]:
        out.append(
            "One row per method and combination rule; `specialist` is each specialist on its own binary task "
            "(10-class accuracy: argmax of the ten log-odds). Macro = mean over classes; mean Δ = mean gain over "
            "the specialists (combined metric of class c minus specialist c's)."
        )
        header = ["Method", "Rule", "10-class acc.", "Macro precision", "Macro F1", "Macro AUC",
                  "Mean Δ precision", "Mean Δ F1", "Mean Δ AUC"]  # fmt: skip
        rows = [
            [s["method"], rule_of(s) or "—", fmt(s.get("accuracy10")), fmt(s.get("macro_precision")), fmt(s.get("macro_f1")),
             fmt(s.get("macro_auc")), _signed(s.get("mean_d_precision")), _signed(s.get("mean_d_f1")), _signed(s.get("mean_d_auc"))]
            for s in run["summary"]
        ]  # fmt: skip
        out.append(_table(header, rows))
    else:
        out.append("summary.csv is missing: run `ensemble-delta evaluate`.")
    primary = _primary(run["metrics"])
    if primary is None:
        out.append("No combined method in metrics.csv.")
        return "\n\n".join(out)
    method, rule = primary
    out.append(f"### Per class: specialist vs {_method_rule(method, rule)}")
    spec = {int(m["class"]): m for m in run["metrics"] if m["method"] == "specialist"}
    comb = {int(m["class"]): m for m in run["metrics"] if m["method"] == method and rule_of(m) == rule}
    strat = {figs.class_of(d): strategy_label(d.get("freeze"), d.get("augment"))
             for d in run["deltas"] if str(d.get("model", "")).startswith("class_")}  # fmt: skip
    header = ["Class", "Strategy", "Spec. precision", "Spec. F1", "Spec. AUC", "Comb. precision", "Comb. F1", "Comb. AUC",
              "Δ precision", "Δ F1", "Δ AUC"]  # fmt: skip
    rows = []
    for c in sorted(set(spec) | set(comb)):
        s, m = spec.get(c, {}), comb.get(c, {})
        rows.append([c, strat.get(c, "n/a"), *(fmt(s.get(k)) for k in GAINS), *(fmt(m.get(k)) for k in GAINS),
                     *(_signed(m.get(f"d_{k}")) for k in GAINS)])  # fmt: skip
    out.append(_table(header, rows))
    return "\n\n".join(out)


def _p_cell(r: dict) -> str:
    p, ph = num(r.get("p")), num(r.get("p_holm"))
    if math.isnan(p):
        return "n/a"
    mark = ("*" if p < ALPHA else "") + ("†" if ph < ALPHA else "")
    return f"{p:.3g}{mark}"


def _power(corr: list[dict]) -> str:
    ns = Counter(int(r["n"]) for r in corr if r.get("n") is not None)
    crit = {}
    for r in corr:
        n, rc = r.get("n"), num(r.get("r_crit"))
        if n is not None and math.isfinite(rc):
            crit.setdefault(int(n), rc)
    if crit:
        n_main = max(crit, key=lambda n: ns[n])
        text = (
            f"With n = {n_main} specialists only |r| > {crit[n_main]:.3f} reaches p < {ALPHA:g} (two-sided); "
            "smaller correlations, however suggestive the plot, are indistinguishable from noise at this sample size."
        )
        others = [f"n = {n}: |r| > {rc:.3f}" for n, rc in sorted(crit.items()) if n != n_main]
        if others:
            text += " Other sample sizes in this table: " + "; ".join(others) + "."
    else:
        text = "No (method, rule) has the three points a correlation needs, so no test can reach significance."
    if not corr:
        return text
    defined = [r for r in corr if math.isfinite(num(r.get("p")))]
    n_raw = sum(num(r["p"]) < ALPHA for r in defined)
    n_holm = sum(num(r.get("p_holm")) < ALPHA for r in defined)
    groups = len(figs.method_rules(corr))
    text += (
        f"\n\nOf {len(defined)} defined tests ({len(corr)} in all over {groups} method/rule pairs, "
        f"{len(corr) - len(defined)} n/a), {n_raw} have p < {ALPHA:g} and **{n_holm} pass Holm's correction** "
        f"(adjusted over the nine tests of each method and rule). By chance alone about {ALPHA * len(defined):.1f} "
        f"of {len(defined)} independent null tests would reach p < {ALPHA:g}; these tests are far from independent "
        "(the three statistics move together, and the rules of one method share their predicted classes)."
    )
    return text


def _corr_block(corr: list[dict], method: str, rule: str) -> str:
    rows_mr = [r for r in corr if r["method"] == method and rule_of(r) == rule]
    by = {(r["metric"], r["stat"]): r for r in rows_mr}
    header = ["Gain in"] + [f"{STAT_CELLS[s]} {k}" for s in STATS for k in ("r", "p")]
    rows = []
    for g in GAIN_ROWS:
        cells = [GAIN_NAMES[g]]
        for s in STATS:
            r = by.get((g, s))
            cells += ["n/a", "n/a"] if r is None else [_signed(r.get("r")), _p_cell(r)]
        rows.append(cells)
    n = Counter(int(r["n"]) for r in rows_mr if r.get("n") is not None)
    out = [f"### {_method_rule(method, rule)}", f"n = {', '.join(map(str, sorted(n))) or 'n/a'} specialists.", _table(header, rows)]
    notes = Counter(
        (GAIN_NAMES[r["metric"]], STAT_LABELS[r["stat"]], str(r.get("note") or "no correlation"))
        for r in rows_mr if not math.isfinite(num(r.get("r")))
    )  # fmt: skip
    if notes:
        reasons = Counter(note for _, _, note in notes)
        if len(notes) == len(rows_mr) and len(reasons) == 1:
            out.append(f"n/a (all {len(rows_mr)} tests): {next(iter(reasons))}.")
        else:
            out.append("n/a: " + "; ".join(f"Δ {g} vs {s}: {note}" for g, s, note in notes) + ".")
    return "\n\n".join(out)


def _fits(corr: list[dict]) -> str:
    header = ["Method", "Rule", "Gain in"] + [f"{STAT_CELLS[s]} {k}" for s in STATS for k in ("a", "b")]
    rows = []
    for method, rule in figs.method_rules(corr):
        by = {(r["metric"], r["stat"]): r for r in corr if r["method"] == method and rule_of(r) == rule}
        for g in GAIN_ROWS:
            cells = [method, rule or "—", GAIN_NAMES[g]]
            for s in STATS:
                r = by.get((g, s), {})
                cells += [fmt(r.get("slope"), 3), fmt(r.get("intercept"), 3)]
            rows.append(cells)
    return "\n\n".join([
        "### Fitted lines",
        "Least-squares line gain = a · statistic + b per method, rule and pair. correlations.csv holds these "
        "with Spearman's ρ and p, the Fisher 95% interval of r, Holm-adjusted p and the note of each n/a row.",
        _table(header, rows),
    ])  # fmt: skip


def _correlations(run: dict) -> str:
    corr = run["corr"]
    out = [
        "## Correlation of delta statistics with gains",
        "Pearson r and two-sided p between each specialist's delta statistic and its class's gain, one table per "
        f"method and rule. `*`: p < {ALPHA:g}; `†`: Holm-adjusted p < {ALPHA:g} over the nine tests of that method and rule.",
    ]
    rules_per_method = Counter(m for m, _ in figs.method_rules(corr))
    if any(n > 1 for n in rules_per_method.values()):
        out.append("Precision and F1 gains come from the predicted class, which every rule of a method shares (see the "
                   "note on mean_prob), so their rows repeat across the rules of one method; only the AUC rows differ.")  # fmt: skip
    out += ["### Power", _power(corr)]
    out += [_corr_block(corr, m, r) for m, r in figs.method_rules(corr)]
    out.append(_fits(corr))
    return "\n\n".join(out)


def _figures(run: dict, written: list[Path]) -> str:
    fig_dir = run["paths"].figures
    have = {Path(p).resolve() for p in written}

    def link(path: Path, alt: str) -> str | None:
        if path.resolve() not in have:
            return None
        return f"![{alt}]({path.resolve().relative_to(run['paths'].root.resolve()).as_posix()})"

    out = ["## Figures"]
    for method, rule in figs.method_rules(run["corr"]):
        item = link(figs.grid_png(fig_dir, method, rule), f"{_method_rule(method, rule)}: gains against delta statistics")
        if item:
            out += [f"### Grid: {_method_rule(method, rule)}", item]
    pairs = sorted(p for p in have if p.name.startswith("pair_") and p.parent == fig_dir.resolve())
    for p in pairs:
        out += [f"### Pair: {run['name']} and {p.stem.removeprefix('pair_')}", link(p, "gain in precision against E|Δ|, two datasets")]
    for path, title in ((figs.distribution_png(fig_dir), "Distribution of |Δ|"), (figs.blocks_png(fig_dir), "Deltas per block")):
        item = link(path, title)
        if item:
            out += [f"### {title}", item]
    if len(out) == 1:
        out.append("No figures: correlations.csv has no rows and the delta tables are missing.")
    return "\n\n".join(out)


def _mean_prob(run: dict) -> str:
    text = [
        "## Combination rules: a note on mean_prob",
        "`mean_prob` (the paper's formula 2 taken literally) spreads each specialist's binary distribution into the "
        "K classes (p_k on class k, (1 − p_k)/(K − 1) on each other class) and averages the K of them: "
        "s_c = p_c/(K − 1) + (K − 1 − Σ_k p_k)/(K(K − 1)). Within one image this is an increasing function of p_c with "
        "an offset shared by all classes, so it orders the classes as the specialists' p do and predicts argmax p, "
        "the same class as `prob_norm` (p_c / Σ p) and `logit_softmax` (softmax of the log-odds). The three rules "
        "therefore give the same accuracy, precision, recall and F1 whenever the argmax is unique; they can differ "
        "only where two specialists' p round to the same float (p saturating at 1 for log-odds above about 37), "
        "where the rules break the tie differently. Across images the offset moves with the other specialists' "
        "(1 − p_k) terms, so s_c does not rank images exactly as p_c does: the per-class AUC of `mean_prob` is "
        "close to the specialist's, not equal to it, and the rules differ in AUC.",
    ]
    acc: dict[str, set] = {}
    for s in run["summary"]:
        if s["method"] != "specialist" and math.isfinite(num(s.get("accuracy10"))):
            acc.setdefault(s["method"], set()).add(round(num(s["accuracy10"]), 12))
    multi = {m: v for m, v in acc.items() if sum(1 for s in run["summary"] if s["method"] == m) > 1}
    facts = []
    if multi:
        same = [m for m, v in multi.items() if len(v) == 1]
        facts.append(f"In this run the rules give the same 10-class accuracy for {len(same)} of the {len(multi)} methods "
                     f"evaluated with more than one rule" + (f" ({', '.join(same)})" if same else "") + ".")  # fmt: skip
    ens = [m for m in run["metrics"] if m["method"] == "ensemble" and rule_of(m) == "mean_prob"]
    d_auc = [abs(num(m.get("d_auc"))) for m in ens if math.isfinite(num(m.get("d_auc")))]
    if d_auc:
        facts.append(
            f"For the ensemble, where every rule combines the specialists' own scores, |AUC_c(mean_prob) − AUC_c(specialist c)| "
            f"is at most {max(d_auc):.3g} over the {len(d_auc)} classes (mean {sum(d_auc) / len(d_auc):.3g})."
        )
    if facts:
        text.append(" ".join(facts))
    return "\n\n".join(text)


def _lambda_cell(configured, recorded) -> str:
    """The configured lambda and, for `auto`, the one chosen (manifest: a number or {"lambda", "val_accuracy_per_lambda"})."""
    info = recorded if isinstance(recorded, dict) else {"lambda": recorded}
    chosen = info.get("lambda")
    if configured != "auto":
        return fmt(configured) if configured is not None else fmt(chosen)
    if chosen is None:
        return "auto (chosen value not in the manifest)"
    text = f"auto → {fmt(chosen)} (chosen on the validation split"
    grid = info.get("val_accuracy_per_lambda") or {}
    if grid:
        ordered = sorted(grid.items(), key=lambda kv: num(kv[0]))
        text += "; validation accuracy per λ: " + ", ".join(f"{fmt(num(k))}: {fmt(v, 3)}" for k, v in ordered)
    return text + ")"


def _methods(run: dict) -> str:
    cfg, man = run["config"], run["manifest"]
    merge, distill = cfg.get("merge") or {}, cfg.get("distill") or {}
    lambdas = man.get("lambdas") or {}
    present = list(dict.fromkeys(str(m["method"]) for m in run["metrics"] if m["method"] != "specialist"))
    rules = list(dict.fromkeys(rule_of(m) for m in run["metrics"] if m["method"] != "specialist"))
    rows = []
    for m in present:
        if m == "ties":
            setting = f"density {fmt(merge.get('density'))}, λ = {_lambda_cell(merge.get('ties_lambda'), lambdas.get('ties'))}"
        elif m == "task_arithmetic":
            setting = f"λ = {_lambda_cell(merge.get('task_arithmetic_lambda'), lambdas.get('task_arithmetic'))}"
        elif m == "weight_average":
            setting = "λ = 1/K on the sum (the mean)"
        elif m == "distill":
            setting = (f"epochs {fmt(distill.get('epochs'))}, {distill.get('optimizer', 'n/a')} lr {fmt(distill.get('lr'))}, "
                       f"temperature {fmt(distill.get('temperature'))}, hard-label weight {fmt(distill.get('hard_weight'))}, "
                       f"trains from {distill.get('freeze', 'n/a')}")  # fmt: skip
        else:
            setting = "—"
        rows.append([m, METHOD_TEXT.get(m, "—"), setting])
    out = ["## Methods, lambdas and BatchNorm",
           f"Rules evaluated: {', '.join(r or '—' for r in rules) or 'none'}.",
           _table(["Method", "What it is", "Settings"], rows)]  # fmt: skip
    missing = [m for m in (cfg.get("eval") or {}).get("methods", []) if m not in present]
    if missing:
        out.append(f"Configured but without results in metrics.csv: {', '.join(missing)}.")
    if any(m in present for m in ("ties", "task_arithmetic", "weight_average")):
        if merge.get("bn_recalibrate"):
            out.append(f"BatchNorm running statistics of every merged network were re-estimated on "
                       f"{fmt(merge.get('bn_batches'))} training batches of {fmt(merge.get('bn_batch_size'))} images.")  # fmt: skip
        elif merge.get("bn_recalibrate") is False:
            out.append("BatchNorm running statistics of the merged networks were **not** re-estimated "
                       "(merge.bn_recalibrate: false); merged features may collapse.")  # fmt: skip
        else:
            out.append("Whether BatchNorm was re-estimated after merging is not recorded in config.yaml.")
    return "\n\n".join(out)


def _sign(run: dict, other: dict | None) -> str:
    out = ["## Cross-dataset sign agreement"]
    if other is not None:
        # Labelled like the pipeline's sign_agreement.csv: by the correlations' dataset column.
        name_a, name_b = figs.dataset_of(run["corr"], run["name"]), figs.dataset_of(other["corr"], other["name"])
        rows = sign_agreement_rows(run["corr"], other["corr"], name_a, name_b)
        source = f"computed from this run's and {other['name']}'s correlations.csv"
    elif run["paths"].sign_agreement.exists():
        rows = read_csv(run["paths"].sign_agreement)
        source = "from sign_agreement.csv"
    else:
        out.append("Only one run: pass a second run to `ensemble-delta correlate` or `report` to compare the signs "
                   "of the fitted slopes and intercepts across datasets.")  # fmt: skip
        return "\n\n".join(out)
    names = sorted({(str(r.get("dataset_a")), str(r.get("dataset_b"))) for r in rows})
    pair = " and ".join(names[0]) if len(names) == 1 else "the two runs"
    out.append(f"Signs of the fitted slope a and intercept b of each (gain, statistic) pair in {pair}, {source}, "
               "as in the paper's Table 3. A pair with no fit (n/a) never agrees.")  # fmt: skip
    counts = agreement_counts(rows)
    table = [[c["method"], c["rule"] or "—", c["n_pairs"], f"{c['slope_agree']}/{c['n_pairs']}", f"{c['intercept_agree']}/{c['n_pairs']}"]
             for c in counts]  # fmt: skip
    out.append(_table(["Method", "Rule", "Pairs", "Slopes agree", "Intercepts agree"], table))
    primary = ("ensemble", "prob_norm")
    order = {(g, st): i for i, (g, st) in enumerate((g, st) for g in GAIN_ROWS for st in STATS)}
    detail = sorted((r for r in rows if (r["method"], rule_of(r)) == primary), key=lambda r: order.get((r["metric"], r["stat"]), 99))
    if detail:
        out.append(f"Per pair for {_method_rule(*primary)}, sign in {names[0][0]} / {names[0][1]}:" if len(names) == 1 else
                   f"Per pair for {_method_rule(*primary)}:")  # fmt: skip
        out.append(_table(
            ["Gain in", "Statistic", "a", "agree", "b", "agree"],
            [[GAIN_NAMES.get(r["metric"], r["metric"]), STAT_CELLS.get(r["stat"], r["stat"]),
              f"{r['slope_sign_a'] or 'n/a'} / {r['slope_sign_b'] or 'n/a'}", "yes" if r["slope_agree"] else "no",
              f"{r['intercept_sign_a'] or 'n/a'} / {r['intercept_sign_b'] or 'n/a'}", "yes" if r["intercept_agree"] else "no"]
             for r in detail],
        ))  # fmt: skip
    return "\n\n".join(out)


def _provenance(run: dict) -> str:
    man = run["manifest"]
    out = ["## Provenance"]
    if not man:
        out.append("manifest.json is missing: no provenance recorded for this run.")
        return "\n\n".join(out)
    git = man.get("git") or {}
    dirty = git.get("dirty")
    commit = f"`{git.get('commit') or 'n/a'}`" + (" (uncommitted changes)" if dirty else " (clean)" if dirty is False else "")
    items = [["Config hash", f"`{man.get('config_hash', 'n/a')}`"], ["Git commit", commit], ["Device", str(man.get("device", "n/a"))]]
    if man.get("base_weights"):
        items.append(["Base weights", str(man["base_weights"])])
    seeds = man.get("seeds") or {}
    if seeds:
        items.append(["Seeds", ", ".join(f"{k} {v}" for k, v in seeds.items())])
    out.append(_table(["Item", "Value"], items))
    versions = man.get("versions") or {}
    if versions:
        out.append(_table(["Package", "Version"], [[k, str(v)] for k, v in sorted(versions.items())]))
    timings = man.get("timings") or {}
    if timings:
        rows = [[k, fmt(num(v), 3)] for k, v in timings.items()]
        total = sum(num(v) for v in timings.values() if math.isfinite(num(v)))
        out.append(_table(["Stage", "Seconds"], rows + [["total", fmt(total, 3)]]))
    out.append("Every number above is read from config.yaml, manifest.json and the CSV tables of this run directory; "
               "`ensemble-delta report` regenerates this page and its figures without a GPU.")  # fmt: skip
    return "\n\n".join(out)


def write_report(run_dir, other_run_dir=None, *, dpi: int = figs.DPI) -> Path:
    """Draw the figures and write report.md (atomically) from a run directory's files; returns its path.

    With other_run_dir, the pair figure and the cross-dataset sign agreement compare the
    two runs; without it, sign_agreement.csv is used when present.
    """
    run = _load(Path(run_dir))
    other = _load(Path(other_run_dir)) if other_run_dir is not None else None
    written = figs.make_figures(run_dir, other_run_dir, dpi=dpi)
    sections = [_setup(run), _metrics(run), _correlations(run), _figures(run, written), _mean_prob(run),
                _methods(run), _sign(run, other), _provenance(run)]  # fmt: skip
    path = run["paths"].report
    write_text(path, "\n\n".join(sections) + "\n")
    return path
