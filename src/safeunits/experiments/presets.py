"""Multi-step studies as experiments: `ssah-budget`, `ssah-freeze` and `patch continual` build a chain of steps,
the runner runs it (cached, resumable, with a report like any experiment), and a table is written from the step
outputs.

(a) `ssah_budget`: full `align` vs `align` on a unit budget (SSAH Table 4): safety gained and alignment tax of
    each. Protocol `ssah` (default): the budget is RU of the pretrained model classed by utility alone
    (`ru:utility`, SSAH Fig. 6) and the budget run trains twice the epochs (Table 4: "we doubled the training
    epochs for our method", as quoted in issue 24). Protocol `equal`: `ru` of the map's four classes, the same
    epochs (before issue 24).
(b) `ssah_freeze`: benign fine-tuning of an aligned model, full vs frozen units (SSAH settings (i) SCU + top 6 %
    CU and (ii) SCU + CU). Protocol `ssah` (default): a setting restricted by `:topF` (setting (i)) is a chain of
    two finetune steps, one epoch with the unrestricted set frozen (setting (ii)), then the run itself (Table 2:
    fine-tuned "with Setting (ii) for one epoch prior to applying Setting (i)", as quoted in issue 24). Protocol
    `direct`: setting (i) from the first step (before issue 24). SSAH gave frozen runs ~2x the epochs so their
    final loss matched; `frozen_epochs_factor` does the same.

(c) `sweep` / `baselines`: one step each (`patch sweep`, `patch baselines` on patch and D_h folders), so that
    they are cached, resumed and reported like every other study.
(d) `continual`: continual post-safety alignment (SafePatching §4.4): per harm category, D_h built on the
    current model, δ_SE and δ_OSM derived from it, merged, added to the model (an `apply` step: the next category
    starts from it), and the three axes evaluated.

Why experiments: these studies used to have their own loop with no resume; now a rerun into the same folder
skips every finished step, and `--set` / a changed recipe re-runs exactly what depends on it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from safeunits.errors import ConfigError
from safeunits.document import Document, Heading, Paragraph, Table
from safeunits.eval.report import SIGNIFICANCE_NOTE, headline_row
from safeunits.eval.result import EvalResult
from safeunits.experiments.config import STEP_NAME, Experiment, build_experiment
from safeunits.experiments.runner import RunResult, run_experiment
from safeunits.io import read_json, write_json
from safeunits.patching.continual import ContinualConfig
from safeunits.patching.sparse import SparsePatch
from safeunits.train.recipes import AlignRecipe, FinetuneRecipe, Recipe
from safeunits.units.attribution import AttributionConfig
from safeunits.units.unit_map import UnitMap

BudgetProtocol = Literal["ssah", "equal"]
FreezeProtocol = Literal["ssah", "direct"]
# SSAH Table 4 / Fig. 6 vs the pre-issue-24 comparison: the default settings and the budget run's epoch factor
BUDGET_PROTOCOLS: dict[str, tuple[tuple[str, ...], float]] = {"ssah": (("full", "ru:utility"), 2.0),
                                                             "equal": (("full", "ru"), 1.0)}
_TOP = re.compile(r":top\d*\.?\d+")
_STEP_FIELDS = ("model", "unit_map", "budget", "freeze")  # set on a train step itself, not in its settings


def warmup_setting(setting: str, protocol: FreezeProtocol) -> str | None:
    """The frozen set trained for one epoch before `setting` (SSAH Table 2): setting (ii) before setting (i), i.e.
    the same spec without its `:topF` restriction; None when there is no warm-up (protocol `direct`, or no `:top`)."""
    if protocol == "direct":
        return None
    if protocol != "ssah":
        raise ConfigError(f"unknown freeze protocol {protocol!r}; use 'ssah' or 'direct'")
    wider = _TOP.sub("", setting)
    return wider if wider != setting else None


def _slug(setting: str) -> str:
    """A unit spec as a step name ('scu+cu:top0.06' -> 'scu_cu_top0_06')."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", setting)
    assert re.match(STEP_NAME, name), name
    return name


def _train_step(kind: str, name: str, recipe: Recipe, *, model: str, unit_map: Path | None, units: dict[str, Any],
                epochs: float) -> dict[str, Any]:
    """A train step running `recipe` (every field of it, so the step trains exactly this recipe) for `epochs`."""
    settings = recipe.model_dump(mode="json", exclude=set(_STEP_FIELDS))
    settings["train"]["epochs"] = epochs
    return {"name": name, "kind": kind, "recipe": kind, "model": model, "settings": settings,
            "unit_map": str(unit_map) if unit_map is not None else None, **units}


def _eval_step(name: str, model: str, label: str) -> dict[str, Any]:
    return {"name": name, "kind": "eval", "model": model, "label": label}


def _experiment(name: str, description: str, suite: str | None, data_dir: str | Path | None,
                steps: list[dict[str, Any]], held_out_xstest: list[str] | None = None) -> Experiment:
    evaluating = suite not in (None, "none")
    if not evaluating:
        steps = [s for s in steps if s["kind"] != "eval"]
    return build_experiment({"name": name, "description": description, "suite": suite if evaluating else "none",
                             "data_dir": str(data_dir) if data_dir else None, "steps": steps,
                             "held_out_xstest": list(held_out_xstest or [])}, {})


def budget_experiment(recipe: AlignRecipe, unit_map: Path, *, settings: tuple[str, ...] | None = None,
                      protocol: BudgetProtocol = "ssah", suite: str | None = "quick",
                      data_dir: str | Path | None = None) -> Experiment:
    """SSAH Table 4 as steps: evaluate the base model, then per setting an align step and its evaluation."""
    if protocol not in BUDGET_PROTOCOLS:
        raise ConfigError(f"unknown budget protocol {protocol!r}; use {' or '.join(map(repr, BUDGET_PROTOCOLS))}")
    default_settings, factor = BUDGET_PROTOCOLS[protocol]
    steps = [_eval_step("base", recipe.model, "base (no training)")]
    for setting in settings or default_settings:
        full = setting == "full"
        name = "full" if full else f"budget-{_slug(setting)}"
        steps.append(_train_step("align", name, recipe, model=recipe.model, unit_map=None if full else unit_map,
                                 units={"budget": None if full else setting},
                                 epochs=recipe.train.epochs * (1 if full else factor)))
        steps.append(_eval_step(f"{name}-eval", name, "full align" if full else f"align --budget {setting}"))
    return _experiment("ssah-budget", f"SSAH alignment budget (protocol {protocol}): full align vs a unit budget "
                       f"of {recipe.model}", suite, data_dir, steps)


def freeze_experiment(recipe: FinetuneRecipe, unit_map: Path, *,
                      settings: tuple[str, ...] = ("full", "scu+cu:top0.06", "scu+cu"),
                      frozen_epochs_factor: float = 1.0, protocol: FreezeProtocol = "ssah",
                      suite: str | None = "quick", data_dir: str | Path | None = None,
                      role_transfer: bool = False) -> Experiment:
    """SSAH §5 as steps: evaluate the model, then per setting (its warm-up step,) a finetune step and its evaluation.

    `role_transfer` (SSAH Fig. 5): the fully fine-tuned model is attributed with the settings `unit_map` was made
    with, and its units are classed by that map's cut-offs (`transfer` step `role-transfer`)."""
    for setting in settings:
        warmup_setting(setting, protocol)  # an unknown protocol fails before any training
    if role_transfer and "full" not in settings:
        raise ConfigError("the role transfer is that of the full fine-tune: add the setting 'full'")
    steps = [_eval_step("before", recipe.model, "before fine-tuning")]
    for setting in settings:
        full = setting == "full"
        name = "full" if full else f"freeze-{_slug(setting)}"
        wider = None if full else warmup_setting(setting, protocol)
        start = recipe.model
        if wider is not None:
            steps.append(_train_step("finetune", f"{name}-warmup", recipe, model=recipe.model, unit_map=unit_map,
                                     units={"freeze": wider}, epochs=1))
            start = f"{name}-warmup"
        steps.append(_train_step("finetune", name, recipe, model=start, unit_map=None if full else unit_map,
                                 units={"freeze": None if full else setting},
                                 epochs=recipe.train.epochs * (1 if full else frozen_epochs_factor)))
        if full and role_transfer:
            attribution = AttributionConfig.of_map(UnitMap.load(unit_map)).model_dump(mode="json")
            steps += [{"name": "full-map", "kind": "attribute", "model": name, "settings": attribution},
                      {"name": "role-transfer", "kind": "transfer", "before": str(unit_map), "after": "full-map"}]
        steps.append(_eval_step(f"{name}-eval", name, _freeze_label(None if full else setting, wider)))
    return _experiment("ssah-freeze", f"SSAH fine-tuning with frozen units (protocol {protocol}) of {recipe.model}",
                       suite, data_dir, steps)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _Outputs:
    """What the finished steps of a run folder hold: train reports, wall times, evaluations."""

    def __init__(self, out: Path, experiment: Experiment) -> None:
        self.out, self.experiment = out, experiment
        self.names = {s.name for s in experiment.steps}

    def train(self, name: str) -> dict[str, Any]:
        return read_json(self.out / name / "train_report.json")["train"]

    def seconds(self, name: str) -> float:
        return read_json(self.out / name / "done.json")["seconds"]

    def evaluation(self, name: str) -> EvalResult | None:
        return EvalResult.load(self.out / name / "eval") if name in self.names else None


def _run_table(experiment: Experiment, out_dir: Path, first: str, label: str, progress: bool,
               force: bool) -> tuple[RunResult, _Outputs, EvalResult | None, list[dict]]:
    """Run the experiment; its outputs, the evaluation of the reference step `first` and the table's first row."""
    result = run_experiment(experiment, out_dir, progress=progress, force=force)
    got = _Outputs(Path(out_dir), experiment)
    ref = got.evaluation(first)
    return result, got, ref, [{"setting": label, **_columns(ref, ref)}]


def _write_table(out: Path, title: str, rows: list[dict], columns: list[str], note: str) -> None:
    Document().add(Heading(level=1, text=title), Paragraph(text=note),
                   Table.from_rows(rows, [(c, c, _fmt) for c in columns], missing="-")).write(out, "table")
    write_json(out / "table.json", {"experiment": title, "rows": rows})


def ssah_budget(recipe: AlignRecipe, unit_map: Path, out_dir: Path, *, settings: tuple[str, ...] | None = None,
                protocol: BudgetProtocol = "ssah", suite: str | None = "quick", data_dir: str | Path | None = None,
                progress: bool = True, force: bool = False) -> list[dict]:
    """Run `budget_experiment` into `out_dir` and write table.md / table.json (one row per setting)."""
    experiment = budget_experiment(recipe, unit_map, settings=settings, protocol=protocol, suite=suite,
                                   data_dir=data_dir)
    result, got, base_ev, rows = _run_table(experiment, out_dir, "base", "base (no training)", progress, force)
    out = Path(out_dir)
    base = base_ev.headline.as_dict() if base_ev else {}
    for step in experiment.steps:
        if step.kind != "align":
            continue
        train, ev = got.train(step.name), got.evaluation(f"{step.name}-eval")
        row = {"setting": "full align" if step.budget is None else f"align --budget {step.budget}",
               "trainable_share": train["mask"]["trainable_share"], "epochs": step.settings["train"]["epochs"],
               "steps": train["steps"], "final_loss": train["final_loss"], "train_wall_s": got.seconds(step.name),
               **_columns(ev, base_ev)}
        if base.get("asr") is not None and row.get("asr") is not None:
            row["safety_gained"] = base["asr"] - row["asr"]
        if base.get("utility_nll") is not None and row.get("utility_nll") is not None:
            row["alignment_tax_nll"] = row["utility_nll"] - base["utility_nll"]
        rows.append(row)
    cols = ["setting", "trainable_share", "epochs", "steps", "final_loss", "asr", "asr_system", "refusal", "incoherent",
            "xstest_refusal", "utility_nll", "significant", "safety_gained", "alignment_tax_nll", "train_wall_s"]
    _, factor = BUDGET_PROTOCOLS[protocol]
    note = (f"Model {recipe.model}; unit map {unit_map}; eval suite {experiment.suite}; protocol {protocol} "
            f"(budget runs train {factor:g}x the epochs). safety_gained = base ASR - ASR (ASR = harmful rate, "
            "`refusal` = refused rate); alignment_tax_nll = utility NLL - base utility NLL (higher = more utility "
            f"lost). Steps, models and the report: {_report_note(result)}. " + SIGNIFICANCE_NOTE)
    _write_table(out, "SSAH alignment budget: full align vs RU-only", rows, cols, note)
    return rows


def ssah_freeze(recipe: FinetuneRecipe, unit_map: Path, out_dir: Path, *,
                settings: tuple[str, ...] = ("full", "scu+cu:top0.06", "scu+cu"), frozen_epochs_factor: float = 1.0,
                protocol: FreezeProtocol = "ssah", suite: str | None = "quick", data_dir: str | Path | None = None,
                role_transfer: bool = False, progress: bool = True, force: bool = False) -> list[dict]:
    """Run `freeze_experiment` into `out_dir` and write table.md / table.json (one row per setting)."""
    experiment = freeze_experiment(recipe, unit_map, settings=settings, frozen_epochs_factor=frozen_epochs_factor,
                                   protocol=protocol, suite=suite, data_dir=data_dir, role_transfer=role_transfer)
    result, got, before_ev, rows = _run_table(experiment, out_dir, "before", "before fine-tuning", progress, force)
    out = Path(out_dir)
    before = before_ev.headline.as_dict() if before_ev else {}
    for step in experiment.steps:
        if step.kind != "finetune" or step.name.endswith("-warmup"):
            continue
        train = got.train(step.name)
        warmup = step.model if step.model in got.names else None
        warm_steps = got.train(warmup)["steps"] if warmup else 0
        rows.append({"setting": _freeze_label(step.freeze, experiment.step(warmup).freeze if warmup else None),
                     "frozen_share": 1 - train["mask"]["trainable_share"], "epochs": step.settings["train"]["epochs"],
                     "warmup_steps": warm_steps, "steps": warm_steps + train["steps"],
                     "final_loss": train["final_loss"], "asr_before": before.get("asr"),
                     "train_wall_s": got.seconds(step.name) + (got.seconds(warmup) if warmup else 0),
                     **_columns(got.evaluation(f"{step.name}-eval"), before_ev)})
    cols = ["setting", "frozen_share", "epochs", "warmup_steps", "steps", "final_loss", "asr_before", "asr",
            "asr_system", "refusal", "incoherent", "xstest_refusal", "utility_nll", "significant", "train_wall_s"]
    note = (f"Model {recipe.model}; data {recipe.data} ({recipe.n_examples} examples); unit map {unit_map}; "
            f"eval suite {experiment.suite}; frozen runs train {frozen_epochs_factor}x the epochs; protocol "
            f"{protocol} (ssah: a :top setting first trains 1 epoch with the wider set frozen; steps include it). "
            + ("Role transfer of the full fine-tune (SSAH Fig. 5): role-transfer/transfer.json and .png. "
               if role_transfer else "") +
            f"Steps, models and the report: {_report_note(result)}. " + SIGNIFICANCE_NOTE)
    _write_table(out, "SSAH fine-tuning with frozen safety units", rows, cols, note)
    return rows


def _freeze_label(freeze: str | None, wider: str | None) -> str:
    """A freeze row's name (the evaluation's label and the table's): the frozen set, and the warm-up's wider one."""
    if freeze is None:
        return "full fine-tuning"
    return f"freeze {freeze}" + (f" (1 epoch freeze {wider} first)" if wider else "")


def _columns(ev: EvalResult | None, base: EvalResult | None) -> dict:
    """The headline of a row and, against the table's first row, which differences are significant."""
    return headline_row(ev, base) if ev is not None else {}


def _report_note(result: RunResult) -> str:
    return ", ".join(p.name for p in result.report.values()) if result.report else "none"


def continual_experiment(config: ContinualConfig, model: str, *, suite: str | None = "quick",
                         data_dir: str | Path | None = None, held_out_xstest: list[str] | None = None) -> Experiment:
    """Continual PSA as steps: evaluate the backbone, then per category harmful-data -> derive δ_SE, δ_OSM -> merge ->
    apply (the next category's model) -> evaluate."""
    steps = [_eval_step("step0-eval", model, "step 0: backbone")]
    current = model
    for k, category in enumerate(config.categories, 1):
        name = f"step{k}_{category}"
        data = config.harmful_data.model_copy(update={"prompts": config.prompts, "categories": [category]})
        steps += [
            {"name": f"{name}-data", "kind": "harmful-data", "model": current, "settings": data.model_dump(mode="json")},
            {"name": f"{name}-se", "kind": "derive", "model": current, "harmful_data": f"{name}-data",
             "settings": config.se.model_dump(mode="json")},
            {"name": f"{name}-osm", "kind": "derive", "model": current, "harmful_data": f"{name}-data",
             "settings": config.osm.model_dump(mode="json")},
            {"name": f"{name}-merge", "kind": "merge", "se": f"{name}-se", "osm": f"{name}-osm",
             "settings": config.merge.model_dump(mode="json")},
            {"name": name, "kind": "apply", "model": current, "patch": f"{name}-merge"},
            _eval_step(f"{name}-eval", name, f"step {k}: + {category}"),
        ]
        current = name
    return _experiment("continual", f"Continual SafePatching of {model} over {', '.join(config.categories)}", suite,
                       data_dir, steps, held_out_xstest)


def continual(config: ContinualConfig, model: str, out_dir: Path, *, suite: str | None = "quick",
              data_dir: str | Path | None = None, held_out_xstest: list[str] | None = None, progress: bool = True,
              force: bool = False) -> list[dict]:
    """Run `continual_experiment` into `out_dir`; write continual.md / continual.json (one row per step; the
    significance of each against the backbone). The final model is the last step's `model/` folder."""
    experiment = continual_experiment(config, model, suite=suite, data_dir=data_dir, held_out_xstest=held_out_xstest)
    result = run_experiment(experiment, out_dir, progress=progress, force=force)
    got, out = _Outputs(Path(out_dir), experiment), Path(out_dir)
    backbone = got.evaluation("step0-eval")
    rows = [{"step": 0, "category": "(backbone)", **_columns(backbone, backbone)}]
    for k, category in enumerate(config.categories, 1):
        name = f"step{k}_{category}"
        se = read_json(out / f"{name}-se" / "manifest.json")
        rows.append({"step": k, "category": category, "n_train": se["data"]["n_records"],
                     "nnz": SparsePatch.load(out / f"{name}-merge" / "patch").nnz, "se_steps": se["steps"],
                     "se_stopped": se["stopped_reason"], **_columns(got.evaluation(f"{name}-eval"), backbone)})
    write_json(out / "continual.json", {"config": config.model_dump(mode="json"), "rows": rows})
    columns = [("step", "step", ""), ("category", "category added", ""), ("asr", "harmful %", "%"),
               ("asr_system", "harmful % (+sys)", "%"), ("refusal", "refused %", "%"),
               ("xstest_refusal", "XSTest refusal %", "%"),
               ("incoherent", "incoherent %", "%"), ("utility_nll", "utility NLL", ".3f"),
               ("significant", "significant vs backbone", ""), ("nnz", "weights changed", ",")]
    Document().add(Heading(level=1, text=f"Continual SafePatching (suite `{experiment.suite}`)"),
                   Paragraph(text=f"{SIGNIFICANCE_NOTE} Steps, models and the report: {_report_note(result)}."),
                   Table.from_rows(rows, columns)).write(out, "continual")
    return rows


def single_step(kind: str, fields: dict[str, Any], settings: Any, *, suite: str | None = "quick",
                data_dir: str | Path | None = None, held_out_xstest: list[str] | None = None) -> Experiment:
    """An experiment of one step named after its kind (`patch sweep` -> OUT/sweep/, `patch baselines` ->
    OUT/baselines/); `fields` are the step's references (folders or model names)."""
    step = {"name": kind, "kind": kind, **{k: str(v) for k, v in fields.items() if v is not None},
            "settings": settings.model_dump(mode="json")}
    return _experiment(kind, f"{kind} of {fields.get('model')}", suite, data_dir, [step], held_out_xstest)

