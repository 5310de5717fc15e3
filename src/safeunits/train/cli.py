"""`safeunits train`, `safeunits ssah-budget`, `safeunits ssah-freeze`: unit-masked training from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml

from safeunits.train.recipes import AlignRecipe, FinetuneRecipe, load_recipe


def _overrides(sets: list[str]) -> dict:
    """`--set train.lr=1e-4` -> {"train": {"lr": 1e-4}} (values parsed as YAML scalars/lists)."""
    out: dict = {}
    for item in sets:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _recipe(recipe: str, config: Path | None, model: str | None, sets: list[str], extra: dict) -> AlignRecipe | FinetuneRecipe:
    overrides = _overrides(sets)
    if model:
        overrides["model"] = model
    for key, value in extra.items():
        if value is None:
            continue
        if key.startswith("train."):
            overrides.setdefault("train", {})[key[6:]] = value
        else:
            overrides[key] = value
    try:
        loaded = load_recipe(config or recipe, overrides)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    if loaded.recipe != recipe:
        raise typer.BadParameter(f"--recipe {recipe} but the config {config} is a {loaded.recipe!r} recipe")
    return loaded


def _context(suite: str | None, data_dir: Path | None, progress: bool):
    """The evaluation context of a training command, resolved before any training (a typo fails in a second)."""
    from safeunits.eval.context import EvalContext

    return EvalContext.create(suite, data_dir=data_dir, progress=progress)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        recipe: str = typer.Option(..., "--recipe", help="align (safety SFT) or finetune (ordinary fine-tuning)."),
        out: Path = typer.Option(..., "--out", help="Run directory: model/, recipe.yaml, train_report.json, eval/."),
        config: Path | None = typer.Option(None, "--config", help="Recipe YAML (default: the bundled <recipe>.yaml)."),
        model: str | None = typer.Option(None, "--model", help="Model name, folder or hub id (overrides the config)."),
        budget: str | None = typer.Option(None, "--budget", help="align: train only these units, e.g. 'ru'."),
        freeze: str | None = typer.Option(None, "--freeze", help="finetune: keep these units bit-identical, "
                                          "e.g. 'scu+cu:top0.06' or 'scu+cu'."),
        unit_map: Path | None = typer.Option(None, "--unit-map", help="Unit map (from `safeunits attribute`)."),
        data: list[str] = typer.Option([], "--data", help="finetune: dataset names or files (repeatable)."),
        n_examples: int | None = typer.Option(None, "--n-examples", help="Training examples in total."),
        safety_share: float | None = typer.Option(None, "--safety-share", help="align: share of safety examples."),
        epochs: float | None = typer.Option(None, "--epochs", help="Passes over the data."),
        lr: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
        max_steps: int | None = typer.Option(None, "--max-steps", help="Optimizer steps (overrides epochs)."),
        batch_size: int | None = typer.Option(None, "--batch-size", help="Examples per micro-batch."),
        grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
        seed: int | None = typer.Option(None, "--seed", help="Training seed (data order, torch RNG)."),
        checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps into "
                                                    "OUT/checkpoints; a rerun resumes from the latest."),
        sets: list[str] = typer.Option([], "--set", help="Any other recipe field, dotted: --set train.weight_decay=0.01."),
        eval_suite: str | None = typer.Option(None, "--eval", help="Evaluate the trained model with this suite "
                                              "(quick, full, or a YAML); default or 'none': no evaluation."),
        data_dir: Path | None = typer.Option(None, "--data-dir", help="Offline data folder (default $SAFEUNITS_DATA_DIR)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        """Run a training recipe: `align` (optionally --budget ru) or `finetune` (optionally --freeze ...)."""
        from safeunits.train.recipes import run_recipe

        if recipe not in ("align", "finetune"):
            raise typer.BadParameter(f"--recipe must be align or finetune, got {recipe!r}")
        if budget and recipe != "align":
            raise typer.BadParameter("--budget belongs to --recipe align (use --freeze with finetune)")
        if freeze and recipe != "finetune":
            raise typer.BadParameter("--freeze belongs to --recipe finetune (use --budget with align)")
        extra = {"budget": budget, "freeze": freeze, "unit_map": str(unit_map) if unit_map else None,
                 "data": list(data) or None, "n_examples": n_examples, "safety_share": safety_share,
                 "train.epochs": epochs, "train.lr": lr, "train.max_steps": max_steps, "train.batch_size": batch_size,
                 "train.grad_accum": grad_accum, "train.seed": seed}
        if checkpoint_every:
            extra.update({"train.checkpoint_every": checkpoint_every, "train.checkpoint_dir": str(out / "checkpoints")})
        rec = _recipe(recipe, config, model, sets, extra)
        report = run_recipe(rec, out, _context(eval_suite, data_dir, progress))
        summary = {k: report["train"][k] for k in ("steps", "final_loss", "tokens_per_s", "stopped_reason")}
        summary["trainable_share"] = report["train"]["mask"]["trainable_share"]
        if "eval" in report:
            summary["eval"] = report["eval"]
        typer.echo(json.dumps(summary, indent=2))
        typer.echo(f"model: {out / 'model'}  report: {out / 'train_report.json'}")

    @app.command("ssah-budget")
    def ssah_budget_command(
        unit_map: Path = typer.Option(..., "--unit-map", help="Unit map of the model to align."),
        out: Path = typer.Option(..., "--out", help="Run directory; table.md / table.json land here."),
        config: Path | None = typer.Option(None, "--config", help="Align recipe YAML (default: bundled align.yaml)."),
        model: str | None = typer.Option(None, "--model", help="Model to align (overrides the config)."),
        settings: list[str] = typer.Option(["full", "ru"], "--setting",
                                           help="'full' or a unit selection the budget run trains (repeatable)."),
        sets: list[str] = typer.Option([], "--set", help="Recipe overrides, dotted: --set train.epochs=1."),
        eval_suite: str = typer.Option("quick", "--eval", help="Evaluation suite, or 'none' for training numbers only."),
        save_models: bool = typer.Option(False, "--save-models", help="Also save both trained models."),
        data_dir: Path | None = typer.Option(None, "--data-dir", help="Offline data folder."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        """SSAH experiment (a): full align vs align --budget ru; safety gained and alignment tax of each.

        `--setting ru` alone skips the full run (e.g. when the full run is an already-built named model)."""
        from safeunits.train.experiments import ssah_budget

        if not unit_map.exists():
            raise typer.BadParameter(f"unit map {unit_map} does not exist (make one with `safeunits attribute`)")
        rec = _recipe("align", config, model, sets, {})
        ssah_budget(rec, unit_map, out, settings=tuple(settings), evaluation=_context(eval_suite, data_dir, progress),
                    save_models=save_models)
        typer.echo((out / "table.md").read_text())

    @app.command("ssah-freeze")
    def ssah_freeze_command(
        unit_map: Path = typer.Option(..., "--unit-map", help="Unit map of the model being fine-tuned."),
        out: Path = typer.Option(..., "--out", help="Run directory; table.md / table.json land here."),
        config: Path | None = typer.Option(None, "--config", help="Finetune recipe YAML (default: bundled finetune.yaml)."),
        model: str | None = typer.Option(None, "--model", help="Aligned model to fine-tune (overrides the config)."),
        settings: list[str] = typer.Option(["full", "scu+cu:top0.06", "scu+cu"], "--setting",
                                           help="'full' or a unit selection to freeze (repeatable)."),
        frozen_epochs_factor: float = typer.Option(1.0, "--frozen-epochs-factor",
                                                   help="Epoch multiplier for frozen runs (SSAH used ~2)."),
        sets: list[str] = typer.Option([], "--set", help="Recipe overrides, dotted: --set n_examples=100."),
        eval_suite: str = typer.Option("quick", "--eval", help="Evaluation suite, or 'none' for training numbers only."),
        save_models: bool = typer.Option(False, "--save-models", help="Also save the fine-tuned models."),
        data_dir: Path | None = typer.Option(None, "--data-dir", help="Offline data folder."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        """SSAH experiment (b): fine-tune full vs frozen (i) scu+cu:top0.06 and (ii) scu+cu; ASR before/after."""
        from safeunits.train.experiments import ssah_freeze

        if not unit_map.exists():
            raise typer.BadParameter(f"unit map {unit_map} does not exist (make one with `safeunits attribute`)")
        rec = _recipe("finetune", config, model, sets, {})
        ssah_freeze(rec, unit_map, out, settings=tuple(settings), frozen_epochs_factor=frozen_epochs_factor,
                    evaluation=_context(eval_suite, data_dir, progress), save_models=save_models)
        typer.echo((out / "table.md").read_text())
