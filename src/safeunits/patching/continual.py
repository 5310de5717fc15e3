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

from safeunits.eval.report import rows_markdown
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
    suite: str = Field("quick", description="evaluation after every step")


def run_continual(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: ContinualConfig,
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Patch the model category by category (in place); the three axes after each step -> continual.md/json."""
    out = Path(out_dir)
    rows = [{"step": 0, "category": "(backbone)", **evaluate_model(model, tokenizer, config.suite, out / "step0_eval",
                                                                   progress=progress)}]
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
        rows.append({"step": step, "category": category, "n_train": len(data["train"]), "nnz": patch.nnz,
                     "se_steps": se.manifest["steps"], "se_stopped": se.manifest["stopped_reason"],
                     **evaluate_model(model, tokenizer, config.suite, sdir / "eval", progress=progress)})
        write_json(out / "continual.json", {"config": config.model_dump(mode="json"), "rows": rows})
    columns = [("step", "step", ""), ("category", "category added", ""), ("asr", "harmful %", "%"),
               ("asr_system", "harmful % (+sys)", "%"), ("xstest_refusal", "XSTest refusal %", "%"),
               ("utility_nll", "utility NLL", ".3f"), ("nnz", "weights changed", ",")]
    write_text(out / "continual.md", f"# Continual SafePatching (suite `{config.suite}`)\n\n" + rows_markdown(rows, columns))
    return rows
