"""Baselines through the same evaluation (SafePatching Table 1): none, GA, GD, NPO, task arithmetic, TIES,
and SafePatching itself, each applied to the same backbone, evaluated, and undone bit-for-bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.eval.report import rows_markdown
from safeunits.io import write_json, write_text
from safeunits.patching.evaluation import evaluate_model, evaluate_patched
from safeunits.patching.merge import MergeConfig
from safeunits.patching.methods import (PatchSources, TiesConfig, build_method_patch, get_patch_method,
                                        patch_method_names)
from safeunits.patching.patches import DensePatch


class BaselinesConfig(BaseModel):
    """Which methods, and their hyper-parameters."""

    methods: list[str] = Field(default_factory=patch_method_names, description="registered patch methods "
                               f"(patching.methods): {', '.join(patch_method_names())}")
    task_arithmetic_lambda: float = Field(0.5, description="θ_B + λ·δ_SE (λ = 1 is GA itself)")
    ties: TiesConfig = Field(default_factory=TiesConfig, description="TIES merge of δ_SE and δ_OSM")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="SafePatching's (a, b, α, β) (from the sweep)")
    suite: str = Field("quick", description="evaluation suite (name or YAML): the test prompts, not the sweep's")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, names: list[str]) -> list[str]:
        for name in names:
            get_patch_method(name)
        return names


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
    sources = PatchSources(se, osm, npo)
    for method in config.methods:
        get_patch_method(method).check(sources)
    rows = []
    for method in config.methods:
        patch = build_method_patch(method, sources, config)
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
