"""The `ensemble-delta` command line: a thin Typer layer over pipeline.py.

A user error prints one line naming the problem and the fix and exits with status 2,
no traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Do the weight deltas of fine-tuned specialists predict what combining them gains?")

DatasetOpt = typer.Option(None, "--dataset", "-d", help="Config configs/NAME.yaml (mnist-subset, mnist, imagenette, ...)")
ConfigOpt = typer.Option(None, "--config", "-c", help="Path to a YAML config")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (default results/<config name>)")
ForceOpt = typer.Option(False, "--force", help="Redo work even if complete for this config")


class _LazyPipeline:
    """pipeline (and torch) imported on first use, so `--help` and usage errors answer at once."""

    def __getattr__(self, name):
        from . import pipeline as real

        return getattr(real, name)


pipeline = _LazyPipeline()


def user_errors(fn):
    """Turn UserError (and Ctrl-C) into one line on stderr and an exit status, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is saved; rerun the same command to resume", err=True)
            raise typer.Exit(130)

    return wrapper


def _run_dir(dataset: Optional[str], config: Optional[Path], out: Optional[Path]) -> Path:
    """The run a later stage acts on: --out, else the config's run directory, else the last trained run."""
    if out is not None:
        return out
    if dataset or config:
        return pipeline.config_for(dataset, config).run_dir
    run = pipeline.last_run()
    typer.echo(f"using the last trained run: {run}", err=True)
    return run


@app.command()
@user_errors
def train(dataset: Optional[str] = DatasetOpt, config: Optional[Path] = ConfigOpt, out: Optional[Path] = OutOpt, force: bool = ForceOpt):
    """Base model, data cache and the one-vs-rest specialists."""
    pipeline.train(pipeline.config_for(dataset, config, out), force=force)


@app.command()
@user_errors
def evaluate(
    dataset: Optional[str] = DatasetOpt,
    config: Optional[Path] = ConfigOpt,
    out: Optional[Path] = OutOpt,
    method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="Only these methods (repeatable)"),
    force: bool = ForceOpt,
):
    """Scores, deltas and metrics of every method: ensemble, merges, distillation."""
    pipeline.evaluate(_run_dir(dataset, config, out), methods=method, force=force)


@app.command()
@user_errors
def correlate(
    dataset: Optional[str] = DatasetOpt,
    config: Optional[Path] = ConfigOpt,
    out: Optional[Path] = OutOpt,
    run: Optional[list[Path]] = typer.Option(None, "--run", "-r", help="Run directory; give two for the cross-dataset sign agreement"),
):
    """Correlation tables and figures; with two --run, the sign agreement across datasets."""
    runs = list(run) if run else [_run_dir(dataset, config, out)]
    for p in pipeline.correlate(runs):
        typer.echo(f"wrote {p.correlations}")


@app.command()
@user_errors
def report(
    dataset: Optional[str] = DatasetOpt,
    config: Optional[Path] = ConfigOpt,
    out: Optional[Path] = OutOpt,
    other: Optional[Path] = typer.Option(None, "--other", help="A second run to compare with (cross-dataset agreement)"),
):
    """report.md with the tables and figures of a run."""
    typer.echo(f"wrote {pipeline.report(_run_dir(dataset, config, out), other)}")


@app.command("run")
@user_errors
def run_all(dataset: Optional[str] = DatasetOpt, config: Optional[Path] = ConfigOpt, out: Optional[Path] = OutOpt, force: bool = ForceOpt):
    """All stages in order: train, evaluate, correlate, report."""
    pipeline.run(pipeline.config_for(dataset, config, out), force=force)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":
    main()
