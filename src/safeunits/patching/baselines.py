"""Baselines through the same evaluation (SafePatching Table 1): none, GA, GD, NPO, task arithmetic, TIES,
and SafePatching itself, each applied to the same backbone, evaluated, and undone bit-for-bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.errors import UserValueError
from safeunits.eval.report import rows_markdown
from safeunits.io import write_json, write_text
from safeunits.patching.evaluation import evaluate_model, evaluate_patched
from safeunits.patching.merge import MergeConfig, controllable_merge
from safeunits.patching.methods import TiesConfig, task_arithmetic, ties_merge
from safeunits.patching.patches import DensePatch
from safeunits.patching.sparse import SparsePatch

METHODS = ("none", "ga", "gd", "npo", "task_arithmetic", "ties", "safepatching")


class BaselinesConfig(BaseModel):
    """Which methods, and their hyper-parameters."""

    methods: list[str] = Field(list(METHODS), description=f"subset of {', '.join(METHODS)}")
    task_arithmetic_lambda: float = Field(0.5, description="θ_B + λ·δ_SE (λ = 1 is GA itself)")
    ties: TiesConfig = Field(default_factory=TiesConfig, description="TIES merge of δ_SE and δ_OSM")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="SafePatching's (a, b, α, β) (from the sweep)")
    suite: str = Field("quick", description="evaluation suite (name or YAML): the test prompts, not the sweep's")


def build_method_patch(method: str, se: DensePatch, osm: DensePatch, npo: DensePatch | None,
                       config: BaselinesConfig) -> SparsePatch | None:
    """The additive patch each method applies (None for the untouched backbone)."""
    if method == "none":
        return None
    if method == "ga":
        return task_arithmetic([se], [1.0], progress=False)
    if method == "gd":
        return task_arithmetic([osm], [1.0], progress=False)
    if method == "npo":
        if npo is None:
            raise ValueError("the NPO baseline needs an NPO patch: `safeunits patch derive --objective npo`")
        return task_arithmetic([npo], [1.0], progress=False)
    if method == "task_arithmetic":
        return task_arithmetic([se], [config.task_arithmetic_lambda], progress=False)
    if method == "ties":
        return ties_merge([se, osm], config.ties, progress=False)
    if method == "safepatching":
        return controllable_merge(se, osm, config.merge, progress=False)
    raise UserValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def run_baselines(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    se: DensePatch,
    osm: DensePatch,
    config: BaselinesConfig,
    out_dir: str | Path,
    *,
    npo: DensePatch | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate each method on the test suite; write baselines.json and baselines.md (one table, paper-style)."""
    out = Path(out_dir)
    rows = []
    for method in config.methods:
        patch = build_method_patch(method, se, osm, npo, config)
        target = out / method
        if patch is None:
            metrics = evaluate_model(model, tokenizer, config.suite, target, progress=progress)
            nnz = 0
        else:
            metrics = evaluate_patched(model, tokenizer, [(patch, 1.0)], config.suite, target, progress=progress)
            nnz = patch.nnz
        rows.append({"method": method, "nnz": nnz, **metrics})
        write_json(out / "baselines.json", {"config": config.model_dump(mode="json"), "rows": rows})
        del patch
    columns = [("method", "method", ""), ("asr", "harmful % (AdvBench)", "%"), ("asr_system", "harmful % (+sys)", "%"),
               ("xstest_refusal", "XSTest refusal %", "%"), ("utility_nll", "utility NLL", ".3f"),
               ("perplexity", "perplexity", ".2f"), ("nnz", "weights changed", ",")]
    write_text(out / "baselines.md", f"# Baselines (suite `{config.suite}`)\n\n" + rows_markdown(rows, columns))
    return rows
