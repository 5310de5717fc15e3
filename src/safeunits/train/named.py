"""Named models built by training: `smollm2-135m-aligned` (the aligned default) and `smollm2-135m-oversafe`.

Each is the default model trained with a bundled align preset (`configs/recipes/aligned-default.yaml`,
`oversafe.yaml`, `aligned-contrast.yaml`), built once on first `load_model(name)` (or `safeunits models --build
NAME`) and cached; editing the preset changes its build key, and the next use rebuilds it.
The build is deterministic: fixed data sample, data order and torch seeds (on the same hardware and thread
count; floating-point reductions may differ across machines). `safeunits_build.json` in the model folder
records the recipe, data manifest and training result.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from safeunits.io import write_json
from safeunits.models.loading import load_model, model_fingerprint, register_named_model

log = logging.getLogger(__name__)

ALIGNED = "smollm2-135m-aligned"
OVERSAFE = "smollm2-135m-oversafe"
ALIGNED_CONTRAST = "smollm2-135m-aligned-contrast"


def recipe_key(preset: str) -> Callable[[], str]:
    """The build key of a recipe-built model: a hash of the preset's full recipe, so editing the preset rebuilds it."""

    def key() -> str:
        from safeunits.train.recipes import load_recipe

        recipe = json.dumps(load_recipe(preset).model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(recipe.encode("utf-8")).hexdigest()[:16]

    return key


def recipe_builder(preset: str) -> Callable[[Path], None]:
    """A named-model builder that trains the preset's model with the preset and saves the result."""

    def build(target: Path) -> None:
        from safeunits.train.recipes import RecipeReport, data_manifest, load_recipe, train_recipe

        recipe = load_recipe(preset)
        log.info("building %s: training %s with the %r preset (once; cached)", target.name, recipe.model, preset)
        model, tokenizer = load_model(recipe.model)
        base_fp = model_fingerprint(model)
        result, records = train_recipe(recipe, model, tokenizer)
        model.config.name_or_path = target.name
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        report = RecipeReport(recipe=recipe, base_model_fingerprint=base_fp, model_fingerprint=model_fingerprint(model),
                              data=data_manifest(records), train=result)
        write_json(target / "safeunits_build.json", {"preset": preset, **report.model_dump(mode="json")})

    return build


def register_recipe_model(name: str, preset: str, description: str) -> None:
    """A named model trained with a bundled recipe preset, rebuilt when the preset changes."""
    register_named_model(name, recipe_builder(preset), description, key=recipe_key(preset))


register_recipe_model(ALIGNED, "aligned-default",
                      "smollm2-135m-instruct after safety SFT with the aligned-default preset: safety data partly asked "
                      "as questions, contrast prompts answered by the base model, evaluation prompts excluded (built "
                      "on CPU, cached; docs/train.md)")
register_recipe_model(OVERSAFE, "oversafe",
                      "smollm2-135m-instruct after safety SFT with a safety-heavy mix: refuses benign-but-scary prompts")
register_recipe_model(ALIGNED_CONTRAST, "aligned-contrast",
                      "the aligned default's recipe without safety questions: fewer over-refusals, answers harmful "
                      "questions (a point of the trade-off curve in docs/train.md)")
