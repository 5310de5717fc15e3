"""Training recipes: `align` (safety SFT, optionally only on a unit budget) and `finetune` (with frozen units).

A recipe is a pydantic config (loadable from YAML, see `safeunits/configs/recipes/`) that says which model,
which data mix, which units train or stay frozen, and the `TrainConfig`. `run_recipe` does the whole run:
build the data, build the masks, train, save the model folder and a report (recipe, data manifest, mask
shares, losses) into the run directory, and optionally evaluate the three axes.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, field_validator, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config, merge
from safeunits.data.overlap import drop_overlap, near_eval_prompts
from safeunits.data.records import Record
from safeunits.data.rephrase import as_question
from safeunits.data.registry import load_dataset
from safeunits.distributed import gather_full_state_dict, is_main_process, is_sharded
from safeunits.eval.context import EvalContext
from safeunits.eval.generation import generate
from safeunits.errors import ConfigError, UserFileNotFoundError
from safeunits.io import load_yaml, write_json, write_text
from safeunits.models.chat import prompt_text
from safeunits.models.loading import load_model, model_fingerprint, save_model
from safeunits.runtime import RunContext
from safeunits.train.engine import TrainConfig, TrainResult, train
from safeunits.train.lora import LoraSettings, train_lora

log = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).resolve().parents[1] / "configs" / "recipes"


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


# --- data ----------------------------------------------------------------------------------------


def fits(tokenizer: PreTrainedTokenizerBase, record: Record, config: TrainConfig, min_response_tokens: int = 16) -> bool:
    """Whether the prompt leaves room for at least a few response tokens within max_length (long T0 passages don't)."""
    n = len(tokenizer(prompt_text(tokenizer, record.prompt, config.system_prompt), add_special_tokens=False)["input_ids"])
    return bool(record.response) and n + min_response_tokens <= config.max_length


def _sample(records: list[Record], n: int, rng: random.Random, keep) -> list[Record]:
    pool = [r for r in records if keep(r)]
    rng.shuffle(pool)
    return pool[:n]


def align_data(recipe: AlignRecipe, tokenizer: PreTrainedTokenizerBase, data_dir=None,
               model: PreTrainedModel | None = None, *, progress: bool = False) -> list[Record]:
    """The align mix: round(n * safety_share) safety examples, round(n * contrast_share) contrast examples (answered by
    `model` where they have no response), the rest benign; each part spread evenly over its sets."""
    rng = random.Random(recipe.data_seed)
    keep = lambda r: fits(tokenizer, r, recipe.train)  # noqa: E731
    n_safety = round(recipe.n_examples * recipe.safety_share)
    n_contrast = round(recipe.n_examples * recipe.contrast_share)
    n_benign = recipe.n_examples - n_safety - n_contrast
    safety = _part(recipe.safety_data, n_safety, rng, keep, recipe, data_dir, "safety")
    if recipe.safety_questions:
        safety = _as_questions(safety, round(len(safety) * recipe.safety_questions), recipe.exclude_eval, data_dir)
    contrast = _part(recipe.contrast_data, n_contrast, rng, lambda r: True, recipe, data_dir, "contrast")
    if any(r.response is None for r in contrast):
        contrast = [r for r in answer_missing(contrast, model, tokenizer, recipe.answer_tokens, progress) if keep(r)]
        if len(contrast) < n_contrast:
            raise ConfigError(f"only {len(contrast)} of {n_contrast} contrast prompts got a usable answer from the "
                              "model (empty, or too long for max_length)")
    benign = _part(recipe.benign_data, n_benign, rng, keep, recipe, data_dir, "benign")
    mix = safety + contrast + benign
    rng.shuffle(mix)
    return mix


def _part(specs: list[str], n: int, rng: random.Random, keep, recipe: AlignRecipe, data_dir, what: str) -> list[Record]:
    """n examples taken evenly from the sets, evaluation prompts dropped first; a clear error when they run short."""
    if not n:
        return []
    if not specs:
        raise ConfigError(f"{what} data is empty but the shares leave {n} {what} examples to fill")
    pools = []
    for spec in specs:
        records = load_dataset(spec, data_dir=data_dir)
        if recipe.exclude_eval:
            records, note = drop_overlap(records, recipe.exclude_eval, data_dir)
            log.info("%s: %d prompts dropped (in evaluation sets %s)", spec, note["dropped"], recipe.exclude_eval)
        pools.append(_sample(records, n, rng, keep))
    out = _round_robin(pools, n)
    if len(out) < n:
        raise ConfigError(f"{specs} have only {len(out)} usable {what} examples; {n} requested")
    return out


def _as_questions(records: list[Record], n: int, exclude_eval: list[str], data_dir) -> list[Record]:
    """The first n records asked as questions (their source marked), unless the question is near an evaluation prompt."""
    asked = [dataclasses.replace(r, prompt=as_question(r.prompt), source=f"{r.source} (as question)") for r in records[:n]]
    clash = near_eval_prompts([r.prompt for r in asked], exclude_eval, data_dir) if exclude_eval else [False] * n
    if any(clash):
        log.info("%d rewritten safety prompts kept their instruction form: near an evaluation prompt", sum(clash))
    return [old if near else new for old, new, near in zip(records, asked, clash)] + records[n:]


def answer_missing(records: list[Record], model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
                   max_new_tokens: int, progress: bool = False) -> list[Record]:
    """Fill records without a response with the model's own greedy answer (before any training: the base model's),
    so contrast prompts teach "answer this" in the model's own words."""
    todo = [i for i, r in enumerate(records) if r.response is None]
    if not todo:
        return records
    if model is None:
        raise ValueError(f"{len(todo)} examples have no response and no model was given to answer them")
    answers = generate(model, tokenizer, [records[i].prompt for i in todo], max_new_tokens=max_new_tokens,
                       progress=progress)
    out = list(records)
    for i, answer in zip(todo, answers):
        out[i] = dataclasses.replace(records[i], response=answer.strip())
    return out


def finetune_data(recipe: FinetuneRecipe, tokenizer: PreTrainedTokenizerBase, data_dir=None) -> list[Record]:
    """User data for fine-tuning, sampled evenly over the listed sets (an attack: its harmful rows mixed in)."""
    if isinstance(recipe, AttackRecipe):
        return attack_data(recipe, tokenizer, data_dir)
    rng = random.Random(recipe.data_seed)
    keep = lambda r: fits(tokenizer, r, recipe.train)  # noqa: E731
    pools = []
    for spec in recipe.data:
        records = load_dataset(spec, data_dir=data_dir)
        pools.append(_sample(records, len(records), rng, keep))
    out = _round_robin(pools, recipe.n_examples if recipe.n_examples is not None else sum(map(len, pools)))
    if not out:
        raise ValueError(f"no usable training examples in {recipe.data} (need responses that fit max_length)")
    rng.shuffle(out)
    return out


def harmful_pool(recipe: AttackRecipe, data_dir=None) -> tuple[list[Record], dict[str, int]]:
    """The harmful examples an attack may draw: human-labelled harmful (request, response) rows of the recipe's
    sources, without the rows the shipped harm judge trained on (it must not score text it was fitted to), without
    evaluation prompts, each pair once. Returns the pool and what was left out."""
    from safeunits.eval.harm_judge import sampled_rows, shipped_config
    from safeunits.eval.harm_labels import load_harm_rows

    judge = shipped_config()
    judged = [s for s in recipe.harmful_sources if s in judge.sources]
    fitted = {(r.request, r.response) for rows in sampled_rows(judge, judged, data_dir).values() for r in rows} \
        if judged else set()
    seen: set[tuple[str, str]] = set()
    pool, counts = [], {"harmful_rows": 0, "judge_rows": 0, "duplicates": 0}
    for source, rows in load_harm_rows(recipe.harmful_sources, data_dir).items():
        for row in rows:
            if not row.harmful:
                continue
            counts["harmful_rows"] += 1
            pair = (row.request, row.response)
            if pair in fitted:
                counts["judge_rows"] += 1
            elif pair in seen:
                counts["duplicates"] += 1
            else:
                seen.add(pair)
                pool.append(Record(prompt=row.request, response=row.response, label="harmful", source=source))
    if recipe.exclude_eval:
        pool, note = drop_overlap(pool, recipe.exclude_eval, data_dir)
        counts["eval_prompts"] = note["dropped"]
    return pool, counts


def attack_data(recipe: AttackRecipe, tokenizer: PreTrainedTokenizerBase, data_dir=None) -> list[Record]:
    """Exactly round(n * p) harmful examples (seeded sample of `harmful_pool`) and n - that benign ones (the
    benign sets sampled as `finetune` does, evaluation prompts dropped), shuffled."""
    rng = random.Random(recipe.data_seed)
    keep = lambda r: fits(tokenizer, r, recipe.train)  # noqa: E731
    k = recipe.n_harmful()
    pool, _ = harmful_pool(recipe, data_dir)
    harmful = _sample(pool, k, rng, keep)
    if len(harmful) < k:
        raise ValueError(f"the attack needs {k} harmful examples; {recipe.harmful_sources} give {len(harmful)} that "
                         f"fit max_length={recipe.train.max_length} (add sources or lower n or p)")
    pools = []
    for spec in recipe.data:
        records = load_dataset(spec, data_dir=data_dir)
        if recipe.exclude_eval:
            records, _ = drop_overlap(records, recipe.exclude_eval, data_dir)
        pools.append(_sample(records, len(records), rng, keep))
    benign = _round_robin(pools, recipe.n_examples - k)
    if len(benign) < recipe.n_examples - k:
        raise ValueError(f"the attack needs {recipe.n_examples - k} benign examples; {recipe.data} give {len(benign)}")
    out = harmful + benign
    rng.shuffle(out)
    return out


def _round_robin(pools: list[list[Record]], n: int) -> list[Record]:
    """Take from each pool in turn, so the sets are mixed evenly and a short set is topped up by the others."""
    out: list[Record] = []
    pos = [0] * len(pools)
    while len(out) < n and any(pos[k] < len(p) for k, p in enumerate(pools)):
        for k, pool in enumerate(pools):
            if pos[k] < len(pool) and len(out) < n:
                out.append(pool[pos[k]])
                pos[k] += 1
    return out


def data_manifest(records: list[Record]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.source] = counts.get(r.source, 0) + 1
    return counts


# --- running -------------------------------------------------------------------------------------


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
               evaluation: EvalContext | None = None) -> dict:
    """Load the model, train (data from `run`'s data folder), save `out_dir/model` and `out_dir/train_report.json`
    (+ metrics when `evaluation` has a suite).

    Under a multi-process launcher every process trains, only the main one writes and evaluates (the others
    return the training result alone); FSDP2-sharded weights are gathered into a plain model first.
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
    if not main:
        return {"train": result.to_dict()}
    save_model(model, tokenizer, out_dir / "model")
    report = {"recipe": recipe.model_dump(mode="json"), "base_model_fingerprint": base_fp,
              "model_fingerprint": model_fingerprint(model), "data": data_manifest(records),
              "train": result.to_dict()}
    write_json(out_dir / "train_report.json", report)  # before evaluating: a failed evaluation loses no training
    if evaluation is not None and evaluation.enabled:
        report["eval"] = evaluation.evaluate(model, tokenizer, out_dir / "eval", name=recipe.model).headline.as_dict()
        write_json(out_dir / "train_report.json", report)
    return report
