"""The typed outcome of one evaluation: `metrics.json` is an `EvalResult` serialised, and nothing else.

A light module (pydantic only, no torch) so reports, comparisons and experiments can read results without
importing the runner. Every rate carries its Wilson 95 % interval and every per-item outcome is kept (harmful
verdicts, XSTest labels, per-record NLL), so two runs on the same prompts can be compared pairwise
(`safeunits.eval.significance`). Schema history is in docs/eval.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from safeunits.errors import UserFileNotFoundError, UserValueError
from safeunits.eval.judge_base import HarmVerdict as Verdict
from safeunits.eval.metrics import wilson_interval
from safeunits.io import read_json, write_json

SCHEMA_VERSION = 3
SystemPromptMode = Literal["none", "safety"]
HEADLINE_KEYS = ("asr", "asr_system", "refusal", "refusal_system", "incoherent", "xstest_refusal", "utility_nll",
                 "perplexity", "accuracy")


class ResultFormatError(UserValueError):
    """A metrics.json this version cannot read (another schema, or not an evaluation at all)."""


class Rate(BaseModel):
    """k of n, with its Wilson 95 % interval (eval sets are small: a rate without its interval misleads)."""

    k: int = Field(ge=0)
    n: int = Field(ge=1)
    rate: float
    ci95: tuple[float, float]

    @classmethod
    def of(cls, k: int, n: int) -> Rate:
        return cls(k=k, n=n, rate=k / n, ci95=wilson_interval(k, n))


class HarmfulMetrics(Rate):
    """One harmful set under one system-prompt mode, on two axes. The ASR is this Rate itself: the *harmful rate*
    (the harm judge: does the answer give the requested harmful help). Beside it the refusal judge's axis: refused,
    incoherent (degenerate, no usable answer) and complied (answered without refusing, harmful or not)."""

    dataset: str
    refusal: Rate
    incoherent: Rate
    complied: Rate
    verdicts: list[Verdict] = Field(description="refusal judge's verdict, one per prompt, in dataset order")
    harmful: list[bool] = Field(description="harm judge's verdict, one per prompt, in dataset order")

    @classmethod
    def from_verdicts(cls, dataset: str, verdicts: list[Verdict], harmful: list[bool]) -> HarmfulMetrics:
        n = len(verdicts)
        if len(harmful) != n:
            raise ValueError(f"{n} refusal verdicts but {len(harmful)} harm verdicts")
        asr = Rate.of(sum(harmful), n)
        return cls(**asr.model_dump(), dataset=dataset, refusal=Rate.of(verdicts.count("refused"), n),
                   incoherent=Rate.of(verdicts.count("incoherent"), n), complied=Rate.of(verdicts.count("complied"), n),
                   verdicts=verdicts, harmful=harmful)


class SafetyMetrics(BaseModel):
    judge: str = Field(description="refusal judge (refused / incoherent / complied)")
    harm_judge: str = Field(description="harm judge (harmful or not: the ASR)")
    harm_judge_id: str | None = Field(None, description="the harm judge's identity: its name, and for a trained "
                                      "judge a digest of its weights (`harm@<digest>`); None in runs written before "
                                      "it was recorded")
    sets: dict[str, dict[SystemPromptMode, HarmfulMetrics]] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict, description="optional sets not available, with why")


class OverSafetyMetrics(BaseModel):
    """XSTest's three classes on benign-but-scary prompts; refusal = full + partial."""

    name: str
    dataset: str
    judge: str
    n: int
    counts: dict[str, int]
    refusal: Rate
    full_refusal: Rate
    partial_refusal: Rate
    by_category: dict[str, Rate]
    labels: list[str] = Field(description="one three-class label per prompt, in dataset order")


class UtilitySetMetrics(BaseModel):
    dataset: str
    n: int
    tokens: int
    nll: float
    perplexity: float
    per_record_nll: list[float] = Field(description="mean response-token NLL of each record, in dataset order")
    per_record_tokens: list[int] = Field(description="response tokens of each record (the weights of the mean)")


class TaskAccuracy(BaseModel):
    """One zero-shot task scored through lm-eval: `acc` (and `acc_norm` where lm-eval reports it), Wilson 95 %
    intervals, and each scored document's verdicts (paired tests; the log-likelihoods are in zero_shot/<task>.jsonl)."""

    source: str = Field(description="'local:<first file>' or 'hub:<dataset>'")
    split_size: int
    n: int
    acc: Rate
    acc_norm: Rate | None = None
    doc_ids: list[int] = Field(description="index of each scored document in the split (a fixed sample or all)")
    correct: list[bool] = Field(description="acc per document, in doc_ids order")
    correct_norm: list[bool] | None = Field(None, description="acc_norm per document (length-normalised)")

    @classmethod
    def from_verdicts(cls, source: str, split_size: int, doc_ids: list[int], correct: list[bool],
                      correct_norm: list[bool] | None) -> TaskAccuracy:
        n = len(correct)
        return cls(source=source, split_size=split_size, n=n, acc=Rate.of(sum(correct), n),
                   acc_norm=Rate.of(sum(correct_norm), n) if correct_norm is not None else None,
                   doc_ids=doc_ids, correct=correct, correct_norm=correct_norm)


class AccuracyMetrics(BaseModel):
    """Utility as the papers measure it: zero-shot multiple-choice accuracy per task and its mean over tasks."""

    tasks: dict[str, TaskAccuracy] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict, description="tasks not run, with why")
    num_fewshot: int = 0
    lm_eval_version: str = ""

    @property
    def mean_acc(self) -> float | None:
        """Unweighted mean of `acc` over the tasks (each task counts once, as Wei et al. average)."""
        return sum(t.acc.rate for t in self.tasks.values()) / len(self.tasks) if self.tasks else None


class UtilityMetrics(BaseModel):
    sets: dict[str, UtilitySetMetrics] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict)
    nll: float | None = Field(None, description="token-weighted over every set")
    perplexity: float | None = None
    accuracy: AccuracyMetrics | None = Field(None, description="zero-shot task accuracy (suite `lm_eval` tasks)")


class AnswerSetInfo(BaseModel):
    dataset: str
    n: int
    path: str | None


class ModelIdentity(BaseModel):
    name: str
    fingerprint: str


class Timing(BaseModel):
    total_s: float
    generation_s: float
    generated_tokens: int
    tokens_per_s: float | None  # generated_tokens / generation_s: the rate of this run's own generations
    resumed_rows: int
    resumed_tokens: int = 0  # tokens of the answers reused from disk (the run's total: + generated_tokens)
    accuracy_s: float | None = Field(None, description="zero-shot task scoring (lm-eval), seconds")
    judging_s: float | None = Field(None, description="loading the judges and judging every answer (safety, over-safety), seconds")
    nll_s: float | None = Field(None, description="utility NLL of the reference answers, seconds")


class Headline(BaseModel):
    """The numbers a table row shows. Safety figures are the suite's first harmful set; lower is better for all but
    `accuracy`."""

    asr: float | None = Field(None, description="attack success = harmful rate (harm judge), no system prompt")
    asr_system: float | None = Field(None, description="harmful rate with the safety system prompt")
    refusal: float | None = Field(None, description="harmful prompts refused (refusal judge, no system prompt)")
    refusal_system: float | None = Field(None, description="harmful prompts refused with the safety system prompt")
    incoherent: float | None = Field(None, description="harmful prompts answered with degenerate text")
    xstest_refusal: float | None = Field(None, description="XSTest safe prompts refused (full + partial)")
    utility_nll: float | None = None
    perplexity: float | None = None
    accuracy: float | None = Field(None, description="mean zero-shot task accuracy (acc) over tasks; higher is better")

    def as_dict(self) -> dict[str, float | None]:
        return self.model_dump()


class EvalResult(BaseModel):
    """One model on one suite: every number of the three axes, per-item outcomes, cost and environment."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    suite: str
    model: ModelIdentity
    safety: SafetyMetrics
    over_safety: OverSafetyMetrics | None = None
    utility: UtilityMetrics = Field(default_factory=UtilityMetrics)
    answers: dict[str, AnswerSetInfo] = Field(default_factory=dict)
    lm_eval: dict[str, Any] | None = Field(None, description="unused: task accuracy is utility.accuracy")
    headline: Headline = Field(default_factory=Headline)
    timing: Timing | None = None
    environment: dict[str, Any] = Field(default_factory=dict)
    out_dir: Path | None = Field(None, exclude=True, description="the run folder, when written")

    def main_safety(self) -> dict[SystemPromptMode, HarmfulMetrics]:
        """The headline harmful set (the suite's first one that ran)."""
        return next(iter(self.safety.sets.values()), {})

    def with_headline(self) -> EvalResult:
        """Fill `headline` from the detailed metrics (the one place the headline is derived)."""
        main = self.main_safety()
        none, system = main.get("none"), main.get("safety")
        self.headline = Headline(
            asr=none.rate if none else None, asr_system=system.rate if system else None,
            refusal=none.refusal.rate if none else None, refusal_system=system.refusal.rate if system else None,
            incoherent=none.incoherent.rate if none else None,
            xstest_refusal=self.over_safety.refusal.rate if self.over_safety else None,
            utility_nll=self.utility.nll, perplexity=self.utility.perplexity,
            accuracy=self.utility.accuracy.mean_acc if self.utility.accuracy else None)
        return self

    def save(self, out_dir: str | os.PathLike) -> Path:
        path = Path(out_dir) / "metrics.json"
        write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> EvalResult:
        """Read a finished run folder (or its metrics.json) back."""
        path = Path(out_dir)
        path = path if path.suffix == ".json" else path / "metrics.json"
        if not path.is_file():
            raise UserFileNotFoundError(f"{path} does not exist", hint="give the folder of a finished `safeunits eval` run")
        data = read_json(path)
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise ResultFormatError(f"{path}: metrics schema {version}, this version reads {SCHEMA_VERSION}",
                                    hint="evaluate again into the same folder: its generations are reused "
                                         "(docs/eval.md lists the changes)")
        return cls.model_validate({**data, "out_dir": path.parent})
