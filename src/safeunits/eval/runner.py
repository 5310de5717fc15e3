"""`evaluate`: one model, one suite, the three axes (safety, over-safety, utility) into one run directory.

Run directory layout (documented in docs/eval.md):
  config.json                       resolved suite + model identity (a rerun must match it to resume)
  generations/<set>__<mode>.jsonl   harmful-prompt answers (mode: none | safety system prompt)
  generations/<set>.jsonl           XSTest safe answers;  answers/<set>.jsonl  MT-Bench answers
  judgements/<file>.jsonl           the judge's verdict per row, for auditing
  nll/<set>.json                    utility NLL scores (summed, per record), reused on resume
  zero_shot/<task>.jsonl            zero-shot task scores per document (lm-eval log-likelihoods), reused on resume
  metrics.json                      every number, rates with Wilson 95% CIs;  summary.md  the short report
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections import Counter
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.data.overlap import drop_overlap
from safeunits.data.records import Record
from safeunits.data.registry import DatasetNotFoundError, load_dataset
from safeunits.distributed import ProcessShard, process_shard
from safeunits.errors import UserValueError
from safeunits.eval.generation import Backend, GenerationJob, generate_many
from safeunits.eval.judges import FULL_COMPLIANCE, FULL_REFUSAL, PARTIAL_REFUSAL, XSTEST_LABELS, get_judge
from safeunits.eval.nll import NLLStats, response_nll_stats
from safeunits.eval.report import summary_document
from safeunits.eval.result import (AnswerSetInfo, EvalResult, HarmfulMetrics, ModelIdentity, OverSafetyMetrics, Rate,
                                   SafetyMetrics, SystemPromptMode, Timing, UtilityMetrics, UtilitySetMetrics)
from safeunits.eval.suites import SuiteConfig, load_suite
from safeunits.eval.vllm_backend import VllmGenerator, check_backend
from safeunits.io import read_json, write_json, write_text
from safeunits.models.chat import SAFETY_SYSTEM_PROMPT
from safeunits.models.loading import model_fingerprint

RESULT_DIRS = ("generations", "answers", "nll", "judgements")  # what a resume reuses
SYSTEM_PROMPTS: dict[SystemPromptMode, str | None] = {"none": None, "safety": SAFETY_SYSTEM_PROMPT}


class RunDirMismatchError(UserValueError):
    """The output folder holds a run of another model or suite; resuming into it would mix results."""


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: str | SuiteConfig = "quick",
    *,
    out_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    model_name: str | None = None,
    backend: Backend = "transformers",
) -> EvalResult:
    """Evaluate `model` on a suite's three axes; with `out_dir`, write the run folder and resume into it.

    Experiments call this through `EvalContext.evaluate` (safeunits.eval.context), which resolves the suite and
    the data folder once. `backend` generates the answers (same files either way; see eval/vllm_backend.py).

    Under `accelerate launch` / `torchrun` with N processes, every process calls this: each generates and scores
    its share of every prompt set, all get every answer and score, and only the main process writes the run
    folder; metrics equal a one-process run's (greedy answers and judge verdicts are per prompt)."""
    started = time.perf_counter()
    check_backend(backend)
    config = load_suite(suite)
    out = Path(out_dir) if out_dir is not None else None
    identity = ModelIdentity(name=model_name or getattr(model.config, "name_or_path", "") or model.config.model_type,
                             fingerprint=model_fingerprint(model))
    shard = process_shard()
    fresh = False
    if out is not None:
        fresh = _claim_run_dir(out, config, identity, data_dir, backend, write=shard.is_main)
        shard.barrier()
    run = _Run(model, tokenizer, config, out, data_dir, progress and shard.is_main, backend, shard)
    try:
        run.generate()
        t0 = time.perf_counter()
        safety, over_safety = run.safety(), run.over_safety()
        t1 = time.perf_counter()
        utility = run.utility()
        judging_s, nll_s = t1 - t0, time.perf_counter() - t1
        result = EvalResult(suite=config.name, model=identity, safety=safety, over_safety=over_safety,
                            utility=utility, answers=run.answers(), out_dir=out)
    except BaseException:
        if fresh and not any(p.is_file() for sub in RESULT_DIRS for p in (out / sub).rglob("*")):
            (out / "config.json").unlink(missing_ok=True)  # nothing to resume: the claim is undone (a fix may rerun)
        raise
    finally:
        run.close()
    accuracy_s = None
    if config.lm_eval is not None and config.lm_eval.tasks:
        from safeunits.eval.zero_shot import accuracy_metrics  # imports lm_eval (seconds): only when asked

        t0 = time.perf_counter()
        result.utility.accuracy = accuracy_metrics(model, tokenizer, config.lm_eval, data_dir=data_dir, progress=progress,
                                                   cache_dir=out / "zero_shot" if out is not None else None)
        accuracy_s = time.perf_counter() - t0
    result.timing = Timing(total_s=time.perf_counter() - started, generation_s=run.gen_seconds,
                           generated_tokens=run.gen_tokens, resumed_rows=run.resumed, resumed_tokens=run.resumed_tokens,
                           tokens_per_s=run.gen_tokens / run.gen_seconds if run.gen_tokens and run.gen_seconds else None,
                           accuracy_s=accuracy_s, judging_s=judging_s, nll_s=nll_s)
    result.environment = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "device": str(model.device), "generation_backend": backend, "threads": torch.get_num_threads(),
                          "machine": platform.machine(), "cpu_count": os.cpu_count(),
                          "processes": shard.world}
    result.with_headline()
    if out is not None and shard.is_main:
        result.save(out)
        write_text(out / "summary.md", summary_document(result).markdown())
    return result


class _Run:
    """One evaluation in progress: every answer generated first in one run (`generate`), then the three axes one
    method each, generations written where the run folder says."""

    def __init__(self, model, tokenizer, config: SuiteConfig, out: Path | None, data_dir, progress: bool,
                 backend: Backend, shard: ProcessShard) -> None:
        self.model, self.tokenizer, self.config, self.out, self.shard = model, tokenizer, config, out, shard
        self.data_dir, self.progress = data_dir, progress
        self.gen_seconds, self.gen_tokens, self.resumed, self.resumed_tokens = 0.0, 0, 0, 0
        self.records: dict[str, list[Record] | None] = {}  # set name -> its records (None: optional, skipped)
        self.skipped: dict[str, str] = {}  # optional harmful sets not available, with why
        self.responses: dict[str, list[str]] = {}  # run-folder file -> its answers, in record order
        self.vllm = None
        if backend == "vllm":  # one engine for every generation of this evaluation, started on first use
            self.vllm = VllmGenerator(model, tokenizer)

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()

    def generate(self) -> None:
        """Answer every prompt of the suite (harmful sets x system prompts, XSTest safe, answer sets) in one
        generation run: the continuous engine then decodes all of them together, many rows a step, each set under
        its own system prompt (one prefix group a file). Writes the same files a call per set would."""
        jobs: dict[str, GenerationJob] = {}
        for hs in self.config.harmful:
            records = self._load(hs.dataset, hs.limit, hs.name, self.skipped if hs.optional else None)
            self.records[hs.name] = records
            for mode in hs.system_prompts if records is not None else []:
                jobs[f"generations/{hs.name}__{mode}.jsonl"] = GenerationJob([r.prompt for r in records],
                                                                             system_prompt=SYSTEM_PROMPTS[mode])
        cfg = self.config.over_safety
        if cfg is not None:
            records = self._load(cfg.dataset, cfg.limit, cfg.name, None)
            if cfg.exclude:
                records, _ = drop_overlap(records, cfg.exclude, self.data_dir, strict=True)
            self.records[cfg.name] = records
            jobs[f"generations/{cfg.name}.jsonl"] = GenerationJob([r.prompt for r in records])
        for ans in self.config.answers:
            self.records[ans.name] = self._load(ans.dataset, ans.limit, ans.name, None)
            jobs[f"answers/{ans.name}.jsonl"] = GenerationJob([r.prompt for r in self.records[ans.name]])
        self.responses = dict(zip(jobs, self._generate(list(jobs.items()))))

    def safety(self) -> SafetyMetrics:
        refusal_judge = get_judge(self.config.refusal_judge, data_dir=self.data_dir)
        harm_judge = (refusal_judge if self.config.harm_judge == self.config.refusal_judge
                      else get_judge(self.config.harm_judge, data_dir=self.data_dir))
        metrics = SafetyMetrics(judge=self.config.refusal_judge, harm_judge=self.config.harm_judge,
                                harm_judge_id=harm_judge.identity, skipped=dict(self.skipped))
        for hs in self.config.harmful:
            records = self.records[hs.name]
            if records is None:
                continue
            prompts = [r.prompt for r in records]
            per_mode: dict[SystemPromptMode, HarmfulMetrics] = {}
            for mode in hs.system_prompts:
                responses = self.responses[f"generations/{hs.name}__{mode}.jsonl"]
                verdicts = refusal_judge.harm_verdicts(prompts, responses)
                harmful = harm_judge.harmful_many(prompts, responses)
                self._write_judgements(f"{hs.name}__{mode}", [{"verdict": v, "harmful": h}
                                                              for v, h in zip(verdicts, harmful)])
                per_mode[mode] = HarmfulMetrics.from_verdicts(hs.dataset, verdicts, harmful)
            metrics.sets[hs.name] = per_mode
        return metrics

    def over_safety(self) -> OverSafetyMetrics | None:
        cfg = self.config.over_safety
        if cfg is None:
            return None
        records = self.records[cfg.name]
        prompts = [r.prompt for r in records]
        responses = self.responses[f"generations/{cfg.name}.jsonl"]
        labels = get_judge(cfg.judge, data_dir=self.data_dir).classify_many(prompts, responses)
        self._write_judgements(cfg.name, [{"label": lab} for lab in labels])
        counts = Counter(labels)
        n = len(labels)
        by_category = {}
        for cat in sorted({r.category or "" for r in records}):
            cat_labels = [lab for r, lab in zip(records, labels) if (r.category or "") == cat]
            by_category[cat] = Rate.of(sum(lab != FULL_COMPLIANCE for lab in cat_labels), len(cat_labels))
        return OverSafetyMetrics(
            name=cfg.name, dataset=cfg.dataset, judge=cfg.judge, n=n, counts={lab: counts[lab] for lab in XSTEST_LABELS},
            refusal=Rate.of(counts[FULL_REFUSAL] + counts[PARTIAL_REFUSAL], n),
            full_refusal=Rate.of(counts[FULL_REFUSAL], n), partial_refusal=Rate.of(counts[PARTIAL_REFUSAL], n),
            by_category=by_category, labels=labels)

    def utility(self) -> UtilityMetrics:
        metrics = UtilityMetrics()
        total_nll, total_tokens = 0.0, 0
        for us in self.config.utility:
            records = self._load(us.dataset, us.limit, us.name, metrics.skipped if us.optional else None)
            if records is None:
                continue
            stats = self._nll_stats(us.name, records)
            metrics.sets[us.name] = UtilitySetMetrics(
                dataset=us.dataset, n=len(records), tokens=stats.n_tokens, nll=stats.mean, perplexity=stats.perplexity,
                per_record_nll=stats.per_record, per_record_tokens=stats.per_record_tokens)
            total_nll += stats.total_nll
            total_tokens += stats.n_tokens
        if total_tokens:
            metrics.nll = total_nll / total_tokens
            metrics.perplexity = math.exp(metrics.nll)
        return metrics

    def _nll_stats(self, name: str, records: list[Record]) -> NLLStats:
        """Scores of a utility set, cached in the run folder (`nll/<set>.json`): a resumed run reuses them, as it
        reuses generations (config.json has already checked that model and suite are the same)."""
        path = self.out / "nll" / f"{name}.json" if self.out is not None else None
        if path is not None and path.is_file():
            cached = NLLStats(**read_json(path))
            if len(cached.per_record) == len(records):
                return cached
        stats = response_nll_stats(self.model, self.tokenizer, records, batch_size=self.config.nll_batch_size,
                                   max_length=self.config.nll_max_length, progress=self.progress, shard=self.shard)
        if path is not None and self.shard.is_main:
            write_json(path, dataclasses.asdict(stats))
        return stats

    def answers(self) -> dict[str, AnswerSetInfo]:
        answers = {}
        for ans in self.config.answers:
            records = self.records[ans.name]
            rel = f"answers/{ans.name}.jsonl"
            answers[ans.name] = AnswerSetInfo(dataset=ans.dataset, n=len(records),
                                              path=rel if self.out is not None else None)
        return answers

    def _load(self, dataset: str, limit: int | None, name: str, skipped: dict[str, str] | None) -> list[Record] | None:
        """The set's records; an optional set (`skipped` given) that is not available is recorded and skipped."""
        try:
            return load_dataset(dataset, data_dir=self.data_dir, limit=limit)
        except (DatasetNotFoundError, ModuleNotFoundError) as err:
            if skipped is None:
                raise
            skipped[name] = str(err)
            return None

    def _generate(self, jobs: list[tuple[str, GenerationJob]]) -> list[list[str]]:
        """Answers of every (run-folder file, job) in one generation run; counts resumed and generated tokens."""
        jobs = [(rel, dataclasses.replace(job, out_path=self.out / rel if self.out is not None else None))
                for rel, job in jobs]
        before = [_count_lines(job.out_path) if job.out_path is not None else 0 for _, job in jobs]
        t0 = time.perf_counter()
        kwargs = dict(max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size,
                      progress=self.progress, engine=self.config.generation, shard=self.shard)
        plain = [job for _, job in jobs]
        answers = (self.vllm.generate_many(plain, **kwargs) if self.vllm is not None
                   else generate_many(self.model, self.tokenizer, plain, **kwargs))
        self.gen_seconds += time.perf_counter() - t0
        for responses, n in zip(answers, before):
            self.resumed += n
            # the first `n` rows came from disk, the rest were generated now (the rate counts only those)
            self.resumed_tokens += sum(self._tokens(r) for r in responses[:n])
            self.gen_tokens += sum(self._tokens(r) for r in responses[n:])
        return answers

    def _tokens(self, response: str) -> int:
        return len(self.tokenizer(response, add_special_tokens=False)["input_ids"])

    def _write_judgements(self, name: str, rows: list[dict]) -> None:
        if self.out is not None and self.shard.is_main:
            text = "".join(json.dumps({"index": i, **row}) + "\n" for i, row in enumerate(rows))
            write_text(self.out / "judgements" / f"{name}.jsonl", text)


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.open(encoding="utf-8") if line.strip()) if path.is_file() else 0


def _claim_run_dir(out: Path, config: SuiteConfig, identity: ModelIdentity, data_dir, backend: Backend,
                   write: bool = True) -> bool:
    """Write config.json (`write`: the main process; True when written afresh), or check that an existing one
    describes the same model, suite and backend (resume). How rows are batched (`batch_size`, `generation`) and how
    answers are judged do not decide the answers, so a run may resume with other values (judged again)."""
    resolved = {"suite": config.model_dump(mode="json"), "model": identity.model_dump(), "backend": backend,
                "data_dir": str(data_dir) if data_dir else os.environ.get("SAFEUNITS_DATA_DIR")}
    path = out / "config.json"
    if path.is_file():
        previous = read_json(path)
        if previous.get("model", {}).get("fingerprint") != identity.fingerprint:
            raise RunDirMismatchError(f"{out} holds a run of another model ({previous.get('model', {}).get('name')}); "
                                      f"choose another --out or delete it")
        if _answer_settings(previous.get("suite")) != _answer_settings(resolved["suite"]):
            raise RunDirMismatchError(f"{out} holds a run of a different suite configuration; choose another --out")
        if previous.get("backend", "transformers") != backend:  # greedy answers may differ between backends
            raise RunDirMismatchError(f"{out} holds generations of the {previous.get('backend', 'transformers')} "
                                      f"backend; resume with that --backend or choose another --out")
        if write and previous.get("suite") != resolved["suite"]:  # e.g. other judges: answers reused, judged again
            write_json(path, resolved)
        return False
    if write:
        write_json(path, resolved)
    return write


def _answer_settings(suite: dict | None) -> dict | None:
    """A suite's settings that decide the answers (not its description, batching or judges, which only read them)."""
    if not isinstance(suite, dict):
        return suite
    suite = SuiteConfig.model_validate(suite).model_dump(mode="json")  # old spellings (asr_judge) read alike
    for key in ("description", "batch_size", "generation", "refusal_judge", "harm_judge"):
        suite.pop(key, None)
    if suite.get("over_safety"):
        suite["over_safety"].pop("judge")
    return suite
