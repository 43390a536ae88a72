"""report.md from fake run directories (built by test_figures.make_run from the real metric functions)."""

import re
from pathlib import Path

import pytest

from ensemble_delta.paths import RunPaths
from ensemble_delta.reporting import fmt, write_report
from ensemble_delta.statistics import SIGN_COLUMNS, agreement_counts, sign_agreement_rows
from ensemble_delta.storage import read_csv, write_csv
from test_figures import DPI, NAN_METHOD, make_run

HEADINGS = [
    "## Setup",
    "## Individual and combined metrics",
    "### Summary",
    "### Per class: specialist vs ensemble (prob_norm)",
    "## Correlation of delta statistics with gains",
    "### Power",
    "### Fitted lines",
    "## Figures",
    "## Combination rules: a note on mean_prob",
    "## Methods, lambdas and BatchNorm",
    "## Cross-dataset sign agreement",
    "## Provenance",
]
SMALL = {"ensemble": ("prob_norm",), "distill": ("prob_norm",)}  # one defined and one all-NaN (method, rule)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run_a = make_run(root, "fake-a", seed=0)
    run_b = make_run(root, "fake-b", seed=1, methods=SMALL, blocks=False)
    path = write_report(run_a, run_b, dpi=DPI)
    return run_a, run_b, path.read_text()


def _section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    nxt = text.find("\n## ", start + len(heading))
    return text[start : nxt if nxt >= 0 else len(text)]


def test_report_has_every_section_in_order(two_runs):
    run_a, _, text = two_runs
    assert (RunPaths(run_a).report).exists()
    assert text.startswith("# fake-a: ")
    positions = [text.index(h + "\n") for h in HEADINGS]
    assert positions == sorted(positions)


def test_setup_lists_every_specialist_and_the_student(two_runs):
    run_a, _, text = two_runs
    setup = _section(text, "## Setup")
    assert "**synthetic**" in setup and "**resnet18**" in setup and "`balanced`" in setup and "32 px" in setup
    for c in range(10):
        assert f"| class {c} |" in setup
    assert "| student (distill) |" in setup
    row3 = next(line for line in setup.splitlines() if line.startswith("| class 3 |"))
    d3 = next(d for d in read_csv(RunPaths(run_a).deltas) if d["model"] == "class_3")
    assert "| layer4 | crop | sgd | 0.01 | 2 |" in row3 and fmt(d3["mean_abs"], 3) in row3


def test_summary_has_a_row_per_method_and_rule(two_runs):
    run_a, _, text = two_runs
    summary = _section(text, "## Individual and combined metrics")
    for s in read_csv(RunPaths(run_a).summary):
        assert f"| {s['method']} | {s['rule'] or '—'} | {fmt(s['accuracy10'])} |" in summary
    per_class = summary[summary.index("### Per class") :]
    assert sum(line.startswith("| ") and line[2].isdigit() for line in per_class.splitlines()) == 10


def test_power_statement_uses_r_crit_from_the_file(two_runs):
    run_a, _, text = two_runs
    corr = read_csv(RunPaths(run_a).correlations)
    r_crit = next(r["r_crit"] for r in corr if r["n"] == 10)
    assert f"With n = 10 specialists only |r| > {r_crit:.3f} reaches p < 0.05 (two-sided)" in text
    assert f"{r_crit:.3f}" == "0.632"
    n_holm = sum(r["p_holm"] < 0.05 for r in corr if r["p_holm"] == r["p_holm"])
    assert f"**{n_holm} pass Holm's correction**" in text


def test_correlation_tables_mark_nan_rows(two_runs):
    run_a, _, text = two_runs
    corr = read_csv(RunPaths(run_a).correlations)
    section = _section(text, "## Correlation of delta statistics with gains")
    nan_block = section[section.index(f"### {NAN_METHOD[0]} ({NAN_METHOD[1]})") :].split("\n### ")[0]
    assert "| F1 | n/a | n/a | n/a | n/a | n/a | n/a |" in nan_block
    assert "n/a (all 9 tests): gain is identical for every specialist." in nan_block
    ens = section[section.index("### ensemble (prob_norm)") :].split("\n### ")[0]
    r = next(r for r in corr if (r["method"], r["rule"], r["metric"], r["stat"]) == ("ensemble", "prob_norm", "f1", "mean_abs"))
    assert f"| F1 | {r['r']:+.3g} | {r['p']:.3g}" in ens
    assert [line.split(" |")[0] for line in ens.splitlines() if line.startswith("| ") and "Gain" not in line] == [
        "| F1", "| Precision", "| AUC"
    ]  # fmt: skip


def test_figure_links_exist_on_disk(two_runs):
    run_a, _, text = two_runs
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    names = {Path(link).name for link in links}
    assert {"grid_ensemble_prob_norm.png", "grid_distill_prob_norm.png", "delta_distribution.png", "delta_blocks.png",
            "pair_fake-b.png"} <= names  # fmt: skip
    assert all(link.startswith("figures/") and (run_a / link).stat().st_size > 0 for link in links)


def test_mean_prob_note_is_honest(two_runs):
    _, _, text = two_runs
    note = _section(text, "## Combination rules: a note on mean_prob")
    assert "close to the specialist's, not equal to it" in note
    assert "equals the specialist" not in note
    assert "same 10-class accuracy for 1 of the 1 methods" in note  # the ensemble's two rules


def test_methods_lambdas_and_batchnorm(two_runs):
    _, _, text = two_runs
    methods = _section(text, "## Methods, lambdas and BatchNorm")
    for m in ("ensemble", "ties", "distill"):
        assert f"| {m} |" in methods
    assert "BatchNorm running statistics of every merged network were re-estimated" in methods
    assert "λ = auto → 0.7 (chosen on the validation split; validation accuracy per λ: 0.5: 0.61, 0.7: 0.66, 1: 0.64)" in methods


def test_sign_agreement_counts_of_two_runs(two_runs):
    run_a, run_b, text = two_runs
    rows = sign_agreement_rows(read_csv(RunPaths(run_a).correlations), read_csv(RunPaths(run_b).correlations), "fake-a", "fake-b")
    sign = _section(text, "## Cross-dataset sign agreement")
    counts = agreement_counts(rows)
    assert {(c["method"], c["rule"]) for c in counts} == {("ensemble", "prob_norm"), NAN_METHOD}
    for c in counts:
        assert f"| {c['method']} | {c['rule']} | 9 | {c['slope_agree']}/9 | {c['intercept_agree']}/9 |" in sign
    assert "| distill | prob_norm | 9 | 0/9 | 0/9 |" in sign  # n/a fits never agree


def test_provenance(two_runs):
    _, _, text = two_runs
    prov = _section(text, "## Provenance")
    assert "`0123abcd` (uncommitted changes)" in prov and "cpu (fake)" in prov and "| train | 12.5 |" in prov


def test_single_run_is_idempotent_and_reads_sign_agreement_csv(two_runs, tmp_path):
    run_a = two_runs[0]
    run_c = make_run(tmp_path, "fake-c", seed=3, methods={"ensemble": ("prob_norm",)}, blocks=False)
    first = write_report(run_c, dpi=DPI).read_text()
    assert write_report(run_c, dpi=DPI).read_text() == first
    assert "Only one run" in first and "delta_blocks.png" not in first  # no block table in run_c: no figure
    assert "### ensemble (prob_norm)" in first and "### ties" not in first  # only the methods present
    rows = sign_agreement_rows(read_csv(RunPaths(run_c).correlations), read_csv(RunPaths(run_a).correlations), "fake-c", "fake-a")
    write_csv(RunPaths(run_c).sign_agreement, rows, SIGN_COLUMNS)
    with_signs = write_report(run_c, dpi=DPI).read_text()
    (c,) = agreement_counts(rows)
    assert "from sign_agreement.csv" in with_signs
    assert f"| ensemble | prob_norm | 9 | {c['slope_agree']}/9 | {c['intercept_agree']}/9 |" in with_signs


def test_fmt():
    assert fmt(None) == "n/a" and fmt(float("nan")) == "n/a"
    assert fmt(0.123456) == "0.1235" and fmt(1.23456e-6, 3) == "1.23e-06" and fmt(11_166_912) == "11,166,912"
