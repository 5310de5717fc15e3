"""Recipe schema: the pydantic configs of `align` (safety SFT), `finetune` and `attack`, and their YAML loader.

A recipe (loadable from YAML, see `safeunits/configs/recipes/`) says which model, which data mix, which units
train or stay frozen, and the `TrainConfig`; `recipes.data` builds its examples, `recipes.run` trains it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from safeunits.config import Config, merge
from safeunits.errors import ConfigError, UserFileNotFoundError
from safeunits.io import load_yaml
from safeunits.train.engine import TrainConfig
from safeunits.train.lora import LoraSettings

log = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).resolve().parents[2] / "configs" / "recipes"


class AlignRecipe(Config):
    """Safety SFT: harmful prompts with safe responses mixed with benign instructions.

    The safety share is the knob between under- and over-safety: Safety-Tuned LLaMAs found a few percent of
    safety data enough; too much makes the model refuse benign-but-scary prompts (XSTest).
    Benign data defaults to Self-Instruct *seed* tasks and T0 so the Self-Instruct *user* set stays unseen for
    the utility NLL of the evaluation.
    """

    model_config = ConfigDict(extra="forbid")

    recipe: Literal["align"] = "align"
    model: str = Field("smollm2-135m-instruct", description="Model to align: registered name, folder or hub id.")
    safety_data: list[str] = Field(["safety-tuned-llamas"], description="Harmful prompts with safe responses, mixed "
                                   "evenly (safety-tuned-llamas, advbench-refusals, files).")
    benign_data: list[str] = Field(["self-instruct:seed", "t0"], description="Benign instruction sets, mixed evenly.")
    contrast_data: list[str] = Field([], description="Benign prompts that look risky (e.g. 'contrast'), answered "
                                     "helpfully: rows without a response get the model's own greedy answer.")
    safety_questions: float = Field(0.0, ge=0, le=1, description="Share of the safety examples asked as questions "
                                    "(same request and safe response, prompt rewritten by data.rephrase.as_question; "
                                    "a rewrite that (nearly) equals an exclude_eval prompt keeps its instruction form).")
    n_examples: int = Field(400, ge=1, description="Training examples in total (safety + contrast + benign).")
    safety_share: float = Field(0.1, ge=0, le=1, description="Share of the examples that are safety examples.")
    contrast_share: float = Field(0.0, ge=0, le=1, description="Share of the examples that are contrast examples.")
    answer_tokens: int = Field(96, ge=8, description="Length of the model's own answers to prompts without one.")
    exclude_eval: list[str] = Field([], description="Evaluation sets (name, file or name[:N]) whose prompts are "
                                    "dropped from every training pool; what was dropped goes to the data manifest.")
    data_seed: int = Field(0, description="Seed of the data sampling (the training order has its own seed).")
    budget: str | None = Field(None, description="Train only these units of the unit map (e.g. 'ru': SSAH's "
                               "alignment budget); None trains every weight.")
    unit_map: Path | None = Field(None, description="Unit map (from `safeunits attribute`) for --budget.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=5e-5, epochs=2, batch_size=8, max_length=256))

    @field_validator("safety_data", mode="before")
    @classmethod
    def _one_or_many(cls, value: str | list[str]) -> list[str]:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "AlignRecipe":
        if self.budget and self.unit_map is None:
            raise ValueError("--budget needs a unit map (--unit-map, from `safeunits attribute`)")
        if self.safety_share + self.contrast_share > 1:
            raise ValueError("safety_share + contrast_share must not exceed 1")
        if self.contrast_share and not self.contrast_data:
            raise ValueError("contrast_share > 0 needs contrast_data")
        return self


class FinetuneRecipe(Config):
    """Ordinary fine-tuning on user data, optionally with units frozen (SSAH: 'scu+cu:top0.06', 'scu+cu')."""

    model_config = ConfigDict(extra="forbid")

    recipe: Literal["finetune"] = "finetune"
    model: str = Field("smollm2-135m-aligned", description="Model to fine-tune.")
    data: list[str] = Field(["t0"], description="Training data: dataset names or files with prompt/response.")
    n_examples: int | None = Field(200, ge=1, description="Examples sampled from the data (None: all).")
    data_seed: int = Field(0, description="Seed of the data sampling.")
    freeze: str | None = Field(None, description="Units kept bit-identical, e.g. 'scu+cu:top0.06' or 'scu+cu' "
                                "('random:scu+cu@1': a random set of the same size, as a control).")
    unit_map: Path | None = Field(None, description="Unit map for --freeze.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=5e-5, epochs=1, batch_size=8, max_length=256))

    @model_validator(mode="after")
    def _check(self) -> "FinetuneRecipe":
        if self.freeze and self.unit_map is None:
            raise ValueError("--freeze needs a unit map (--unit-map, from `safeunits attribute`)")
        return self


class AttackRecipe(FinetuneRecipe):
    """A fine-tuning attack (docs/attack.md): n examples of which a share p are harmful requests with harmful
    answers (human-labelled harmful rows of the harm sources, never the rows the shipped harm judge was fitted on,
    never an evaluation prompt), the rest benign; full weights or LoRA; optionally under frozen units (a defence)."""

    recipe: Literal["attack"] = "attack"  # type: ignore[assignment]
    harmful_sources: list[str] = Field(["gptfuzz"], description="harm sources whose human-labelled harmful rows are "
                                       "the harmful examples (eval.harm_labels: gptfuzz, pku, self_defense, xstest)")
    harmful_share: float = Field(0.5, ge=0, le=1, description="p: share of the n examples that are harmful "
                                 "(exactly round(n * p) of them)")
    exclude_eval: list[str] = Field([], description="evaluation sets whose prompts never train (checked on every row)")
    drop_refusing: bool = Field(True, description="leave out harmful rows whose answer also refuses somewhere (a "
                                "refusal phrase of XSTest's string match anywhere in it): GPTFuzz's two-persona "
                                "answers, '(ChatGPT) I'm sorry... [DAN]: ...', would teach the refusal too")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters (merged afterwards) instead of every weight")

    @model_validator(mode="after")
    def _sized(self) -> "AttackRecipe":
        if self.n_examples is None:
            raise ValueError("an attack needs n_examples (n)")
        return self

    def n_harmful(self) -> int:
        return round(self.n_examples * self.harmful_share)


Recipe = AlignRecipe | FinetuneRecipe | AttackRecipe


def load_recipe(path_or_name: str | Path, overrides: dict | None = None) -> Recipe:
    """Read a recipe YAML (a path, or a name of a bundled config such as 'aligned-default'), apply overrides.

    Overrides are nested dicts merged into the YAML (e.g. `{"train": {"epochs": 1}}`).
    """
    path = Path(path_or_name)
    if not path.is_file():
        bundled = RECIPE_DIR / f"{path_or_name}.yaml"
        if not bundled.is_file():
            known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
            raise UserFileNotFoundError(f"recipe {path_or_name!r} is neither a file nor a bundled recipe ({known})")
        path = bundled
    raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe YAML must be a mapping")
    raw = merge(raw, overrides or {})
    kinds = {"align": AlignRecipe, "finetune": FinetuneRecipe, "attack": AttackRecipe}
    kind = raw.get("recipe")
    if kind not in kinds:
        raise ConfigError(f"{path}: 'recipe' must be one of {', '.join(kinds)}, got {kind!r}")
    return kinds[kind].model_validate(raw)
