"""`safeunits demo`: the story of SPEC.md §6 end to end on the embedded default model, at CPU scale.

Stages (each can be chosen with `--stage`; every stage reuses what earlier runs left in the output folder):
  eval   evaluate the unaligned default model on the quick suite (three axes);
  patch  SafePatching on the default model: harmful data by prefill attack, bounded gradient-ascent safety patch,
         gradient-descent over-safety patch, controllable merge of their salient difference sets, evaluation;
  align  the aligned default (`smollm2-135m-aligned`, built once and cached) evaluated the same way;
  units  SSAH on the aligned model: score and classify units, then prune the safety-critical units against an
         equally large random set (the check that the map is right).
The three-axis table of every variant is printed at the end and written to `summary.md`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

import typer
from pydantic import BaseModel, Field

from safeunits.cli_options import DATA_DIR, QUIET, build_config, out_option, parse_sets, sets_option, suite_option
from safeunits.eval.context import EvalContext
from safeunits.eval.report import compare_table, markdown_table
from safeunits.eval.result import EvalResult
from safeunits.io import write_text
from safeunits.models.loading import DEFAULT_MODEL, load_model

log = logging.getLogger(__name__)

Stage = Literal["eval", "patch", "align", "units"]
STAGES: tuple[Stage, ...] = ("eval", "patch", "align", "units")
ALIGNED_MODEL = "smollm2-135m-aligned"


class DemoConfig(BaseModel):
    """Sizes of the demo: small enough for 2 CPU cores (about 30-40 minutes for every stage)."""

    stages: list[Stage] = Field(list(STAGES), description="stages to run, in this order")
    suite: str = Field("quick", description="evaluation suite for every variant")
    patch_model: str = Field(DEFAULT_MODEL, description="backbone SafePatching patches")
    aligned_model: str = Field(ALIGNED_MODEL, description="model whose units the units stage maps and prunes")
    n_harmful: int = Field(32, ge=1, description="harmful prompts (with prefill-attack answers) deriving the patches")
    ascent_steps: int = Field(10, ge=1, description="step budget of the bounded gradient ascent (safety patch)")
    ascent_nll_bound: float = Field(4.0, description="stop the ascent once the harmful answers' NLL passes this")
    descent_steps: int = Field(3, ge=1, description="steps of gradient descent (over-safety patch)")
    top_a: float = Field(5.0, description="top-a % most salient weights of the safety patch")
    top_b: float = Field(5.0, description="top-b % most salient weights of the over-safety patch")
    n_attribution: int = Field(48, ge=4, description="examples of safety and of utility data for unit scores")
    data_dir: str | None = Field(None, description="offline data folder (default $SAFEUNITS_DATA_DIR)")


def run_demo(config: DemoConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, EvalResult]:
    """Run the chosen stages into `out_dir`; return the evaluation of every variant by name."""
    out = Path(out_dir)
    evaluation = EvalContext.create(config.suite, data_dir=config.data_dir, progress=progress)
    results: dict[str, EvalResult] = {}
    for stage in STAGES:
        if stage in config.stages:
            log.info("demo stage %r", stage)
            results.update(_STAGE_FUNCTIONS[stage](config, evaluation, out / stage))
    if results:
        compare_table(results)
        write_text(out / "summary.md", "# safeunits demo\n\n" + markdown_table(results) + "\n")
    return results


def _stage_eval(config: DemoConfig, evaluation: EvalContext, out: Path) -> dict[str, EvalResult]:
    model, tokenizer = load_model(DEFAULT_MODEL)
    return {DEFAULT_MODEL: evaluation.evaluate(model, tokenizer, out, name=DEFAULT_MODEL)}


def _stage_patch(config: DemoConfig, evaluation: EvalContext, out: Path) -> dict[str, EvalResult]:
    from safeunits.patching import (HarmfulDataConfig, MergeConfig, PatchConfig, apply_patch, build_harmful_data,
                                    controllable_merge, derive_patch, undo_patch)

    progress = evaluation.progress
    model, tokenizer = load_model(config.patch_model)
    dh = build_harmful_data(HarmfulDataConfig(n_train=config.n_harmful, n_val=0, max_new_tokens=48), out / "dh",
                            model, tokenizer, data_dir=evaluation.data_dir, model_name=config.patch_model,
                            progress=progress)
    info = {"folder": str(out / "dh"), "n_records": len(dh["train"])}
    se = derive_patch(model, tokenizer, dh["train"], PatchConfig(objective="ascent", train={
        "lr": 1e-4, "max_steps": config.ascent_steps, "stop_nll_above": config.ascent_nll_bound}),
        out / "se", data_info=info, progress=progress)
    osm = derive_patch(model, tokenizer, dh["train"], PatchConfig(objective="descent", train={
        "lr": 5e-5, "max_steps": config.descent_steps}), out / "osm", data_info=info, progress=progress)
    patch = controllable_merge(se, osm, MergeConfig(a=config.top_a, b=config.top_b), progress=progress)
    patch.save(out / "safepatching")
    undo = apply_patch(model, patch)
    try:
        name = f"{config.patch_model} + SafePatching"
        return {name: evaluation.evaluate(model, tokenizer, out / "eval", name=name)}
    finally:
        undo_patch(model, undo)


def _stage_align(config: DemoConfig, evaluation: EvalContext, out: Path) -> dict[str, EvalResult]:
    model, tokenizer = load_model(config.aligned_model)
    return {config.aligned_model: evaluation.evaluate(model, tokenizer, out, name=config.aligned_model)}


def _stage_units(config: DemoConfig, evaluation: EvalContext, out: Path) -> dict[str, EvalResult]:
    from safeunits.units.attribution import AttributionConfig, attribute
    from safeunits.units.pruning import PruneConfig, pruning_table
    from safeunits.units.scores import ScoreConfig

    model, tokenizer = load_model(config.aligned_model)
    attribution = AttributionConfig(utility_data="self-instruct:seed", limit=config.n_attribution,
                                    score=ScoreConfig(max_length=192))
    unit_map = attribute(model, tokenizer, attribution, out, data_dir=evaluation.data_dir,
                         model_name=config.aligned_model, progress=evaluation.progress)
    rows = pruning_table(model, tokenizer, unit_map, PruneConfig(targets=["scu", "random:scu"], baseline=False),
                         evaluation, out_dir=out / "pruning")
    return {f"{config.aligned_model} - {row['pruned']}": EvalResult.load(row["run_dir"]) for row in rows}


_STAGE_FUNCTIONS = {"eval": _stage_eval, "patch": _stage_patch, "align": _stage_align, "units": _stage_units}


app = typer.Typer()


@app.command("demo")
def demo_command(
    out: Path = out_option("Run folder; a rerun resumes finished evaluations.", default=Path("runs/demo")),
    stage: list[str] = typer.Option(list(STAGES), "--stage", help=f"Stage to run (repeatable): {', '.join(STAGES)}."),
    suite: Optional[str] = suite_option(None, "For every variant (default: quick)."),
    sets: list[str] = sets_option("n_attribution=32"),
    data_dir: Optional[Path] = DATA_DIR,
    quiet: bool = QUIET,
) -> None:
    """The SPEC §6 story on the default model: evaluate, SafePatching, aligned model, unit map + pruning check."""
    given: dict = {"stages": stage}
    if suite:
        given["suite"] = suite
    if data_dir:
        given["data_dir"] = str(data_dir)
    config = build_config(DemoConfig, given, parse_sets(sets))
    run_demo(config, out, progress=not quiet)
    typer.echo(f"summary: {out / 'summary.md'}")
