"""`safeunits train`, `safeunits ssah-budget`, `safeunits ssah-freeze`: unit-masked training from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from safeunits.cli_options import (DATA_DIR, FORCE, QUIET, config_options, model_option,
                                  out_option, sets_option, suite_option, unit_map_option)
from safeunits.config import merge, parse_sets, validation_message
from safeunits.errors import ConfigError, UserFileNotFoundError
from safeunits.outdir import claim_output_dir
from safeunits.train.recipes import AlignRecipe, AttackRecipe, Recipe, load_recipe

app = typer.Typer()

CONFIG_HELP = "Recipe YAML (default: the bundled {recipe}.yaml)."
SETTING_HELP = "'full' or a unit selection {what} (repeatable)."


def _recipe(recipe: str, config: Path | None, model: str | None, *layers: dict) -> Recipe:
    """The recipe YAML (or the bundled one) with the options, then the --set items, merged in and validated."""
    overrides: dict = {"model": model} if model else {}
    for layer in layers:
        overrides = merge(overrides, layer)
    try:
        loaded = load_recipe(str(config) if config else recipe, overrides)
    except ValidationError as err:
        raise ConfigError(validation_message(err), hint="check --set keys and option values (docs/cli.md)") from err
    if loaded.recipe != recipe:
        raise typer.BadParameter(f"--recipe {recipe} but the config {config} is a {loaded.recipe!r} recipe")
    return loaded


def _context(suite: str | None, default: str | None, data_dir: Optional[Path], progress: bool):
    """The evaluation context of `--suite`, resolved before any training."""
    from safeunits.eval.context import EvalContext

    return EvalContext.create(suite or default, data_dir=data_dir, progress=progress)


@app.command("train")
@config_options(AlignRecipe, ["n_examples", "safety_share", "train.epochs", "train.lr", "train.max_steps",
                              "train.batch_size", "train.grad_accum", "train.seed"])
def train_command(
    recipe: str = typer.Option(..., "--recipe", help="align (safety SFT) or finetune (ordinary fine-tuning)."),
    out: Path = out_option("Run directory: model/, recipe.yaml, train_report.json, eval/."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP.format(recipe="<recipe>")),
    model: Optional[str] = model_option(None, "Default: the recipe's."),
    budget: Optional[str] = typer.Option(None, "--budget", help="align: train only these units, e.g. 'ru'."),
    freeze: Optional[str] = typer.Option(None, "--freeze", help="finetune: keep these units bit-identical, "
                                         "e.g. 'scu+cu:top0.06' or 'scu+cu'."),
    unit_map: Optional[Path] = unit_map_option(required=False),
    data: list[str] = typer.Option([], "--data", help="finetune: dataset names or files (repeatable)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps into "
                                                   "OUT/checkpoints; a rerun resumes from the latest."),
    sets: list[str] = sets_option("train.weight_decay=0.01"),
    suite: Optional[str] = suite_option(None, "Evaluates the trained model; default or 'none': no evaluation."),
    data_dir: Optional[Path] = DATA_DIR,
    quiet: bool = QUIET,
    force: bool = FORCE,
    options: Optional[dict] = None,
) -> None:
    """Run a training recipe: `align` (optionally --budget ru) or `finetune` (optionally --freeze ...)."""
    from safeunits.train.recipes import run_recipe

    if recipe not in ("align", "finetune", "attack"):
        raise typer.BadParameter(f"--recipe must be align, finetune or attack, got {recipe!r}")
    evaluation = _context(suite, None, data_dir, not quiet)
    if budget and recipe != "align":
        raise typer.BadParameter("--budget belongs to --recipe align (use --freeze with finetune)")
    if freeze and recipe == "align":
        raise typer.BadParameter("--freeze belongs to --recipe finetune or attack (use --budget with align)")
    extra = {k: v for k, v in {"budget": budget, "freeze": freeze, "unit_map": str(unit_map) if unit_map else None,
                               "data": list(data) or None}.items() if v is not None}
    if checkpoint_every:
        extra["train"] = {"checkpoint_every": checkpoint_every, "checkpoint_dir": str(out / "checkpoints")}
    rec = _recipe(recipe, config, model, extra, options or {}, parse_sets(sets))
    claim_output_dir(out, "train", force=force)
    report = run_recipe(rec, out, evaluation.run, evaluation)
    summary = {k: getattr(report.train, k) for k in ("steps", "final_loss", "tokens_per_s", "stopped_reason")}
    summary["trainable_share"] = report.train.mask["trainable_share"]
    if report.eval is not None:
        summary["eval"] = report.eval.as_dict()
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"model: {out / 'model'}  report: {out / 'train_report.json'}")


def _check_map(unit_map: Path) -> None:
    if not unit_map.exists():
        raise UserFileNotFoundError(f"unit map {unit_map} does not exist", hint="make one with `safeunits attribute`")


@app.command("ssah-budget")
def ssah_budget_command(
    unit_map: Path = unit_map_option(),
    out: Path = out_option("Experiment run folder: one folder per step (models, evaluations), report.md/.html, "
                           "table.md / table.json; a rerun resumes."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP.format(recipe="align")),
    model: Optional[str] = model_option(None, "Model to align; default: the recipe's."),
    settings: list[str] = typer.Option([], "--setting", help=SETTING_HELP.format(what="the budget run trains")
                                       + " Default: the protocol's (ssah: full, ru:utility; equal: full, ru)."),
    protocol: str = typer.Option("ssah", "--protocol",
                                 help="ssah: SSAH Table 4 (budget = RU of the pretrained model by utility alone, "
                                      "ru:utility; budget runs train 2x the epochs); equal: ru of the map's four "
                                      "classes, same epochs (before issue 24)."),
    sets: list[str] = sets_option("train.epochs=1"),
    suite: Optional[str] = suite_option(None, "'none': training numbers only. Default: quick."),
    data_dir: Optional[Path] = DATA_DIR,
    quiet: bool = QUIET,
    force: bool = FORCE,
) -> None:
    """SSAH experiment (a): full align vs align on a unit budget; safety gained and alignment tax of each.

    `--setting ru` alone skips the full run (e.g. when the full run is an already-built named model)."""
    from safeunits.experiments.presets import ssah_budget

    _check_map(unit_map)
    rec = _recipe("align", config, model, parse_sets(sets))
    ssah_budget(rec, unit_map, out, settings=tuple(settings) or None, protocol=protocol, suite=suite or "quick",
                data_dir=data_dir, progress=not quiet, force=force)
    typer.echo((out / "table.md").read_text())


@app.command("ssah-freeze")
def ssah_freeze_command(
    unit_map: Path = unit_map_option(),
    out: Path = out_option("Experiment run folder: one folder per step (models, evaluations), report.md/.html, "
                           "table.md / table.json; a rerun resumes."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP.format(recipe="finetune")),
    model: Optional[str] = model_option(None, "Aligned model to fine-tune; default: the recipe's."),
    settings: list[str] = typer.Option(["full", "scu+cu:top0.06", "scu+cu"], "--setting",
                                       help=SETTING_HELP.format(what="to freeze")),
    frozen_epochs_factor: float = typer.Option(1.0, "--frozen-epochs-factor", min=0.0, max=1000.0,
                                               help="Epoch multiplier for frozen runs (SSAH used ~2)."),
    protocol: str = typer.Option("ssah", "--protocol",
                                 help="ssah: a ':top' setting (i) first trains 1 epoch with the wider set (ii) frozen "
                                      "(SSAH Table 2); direct: setting (i) from the first step (before issue 24)."),
    role_transfer: bool = typer.Option(False, "--role-transfer",
                                       help="Also attribute the full fine-tune with the unit map's own settings and "
                                            "class its units by the map's cut-offs (SSAH Fig. 5; step role-transfer)."),
    sets: list[str] = sets_option("n_examples=100"),
    suite: Optional[str] = suite_option(None, "'none': training numbers only. Default: quick."),
    data_dir: Optional[Path] = DATA_DIR,
    quiet: bool = QUIET,
    force: bool = FORCE,
) -> None:
    """SSAH experiment (b): fine-tune full vs frozen (i) scu+cu:top0.06 and (ii) scu+cu; ASR before/after."""
    from safeunits.experiments.presets import ssah_freeze

    _check_map(unit_map)
    rec = _recipe("finetune", config, model, parse_sets(sets))
    ssah_freeze(rec, unit_map, out, settings=tuple(settings), frozen_epochs_factor=frozen_epochs_factor, protocol=protocol,
                suite=suite or "quick", data_dir=data_dir, role_transfer=role_transfer, progress=not quiet, force=force)
    typer.echo((out / "table.md").read_text())


@app.command("attack")
@config_options(AttackRecipe, ["n_examples", "harmful_share", "train.lr", "train.max_steps", "train.epochs",
                               "train.batch_size", "data_seed"])
def attack_command(
    out: Path = out_option("Run directory: model/ (the attacked model), recipe.yaml, train_report.json (with the "
                           "attack mix's manifest), eval/."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP.format(recipe="attack")),
    model: Optional[str] = model_option(None, "The model attacked; default: the recipe's (smollm2-135m-aligned)."),
    freeze: Optional[str] = typer.Option(None, "--freeze", help="Defence: keep these units bit-identical during the "
                                         "attack, e.g. 'scu+cu' ('random:scu+cu@1': a random set of the same size)."),
    unit_map: Optional[Path] = unit_map_option(required=False),
    lora: bool = typer.Option(False, "--lora", help="Attack with LoRA adapters (merged afterwards) instead of every "
                              "weight; adapter settings: --set lora.r=16."),
    sets: list[str] = sets_option("harmful_sources=[gptfuzz,pku]"),
    suite: Optional[str] = suite_option(None, "Evaluates the attacked model; default or 'none': no evaluation."),
    data_dir: Optional[Path] = DATA_DIR,
    quiet: bool = QUIET,
    force: bool = FORCE,
    options: Optional[dict] = None,
) -> None:
    """Fine-tuning attack: train a model on n examples, a share p of them harmful; optionally under frozen units."""
    from safeunits.train.recipes import run_recipe

    evaluation = _context(suite, None, data_dir, not quiet)
    extra = {k: v for k, v in {"freeze": freeze, "unit_map": str(unit_map) if unit_map else None,
                               "lora": {} if lora else None}.items() if v is not None}
    rec = _recipe("attack", config, model, extra, options or {}, parse_sets(sets))
    claim_output_dir(out, "train", force=force)
    report = run_recipe(rec, out, evaluation.run, evaluation)
    summary = {k: getattr(report.train, k) for k in ("steps", "final_loss", "tokens_per_s", "stopped_reason")}
    summary["data"] = report.data
    if report.eval is not None:
        summary["eval"] = report.eval.as_dict()
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"model: {out / 'model'}  report: {out / 'train_report.json'}")

