"""`safeunits run EXPERIMENT`: a declarative experiment with cached steps and a report; `safeunits demo` runs the
bundled `demo-quick` experiment (what `make demo` calls)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from safeunits.cli_options import DATA_DIR, FORCE, QUIET, out_option, sets_option, suite_option
from safeunits.config import parse_sets
from safeunits.experiments.config import bundled_experiments

log = logging.getLogger(__name__)
DEMO_EXPERIMENT = "demo-quick"
DRY_RUN = typer.Option(False, "--dry-run", help="Print the plan (which steps run, which are cached) and stop.")

app = typer.Typer()


def run_command_body(experiment: str, out: Path | None, sets: list[str], suite: str | None, data_dir: Path | None,
                     dry_run: bool, quiet: bool, force: bool) -> None:
    """What `run` and `demo` do: load the experiment with the overrides, then plan or run it."""
    from safeunits.experiments.config import load_experiment
    from safeunits.experiments.runner import (check_models, check_run_folder, evaluation_context, format_plan,
                                              make_plan, run_experiment)

    overrides = parse_sets(sets)
    if suite:
        overrides["suite"] = suite
    if data_dir:
        overrides["data_dir"] = str(data_dir)
    exp = load_experiment(experiment, overrides)
    out = out or Path("runs") / exp.name
    if dry_run:
        check_models(exp)
        plan = make_plan(exp, out, evaluation_context(exp, progress=False))
        check_run_folder(plan, out, force=force)
        typer.echo(format_plan(plan, out))
        return
    result = run_experiment(exp, out, progress=not quiet, force=force)
    typer.echo(f"{len(result.ran)} step(s) ran, {len(result.plan) - len(result.ran)} cached")
    typer.echo(f"report: {result.report['html']} (and {result.report['markdown'].name})")


@app.command("run")
def run_command(
    experiment: str = typer.Argument(..., help=f"Experiment YAML, or a bundled one: {', '.join(bundled_experiments())}."),
    out: Optional[Path] = out_option("Run folder (default runs/<experiment name>); a rerun reuses finished steps.",
                                     default=None),
    suite: Optional[str] = suite_option(None, "Overrides the experiment's suite."),
    sets: list[str] = sets_option("steps.align-full.settings.train.epochs=1"),
    data_dir: Optional[Path] = DATA_DIR,
    dry_run: bool = DRY_RUN,
    quiet: bool = QUIET,
    force: bool = FORCE,
) -> None:
    """Run a declarative experiment: cached steps (eval, align, attribute, prune, attack, patch, ...; docs/experiments.md) and a report."""
    run_command_body(experiment, out, sets, suite, data_dir, dry_run, quiet, force)


@app.command("demo")
def demo_command(
    out: Path = out_option("Run folder; a rerun reuses finished steps.", default=Path("runs/demo")),
    suite: Optional[str] = suite_option(None, "Overrides the demo's suite (quick)."),
    sets: list[str] = sets_option("steps.align-full.settings.train.epochs=1"),
    data_dir: Optional[Path] = DATA_DIR,
    dry_run: bool = DRY_RUN,
    quiet: bool = QUIET,
    force: bool = FORCE,
) -> None:
    """The SPEC §6 story on the default model: `safeunits run demo-quick` (see docs/experiments.md)."""
    run_command_body(DEMO_EXPERIMENT, out, sets, suite, data_dir, dry_run, quiet, force)
