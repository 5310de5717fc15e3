"""`safeunits attribute | prune | transfer | probe`: SSAH unit attribution from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

MODEL_HELP = "Registered model name, local model folder, or Hugging Face hub id."


def _load(model: str, dtype: str, device: str):
    from safeunits.models.loading import load_model

    return load_model(model, dtype=dtype, device=device)


def _records(spec: str, limit: Optional[int], data_dir: Optional[Path], what: str):
    from safeunits.data.registry import load_dataset

    try:
        records = load_dataset(spec, data_dir=data_dir, limit=limit)
    except (FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint=what) from err
    if not records:
        raise typer.BadParameter(f"dataset {spec!r} is empty", param_hint=what)
    return records


def _print_summary(summary: dict) -> None:
    table = Table("class", "MLP channels", "heads", "parameters", "share")
    for name, row in summary["classes"].items():
        table.add_row(name, str(row["mlp_channels"]), str(row["heads"]), f"{row['params']:,}", f"{100 * row['param_share']:.2f} %")
    Console().print(table)


def register(app: typer.Typer) -> None:
    @app.command("attribute")
    def attribute_command(
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: unit_map.safetensors, unit_map.json, class_shares.png, unit_map.png."),
        model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP),
        safety_data: str = typer.Option("advbench-refusals", "--safety-data",
                                        help="Harmful prompts paired with refusals (dataset name or file)."),
        utility_data: str = typer.Option("self-instruct:user", "--utility-data",
                                         help="Benign instructions with answers (dataset name or file)."),
        limit: int = typer.Option(128, "--limit", min=1, help="Examples taken from each dataset (first N)."),
        method: str = typer.Option("fluctuation", "--method", help="Score: fluctuation (FLAP, SSAH default), wanda or snip."),
        tokens: str = typer.Option("response", "--tokens", help="Tokens that count: response (default) or all (prompt too)."),
        head_reduce: str = typer.Option("mean", "--head-reduce", help="A head's activation score: mean or sum of its channels."),
        r: float = typer.Option(0.15, "--r", min=0, max=1, help="Parameter fraction of redundant units (RU)."),
        s: float = typer.Option(0.015, "--s", min=0, max=1, help="Parameter fraction of safety-critical units (SCU)."),
        u: float = typer.Option(0.10, "--u", min=0, max=1, help="Parameter fraction of utility-critical units (UCU)."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per forward pass (snip: always 1)."),
        max_length: int = typer.Option(256, "--max-length", min=8, help="Tokens per example (the response end is cut)."),
        system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System prompt in the chat template while scoring."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Offline data folder (default $SAFEUNITS_DATA_DIR)."),
        dtype: str = typer.Option("float32", "--dtype", help="Model weights dtype (float32, bfloat16, float16)."),
        device: str = typer.Option("cpu", "--device", help="Torch device (cpu, cuda, ...)."),
        no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG figures."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Score every MLP channel and head on safety and utility data, classify them (SCU/UCU/CU/RU), save the unit map."""
        from pydantic import ValidationError

        from safeunits.distributed import is_main_process
        from safeunits.units.classes import ClassifyConfig, build_unit_map
        from safeunits.units.plots import write_map_plots
        from safeunits.units.scores import ScoreConfig, compute_scores

        try:
            score_cfg = ScoreConfig(method=method, tokens=tokens, head_reduce=head_reduce, batch_size=batch_size,
                                    max_length=max_length, system_prompt=system_prompt)
            class_cfg = ClassifyConfig(r=r, s=s, u=u)
        except ValidationError as err:
            raise typer.BadParameter(str(err)) from err
        safety = _records(safety_data, limit, data_dir, "--safety-data")
        utility = _records(utility_data, limit, data_dir, "--utility-data")
        lm, tok = _load(model, dtype, device)
        try:
            s_scores = compute_scores(lm, tok, safety, score_cfg, progress=not quiet, desc="safety data")
            u_scores = compute_scores(lm, tok, utility, score_cfg, progress=not quiet, desc="utility data")
        except NotImplementedError as err:  # unsupported architecture
            raise typer.BadParameter(str(err), param_hint="--model") from err
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
        if not is_main_process():  # every process scored its shard; the main one writes the unit map
            return
        s_scores.extra, u_scores.extra = {"dataset": safety_data, "seconds": s_scores.seconds}, {"dataset": utility_data, "seconds": u_scores.seconds}
        unit_map = build_unit_map(lm, s_scores, u_scores, class_cfg,
                                  settings={"model": model, "score": score_cfg.model_dump(), "limit": limit})
        path = unit_map.save(out / "unit_map.safetensors")
        if not no_plots:
            write_map_plots(unit_map, out)
        _print_summary(unit_map.summary())
        typer.echo(f"unit map: {path} (+ unit_map.json{'' if no_plots else ', class_shares.png, unit_map.png'})")

    @app.command("prune")
    def prune_command(
        unit_map_path: Path = typer.Option(..., "--map", help="Unit map (unit_map.safetensors or its folder) from `safeunits attribute`."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: pruning.json, pruning.md and one eval run folder per row; or the saved model with --save-model."),
        model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP + " Must match the map's architecture."),
        target: list[str] = typer.Option(["scu", "random:scu", "ru"], "--target", "-t",
                                         help="Units to zero (repeatable): scu, ucu, cu, ru, all, 'scu+cu:top0.06', or 'random:<spec>' "
                                              "for a seeded random control with as many channels and heads."),
        suite: str = typer.Option("quick", "--suite", "-s", help="Evaluation suite name or YAML file."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Cut every evaluation set to at most this many items."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Override the suite's generation budget."),
        no_baseline: bool = typer.Option(False, "--no-baseline", help="Do not evaluate the unpruned model."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random controls."),
        shared_kv: str = typer.Option("none", "--shared-kv", help="none: grouped K/V rows are never zeroed; group: zero a group's K/V when any of its heads is pruned."),
        save_model: bool = typer.Option(False, "--save-model", help="Instead of evaluating, save the model with the (single) target pruned into --out."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Offline data folder (default $SAFEUNITS_DATA_DIR)."),
        dtype: str = typer.Option("float32", "--dtype", help="Model weights dtype."),
        device: str = typer.Option("cpu", "--device", help="Torch device."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Zero the units of chosen classes (or equally large random controls) and evaluate: the SSAH Table-1 check."""
        from safeunits.eval.context import EvalContext
        from safeunits.models.loading import save_model as save
        from safeunits.units.pruning import PruneConfig, prune_units, pruning_table, resolve_target
        from safeunits.units.unit_map import UnitMap

        if shared_kv not in ("none", "group"):
            raise typer.BadParameter("--shared-kv must be none or group")
        unit_map = UnitMap.load(unit_map_path)
        lm, tok = _load(model, dtype, device)
        try:
            unit_map.check_model(lm)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--model") from err
        if save_model:
            if len(target) != 1:
                raise typer.BadParameter("--save-model takes exactly one --target")
            units = resolve_target(unit_map, target[0], seed=seed)
            zeroed = prune_units(lm, units, shared_kv=shared_kv)  # type: ignore[arg-type]
            save(lm, tok, out)
            typer.echo(f"zeroed {zeroed:,} weights ({units.counts()}); model saved to {out}")
            return
        ctx = EvalContext.create(suite, data_dir=data_dir, progress=not quiet, limit=limit)
        if max_new_tokens:
            ctx = ctx.with_suite(ctx.suite.model_copy(update={"max_new_tokens": max_new_tokens}))
        rows = pruning_table(lm, tok, unit_map, PruneConfig(targets=target, baseline=not no_baseline, seed=seed, shared_kv=shared_kv),  # type: ignore[arg-type]
                             ctx, out_dir=out)
        table = Table("pruned", "params %", "perplexity", "utility NLL", "ASR", "ASR (sys)")
        for row in rows:
            fmt = lambda v, pct=False: "n/a" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.3f}")  # noqa: E731
            table.add_row(row["pruned"], fmt(row["model_param_share"], True), fmt(row["perplexity"]), fmt(row["utility_nll"]),
                          fmt(row["asr"], True), fmt(row["asr_system"], True))
        Console().print(table)
        typer.echo(f"table: {out / 'pruning.md'}")

    @app.command("transfer")
    def transfer_command(
        before: Path = typer.Argument(..., help="Unit map before (e.g. the aligned model)."),
        after: Path = typer.Argument(..., help="Unit map after (e.g. after a fine-tune), same architecture."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: transfer.json and transfer.png."),
    ) -> None:
        """Role transfer: the 4x4 class transition matrix between two unit maps (units and parameters)."""
        from safeunits.units.transfer import write_transfer
        from safeunits.units.unit_map import CLASSES, UnitMap

        try:
            result = write_transfer(UnitMap.load(before), UnitMap.load(after), out)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
        table = Table("before \\ after", *CLASSES, title="share of before-class parameters (%)")
        for name, row in zip(CLASSES, result["param_share_of_row"]):
            table.add_row(name, *(f"{100 * v:.1f}" for v in row))
        Console().print(table)
        typer.echo(f"written: {out / 'transfer.json'}, {out / 'transfer.png'}")

    @app.command("probe")
    def probe_command(
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: probe.json and probe.png."),
        model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=MODEL_HELP),
        prompts: str = typer.Option("advbench", "--prompts", help="Harmful prompts (dataset name or file)."),
        limit: int = typer.Option(32, "--limit", min=1, help="Number of prompts (first N)."),
        refusal: list[str] = typer.Option([], "--refusal", help="Refusal continuation text (repeatable; default: three phrasings such as 'Sorry, I can't help with that. ...')."),
        compliance: list[str] = typer.Option([], "--compliance", help="Compliance continuation text (repeatable; default: three phrasings such as 'Sure, here is a detailed ...')."),
        k_min: int = typer.Option(2, "--k-min", min=1, help="Shortest continuation in tokens."),
        k_max: int = typer.Option(10, "--k-max", min=1, help="Longest continuation in tokens."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per forward pass."),
        system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System prompt in the chat template."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Offline data folder (default $SAFEUNITS_DATA_DIR)."),
        dtype: str = typer.Option("float32", "--dtype", help="Model weights dtype."),
        device: str = typer.Option("cpu", "--device", help="Torch device."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Reasoning-direction probe: is the clean prompt's state closer to a refusal or a compliance continuation?"""
        from pydantic import ValidationError

        from safeunits.units.probe import ProbeConfig, run_probe, write_probe

        updates = {k: v for k, v in {"refusals": refusal, "compliances": compliance}.items() if v}
        try:
            config = ProbeConfig(k_min=k_min, k_max=k_max, batch_size=batch_size, system_prompt=system_prompt, **updates)
        except ValidationError as err:
            raise typer.BadParameter(str(err)) from err
        records = _records(prompts, limit, data_dir, "--prompts")
        lm, tok = _load(model, dtype, device)
        try:
            result = run_probe(lm, tok, [r.prompt for r in records], config, progress=not quiet)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
        write_probe(result, out)
        typer.echo(f"mean gap d(compliance) - d(refusal) = {result['mean_gap']:+.4f}: {result['verdict']}")
        typer.echo(f"written: {out / 'probe.json'}, {out / 'probe.png'}")
