"""Continual post-safety alignment: one SafePatching step per harm category, applied in sequence.

Each step builds D_h for its category on the *current* model, derives δ_SE and δ_OSM from it, merges
them, applies the sparse patch in place and evaluates the three axes. The per-step patches are saved,
so the final model is the backbone plus their ordered sum (`safeunits patch apply --patch ... --patch ...`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.eval.context import EvalContext
from safeunits.eval.report import SIGNIFICANCE_NOTE, rows_markdown
from safeunits.io import write_json, write_text
from safeunits.patching.apply import apply_patch
from safeunits.patching.evaluation import evaluate_model
from safeunits.patching.harmful_data import HarmfulDataConfig, build_harmful_data
from safeunits.patching.merge import MergeConfig, controllable_merge
from safeunits.patching.patches import PatchConfig, derive_patch


class ContinualConfig(BaseModel):
    """Categories in order, and how each step's data, patches and merge are made."""

    prompts: str = Field("donotanswer", description="dataset whose categories are the steps")
    categories: list[str] = Field(["malicious_uses", "information_hazard",
                                   "discrimination_exclusion_toxicity_hateful_offensive"],
                                  description="harm categories, one patching step each, in this order")
    data: HarmfulDataConfig = Field(default_factory=lambda: HarmfulDataConfig(
        prompts="donotanswer", offset=0, n_train=24, n_val=0, responses="prefill"))
    se: PatchConfig = Field(default_factory=lambda: PatchConfig(objective="ascent"))
    osm: PatchConfig = Field(default_factory=lambda: PatchConfig(objective="descent"))
    merge: MergeConfig = Field(default_factory=MergeConfig)


def run_continual(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: ContinualConfig,
    out_dir: str | Path,
    evaluation: EvalContext | None = None,
) -> list[dict[str, Any]]:
    """Patch the model category by category (in place); the three axes after each step (`evaluation`, default
    quick; significance against the backbone) -> continual.md/json."""
    evaluation = evaluation or EvalContext.create()
    progress, data_dir = evaluation.progress, evaluation.data_dir
    out = Path(out_dir)
    first_row, backbone = evaluate_model(model, tokenizer, evaluation, out / "step0_eval")
    rows = [{"step": 0, "category": "(backbone)", **first_row}]
    write_json(out / "continual.json", {"config": config.model_dump(mode="json"), "rows": rows})  # updated each step
    for step, category in enumerate(config.categories, 1):
        sdir = out / f"step{step}_{category}"
        data_conf = config.data.model_copy(update={"prompts": config.prompts, "categories": [category]})
        data = build_harmful_data(data_conf, sdir / "data", model, tokenizer, data_dir=data_dir, progress=progress)
        info = {"folder": str(sdir / "data"), "category": category, "n": len(data["train"])}
        se = derive_patch(model, tokenizer, data["train"], config.se, sdir / "se", data_info=info, progress=progress)
        osm = derive_patch(model, tokenizer, data["train"], config.osm, sdir / "osm", data_info=info, progress=progress)
        patch = controllable_merge(se, osm, config.merge, progress=progress)
        patch.manifest["continual_step"] = {"step": step, "category": category}
        patch.save(sdir / "patch")
        apply_patch(model, patch)
        row, _ = evaluate_model(model, tokenizer, evaluation, sdir / "eval", baseline=backbone)
        rows.append({"step": step, "category": category, "n_train": len(data["train"]), "nnz": patch.nnz,
                     "se_steps": se.manifest["steps"], "se_stopped": se.manifest["stopped_reason"], **row})
        write_json(out / "continual.json", {"config": config.model_dump(mode="json"), "rows": rows})
    columns = [("step", "step", ""), ("category", "category added", ""), ("asr", "harmful %", "%"),
               ("asr_system", "harmful % (+sys)", "%"), ("xstest_refusal", "XSTest refusal %", "%"),
               ("incoherent", "incoherent %", "%"), ("utility_nll", "utility NLL", ".3f"),
               ("significant", "significant vs backbone", ""), ("nnz", "weights changed", ",")]
    write_text(out / "continual.md", f"# Continual SafePatching (suite `{evaluation.suite.name}`)\n\n"
               f"{SIGNIFICANCE_NOTE}\n\n" + rows_markdown(rows, columns))
    return rows
