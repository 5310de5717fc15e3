"""The three axes for patched models: the shared evaluation runner, with a patch applied and exactly undone.

Model selection (the sweep) must not see the test prompts, so `validation_suite` builds a suite from the
held-out split of D_h (harmful), XSTest safe prompts *after* those the CPU `quick` suite uses (over-safety),
and Self-Instruct seed tasks (utility; the suites use the user-oriented set). The `standard` and `full` suites
score all 250 XSTest safe prompts, so a test evaluation after a sweep leaves the sweep's ones out
(`EvalContext.excluding_over_safety(config.xstest_prompts)`; `patch baselines --best` and experiments do).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config
from safeunits.data.overlap import load_spec
from safeunits.eval.context import EvalContext
from safeunits.eval.report import headline_row
from safeunits.eval.result import EvalResult, Headline
from safeunits.eval.suites import HarmfulSet, OverSafetySet, SuiteConfig, UtilitySet
from safeunits.io import write_text
from safeunits.patching.apply import apply_patch, undo_patch
from safeunits.patching.sparse import SparsePatch

AXES = ("asr", "xstest_refusal", "utility_nll")


class ValidationConfig(Config):
    """The held-out evaluation the sweep selects on (small: it runs once per grid point)."""

    xstest_offset: int = Field(200, ge=0, description="use XSTest safe prompts from this index (quick suite: first 48)")
    n_xstest: int = Field(24, ge=1, description="XSTest safe prompts judged for over-refusal")
    utility: str = Field("self-instruct:seed", description="benign set with reference answers for the NLL")
    n_utility: int = Field(16, ge=1, description="reference answers scored")
    n_harmful: int | None = Field(None, ge=1, description="cap on the D_h validation prompts (None: all)")
    max_new_tokens: int = Field(48, ge=1, description="generation budget per answer")
    batch_size: int = Field(16, ge=1)
    refusal_judge: str = Field("learned", description="refusal judge of the held-out harmful answers (the suites' default)")
    harm_judge: str = Field("harm", description="harm judge of the held-out harmful answers: the selection's harmful rate")
    xstest_judge: str = Field("learned", description="three-class judge of the held-out XSTest answers")

    @property
    def xstest_prompts(self) -> str:
        """The held-out XSTest prompts as a sliced dataset spec: test evaluations leave exactly these out."""
        return f"xstest:safe[{self.xstest_offset}:{self.xstest_offset + self.n_xstest}]"


def validation_suite(dh_folder: str | Path, out_dir: str | Path, config: ValidationConfig | None = None,
                     data_dir: str | Path | None = None) -> SuiteConfig:
    """A SuiteConfig over held-out prompts only; the XSTest subset is written beside it for the record."""
    config = config or ValidationConfig()
    val = Path(dh_folder) / "val.jsonl"
    if not val.is_file() or not val.read_text().strip():
        raise ValueError(f"{val} is missing or empty: build D_h with --n-val > 0 to sweep on held-out prompts")
    safe = load_spec(config.xstest_prompts, data_dir)
    if not safe:
        raise ValueError(f"no XSTest safe prompts from index {config.xstest_offset}")
    xs_path = Path(out_dir) / "xstest_val.jsonl"
    write_text(xs_path, "".join(json.dumps({"prompt": r.prompt, "label": "safe", "category": r.category}) + "\n"
                                for r in safe))
    return SuiteConfig(
        name="patch-validation",
        description="held-out: D_h val split, XSTest safe tail, Self-Instruct seed references",
        max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, refusal_judge=config.refusal_judge,
        harm_judge=config.harm_judge,
        harmful=[HarmfulSet(name="dh_val", dataset=str(val), limit=config.n_harmful, system_prompts=["none"])],
        over_safety=OverSafetySet(name="xstest_val", dataset=str(xs_path), judge=config.xstest_judge),
        utility=[UtilitySet(name="utility_val", dataset=config.utility, limit=config.n_utility)],
    )


def evaluate_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, evaluation: EvalContext,
                   out_dir: Path | None, *, baseline: EvalResult | None = None) -> tuple[dict[str, Any], EvalResult]:
    """One evaluation through the experiment's context: a table row (headline, significance against `baseline`,
    wall time) and the full result."""
    started = time.time()
    result = evaluation.evaluate(model, tokenizer, out_dir)
    return {**headline_row(result, baseline), "eval_seconds": round(time.time() - started, 1)}, result


def evaluate_patched(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, patches: list[tuple[SparsePatch, float]],
                     evaluation: EvalContext, out_dir: Path | None, *,
                     baseline: EvalResult | None = None) -> tuple[dict[str, Any], EvalResult]:
    """Apply (patch, scale) pairs, evaluate, and restore the model bit-for-bit whatever happens."""
    undos = []
    try:
        for patch, scale in patches:
            undos.append(apply_patch(model, patch, scale=scale))
        return evaluate_model(model, tokenizer, evaluation, out_dir, baseline=baseline)
    finally:
        for undo in reversed(undos):
            undo_patch(model, undo)


def pareto_front(rows: list[Headline], axes: tuple[str, ...] = AXES) -> list[int]:
    """Indices of rows no other row beats on every axis (all axes: lower is better)."""
    points = [[getattr(r, a) for a in axes] for r in rows]
    front = []
    for i, r in enumerate(points):
        dominated = any(all(x <= y for x, y in zip(o, r)) and any(x < y for x, y in zip(o, r))
                        for j, o in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front
