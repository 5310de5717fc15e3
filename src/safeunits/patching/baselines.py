"""Baselines through the same evaluation (SafePatching Table 1): none, GA, GD, NPO, task arithmetic (of both
patches; of δ_SE alone), TIES, SafePatching itself and its intersection ablation, each applied to the same
backbone, evaluated, and undone bit-for-bit."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.eval.context import EvalContext
from safeunits.document import Document, Heading, Paragraph, Table
from safeunits.eval.report import SIGNIFICANCE_NOTE
from safeunits.eval.result import Headline
from safeunits.io import write_json
from safeunits.patching.evaluation import evaluate_model, evaluate_patched
from safeunits.patching.methods import BaselinesConfig, PatchSources, build_method_patch, get_patch_method
from safeunits.patching.patches import DensePatch


class _Method(BaseModel):
    method: str
    nnz: int = Field(description="weights the method's patch changes (0: the model as it is)")


class MethodRow(Headline, _Method):
    """One row of baselines.json: the method, the weights it changes, its headline numbers on the test suite."""

    significant: str | None = Field(None, description="headline columns that differ from the first method (p < 0.05)")
    eval_seconds: float | None = None


def run_baselines(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    se: DensePatch,
    osm: DensePatch,
    config: BaselinesConfig,
    out_dir: str | Path,
    evaluation: EvalContext | None = None,
    *,
    npo: DensePatch | None = None,
) -> list[MethodRow]:
    """Evaluate each method on the test suite (`evaluation`, default quick); write baselines.json and baselines.md
    (one table, paper-style, significance against the first method)."""
    evaluation = evaluation or EvalContext.create()
    out = Path(out_dir)
    sources = PatchSources(se, osm, npo)
    for method in config.methods:
        get_patch_method(method).check(sources)
    rows = []
    first = None
    for method in config.methods:
        patch = build_method_patch(method, sources, config)
        target = out / method
        if patch is None:
            metrics, result = evaluate_model(model, tokenizer, evaluation, target, baseline=first)
            nnz = 0
        else:
            metrics, result = evaluate_patched(model, tokenizer, [(patch, 1.0)], evaluation, target, baseline=first)
            nnz = patch.nnz
        first = first or result
        rows.append(MethodRow(method=method, nnz=nnz, **metrics))
        write_json(out / "baselines.json", {"config": config.model_dump(mode="json"), "suite": evaluation.suite.name,
                                            "rows": [r.model_dump(mode="json") for r in rows]})
        del patch
    columns = [("method", "method", ""), ("asr", "harmful % (AdvBench)", "%"), ("asr_system", "harmful % (+sys)", "%"),
               ("refusal", "refused %", "%"), ("incoherent", "incoherent %", "%"), ("xstest_refusal", "XSTest refusal %", "%"),
               ("utility_nll", "utility NLL", ".3f"), ("perplexity", "perplexity", ".2f"),
               ("significant", f"significant vs {config.methods[0]}", ""), ("nnz", "weights changed", ",")]
    Document().add(Heading(level=1, text=f"Baselines (suite `{evaluation.suite.name}`)"),
                   Paragraph(text=SIGNIFICANCE_NOTE), Table.from_rows([r.model_dump() for r in rows], columns)).write(out, "baselines")
    return rows
