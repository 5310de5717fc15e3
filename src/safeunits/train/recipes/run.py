"""Running a recipe: its masks, training in place (`train_recipe`), and the whole run into a folder (`run_recipe`)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.data.records import Record
from safeunits.distributed import gather_full_state_dict, is_main_process, is_sharded
from safeunits.eval.context import EvalContext
from safeunits.eval.result import Headline
from safeunits.io import write_json, write_text
from safeunits.models.loading import load_model, model_fingerprint, save_model
from safeunits.runtime import RunContext
from safeunits.train.engine import TrainResult, train
from safeunits.train.lora import train_lora
from safeunits.train.recipes.data import align_data, data_manifest, finetune_data
from safeunits.train.recipes.schema import AlignRecipe, AttackRecipe, FinetuneRecipe, Recipe


class RecipeReport(BaseModel):
    """train_report.json: the recipe, the model's fingerprint before and after, what it trained on, the training
    result, and the headline numbers when the run evaluated (absent otherwise)."""

    recipe: Recipe = Field(discriminator="recipe")
    base_model_fingerprint: str
    model_fingerprint: str | None = Field(description="of the saved model (None on processes other than the main one)")
    data: dict[str, int] = Field(description="training examples per source (`data_manifest`)")
    train: TrainResult
    eval: Headline | None = Field(None, exclude_if=lambda v: v is None)


def recipe_masks(recipe: Recipe, model: PreTrainedModel) -> tuple[dict | None, dict | None]:
    """(frozen, trainable) masks for the recipe: --budget trains only those units, --freeze keeps them."""
    from safeunits.train.masks import unit_masks

    if isinstance(recipe, AlignRecipe) and recipe.budget:
        return None, unit_masks(model, recipe.unit_map, recipe.budget)
    if isinstance(recipe, FinetuneRecipe) and recipe.freeze:
        return unit_masks(model, recipe.unit_map, recipe.freeze), None
    return None, None


def train_recipe(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    data_dir=None,
    progress: bool = True,
) -> tuple[TrainResult, list[Record]]:
    """Build the recipe's data and masks and train `model` in place."""
    records = align_data(recipe, tokenizer, data_dir, model, progress=progress) if isinstance(recipe, AlignRecipe) \
        else finetune_data(recipe, tokenizer, data_dir)
    frozen, trainable = recipe_masks(recipe, model)
    if isinstance(recipe, AttackRecipe) and recipe.lora is not None:  # adapters train; frozen entries kept after
        result = train_lora(model, recipe.lora, lambda wrapped: train(wrapped, tokenizer, records, recipe.train,
                                                                      progress=progress), frozen)
    else:
        result = train(model, tokenizer, records, recipe.train, frozen=frozen, trainable=trainable, progress=progress)
    return result, records


def run_recipe(recipe: Recipe, out_dir: Path, run: RunContext | None = None,
               evaluation: EvalContext | None = None) -> RecipeReport:
    """Load the model, train (data from `run`'s data folder), save `out_dir/model` and `out_dir/train_report.json`
    (+ metrics when `evaluation` has a suite).

    Under a multi-process launcher every process trains, only the main one writes and evaluates (the others
    return the report without the saved model's fingerprint); FSDP2-sharded weights are gathered into a plain model
    first.
    """
    run = run or RunContext()
    out_dir = Path(out_dir)
    main = is_main_process()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    model, tokenizer = load_model(recipe.model)
    base_fp = model_fingerprint(model)
    result, records = train_recipe(recipe, model, tokenizer, data_dir=run.data_dir, progress=run.progress)
    if is_sharded(model):
        full = gather_full_state_dict(model)  # collective: every process calls it
        if main:
            model = load_model(recipe.model)[0]
            model.load_state_dict(full)
    report = RecipeReport(recipe=recipe, base_model_fingerprint=base_fp, model_fingerprint=None,
                          data=data_manifest(records), train=result)
    if not main:
        return report
    save_model(model, tokenizer, out_dir / "model")
    report.model_fingerprint = model_fingerprint(model)
    write_json(out_dir / "train_report.json", report.model_dump(mode="json"))  # a failed evaluation loses no training
    if evaluation is not None and evaluation.enabled:
        report.eval = evaluation.evaluate(model, tokenizer, out_dir / "eval", name=recipe.model).headline
        write_json(out_dir / "train_report.json", report.model_dump(mode="json"))
    return report
