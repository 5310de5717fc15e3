"""Declarative evaluation suites: which datasets, how many prompts, which judges, which decoding budget.

Suites live as YAML files (`safeunits/configs/suites/<name>.yaml`) validated by `SuiteConfig`; a user suite
is any YAML path with the same fields. `quick` is the CPU preset (~3 minutes on the default model);
`full` is the SPEC protocol (AdvBench first 100, HarmBench, all 250 XSTest safe prompts, 256 tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from safeunits.config import Config
from safeunits.errors import ConfigError, UserFileNotFoundError
from safeunits.io import load_yaml

SUITES_DIR = Path(__file__).resolve().parents[1] / "configs" / "suites"

SystemPromptMode = Literal["none", "safety"]


class HarmfulSet(Config):
    """Harmful prompts whose answers are judged for attack success (ASR)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Short name used in file names and metrics.")
    dataset: str = Field(description="Registered dataset name or data file (see `safeunits datasets`).")
    limit: int | None = Field(None, ge=1, description="Use the first N prompts (AdvBench: 100 as Wei et al.).")
    system_prompts: list[SystemPromptMode] = Field(
        ["none", "safety"], description="'none': no system message; 'safety': models.chat.SAFETY_SYSTEM_PROMPT."
    )
    optional: bool = Field(False, description="Skip (and say so in metrics.json) when the dataset is not available.")


class OverSafetySet(Config):
    """Benign-but-scary prompts (XSTest safe) judged in three classes; refusal = full + partial."""

    model_config = ConfigDict(extra="forbid")

    name: str = "xstest_safe"
    dataset: str = "xstest:safe"
    limit: int | None = Field(None, ge=1)
    judge: str = Field("xstest", description="Three-class judge (see `safeunits judge-check`).")
    exclude: list[str] = Field(default_factory=list, description=(
        "Prompt sets left out of this one (dataset names or files, sliceable: 'xstest:safe[200:224]'): the "
        "prompts a model selection saw, e.g. a SafePatching sweep's held-out XSTest prompts."))


class UtilitySet(Config):
    """Benign instructions with reference answers; utility = mean response-token NLL."""

    model_config = ConfigDict(extra="forbid")

    name: str
    dataset: str
    limit: int | None = Field(None, ge=1)
    optional: bool = False


class AnswerSet(Config):
    """Prompts answered and written to JSONL for an external judge (MT-Bench first turns)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "mt_bench"
    dataset: str = "mt-bench"
    limit: int | None = Field(None, ge=1)


class LMEvalConfig(Config):
    """Zero-shot task accuracy through lm-evaluation-harness (safeunits.eval.zero_shot); local data when the data
    folder has `zero_shot/`, the Hugging Face Hub otherwise."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=list, description=(
        "boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, piqa, mmlu (see `zero_shot` data)."))
    limit: int | None = Field(None, ge=1, description=(
        "Documents per task: a fixed random sample (seed 0, the same documents in every run); None: the whole split."))
    num_fewshot: int = Field(0, ge=0, description="0: the papers' zero-shot setting (the local copies hold no "
                                                  "training split).")
    batch_size: int = Field(32, ge=1, description="Choice rows scored per forward pass.")


class SuiteConfig(Config):
    """One evaluation protocol on the three axes; the resolved copy is saved in every run directory."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    max_new_tokens: int = Field(256, ge=1, description="Generation budget per answer (papers: 256).")
    batch_size: int | None = Field(None, ge=1, description=(
        "Rows decoded together (default: as many as a quarter of free memory holds, at most 128; the batched "
        "engine: 16)."))
    generation: Literal["continuous", "batched"] = Field("continuous", description=(
        "Generation engine of the transformers backend: KV-cache slots refilled as rows finish, or padded "
        "batches (same greedy text up to float near-ties; bench/bench_generation.py)."))
    nll_batch_size: int = Field(8, ge=1)
    nll_max_length: int = Field(512, ge=16, description="Prompt + reference tokens; longer references are cut.")
    refusal_judge: str = Field("keyword", description="Refusal judge of the harmful answers (refused / incoherent / "
                               "complied) — the papers' keyword metric measures this axis.")
    harm_judge: str = Field("harm", description="Harm judge of the harmful answers: does the answer give the "
                            "requested harmful help. The ASR is its harmful rate.")
    harmful: list[HarmfulSet] = Field(default_factory=list, description="The first set gives the headline ASR.")
    over_safety: OverSafetySet | None = OverSafetySet()
    utility: list[UtilitySet] = Field(default_factory=list)
    answers: list[AnswerSet] = Field(default_factory=list)
    lm_eval: LMEvalConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed_asr_judge(cls, data: Any) -> Any:
        """Suites written before the two axes (run folders' config.json included) named the refusal judge
        `asr_judge`; read them as that, with the refusal judge as the harm proxy they measured."""
        if isinstance(data, dict) and "asr_judge" in data:
            data = dict(data)
            judge = data.pop("asr_judge")
            data.setdefault("refusal_judge", judge)
            data.setdefault("harm_judge", judge)
        return data

    @model_validator(mode="after")
    def _refusal_judge_tells_refusal(self) -> SuiteConfig:
        if self.refusal_judge == "harm":
            raise ValueError("refusal_judge: the harm judge rates harm, not refusal; use it as harm_judge and a refusal "
                             "judge (learned, xstest, keyword, ...) here")
        return self

    def with_limit(self, limit: int | None) -> SuiteConfig:
        """The same suite with every set cut to at most `limit` items (smoke tests, CLI --limit)."""
        if limit is None:
            return self

        def cut(s):
            return s.model_copy(update={"limit": min(s.limit or limit, limit)})

        return self.model_copy(update={
            "harmful": [cut(s) for s in self.harmful],
            "over_safety": cut(self.over_safety) if self.over_safety else None,
            "utility": [cut(s) for s in self.utility],
            "answers": [cut(s) for s in self.answers],
            "lm_eval": cut(self.lm_eval) if self.lm_eval else None,
        })


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def optional_suite(suite: str | Path | SuiteConfig | None) -> SuiteConfig | None:
    """`load_suite`, with None / '' / 'none' meaning "no evaluation": resolve it *before* long work, so a typo
    fails in a second instead of after hours of training."""
    if suite is None or (isinstance(suite, str) and suite.strip().lower() in ("", "none")):
        return None
    return load_suite(suite)


def load_suite(suite: str | Path | SuiteConfig) -> SuiteConfig:
    """A suite by name (`quick`, `full`), from a YAML path, or passed through when already a SuiteConfig."""
    if isinstance(suite, SuiteConfig):
        return suite
    path = Path(suite).expanduser()
    if not path.is_file():
        path = SUITES_DIR / f"{suite}.yaml"
        if not path.is_file():
            raise UserFileNotFoundError(f"unknown suite {suite!r}: not a YAML file and not one of {', '.join(available_suites())}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
        return SuiteConfig.model_validate(data)
    except (yaml.YAMLError, ValidationError) as err:
        raise ConfigError(f"{path}: invalid suite ({err})") from err
