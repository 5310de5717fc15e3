"""D_h: harmful prompts with harmful responses, split into train / held-out, never overlapping evaluation.

Responses come from a dataset that has them (`dataset`), from the model's own greedy completions
(`self`: SmolLM2-135M complies, so these are real harmful answers), or from a prefill attack (`prefill`:
the answer is forced to start with "Sure, here is" and the model continues). With `require_compliance`
refusals are dropped, so the patches learn from harmful answers only. The saved folder records where
every prompt came from, the split, and which evaluation sets were checked for overlap.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config
from safeunits.data.overlap import OverlapError, check_no_overlap, normalise  # noqa: F401 - OverlapError re-exported
from safeunits.data.records import Record
from safeunits.data.registry import load_dataset
from safeunits.errors import UserFileNotFoundError
from safeunits.io import read_json, write_json, write_text

ResponseSource = Literal["dataset", "self", "prefill"]
SPLITS = ("train", "val")
MANIFEST = "manifest.json"


class HarmfulDataConfig(Config):
    """Where D_h's prompts and responses come from and how they are split."""

    prompts: str = Field("advbench", description="dataset name or file with the harmful prompts")
    offset: int = Field(100, ge=0, description="skip the first N prompts (AdvBench's first 100 are the eval set)")
    n_train: int = Field(64, ge=1, description="prompts in the training split (derives the patches)")
    n_val: int = Field(32, ge=0, description="held-out prompts (the sweep picks a, b, alpha, beta on these)")
    shuffle: bool = Field(True, description="shuffle the remaining prompts (seeded) before splitting")
    seed: int = Field(0, description="seed of the shuffle")
    categories: list[str] | None = Field(
        None, description="keep only prompts whose category (or the file stem of their source, e.g. Do-Not-Answer's "
                          "'malicious_uses') is one of these")
    responses: ResponseSource = Field("prefill", description="dataset | self (model's own completions) | prefill")
    response_prefix: str = Field("Sure, here is", description="forced start of the answer for the prefill source")
    max_new_tokens: int = Field(64, ge=1, description="length of generated responses")
    batch_size: int = Field(16, ge=1, description="generation batch size")
    require_compliance: bool = Field(True, description="drop responses the judge calls refusals (generated sources)")
    judge: str = Field("keyword", description="judge preset deciding compliance (safeunits.eval.judges)")
    eval_sets: list[str] = Field(
        default_factory=lambda: ["advbench[:100]", "harmbench", "xstest"],
        description="evaluation sets (name, file, or name[:N]) whose prompts must not be in D_h; an unavailable "
                    "set is skipped with a note in the manifest")


def category_of(record: Record) -> str:
    """Harm category: Do-Not-Answer risk area (its source file), else the record's category, else 'all'."""
    if record.source and ":" in record.source and record.source.endswith((".jsonl", ".json", ".csv", ".txt")):
        return Path(record.source.split(":", 1)[1]).stem
    return record.category or "all"


def select_prompts(config: HarmfulDataConfig, data_dir: str | None = None) -> dict[str, list[Record]]:
    """Pick the train / val prompts (no responses yet), deduplicated and checked against the evaluation sets."""
    records = load_dataset(config.prompts, data_dir=data_dir)[config.offset:]
    if config.categories:
        records = [r for r in records if category_of(r) in config.categories or r.category in config.categories]
    unique: dict[str, Record] = {}
    for r in records:
        unique.setdefault(normalise(r.prompt), r)
    pool = list(unique.values())
    if config.shuffle:
        random.Random(config.seed).shuffle(pool)
    need = config.n_train + config.n_val
    if len(pool) < need:
        raise ValueError(f"{config.prompts} has {len(pool)} usable prompts after offset/categories; {need} requested")
    return {"train": pool[:config.n_train], "val": pool[config.n_train:need]}


def attach_responses(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    records: list[Record],
    config: HarmfulDataConfig,
    *,
    progress: bool = True,
) -> tuple[list[Record], int]:
    """Give every prompt a harmful response per `config.responses`; returns (records kept, refusals dropped)."""
    if config.responses == "dataset":
        missing = [r.prompt for r in records if not r.response]
        if missing:
            raise ValueError(f"{config.prompts} has no responses for {len(missing)} prompt(s) (e.g. {missing[0]!r}); "
                             "use --responses self or prefill")
        return records, 0
    if model is None or tokenizer is None:
        raise ValueError(f"responses={config.responses!r} needs a model to generate with")
    from safeunits.eval.generation import generate
    from safeunits.eval.judges import get_judge

    prefix = config.response_prefix if config.responses == "prefill" else ""
    answers = generate(model, tokenizer, [r.prompt for r in records], response_prefix=prefix,
                       max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, progress=progress)
    judge = get_judge(config.judge)
    kept, dropped = [], 0
    for r, answer in zip(records, answers):
        answer = answer.strip()
        if not answer or (config.require_compliance and judge.is_refusal(r.prompt, answer)):
            dropped += 1
            continue
        kept.append(Record(r.prompt, answer, "unsafe", category_of(r), r.source))
    return kept, dropped


def build_harmful_data(
    config: HarmfulDataConfig,
    out_dir: str | Path,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    data_dir: str | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> dict[str, list[Record]]:
    """Build D_h (train + val splits), check it against the evaluation sets, save `train.jsonl`, `val.jsonl`, manifest."""
    splits = select_prompts(config, data_dir)
    checked = check_no_overlap([r.prompt for s in splits.values() for r in s], config.eval_sets, data_dir)
    out = Path(out_dir)
    result, dropped = {}, {}
    for name, records in splits.items():
        result[name], dropped[name] = attach_responses(model, tokenizer, records, config, progress=progress) \
            if records else ([], 0)
        if name == "train" and not result[name]:
            raise ValueError("every training response was a refusal: nothing harmful to derive patches from; "
                             "try --responses prefill")
        write_text(out / f"{name}.jsonl", "".join(_jsonl(r, name) for r in result[name]))
    digest = hashlib.blake2b(b"".join((out / f"{s}.jsonl").read_bytes() for s in SPLITS), digest_size=8).hexdigest()
    write_json(out / MANIFEST, {
        "config": config.model_dump(mode="json"), "model": model_name, "counts": {k: len(v) for k, v in result.items()},
        "dropped_refusals": dropped, "eval_sets_checked": checked, "sha": digest,
        "sources": sorted({r.source for v in result.values() for r in v}),
        "categories": sorted({r.category or "all" for v in result.values() for r in v}),
    })
    return result


def _jsonl(record: Record, split: str) -> str:
    import json

    return json.dumps({**record.to_dict(), "split": split}, ensure_ascii=False) + "\n"


def load_harmful_data(folder: str | Path, split: str = "train") -> tuple[list[Record], dict[str, Any]]:
    """Read one split of a D_h folder written by `build_harmful_data`, with its manifest."""
    import json

    folder = Path(folder)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise UserFileNotFoundError(f"{path} does not exist: build D_h first with `safeunits patch harmful-data`")
    manifest = read_json(folder / MANIFEST)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [Record(r["prompt"], r.get("response"), r.get("label"), r.get("category"), r.get("source", ""))
               for r in rows]
    return records, {**manifest, "split": split, "path": str(path), "n": len(records)}
