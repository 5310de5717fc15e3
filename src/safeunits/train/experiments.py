"""The SSAH training experiments as functions (the CLI wraps them), each writing a table into its run dir.

(a) `ssah_budget`: full `align` vs `align --budget ...` (SSAH Table 4): safety gained and alignment tax of each.
    Protocol `ssah` (default): the budget is RU of the pretrained model classed by utility alone (`ru:utility`,
    SSAH Fig. 6) and the budget run trains twice the epochs (Table 4: "we doubled the training epochs for our
    method", as quoted in issue 24). Protocol `equal`: `ru` of the map's four classes, the same epochs (before
    issue 24).
(b) `ssah_freeze`: benign fine-tuning of an aligned model, full vs frozen units (SSAH settings (i) SCU + top 6 %
    CU and (ii) SCU + CU): ASR before and after, final loss. Protocol `ssah` (default): a setting restricted by
    `:topF` (setting (i)) first trains one epoch with the unrestricted set frozen (setting (ii)), then the run
    itself (Table 2: fine-tuned "with Setting (ii) for one epoch prior to applying Setting (i)", as quoted in issue
    24). Protocol `direct`: setting (i) from the first step (before issue 24). SSAH gave frozen runs ~2x the
    epochs so their final loss matched; `frozen_epochs_factor` does the same.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Literal

from safeunits.errors import ConfigError
from safeunits.eval.context import EvalContext
from safeunits.eval.report import SIGNIFICANCE_NOTE, headline_row, rows_markdown
from safeunits.eval.result import EvalResult
from safeunits.io import write_json, write_text
from safeunits.models.loading import load_model
from safeunits.models.loading import save_model as save
from safeunits.train.recipes import AlignRecipe, FinetuneRecipe, data_manifest, train_recipe


def _evaluate(model, tokenizer, evaluation: EvalContext, out_dir: Path, name: str) -> EvalResult | None:
    return evaluation.evaluate(model, tokenizer, out_dir, name=name) if evaluation.enabled else None


BudgetProtocol = Literal["ssah", "equal"]
FreezeProtocol = Literal["ssah", "direct"]
# SSAH Table 4 / Fig. 6 vs the pre-issue-24 comparison: the default settings and the budget run's epoch factor
BUDGET_PROTOCOLS: dict[str, tuple[tuple[str, ...], float]] = {"ssah": (("full", "ru:utility"), 2.0),
                                                             "equal": (("full", "ru"), 1.0)}
_TOP = re.compile(r":top\d*\.?\d+")


def warmup_setting(setting: str, protocol: FreezeProtocol) -> str | None:
    """The frozen set trained for one epoch before `setting` (SSAH Table 2): setting (ii) before setting (i), i.e.
    the same spec without its `:topF` restriction; None when there is no warm-up (protocol `direct`, or no `:top`)."""
    if protocol == "direct":
        return None
    if protocol != "ssah":
        raise ConfigError(f"unknown freeze protocol {protocol!r}; use 'ssah' or 'direct'")
    wider = _TOP.sub("", setting)
    return wider if wider != setting else None


def _run(recipe: AlignRecipe | FinetuneRecipe, out_dir: Path, evaluation: EvalContext,
         save_model: bool, warmup: FinetuneRecipe | None = None) -> tuple[dict, EvalResult | None]:
    """Train one setting from a fresh copy of the recipe's model (after `warmup`'s run, if any), evaluate it,
    write its report."""
    model, tokenizer = load_model(recipe.model)
    t0 = time.perf_counter()
    warm = None
    if warmup is not None:
        warm, _ = train_recipe(warmup, model, tokenizer, data_dir=evaluation.data_dir, progress=evaluation.progress)
    result, records = train_recipe(recipe, model, tokenizer, data_dir=evaluation.data_dir, progress=evaluation.progress)
    wall = time.perf_counter() - t0
    if save_model:
        save(model, tokenizer, out_dir / "model")
    ev = _evaluate(model, tokenizer, evaluation, out_dir / "eval", f"{recipe.model} ({out_dir.name})")
    report = {"recipe": recipe.model_dump(mode="json"), "data": data_manifest(records), "train": result.to_dict(),
              "train_wall_s": wall, "eval": ev.headline.as_dict() if ev else {}}
    if warm is not None:
        report["warmup"] = {"recipe": warmup.model_dump(mode="json"), "train": warm.to_dict()}
    write_json(out_dir / "train_report.json", report)
    return report, ev


def _baseline(model_name: str, out_dir: Path, evaluation: EvalContext) -> EvalResult | None:
    model, tokenizer = load_model(model_name)
    ev = _evaluate(model, tokenizer, evaluation, out_dir / "eval", model_name)
    write_json(out_dir / "eval_headline.json", ev.headline.as_dict() if ev else {})
    return ev


def _eval_columns(ev: EvalResult | None, base: EvalResult | None) -> dict:
    """The headline of a row and, against the table's first row, which differences are significant."""
    return headline_row(ev, base) if ev is not None else {}


def _suite_name(evaluation: EvalContext) -> str:
    return evaluation.suite.name if evaluation.suite else "none"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_table(out_dir: Path, name: str, rows: list[dict], columns: list[str], note: str) -> str:
    md = f"# {name}\n\n{note}\n\n" + rows_markdown(rows, [(c, c, _fmt) for c in columns], missing="-")
    write_text(out_dir / "table.md", md)
    write_json(out_dir / "table.json", {"experiment": name, "rows": rows})
    return md


def ssah_budget(
    recipe: AlignRecipe,
    unit_map: Path,
    out_dir: Path,
    *,
    settings: tuple[str, ...] | None = None,
    protocol: BudgetProtocol = "ssah",
    evaluation: EvalContext | None = None,
    save_models: bool = False,
) -> list[dict]:
    """SSAH Table 4 on our model: align every weight ('full') vs only a budget of units (e.g. 'ru:utility'), one row
    each. `protocol` gives the default settings and the budget runs' epochs (`BUDGET_PROTOCOLS`).

    `evaluation` (default: the quick suite) is resolved by the caller, so an unknown suite fails before training."""
    if protocol not in BUDGET_PROTOCOLS:
        raise ConfigError(f"unknown budget protocol {protocol!r}; use {' or '.join(map(repr, BUDGET_PROTOCOLS))}")
    default_settings, epochs_factor = BUDGET_PROTOCOLS[protocol]
    settings = tuple(settings) if settings else default_settings
    evaluation = evaluation or EvalContext.create()
    out_dir = Path(out_dir)
    base_ev = _baseline(recipe.model, out_dir / "base", evaluation)
    base = base_ev.headline.as_dict() if base_ev else {}
    rows = [{"setting": "base (no training)", **_eval_columns(base_ev, base_ev)}]
    for setting in settings:
        budget = None if setting == "full" else setting
        label = "full align" if budget is None else f"align --budget {budget}"
        train_cfg = recipe.train if budget is None else recipe.train.model_copy(
            update={"epochs": recipe.train.epochs * epochs_factor})
        rec = recipe.model_copy(update={"budget": budget, "unit_map": unit_map if budget else None, "train": train_cfg})
        rep, ev = _run(rec, out_dir / ("full" if budget is None else "budget-" + budget.replace(":", "_")), evaluation,
                       save_models)
        row = {"setting": label, "trainable_share": rep["train"]["mask"]["trainable_share"],
               "epochs": train_cfg.epochs, "steps": rep["train"]["steps"], "final_loss": rep["train"]["final_loss"],
               "train_wall_s": rep["train_wall_s"], **_eval_columns(ev, base_ev)}
        if base.get("asr") is not None and row.get("asr") is not None:
            row["safety_gained"] = base["asr"] - row["asr"]
        if base.get("utility_nll") is not None and row.get("utility_nll") is not None:
            row["alignment_tax_nll"] = row["utility_nll"] - base["utility_nll"]
        rows.append(row)
    cols = ["setting", "trainable_share", "epochs", "steps", "final_loss", "asr", "asr_system", "refusal", "incoherent",
            "xstest_refusal", "utility_nll", "significant", "safety_gained", "alignment_tax_nll", "train_wall_s"]
    note = (f"Model {recipe.model}; unit map {unit_map}; eval suite {_suite_name(evaluation)}; protocol {protocol} "
            f"(budget runs train {epochs_factor:g}x the epochs). safety_gained = base ASR - ASR (ASR = harmful rate, "
            "`refusal` = refused rate); alignment_tax_nll = utility NLL - base utility NLL (higher = more utility "
            "lost). " + SIGNIFICANCE_NOTE)
    _write_table(out_dir, "SSAH alignment budget: full align vs RU-only", rows, cols, note)
    return rows


def ssah_freeze(
    recipe: FinetuneRecipe,
    unit_map: Path,
    out_dir: Path,
    *,
    settings: tuple[str, ...] = ("full", "scu+cu:top0.06", "scu+cu"),
    frozen_epochs_factor: float = 1.0,
    protocol: FreezeProtocol = "ssah",
    evaluation: EvalContext | None = None,
    save_models: bool = False,
) -> list[dict]:
    """SSAH §5 on our model: fine-tune with nothing / (i) / (ii) frozen; ASR before and after, final loss.

    Under protocol `ssah` a `:topF` setting first trains one epoch with the wider set frozen (`warmup_setting`)."""
    for setting in settings:
        warmup_setting(setting, protocol)  # an unknown protocol fails before any training
    evaluation = evaluation or EvalContext.create()
    out_dir = Path(out_dir)
    before_ev = _baseline(recipe.model, out_dir / "before", evaluation)
    before = before_ev.headline.as_dict() if before_ev else {}
    rows = [{"setting": "before fine-tuning", **_eval_columns(before_ev, before_ev)}]
    for setting in settings:
        frozen = None if setting == "full" else setting
        train_cfg = recipe.train if frozen is None else recipe.train.model_copy(
            update={"epochs": recipe.train.epochs * frozen_epochs_factor})
        rec = recipe.model_copy(update={"freeze": frozen, "unit_map": unit_map if frozen else None, "train": train_cfg})
        wider = warmup_setting(setting, protocol) if frozen else None
        warmup = None if wider is None else recipe.model_copy(update={
            "freeze": wider, "unit_map": unit_map, "train": recipe.train.model_copy(update={"epochs": 1})})
        rep, ev = _run(rec, out_dir / ("full" if frozen is None else "freeze-" + setting.replace(":", "_")), evaluation,
                       save_models, warmup)
        warm_steps = rep["warmup"]["train"]["steps"] if "warmup" in rep else 0
        row = {"setting": "full fine-tuning" if frozen is None else
               f"freeze {setting}" + (f" (1 epoch freeze {wider} first)" if wider else ""),
               "frozen_share": 1 - rep["train"]["mask"]["trainable_share"], "epochs": train_cfg.epochs,
               "warmup_steps": warm_steps, "steps": warm_steps + rep["train"]["steps"],
               "final_loss": rep["train"]["final_loss"],
               "asr_before": before.get("asr"), "train_wall_s": rep["train_wall_s"], **_eval_columns(ev, before_ev)}
        rows.append(row)
    cols = ["setting", "frozen_share", "epochs", "warmup_steps", "steps", "final_loss", "asr_before", "asr",
            "asr_system", "refusal", "incoherent", "xstest_refusal", "utility_nll", "significant", "train_wall_s"]
    note = (f"Model {recipe.model}; data {recipe.data} ({recipe.n_examples} examples); unit map {unit_map}; "
            f"eval suite {_suite_name(evaluation)}; frozen runs train {frozen_epochs_factor}x the epochs; protocol "
            f"{protocol} (ssah: a :top setting first trains 1 epoch with the wider set frozen; steps include it). "
            + SIGNIFICANCE_NOTE)
    _write_table(out_dir, "SSAH fine-tuning with frozen safety units", rows, cols, note)
    return rows
