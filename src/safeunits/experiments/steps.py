"""The step kinds: one small function per kind, each a call into the library (never a re-implementation).

A step function receives its typed step (config.py) and a `StepContext` (its folder, the evaluation context, the
outputs of the steps it consumes) and returns its outputs: paths relative to its folder under fixed keys that
later steps consume (`model`, `unit_map`, `harmful_data`, `patch`, `best`), plus what the report shows (`StepOutputs`:
evaluations, figures, tables as Document files, notes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.eval.context import EvalContext
from safeunits.experiments.config import (STEP_CLASSES, AlignStep, ApplyStep, BaselinesStep, DurabilityStep, AttributeStep, DeriveStep, EvalStep,
                                          Experiment, FinetuneStep, HarmfulDataStep, MergeStep, ProbeStep, PruneStep,
                                          StepBase, SweepStep, TransferStep)
from safeunits.document import DOCUMENT_SUFFIX, Figure
from safeunits.experiments.outputs import OutputKey, StepOutputs
from safeunits.models.loading import load_model
from safeunits.registry import Registry

Outputs = StepOutputs
S = TypeVar("S", bound=StepBase)
StepFunction = Callable[[Any, "StepContext"], Outputs]
STEP_FUNCTIONS: Registry[StepFunction] = Registry("step kind")


@dataclass(frozen=True)
class StepContext:
    """What a running step sees: the experiment, its own folder, the evaluation, earlier steps' outputs."""

    experiment: Experiment
    out: Path
    evaluation: EvalContext
    outputs: dict[str, Outputs]  # step name -> outputs (paths relative to that step's folder)
    run_dir: Path

    def path(self, ref: str, key: OutputKey) -> Path:
        """The output `key` of an earlier step, as a path; a reference that names no step is a path itself (a
        field the step kind lets name an outside file or folder: a unit map, a patch, D_h)."""
        if ref not in self.outputs:
            return Path(ref)
        return self.run_dir / ref / self.outputs[ref].path(key)

    def model_source(self, ref: str) -> str:
        """A model reference as load_model takes it: an align/finetune step's model folder, or the reference itself."""
        return str(self.path(ref, "model")) if ref in self.outputs else ref

    def load(self, ref: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return load_model(self.model_source(ref), dtype=self.experiment.dtype, device=self.experiment.device)

    @property
    def data_dir(self) -> Path | None:
        return self.evaluation.data_dir


def register_step(kind: str) -> Callable[[Callable[[S, StepContext], Outputs]], Callable[[S, StepContext], Outputs]]:
    """Make a function the runner of step kind `kind` (a kind of config.STEP_CLASSES)."""
    if kind not in STEP_CLASSES:
        raise ValueError(f"no step model for kind {kind!r}; add one to experiments/config.py")

    return STEP_FUNCTIONS.register(kind)


def _rel(path: str | os.PathLike, folder: Path) -> str:
    return os.path.relpath(path, folder)


@register_step("eval")
def eval_step(step: EvalStep, ctx: StepContext) -> Outputs:
    from safeunits.patching import SparsePatch, apply_patch, undo_patch

    model, tokenizer = ctx.load(step.model)
    label = step.label or step.name
    undo = apply_patch(model, SparsePatch.load(ctx.path(step.patch, "patch"))) if step.patch else None
    try:
        ctx.evaluation.evaluate(model, tokenizer, ctx.out / "eval", name=label)
    finally:
        if undo is not None:
            undo_patch(model, undo)
    return StepOutputs(evals={label: "eval"})


def _train(step: AlignStep | FinetuneStep, ctx: StepContext) -> Outputs:
    from safeunits.train.recipes import run_recipe

    unit_map = str(ctx.path(step.unit_map, "unit_map")) if step.unit_map else None  # a step's map, or a map file
    recipe = step.recipe_config(ctx.model_source(step.model), unit_map)
    report = run_recipe(recipe, ctx.out, ctx.evaluation.run)  # trains only: evaluate steps evaluate
    train = report.train
    return StepOutputs(model="model", notes=[f"{train.steps} optimizer steps, final loss {train.final_loss:.3f}, "
                                              f"{train.tokens_per_s:.0f} tokens/s; data {report.data}"])


register_step("align")(_train)
register_step("finetune")(_train)
register_step("attack")(_train)


@register_step("attribute")
def attribute_step(step: AttributeStep, ctx: StepContext) -> Outputs:
    from safeunits.units.attribution import MAP_FILE, attribute

    model, tokenizer = ctx.load(step.model)
    unit_map = attribute(model, tokenizer, step.settings, ctx.out, data_dir=ctx.data_dir,
                         model_name=ctx.model_source(step.model), progress=ctx.evaluation.progress)
    classes = unit_map.summary()["classes"]
    figures = [Figure(path="class_shares.png", caption=f"unit classes per layer ({step.model})"),
               Figure(path="unit_map.png", caption=f"unit map of {step.model}")] if step.settings.plots else []
    shares = ", ".join(f"{name} {100 * c['param_share']:.1f} %" for name, c in classes.items())
    return StepOutputs(unit_map=MAP_FILE, figures=figures, notes=[f"{step.model}: unit parameters per class: {shares}"])


@register_step("prune")
def prune_step(step: PruneStep, ctx: StepContext) -> Outputs:
    from safeunits.units.pruning import pruning_table
    from safeunits.units.unit_map import UnitMap

    model, tokenizer = ctx.load(step.model)
    rows = pruning_table(model, tokenizer, UnitMap.load(ctx.path(step.unit_map, "unit_map")), step.settings,
                         ctx.evaluation, out_dir=ctx.out)
    return StepOutputs(evals={f"{step.model} - pruned {row.pruned}": _rel(row.run_dir, ctx.out) for row in rows},
                       tables=[f"pruning{DOCUMENT_SUFFIX}"])


@register_step("probe")
def probe_step(step: ProbeStep, ctx: StepContext) -> Outputs:
    from safeunits.data.registry import load_dataset
    from safeunits.units.probe import run_probe, write_probe

    model, tokenizer = ctx.load(step.model)
    records = load_dataset(step.prompts, data_dir=ctx.data_dir, limit=step.limit)
    result = run_probe(model, tokenizer, [r.prompt for r in records], step.settings, progress=ctx.evaluation.progress)
    write_probe(result, ctx.out)
    return StepOutputs(figures=[Figure(path="probe.png", caption=f"reasoning-direction probe of {step.model}")],
                       notes=[f"{step.model}: mean gap d(compliance) - d(refusal) = {result.mean_gap:+.4f}, "
                              f"{result.verdict} ({result.n_prompts} prompts)"])


@register_step("transfer")
def transfer_step(step: TransferStep, ctx: StepContext) -> Outputs:
    from safeunits.units.transfer import share_changes, write_transfer
    from safeunits.units.unit_map import UnitMap

    result = write_transfer(UnitMap.load(ctx.path(step.before, "unit_map")),
                            UnitMap.load(ctx.path(step.after, "unit_map")), ctx.out, step.after_classes)
    kept = ", ".join(f"{c} {100 * v:.0f} %" for c, v in result.kept_class_share.items())
    return StepOutputs(figures=[Figure(path="transfer.png", caption=f"role transfer {step.before} -> {step.after}")],
                       notes=[f"share of each class's parameters that kept their class: {kept}",
                              f"class shares of unit parameters ({step.after_classes}): {share_changes(result)}"])


@register_step("harmful-data")
def harmful_data_step(step: HarmfulDataStep, ctx: StepContext) -> Outputs:
    from safeunits.patching import build_harmful_data

    model, tokenizer = ctx.load(step.model)
    splits = build_harmful_data(step.settings, ctx.out, model, tokenizer, data_dir=ctx.data_dir,
                                model_name=ctx.model_source(step.model), progress=ctx.evaluation.progress)
    return StepOutputs(harmful_data=".", notes=[f"D_h: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} prompts with "
                                        f"{step.settings.responses} answers"])


@register_step("derive")
def derive_step(step: DeriveStep, ctx: StepContext) -> Outputs:
    from safeunits.patching import derive_patch, load_harmful_data

    model, tokenizer = ctx.load(step.model)
    folder = ctx.path(step.harmful_data, "harmful_data")
    records, _ = load_harmful_data(folder, "train")
    patch = derive_patch(model, tokenizer, records, step.settings, ctx.out,
                         data_info={"folder": str(folder), "n_records": len(records)}, progress=ctx.evaluation.progress)
    m = patch.manifest
    return StepOutputs(patch=".", notes=[f"{m['kind']}: {m['steps']} steps ({m['stopped_reason']}), "
                                         f"|δ| = {m['delta_norm']:.3f}"])


@register_step("sweep")
def sweep_step(step: SweepStep, ctx: StepContext) -> Outputs:
    from safeunits.patching.patches import DensePatch
    from safeunits.patching.sweep import run_sweep

    model, tokenizer = ctx.load(step.model)
    result = run_sweep(model, tokenizer, DensePatch(ctx.path(step.se, "patch")), DensePatch(ctx.path(step.osm, "patch")),
                       ctx.path(step.harmful_data, "harmful_data"), step.settings, ctx.out,
                       ctx.evaluation)
    best = result.best
    return StepOutputs(best="best.json", tables=[f"sweep{DOCUMENT_SUFFIX}"],
                       figures=[Figure(path="pareto.png",
                                       caption="SafePatching sweep on held-out prompts (Pareto points ringed)")],
                       notes=[f"chosen point: {best.key}" if best else "no grid point evaluated"])


@register_step("merge")
def merge_step(step: MergeStep, ctx: StepContext) -> Outputs:
    from safeunits.patching import MergeConfig, controllable_merge
    from safeunits.patching.patches import DensePatch

    config = step.settings
    if step.best:
        from safeunits.patching.sweep import SweepChoice

        point = SweepChoice.read(ctx.path(step.best, "best")).point
        config = MergeConfig(**{**config.model_dump(), **point, **config.model_dump(include=config.model_fields_set)})
    patch = controllable_merge(DensePatch(ctx.path(step.se, "patch")), DensePatch(ctx.path(step.osm, "patch")), config,
                               progress=ctx.evaluation.progress)
    patch.save(ctx.out / "patch")
    return StepOutputs(patch="patch", notes=[f"a={config.a:g} %, b={config.b:g} %, α={config.alpha:g}, β={config.beta:g}: "
                                             f"{100 * patch.kept_fraction():.2f} % of the weights changed"])


@register_step("apply")
def apply_step(step: ApplyStep, ctx: StepContext) -> Outputs:
    from safeunits.models.loading import save_model
    from safeunits.patching import SparsePatch, apply_patch

    model, tokenizer = ctx.load(step.model)
    patch = SparsePatch.load(ctx.path(step.patch, "patch"))
    apply_patch(model, patch)
    save_model(model, tokenizer, ctx.out / "model")
    return StepOutputs(model="model", notes=[f"{step.model} + the patch of {step.patch}: "
                                             f"{100 * patch.kept_fraction():.2f} % of the weights changed"])


@register_step("baselines")
def baselines_step(step: BaselinesStep, ctx: StepContext) -> Outputs:
    from safeunits.patching.baselines import run_baselines
    from safeunits.patching.patches import DensePatch
    from safeunits.patching.sweep import SweepChoice

    config = step.settings
    if step.best:  # the sweep's chosen point; merge fields given in settings win
        point = SweepChoice.read(ctx.path(step.best, "best")).point
        given = config.merge.model_dump(include=config.merge.model_fields_set)
        config = config.model_copy(update={"merge": config.merge.model_copy(update={**point, **given})})
    model, tokenizer = ctx.load(step.model)
    npo = DensePatch(ctx.path(step.npo, "patch")) if step.npo else None
    rows = run_baselines(model, tokenizer, DensePatch(ctx.path(step.se, "patch")), DensePatch(ctx.path(step.osm, "patch")),
                         config, ctx.out, ctx.evaluation, npo=npo)
    return StepOutputs(evals={f"{step.model} - {row.method}": row.method for row in rows},
                       tables=[f"baselines{DOCUMENT_SUFFIX}"])


@register_step("durability")
def durability_step(step: DurabilityStep, ctx: StepContext) -> Outputs:
    from safeunits.eval.durability import AttackPoint, durability_rows, plot_curves
    from safeunits.document import Document, Heading, Paragraph, Table
    from safeunits.eval.result import EvalResult
    from safeunits.io import read_json, write_json

    def result(name: str) -> EvalResult:
        return EvalResult.load(ctx.run_dir / name / "eval")  # an eval step's folder

    per = len(step.attacks) // len(step.defences)
    grid = [[AttackPoint(i, read_json(ctx.run_dir / attack / "train_report.json")["train"]["steps"], attack,
                         result(after))
             for i, (attack, after) in enumerate(zip(step.attacks[d * per:(d + 1) * per],
                                                     step.after[d * per:(d + 1) * per]))]
            for d in range(len(step.defences))]
    rows = durability_rows(step.defences, [result(b) for b in step.before], grid, step.utility_bound)
    write_json(ctx.out / "durability.json", {"utility_bound": step.utility_bound, "rows": rows})
    columns = [("defence", "defence", ""), ("harmful_before", "harmful % before", "%"),
               ("worst_harmful", "worst harmful % (attacked)", "%"), ("worst_refusal", "refused % (worst)", "%"),
               ("worst_nll", "NLL (worst)", ".3f"), ("nll_before", "NLL before", ".3f"),
               ("worst_attack", "worst attack", ""), ("counted", "attacks within the bound", ""),
               ("steps_to_50", "steps to 50 % harmful", ""), ("vs_undefended", "significant vs undefended (same attack)", "")]
    table = Document().add(
        Heading(level=1, text="Durability under fine-tuning attacks"),
        Paragraph(text=f"Worst case over {per} attacks among those whose utility NLL stays within "
                       f"{100 * step.utility_bound:g} % of the defended model's; `significant vs undefended` lists the "
                       "columns where the worst-case model differs from the undefended model under the same attack "
                       "(paired tests on the same prompts)."),
        Table.from_rows(rows, columns)).write(ctx.out, "durability")
    plot_curves(step.defences, grid, ctx.out / "durability.png")
    return StepOutputs(tables=[table], figures=[Figure(path="durability.png", caption="harmful rate against attack steps")])

