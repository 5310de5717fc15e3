"""Continual post-safety alignment: one SafePatching step per harm category, applied in sequence.

Each step builds D_h for its category on the *current* model, derives δ_SE and δ_OSM from it, merges
them, applies the sparse patch in place and evaluates the three axes. The per-step patches are saved,
so the final model is the backbone plus their ordered sum (`safeunits patch apply --patch ... --patch ...`).
A rerun into the same folder with the same config resumes: saved step patches are re-applied (each checked against
the fingerprint of the model it was derived from) and evaluations resume their generations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config
from safeunits.eval.context import EvalContext
from safeunits.eval.report import SIGNIFICANCE_NOTE, rows_markdown
from safeunits.eval.runner import RunDirMismatchError
from safeunits.io import read_json, write_json, write_text
from safeunits.models.loading import model_fingerprint
from safeunits.patching.apply import apply_patch
from safeunits.patching.evaluation import evaluate_model
from safeunits.patching.harmful_data import HarmfulDataConfig, build_harmful_data
from safeunits.patching.merge import MergeConfig, controllable_merge
from safeunits.patching.patches import PatchConfig, derive_patch
from safeunits.patching.sparse import SparsePatch

log = logging.getLogger(__name__)


class ContinualConfig(Config):
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
    out = Path(out_dir)
    config_json = config.model_dump(mode="json")
    _claim_folder(out, config_json)
    first_row, backbone = evaluate_model(model, tokenizer, evaluation, out / "step0_eval")
    rows = [{"step": 0, "category": "(backbone)", **first_row}]
    write_json(out / "continual.json", {"config": config_json, "rows": rows})  # updated each step
    for step, category in enumerate(config.categories, 1):
        sdir = out / f"step{step}_{category}"
        patch = _saved_patch(sdir / "patch", model) or _derive_step(model, tokenizer, config, step, category, sdir,
                                                                     evaluation)
        apply_patch(model, patch)
        row, _ = evaluate_model(model, tokenizer, evaluation, sdir / "eval", baseline=backbone)
        se = patch.manifest["se_manifest"]
        rows.append({"step": step, "category": category, "n_train": se["data"]["n"], "nnz": patch.nnz,
                     "se_steps": se["steps"], "se_stopped": se["stopped_reason"], **row})
        write_json(out / "continual.json", {"config": config_json, "rows": rows})
    columns = [("step", "step", ""), ("category", "category added", ""), ("asr", "harmful %", "%"),
               ("asr_system", "harmful % (+sys)", "%"), ("refusal", "refused %", "%"),
               ("xstest_refusal", "XSTest refusal %", "%"),
               ("incoherent", "incoherent %", "%"), ("utility_nll", "utility NLL", ".3f"),
               ("significant", "significant vs backbone", ""), ("nnz", "weights changed", ",")]
    write_text(out / "continual.md", f"# Continual SafePatching (suite `{evaluation.suite.name}`)\n\n"
               f"{SIGNIFICANCE_NOTE}\n\n" + rows_markdown(rows, columns))
    return rows


def _derive_step(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ContinualConfig, step: int,
                 category: str, sdir: Path, evaluation: EvalContext) -> SparsePatch:
    """One step's D_h (built on the current model), δ_SE and δ_OSM, merged and saved to `sdir/patch`."""
    progress = evaluation.progress
    data_conf = config.data.model_copy(update={"prompts": config.prompts, "categories": [category]})
    data = build_harmful_data(data_conf, sdir / "data", model, tokenizer, data_dir=evaluation.data_dir,
                              progress=progress)
    info = {"folder": str(sdir / "data"), "category": category, "n": len(data["train"])}
    se = derive_patch(model, tokenizer, data["train"], config.se, sdir / "se", data_info=info, progress=progress)
    osm = derive_patch(model, tokenizer, data["train"], config.osm, sdir / "osm", data_info=info, progress=progress)
    patch = controllable_merge(se, osm, config.merge, progress=progress)
    patch.manifest["continual_step"] = {"step": step, "category": category}
    patch.save(sdir / "patch")  # manifest.json last: its presence marks a complete step patch (resume)
    return patch


def _saved_patch(folder: Path, model: PreTrainedModel) -> SparsePatch | None:
    """A step patch an earlier (stopped) run saved, when it was derived from exactly the current model."""
    if not (folder / "manifest.json").is_file():
        return None
    patch = SparsePatch.load(folder)
    derived_on, current = patch.manifest.get("backbone_fingerprint"), model_fingerprint(model)
    if derived_on != current:
        raise RunDirMismatchError(f"{folder} was derived from another model (fingerprint {derived_on}, the model at "
                                  f"this step is {current}); choose another --out or delete that step's folder")
    log.info("%s: reusing the saved step patch (derived from this model)", folder)
    return patch


def _claim_folder(out: Path, config_json: dict[str, Any]) -> None:
    """A rerun into the same folder resumes (saved step patches, generations); one with another config is refused."""
    path = out / "continual.json"
    if path.is_file() and read_json(path).get("config") != config_json:
        raise RunDirMismatchError(f"{path} holds a continual run with another configuration; choose another --out "
                                  f"(a rerun with the same options resumes it)")
