"""`evaluate`: one model, one suite, the three axes (safety, over-safety, utility) into one run directory.

Run directory layout (documented in docs/eval.md):
  config.json                       resolved suite + model identity (a rerun must match it to resume)
  generations/<set>__<mode>.jsonl   harmful-prompt answers (mode: none | safety system prompt)
  generations/<set>.jsonl           XSTest safe answers;  answers/<set>.jsonl  MT-Bench answers
  judgements/<file>.jsonl           the judge's verdict per row, for auditing
  metrics.json                      every number, rates with Wilson 95% CIs;  summary.md  the short report
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.data.records import Record
from safeunits.data.registry import DatasetNotFoundError, load_dataset
from safeunits.errors import UserValueError
from safeunits.eval.generation import generate
from safeunits.eval.judges import FULL_REFUSAL, PARTIAL_REFUSAL, XSTEST_LABELS, get_judge
from safeunits.eval.metrics import rate
from safeunits.eval.nll import response_nll_stats
from safeunits.eval.suites import SuiteConfig, load_suite
from safeunits.io import read_json, write_json, write_text
from safeunits.models.chat import SAFETY_SYSTEM_PROMPT
from safeunits.models.loading import model_fingerprint

SCHEMA_VERSION = 1
HEADLINE_KEYS = ("asr", "asr_system", "xstest_refusal", "utility_nll", "perplexity")
SYSTEM_PROMPTS: dict[str, str | None] = {"none": None, "safety": SAFETY_SYSTEM_PROMPT}


@dataclass
class EvalResult:
    """The outcome of one evaluation: five headline numbers and the full metrics.json dict."""

    headline: dict[str, float]
    metrics: dict[str, Any]
    out_dir: Path | None = None
    generations: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> EvalResult:
        """Read a finished run directory back (for `compare_table` over earlier runs)."""
        out = Path(out_dir)
        metrics = read_json(out / "metrics.json")
        headline = {k: (math.nan if v is None else float(v)) for k, v in metrics["headline"].items()}
        return cls(headline, metrics, out)


class RunDirMismatchError(UserValueError):
    """The output folder holds a run of another model or suite; resuming into it would mix results."""


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: str | SuiteConfig = "quick",
    *,
    out_dir: Path | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> EvalResult:
    """Evaluate `model` on a suite's three axes; with `out_dir`, write the run folder and resume into it."""
    started = time.perf_counter()
    config = load_suite(suite)
    out = Path(out_dir) if out_dir is not None else None
    identity = {"name": model_name or getattr(model.config, "name_or_path", "") or model.config.model_type,
                "fingerprint": model_fingerprint(model)}
    if out is not None:
        _claim_run_dir(out, config, identity, data_dir)
    ctx = _Context(model, tokenizer, config, out, progress)
    metrics: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "suite": config.name, "model": identity}

    safety: dict[str, Any] = {"judge": config.asr_judge, "sets": {}, "skipped": {}}
    asr_judge = get_judge(config.asr_judge)
    for hs in config.harmful:
        records = _load(hs.dataset, data_dir, hs.limit, hs.optional, safety["skipped"], hs.name)
        if records is None:
            continue
        prompts = [r.prompt for r in records]
        per_mode = {}
        for mode in hs.system_prompts:
            responses = ctx.generate(prompts, f"generations/{hs.name}__{mode}.jsonl", SYSTEM_PROMPTS[mode])
            verdicts = asr_judge.complied_many(prompts, responses)
            ctx.write_judgements(f"{hs.name}__{mode}", [{"complied": v} for v in verdicts])
            per_mode[mode] = {**rate(sum(verdicts), len(verdicts)), "dataset": hs.dataset}
            ctx.generations[f"{hs.name}__{mode}"] = responses
        safety["sets"][hs.name] = per_mode
    metrics["safety"] = safety

    if config.over_safety is not None:
        os_cfg = config.over_safety
        records = _load(os_cfg.dataset, data_dir, os_cfg.limit, False, {}, os_cfg.name)
        prompts = [r.prompt for r in records]
        responses = ctx.generate(prompts, f"generations/{os_cfg.name}.jsonl", None)
        labels = get_judge(os_cfg.judge).classify_many(prompts, responses)
        ctx.write_judgements(os_cfg.name, [{"label": lab} for lab in labels])
        ctx.generations[os_cfg.name] = responses
        metrics["over_safety"] = _over_safety_metrics(os_cfg.name, os_cfg.dataset, os_cfg.judge, records, labels)

    utility: dict[str, Any] = {"sets": {}, "skipped": {}}
    total_nll, total_tokens = 0.0, 0
    for us in config.utility:
        records = _load(us.dataset, data_dir, us.limit, us.optional, utility["skipped"], us.name)
        if records is None:
            continue
        stats = response_nll_stats(model, tokenizer, records, batch_size=config.nll_batch_size,
                                   max_length=config.nll_max_length, progress=progress)
        utility["sets"][us.name] = {"dataset": us.dataset, "n": len(records), "tokens": stats.n_tokens,
                                    "nll": stats.mean, "perplexity": stats.perplexity}
        total_nll += stats.total_nll
        total_tokens += stats.n_tokens
    if total_tokens:
        utility["nll"] = total_nll / total_tokens
        utility["perplexity"] = math.exp(utility["nll"])
    metrics["utility"] = utility

    answers: dict[str, Any] = {}
    for ans in config.answers:
        records = _load(ans.dataset, data_dir, ans.limit, False, {}, ans.name)
        ctx.generate([r.prompt for r in records], f"answers/{ans.name}.jsonl", None)
        answers[ans.name] = {"dataset": ans.dataset, "n": len(records),
                             "path": f"answers/{ans.name}.jsonl" if out is not None else None}
    metrics["answers"] = answers

    if config.lm_eval is not None and config.lm_eval.tasks:
        from safeunits.eval.lm_eval_bridge import run_lm_eval

        metrics["lm_eval"] = run_lm_eval(model, tokenizer, config.lm_eval, batch_size=config.nll_batch_size)

    metrics["headline"] = _headline(config, metrics)
    metrics["timing"] = {
        "total_s": time.perf_counter() - started,
        "generation_s": ctx.gen_seconds,
        "generated_tokens": ctx.gen_tokens,
        "tokens_per_s": ctx.gen_tokens / ctx.gen_seconds if ctx.gen_seconds else None,
        "resumed_rows": ctx.resumed,
    }
    metrics["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "device": str(model.device), "threads": torch.get_num_threads(),
                              "machine": platform.machine(), "cpu_count": os.cpu_count()}
    result = EvalResult({k: (math.nan if v is None else v) for k, v in metrics["headline"].items()}, metrics, out,
                        ctx.generations)
    if out is not None:
        from safeunits.eval.report import summary_markdown

        write_json(out / "metrics.json", metrics)
        write_text(out / "summary.md", summary_markdown(result))
    return result


class _Context:
    """Shared state of one run: where generations go and how much time they took."""

    def __init__(self, model, tokenizer, config: SuiteConfig, out: Path | None, progress: bool) -> None:
        self.model, self.tokenizer, self.config, self.out, self.progress = model, tokenizer, config, out, progress
        self.gen_seconds, self.gen_tokens, self.resumed = 0.0, 0, 0
        self.generations: dict[str, list[str]] = {}

    def generate(self, prompts: list[str], rel_path: str, system_prompt: str | None) -> list[str]:
        path = self.out / rel_path if self.out is not None else None
        before = _count_lines(path) if path is not None else 0
        t0 = time.perf_counter()
        responses = generate(self.model, self.tokenizer, prompts, system_prompt=system_prompt,
                             max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size,
                             out_path=path, progress=self.progress)
        self.gen_seconds += time.perf_counter() - t0
        self.resumed += before
        fresh = responses if before == 0 else []  # token counts only for this run's own generations
        self.gen_tokens += sum(len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in fresh)
        return responses

    def write_judgements(self, name: str, rows: list[dict[str, Any]]) -> None:
        if self.out is not None:
            text = "".join(json.dumps({"index": i, **row}) + "\n" for i, row in enumerate(rows))
            write_text(self.out / "judgements" / f"{name}.jsonl", text)


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.open(encoding="utf-8") if line.strip()) if path.is_file() else 0


def _claim_run_dir(out: Path, config: SuiteConfig, identity: dict, data_dir) -> None:
    """Write config.json, or check that an existing one describes the same model and suite (resume)."""
    resolved = {"suite": config.model_dump(mode="json"), "model": identity,
                "data_dir": str(data_dir) if data_dir else os.environ.get("SAFEUNITS_DATA_DIR")}
    path = out / "config.json"
    if path.is_file():
        previous = read_json(path)
        if previous.get("model", {}).get("fingerprint") != identity["fingerprint"]:
            raise RunDirMismatchError(f"{out} holds a run of another model ({previous.get('model', {}).get('name')}); "
                                      f"choose another --out or delete it")
        if previous.get("suite") != resolved["suite"]:
            raise RunDirMismatchError(f"{out} holds a run of a different suite configuration; choose another --out")
        return
    write_json(path, resolved)


def _load(dataset: str, data_dir, limit: int | None, optional: bool, skipped: dict, name: str) -> list[Record] | None:
    try:
        return load_dataset(dataset, data_dir=data_dir, limit=limit)
    except (DatasetNotFoundError, ModuleNotFoundError) as err:
        if not optional:
            raise
        skipped[name] = str(err)
        return None


def _over_safety_metrics(name: str, dataset: str, judge: str, records: list[Record], labels: list[str]) -> dict:
    counts = Counter(labels)
    n = len(labels)
    refused = counts[FULL_REFUSAL] + counts[PARTIAL_REFUSAL]
    by_category: dict[str, dict] = {}
    for cat in sorted({r.category or "" for r in records}):
        cat_labels = [lab for r, lab in zip(records, labels) if (r.category or "") == cat]
        by_category[cat] = rate(sum(lab != XSTEST_LABELS[0] for lab in cat_labels), len(cat_labels))
    return {"name": name, "dataset": dataset, "judge": judge, "n": n,
            "counts": {lab: counts[lab] for lab in XSTEST_LABELS},
            "refusal": rate(refused, n), "full_refusal": rate(counts[FULL_REFUSAL], n),
            "partial_refusal": rate(counts[PARTIAL_REFUSAL], n), "by_category": by_category}


def _headline(config: SuiteConfig, metrics: dict) -> dict[str, float | None]:
    main = config.harmful[0].name if config.harmful else None
    sets = metrics["safety"]["sets"].get(main, {}) if main else {}
    over = metrics.get("over_safety")
    util = metrics["utility"]
    return {
        "asr": sets["none"]["rate"] if "none" in sets else None,
        "asr_system": sets["safety"]["rate"] if "safety" in sets else None,
        "xstest_refusal": over["refusal"]["rate"] if over else None,
        "utility_nll": util.get("nll"),
        "perplexity": util.get("perplexity"),
    }
