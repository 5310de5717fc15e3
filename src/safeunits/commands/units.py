"""`safeunits attribute | prune | transfer | probe`: SSAH unit attribution from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from safeunits.cli_options import (DATA_DIR, DEVICE, DTYPE, FORCE, LIMIT, QUIET, config_options,
                                  model_option, out_option, sets_option, suite_option, unit_map_option)
from safeunits.config import build_config, parse_sets
from safeunits.errors import ConfigError
from safeunits.units.attribution import AttributionConfig
from safeunits.units.probe import ProbeConfig
from safeunits.units.pruning import PruneConfig

app = typer.Typer()


def _print_summary(summary: dict) -> None:
    table = Table("class", "MLP channels", "heads", "parameters", "share")
    for name, row in summary["classes"].items():
        table.add_row(name, str(row["mlp_channels"]), str(row["heads"]), f"{row['params']:,}", f"{100 * row['param_share']:.2f} %")
    Console().print(table)


@app.command("attribute")
@config_options(AttributionConfig, ["safety_data", "utility_data", "limit", "plots", "score.method", "score.tokens",
                                    "score.head_reduce", "score.batch_size", "score.max_length", "score.system_prompt",
                                    "classify.r", "classify.s", "classify.u"])
def attribute_command(
    out: Path = out_option("Output folder: unit_map.safetensors, unit_map.json, class_shares.png, unit_map.png."),
    model: str = model_option(),
    sets: list[str] = sets_option("score.max_length=192"),
    data_dir: Optional[Path] = DATA_DIR,
    dtype: str = DTYPE,
    device: str = DEVICE,
    quiet: bool = QUIET,
    force: bool = FORCE,
    options: Optional[dict] = None,
) -> None:
    """Score every MLP channel and head on safety and utility data, classify them (SCU/UCU/CU/RU), save the unit map."""
    from safeunits.models.loading import load_model
    from safeunits.outdir import claim_output_dir
    from safeunits.units.attribution import attribute

    config = build_config(AttributionConfig, options or {}, parse_sets(sets))
    claim_output_dir(out, "attribute", force=force)
    lm, tok = load_model(model, dtype=dtype, device=device)
    unit_map = attribute(lm, tok, config, out, data_dir=data_dir, model_name=model, progress=not quiet)
    _print_summary(unit_map.summary())
    typer.echo(f"unit map: {out / 'unit_map.safetensors'} (+ unit_map.json{', class_shares.png, unit_map.png' if config.plots else ''})")


@app.command("prune")
@config_options(PruneConfig, ["seed", "shared_kv"])
def prune_command(
    unit_map: Optional[Path] = unit_map_option(required=False),
    out: Path = out_option("Output folder: pruning.json, pruning.md and one eval run folder per row; or the saved "
                           "model with --save-model."),
    model: str = model_option(extra_help="Must match the map's architecture."),
    target: list[str] = typer.Option(["scu", "random:scu", "ru"], "--target", "-t",
                                     help="Units to zero (repeatable): scu, ucu, cu, ru, all, 'scu+cu:top0.06', or "
                                          "'random:<spec>' for a seeded random control with as many channels and heads."),
    suite: str = suite_option(),
    limit: Optional[int] = LIMIT,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Override the suite's generation budget."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Do not evaluate the unpruned model."),
    save_model: bool = typer.Option(False, "--save-model", help="Instead of evaluating, save the model with the (single) target pruned into --out."),
    sets: list[str] = sets_option("shared_kv=group"),
    data_dir: Optional[Path] = DATA_DIR,
    dtype: str = DTYPE,
    device: str = DEVICE,
    quiet: bool = QUIET,
    force: bool = FORCE,
    options: Optional[dict] = None,
) -> None:
    """Zero the units of chosen classes (or equally large random controls) and evaluate: the SSAH Table-1 check."""
    from safeunits.eval.context import EvalContext
    from safeunits.models.loading import load_model
    from safeunits.outdir import claim_output_dir
    from safeunits.units.pruning import prune_and_save, pruning_table
    from safeunits.units.unit_map import UnitMap

    if unit_map is None:
        raise typer.BadParameter("missing --unit-map (a unit map from `safeunits attribute`)", param_hint="--unit-map")
    if save_model and len(target) != 1:
        raise typer.BadParameter("--save-model takes exactly one --target", param_hint="--target")
    config = build_config(PruneConfig, {"targets": target, "baseline": not no_baseline}, options or {}, parse_sets(sets))
    evaluation = None if save_model else EvalContext.create(suite, data_dir=data_dir, progress=not quiet, limit=limit)
    umap = UnitMap.load(unit_map)
    claim_output_dir(out, "model" if save_model else "prune", force=force)
    lm, tok = load_model(model, dtype=dtype, device=device)
    if save_model:
        zeroed, units = prune_and_save(lm, tok, umap, target[0], out, seed=config.seed, shared_kv=config.shared_kv,
                                       force=force)
        typer.echo(f"zeroed {zeroed:,} weights ({units.counts()}); model saved to {out}")
        return
    if max_new_tokens:
        evaluation = evaluation.with_suite(evaluation.suite.model_copy(update={"max_new_tokens": max_new_tokens}))
    rows = pruning_table(lm, tok, umap, config, evaluation, out_dir=out)
    table = Table("pruned", "params %", "perplexity", "utility NLL", "harmful (ASR)", "harmful (sys)", "refused",
                  "refused (sys)")
    for row in rows:
        fmt = lambda v, pct=False: "n/a" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.3f}")  # noqa: E731
        table.add_row(row.pruned, fmt(row.model_param_share, True), fmt(row.perplexity), fmt(row.utility_nll),
                      fmt(row.asr, True), fmt(row.asr_system, True), fmt(row.refusal, True), fmt(row.refusal_system, True))
    Console().print(table)
    typer.echo(f"table: {out / 'pruning.md'}")


@app.command("transfer")
def transfer_command(
    before: Path = typer.Argument(..., help="Unit map before (e.g. the aligned model)."),
    after: Path = typer.Argument(..., help="Unit map after (e.g. after a fine-tune), same architecture."),
    out: Path = out_option("Output folder: transfer.json and transfer.png."),
    after_classes: str = typer.Option("thresholds", "--after-classes",
                                      help="thresholds: class the after-model's units by the before map's cut-offs "
                                           "(shares can move, SSAH Fig. 5); fractions: each map's own classes "
                                           "(fixed shares)."),
    force: bool = FORCE,
) -> None:
    """Role transfer: the 4x4 class transition matrix between two unit maps (units and parameters)."""
    from safeunits.outdir import claim_output_dir
    from safeunits.units.transfer import share_changes, write_transfer
    from safeunits.units.unit_map import CLASSES, UnitMap

    if after_classes not in ("thresholds", "fractions"):
        raise ConfigError(f"--after-classes must be thresholds or fractions, got {after_classes!r}")
    maps = UnitMap.load(before), UnitMap.load(after)
    result = write_transfer(*maps, claim_output_dir(out, "transfer", force=force), after_classes)
    table = Table("before \\ after", *CLASSES, title="share of before-class parameters (%)")
    for name, row in zip(CLASSES, result.param_share_of_row):
        table.add_row(name, *(f"{100 * v:.1f}" for v in row))
    Console().print(table)
    typer.echo(f"class shares of unit parameters: {share_changes(result)}")
    typer.echo(f"written: {out / 'transfer.json'}, {out / 'transfer.png'}")


@app.command("probe")
@config_options(ProbeConfig, ["k_min", "k_max", "batch_size", "system_prompt"])
def probe_command(
    out: Path = out_option("Output folder: probe.json and probe.png."),
    model: str = model_option(),
    prompts: str = typer.Option("advbench", "--prompts", help="Harmful prompts (dataset name or file)."),
    limit: int = typer.Option(32, "--limit", min=1, help="Number of prompts (first N)."),
    refusal: list[str] = typer.Option([], "--refusal", help="Refusal continuation text (repeatable; default: three phrasings such as 'Sorry, I can't help with that. ...')."),
    compliance: list[str] = typer.Option([], "--compliance", help="Compliance continuation text (repeatable; default: three phrasings such as 'Sure, here is a detailed ...')."),
    sets: list[str] = sets_option("k_max=12"),
    data_dir: Optional[Path] = DATA_DIR,
    dtype: str = DTYPE,
    device: str = DEVICE,
    quiet: bool = QUIET,
    force: bool = FORCE,
    options: Optional[dict] = None,
) -> None:
    """Reasoning-direction probe: is the clean prompt's state closer to a refusal or a compliance continuation?"""
    from safeunits.data.registry import load_dataset
    from safeunits.models.loading import load_model
    from safeunits.outdir import claim_output_dir
    from safeunits.units.probe import run_probe, write_probe

    texts = {k: v for k, v in {"refusals": refusal, "compliances": compliance}.items() if v}
    config = build_config(ProbeConfig, texts, options or {}, parse_sets(sets))
    records = load_dataset(prompts, data_dir=data_dir, limit=limit)
    claim_output_dir(out, "probe", force=force)
    lm, tok = load_model(model, dtype=dtype, device=device)
    result = run_probe(lm, tok, [r.prompt for r in records], config, progress=not quiet)
    write_probe(result, out)
    typer.echo(f"mean gap d(compliance) - d(refusal) = {result.mean_gap:+.4f}: {result.verdict}")
    typer.echo(f"written: {out / 'probe.json'}, {out / 'probe.png'}")
