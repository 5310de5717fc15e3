"""Recipe data: the examples each recipe trains on (safety / contrast / benign mixes, fine-tuning sets, attack mixes),
sampled with the recipe's seed, evaluation prompts kept out."""

from __future__ import annotations

import dataclasses
import logging
import random

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.data.overlap import drop_overlap, near_eval_prompts
from safeunits.data.records import Record
from safeunits.data.rephrase import as_question
from safeunits.data.registry import load_dataset
from safeunits.errors import ConfigError
from safeunits.eval.generation import generate
from safeunits.eval.rule_judges import XSTEST_STRMATCH_PREFIXES
from safeunits.models.chat import prompt_text
from safeunits.train.engine import TrainConfig
from safeunits.train.recipes.schema import AlignRecipe, AttackRecipe, FinetuneRecipe

log = logging.getLogger(__name__)

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


REFUSAL_PHRASES = tuple(p for p in XSTEST_STRMATCH_PREFIXES if p.startswith(("i", "sorry", "as an ai")))


def refuses_somewhere(response: str) -> bool:
    """A first-person refusal phrase of XSTest's string match (I'm sorry, I cannot, as an AI, ...) anywhere in the
    answer, not only at its start: a jailbroken two-persona answer refuses in one voice and complies in the other."""
    text = response.lower()
    return any(p in text for p in REFUSAL_PHRASES)


def harmful_pool(recipe: AttackRecipe, data_dir=None) -> tuple[list[Record], dict[str, int]]:
    """The harmful examples an attack may draw: human-labelled harmful (request, response) rows of the recipe's
    sources, without the rows the shipped harm judge trained on (it must not score text it was fitted to), without
    answers that also refuse (`drop_refusing`), without evaluation prompts, each pair once. Returns the pool and
    what was left out."""
    from safeunits.eval.harm_judge import sampled_rows, shipped_config
    from safeunits.eval.harm_labels import load_harm_rows

    judge = shipped_config()
    judged = [s for s in recipe.harmful_sources if s in judge.sources]
    fitted = {(r.request, r.response) for rows in sampled_rows(judge, judged, data_dir).values() for r in rows} \
        if judged else set()
    seen: set[tuple[str, str]] = set()
    pool, counts = [], {"harmful_rows": 0, "judge_rows": 0, "duplicates": 0, "refusing": 0}
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
            elif recipe.drop_refusing and refuses_somewhere(row.response):
                counts["refusing"] += 1
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
