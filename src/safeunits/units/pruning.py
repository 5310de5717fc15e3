"""Pruning checks of a unit map (SPEC §2.3, SSAH Table 1): zero a class's units and evaluate.

A target is a unit selection spec (``scu``, ``ru``, ``ucu``, ``scu+cu:top0.06``, see
``units.selection.select_units``) or ``random:<spec>``: a seeded random control with as many MLP
channels and heads as ``<spec>`` (hence exactly as many parameters), drawn uniformly from all
units of the model; ``random:<spec>@<seed>`` fixes the seed, so several controls can sit in one table. Each target is applied to a copy of the affected weights, evaluated through the
experiment's ``EvalContext``, and the weights are restored, so one loaded model serves the whole table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config
from safeunits.eval.context import EvalContext
from safeunits.eval.result import Headline
from safeunits.document import Document, Table
from safeunits.io import write_json
from safeunits.models.adapters import SharedKV
from safeunits.units.selection import UnitSelection, resolve_target, unit_parameter_masks
from safeunits.units.unit_map import UnitMap

log = logging.getLogger(__name__)


class PruneConfig(Config):
    """Which unit sets to zero, and how the controls are drawn."""

    targets: list[str] = Field(["scu", "random:scu", "ru"], description="selection specs; 'random:<spec>' = random control of equal size, "
                               "'random:<spec>@<seed>' with its own seed (several seeds in one table)")
    baseline: bool = Field(True, description="also evaluate the unpruned model (first row)")
    seed: int = Field(0, description="seed of the random controls without '@<seed>' (plus the target's position)")
    shared_kv: SharedKV = Field("none", description="'group': also zero a grouped K/V row block when any head of its group is pruned")


class PrunedUnits(BaseModel):
    """What a pruning row zeroed: the target, the run folder of its evaluation, unit counts and parameter shares."""

    pruned: str
    run_dir: str | None
    mlp_channels: int
    heads: int
    weights_zeroed: int
    unit_param_share: float = Field(description="share of all unit parameters zeroed")
    model_param_share: float = Field(description="share of the model's parameters zeroed")


class PruningRow(Headline, PrunedUnits):
    """A row of pruning.json (SSAH Table 1): what was zeroed, then the headline of the model evaluated without it."""


@torch.no_grad()
def prune_units(model: PreTrainedModel, units: UnitSelection, *, shared_kv: SharedKV = "none") -> int:
    """Zero every weight of the selected units in place; returns how many weights were zeroed."""
    params = dict(model.named_parameters(remove_duplicate=False))
    zeroed = 0
    for name, mask in unit_parameter_masks(model, units, shared_kv=shared_kv).items():
        if mask.any():
            params[name].masked_fill_(mask, 0.0)
            zeroed += int(mask.sum())
    return zeroed


class _Restore:
    """Snapshot of the unit-bearing weights, restored after each pruned evaluation."""

    def __init__(self, model: PreTrainedModel, names: list[str]):
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.saved = {n: self.params[n].detach().clone() for n in names}

    @torch.no_grad()
    def __call__(self) -> None:
        for n, t in self.saved.items():
            self.params[n].copy_(t)


def pruning_table(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    unit_map: UnitMap,
    config: PruneConfig | None = None,
    evaluation: EvalContext | None = None,
    *,
    out_dir: Path | None = None,
) -> list[PruningRow]:
    """Evaluate the model with each target's units zeroed; rows like SSAH Table 1 (JSON + markdown in out_dir)."""
    config = config or PruneConfig()
    evaluation = evaluation or EvalContext.create()
    unit_map.check_model(model)
    n_model = sum(p.numel() for p in model.parameters())
    total_unit = unit_map.total_params()
    all_units = UnitSelection(mlp={l: list(range(unit_map.classes["mlp"].shape[1])) for l in range(unit_map.n_layers)},
                              heads={l: list(range(unit_map.classes["head"].shape[1])) for l in range(unit_map.n_layers)})
    restore = _Restore(model, list(unit_parameter_masks(model, all_units, shared_kv=config.shared_kv)))
    rows: list[PruningRow] = []
    targets = (["none"] if config.baseline else []) + list(config.targets)
    for i, target in enumerate(targets):
        if target == "none":
            units, zeroed = UnitSelection(), 0
        else:
            units = resolve_target(unit_map, target, seed=config.seed + i)
            zeroed = prune_units(model, units, shared_kv=config.shared_kv)
        try:
            log.info("pruning %s: %s units, %d weights", target, units.counts(), zeroed)
            sub = None if out_dir is None else Path(out_dir) / _slug(target)
            result = evaluation.evaluate(model, tokenizer, sub,
                                         name=f"{getattr(model.config, 'name_or_path', '')}|pruned:{target}")
        finally:
            restore()
        rows.append(PruningRow(
            pruned=target, run_dir=None if sub is None else str(sub), **units.counts(), weights_zeroed=zeroed,
            unit_param_share=units.n_params(unit_map.unit_params) / total_unit, model_param_share=zeroed / n_model,
            **result.headline.as_dict()))
    if out_dir is not None:
        write_json(Path(out_dir) / "pruning.json", {"config": config.model_dump(), "suite": evaluation.suite.name,
                                                    "map_settings": unit_map.settings,
                                                    "rows": [r.model_dump(mode="json") for r in rows]})
        pruning_document(rows).write(out_dir, "pruning")
    return rows


def _slug(target: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in target)


def pruning_document(rows: list[PruningRow]) -> Document:
    """SSAH Table-1-style table: class pruned, parameter share, perplexity, utility NLL, zero-shot accuracy (mean
    over the suite's tasks), harmful rate (the ASR) and refusal rate (no / with system prompt), XSTest refusal."""
    def pct(v: float) -> str:
        return f"{100 * v:.1f} %"

    columns = [("pruned", "pruned", ""), ("mlp_channels", "channels", ""), ("heads", "heads", ""),
               ("unit_param_share", "share of unit params", pct), ("model_param_share", "share of model params", pct),
               ("perplexity", "perplexity", ".3f"), ("utility_nll", "utility NLL", ".3f"), ("accuracy", "accuracy", pct),
               ("asr", "harmful (ASR)", pct), ("asr_system", "harmful (system prompt)", pct), ("refusal", "refused", pct),
               ("refusal_system", "refused (system prompt)", pct), ("xstest_refusal", "XSTest refusal", pct)]
    return Document().add(Table.from_rows([r.model_dump() for r in rows], columns, missing="n/a"))


def prune_and_save(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    unit_map: UnitMap,
    target: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    shared_kv: SharedKV = "none",
    force: bool = False,
) -> tuple[int, UnitSelection]:
    """Check the map fits `model`, zero `target`'s units in place and save the pruned model folder (atomically;
    `out_dir` follows safeunits.outdir, `force` writes into any folder).

    Returns the number of zeroed weights and the units (a pruned model to fine-tune or share, not an evaluation)."""
    from safeunits.models.loading import save_model

    unit_map.check_model(model)
    units = resolve_target(unit_map, target, seed=seed)
    zeroed = prune_units(model, units, shared_kv=shared_kv)
    save_model(model, tokenizer, out_dir, force=force)
    return zeroed, units
