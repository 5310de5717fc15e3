"""`safeunits patch ...`: build D_h, derive patches, merge, apply, sweep, continual, baselines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from safeunits.cli_options import (DATA_DIR, FORCE, QUIET, config_options, model_option,
                                  out_option, sets_option, suite_option)
from safeunits.config import build_config, parse_sets
from safeunits.errors import ConfigError
from safeunits.outdir import claim_output_dir
from safeunits.patching.baselines import BaselinesConfig
from safeunits.patching.continual import ContinualConfig
from safeunits.patching.harmful_data import HarmfulDataConfig
from safeunits.patching.merge import MergeConfig
from safeunits.patching.methods import get_patch_method, patch_method_names
from safeunits.patching.patches import PatchConfig
from safeunits.patching.sweep import SweepConfig

app = typer.Typer(name="patch", help="SafePatching: safety / over-safety patches, controllable merge, sparse "
                  "patch files, sweep, continual alignment, baselines.", no_args_is_help=True)

MERGE_FIELDS = ["merge.a", "merge.b", "merge.alpha", "merge.beta"]
BEST = typer.Option(None, "--best", help="The run folder of `patch sweep` (or its best.json): a, b, α, β of its chosen point "
                    "(options given on the command line still win); evaluations leave out the XSTest prompts "
                    "the sweep selected on.")
SE = typer.Option(..., "--se", help="Safety patch folder δ_SE (from `patch derive`).")
OSM = typer.Option(..., "--osm", help="Over-safety patch folder δ_OSM (from `patch derive`).")
DH = typer.Option(..., "--harmful-data", "-d", help="D_h folder from `patch harmful-data`.")


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ConfigError(f"{flag} expects comma-separated numbers, got {text!r}", hint=f"e.g. {flag} 1,5,20") from err


def _best_point(best: Path | None) -> tuple[dict, list[str]]:
    """a, b, α, β, DARE p of the point `patch sweep` chose, and the XSTest prompts it was chosen on (empty
    without --best)."""
    if best is None:
        return {}, []
    from safeunits.patching.sweep import SweepChoice

    choice = SweepChoice.read(best)
    if not choice.point:
        raise ConfigError(f"{best} has no chosen point", hint="no sweep point met the utility tolerance; pass a, b, α, β")
    return choice.point, choice.held_out


def _load(model: str):
    from safeunits.models.loading import load_model

    return load_model(model)


@app.command("harmful-data")
@config_options(HarmfulDataConfig, ["prompts", "offset", "n_train", "n_val", "responses", "response_prefix",
                                    "max_new_tokens", "seed"])
def harmful_data(
    out: Path = out_option("Folder for train.jsonl, val.jsonl and manifest.json."),
    model: str = model_option(),
    category: list[str] = typer.Option([], "--category", help="Keep only these harm categories (repeatable)."),
    eval_set: list[str] = typer.Option([], "--eval-set", help="Evaluation sets that must not overlap (repeatable; "
                                       "default advbench[:100], harmbench, xstest)."),
    keep_refusals: bool = typer.Option(False, "--keep-refusals", help="Keep generated answers the judge calls refusals."),
    sets: list[str] = sets_option("judge=prefix"),
    data_dir: Optional[Path] = DATA_DIR,
    quiet: bool = QUIET,
    force: bool = FORCE,
    options: Optional[dict] = None,
) -> None:
    """Build D_h: harmful prompts with harmful responses, split train/val, checked against evaluation prompts."""
    from safeunits.patching.harmful_data import build_harmful_data

    given = {k: v for k, v in {"categories": category or None, "eval_sets": eval_set or None}.items() if v}
    if keep_refusals:
        given["require_compliance"] = False
    config = build_config(HarmfulDataConfig, given, options or {}, parse_sets(sets))
    claim_output_dir(out, "harmful-data", force=force)
    m, tok = (None, None) if config.responses == "dataset" else _load(model)
    result = build_harmful_data(config, out, m, tok, data_dir=data_dir, model_name=model, progress=not quiet)
    typer.echo(f"D_h in {out}: " + ", ".join(f"{k} {len(v)}" for k, v in result.items()))


@app.command("derive")
def derive(
    harmful_data: Path = DH,
    out: Path = out_option("Writes OUT/se, OUT/osm (and OUT/npo) patch folders."),
    model: str = model_option(),
    objective: list[str] = typer.Option(["ascent", "descent"], "--objective",
                                        help="A registered training objective: ascent (δ_SE), descent (δ_OSM), npo "
                                             "(baseline), ...; repeatable. Folder: se, osm, or the objective's name."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default per objective, see docs/patching.md)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Step budget."),
    stop_nll_above: Optional[float] = typer.Option(None, "--stop-nll-above", help="Ascent bound: stop once the batch NLL passes this."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per step."),
    saliency_on: Optional[str] = typer.Option(None, "--saliency-on", help="SNIP on each patched model ('patched', "
                                              "the paper's); 'backbone' is refused (same scores for both patches)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Regex of parameter names never patched (repeatable)."),
    saliency_examples: Optional[int] = typer.Option(None, "--saliency-examples", help="SNIP on the first N training examples (default all)."),
    sets: list[str] = sets_option("train.weight_decay=0.01"),
    quiet: bool = QUIET,
    force: bool = FORCE,
) -> None:
    """Derive δ_SE by bounded gradient ascent and δ_OSM by descent on D_h's train split, with SNIP saliency."""
    from safeunits.patching.harmful_data import load_harmful_data
    from safeunits.patching.patches import derive_patch

    train = {k: v for k, v in {"lr": lr, "max_steps": max_steps, "batch_size": batch_size}.items() if v is not None}
    saliency = {k: v for k, v in {"exclude": exclude or None, "max_examples": saliency_examples}.items() if v is not None}
    given = {"train": train, "saliency": saliency, **({"saliency_on": saliency_on} if saliency_on else {})}
    overrides = parse_sets(sets)
    configs = {}
    for obj in objective:
        stop = {"train": {"stop_nll_above": stop_nll_above}} if stop_nll_above is not None and obj != "descent" else {}
        configs[obj] = build_config(PatchConfig, {"objective": obj, "train": {}}, given, stop, overrides)
    records, info = load_harmful_data(harmful_data, "train")
    claim_output_dir(out, "patches", force=force)
    m, tok = _load(model)
    for obj, config in configs.items():
        folder = {"ascent": "se", "descent": "osm"}.get(obj, obj)
        patch = derive_patch(m, tok, records, config, out / folder, data_info={**info, "model": model},
                             progress=not quiet)
        mf = patch.manifest
        typer.echo(f"{folder}: {out / folder} ({mf['steps']} steps, stopped: {mf['stopped_reason']}, "
                   f"|δ| = {mf['delta_norm']:.4f})")


@app.command("merge")
@config_options(MergeConfig, ["a", "b", "alpha", "beta", "dare_p", "seed", "scope"])
def merge(
    se: Path = SE,
    osm: Path = OSM,
    out: Path = out_option("Folder for the sparse patch."),
    best: Optional[Path] = BEST,
    sets: list[str] = sets_option("dare_p=0.5"),
    quiet: bool = QUIET,
    force: bool = FORCE,
    options: Optional[dict] = None,
) -> None:
    """Controllable patching: merge the salient difference sets of δ_SE and δ_OSM into a sparse patch."""
    from safeunits.patching.merge import controllable_merge
    from safeunits.patching.patches import DensePatch

    config = build_config(MergeConfig, _best_point(best)[0], options or {}, parse_sets(sets))
    se_patch, osm_patch = DensePatch(se), DensePatch(osm)
    claim_output_dir(out, "sparse-patch", force=force)
    patch = controllable_merge(se_patch, osm_patch, config, progress=not quiet)
    patch.save(out)
    c = patch.manifest["counts"]
    typer.echo(f"sparse patch in {out}: {patch.nnz:,} weights ({100 * patch.kept_fraction():.2f} %): "
               f"SE {c['se']:,}, OSM {c['osm']:,}, left at θ_B (salient to both) {c['both_salient']:,}")


@app.command("apply")
def apply(
    patch: list[Path] = typer.Option(..., "--patch", "-p", help="Sparse patch folder (repeatable: applied in order)."),
    out: Path = out_option("New model folder (written atomically)."),
    model: str = model_option(extra_help="Must be a local model folder or a registered name."),
    scale: list[float] = typer.Option([], "--scale", help="Scale per patch (repeatable; default 1; -1 undoes)."),
    quiet: bool = QUIET,
    force: bool = FORCE,
) -> None:
    """Stream sparse patches onto a checkpoint of the same architecture (checked before anything is written)."""
    from safeunits.patching.apply import apply_patch_to_checkpoint
    from safeunits.patching.sparse import SparsePatch

    if scale and len(scale) != len(patch):
        raise typer.BadParameter(f"{len(scale)} --scale values for {len(patch)} --patch folders")
    if not all(math.isfinite(s) for s in scale):
        raise typer.BadParameter(f"--scale must be finite numbers, got {scale}", param_hint="--scale")
    patches = [SparsePatch.load(p) for p in patch]
    claim_output_dir(out, "model", force=force)
    target = apply_patch_to_checkpoint(model, patches, out, scales=scale or None, progress=not quiet, force=force)
    typer.echo(f"patched model in {target}")


@app.command("sweep")
@config_options(SweepConfig, ["scope", "utility_tolerance", "validation.n_xstest", "validation.n_utility",
                              "validation.max_new_tokens"])
def sweep(
    se: Path = SE,
    osm: Path = OSM,
    harmful_data: Path = typer.Option(..., "--harmful-data", "-d", help="D_h folder (its val split is the held-out harmful set)."),
    out: Path = out_option("Experiment run folder: the sweep step's folder `sweep/` (sweep.jsonl/.md, pareto.png, "
                           "best.json), report.md/.html; `--best OUT` takes the choice; a rerun resumes."),
    model: str = model_option(),
    a: Optional[str] = typer.Option(None, "--a", help="Comma-separated top-a % values (default: 1,5,20)."),
    b: Optional[str] = typer.Option(None, "--b", help="Comma-separated top-b % values (default: 1,5)."),
    alpha: Optional[str] = typer.Option(None, "--alpha", help="Comma-separated α values (default: 1,2)."),
    beta: Optional[str] = typer.Option(None, "--beta", help="Comma-separated β values (default: 1)."),
    dare_p: Optional[str] = typer.Option(None, "--dare-p", help="Comma-separated random-retention (DARE) keep-rates "
                                                                "p; 1 = no retention (default: 0.5)."),
    sets: list[str] = sets_option("validation.xstest_offset=250"),
    data_dir: Optional[Path] = DATA_DIR,
    quiet: bool = QUIET,
    force: bool = FORCE,
    options: Optional[dict] = None,
) -> None:
    """Grid over (a, b, α, β, DARE p) on held-out prompts; Pareto plot and table; writes the chosen point to best.json."""
    from safeunits.experiments.presets import single_step
    from safeunits.experiments.runner import run_experiment

    grid = {k: v for k, v in {"a": _floats(a, "--a"), "b": _floats(b, "--b"), "alpha": _floats(alpha, "--alpha"),
                              "beta": _floats(beta, "--beta"), "dare_p": _floats(dare_p, "--dare-p")}.items() if v is not None}
    config = build_config(SweepConfig, grid, options or {}, parse_sets(sets))
    experiment = single_step("sweep", {"model": model, "se": se, "osm": osm, "harmful_data": harmful_data}, config,
                             suite="none", data_dir=data_dir)  # the sweep builds its held-out suite itself
    run_experiment(experiment, out, progress=not quiet, force=force)
    out = out / "sweep"
    typer.echo((out / "sweep.md").read_text())


@app.command("continual")
@config_options(ContinualConfig, ["harmful_data.n_train", *MERGE_FIELDS])
def continual(
    out: Path = out_option("Experiment run folder: per category its D_h, patches, patched model and evaluation; "
                           "continual.md/.json, report.md/.html; the same command rerun into it resumes."),
    model: str = model_option(),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Dataset whose categories are the steps (default: donotanswer)."),
    category: list[str] = typer.Option([], "--category", help="Harm categories in order (repeatable; default: "
                                       "malicious_uses, information_hazard, discrimination_...)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Step budget of each patch's training."),
    best: Optional[Path] = BEST,
    suite: Optional[str] = suite_option(None, "Evaluated after each step (default: quick)."),
    sets: list[str] = sets_option("se.train.lr=1e-4"),
    data_dir: Optional[Path] = DATA_DIR,
    quiet: bool = QUIET,
    force: bool = FORCE,
    options: Optional[dict] = None,
) -> None:
    """Continual post-safety alignment: one SafePatching step per harm category, the three axes after each."""
    from safeunits.experiments.presets import continual as run_continual

    overrides = parse_sets(sets)
    point, held_out = _best_point(best)
    given: dict = {"merge": point}
    if prompts:
        given.update(prompts=prompts, data={"prompts": prompts})
    if category:
        given["categories"] = category
    if max_steps:
        given.update(se={"train": {"max_steps": max_steps}}, osm={"train": {"max_steps": max_steps}})
    config = build_config(ContinualConfig, given, options or {}, overrides)
    run_continual(config, model, out, suite=suite or "quick", data_dir=data_dir, held_out_xstest=held_out,
                  progress=not quiet, force=force)
    typer.echo((out / "continual.md").read_text())


@app.command("baselines")
@config_options(BaselinesConfig, MERGE_FIELDS)
def baselines(
    se: Path = typer.Option(..., "--se", help="Safety patch folder (GA = θ_B + δ_SE)."),
    osm: Path = typer.Option(..., "--osm", help="Over-safety patch folder (GD = θ_B + δ_OSM)."),
    out: Path = out_option("Experiment run folder: `baselines/` (one evaluation per method, baselines.md/.json), "
                           "report.md/.html; a rerun resumes."),
    model: str = model_option(),
    npo: Optional[Path] = typer.Option(None, "--npo", help="NPO patch folder (`patch derive --objective npo`)."),
    methods: str = typer.Option(",".join(patch_method_names()), "--methods",
                                help="Comma-separated registered patch methods (patching.methods)."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Task arithmetic θ_B + λ·δ_SE (default: 0.5)."),
    best: Optional[Path] = BEST,
    suite: Optional[str] = suite_option(None, "The test prompts (default: quick)."),
    ties_density: Optional[float] = typer.Option(None, "--ties-density", help="TIES: share of each patch kept by magnitude (default: 0.2)."),
    sets: list[str] = sets_option("ties.lam=0.5"),
    data_dir: Optional[Path] = DATA_DIR,
    quiet: bool = QUIET,
    force: bool = FORCE,
    options: Optional[dict] = None,
) -> None:
    """Compare no intervention, GA, GD, NPO, task arithmetic, TIES and SafePatching on the same evaluation."""
    from safeunits.experiments.presets import single_step
    from safeunits.experiments.runner import run_experiment

    chosen = [x.strip() for x in methods.split(",") if x.strip()]
    if npo is None and any("npo" in get_patch_method(m).needs for m in chosen):
        typer.echo("no --npo patch given: skipping the methods that need it", err=True)
        chosen = [m for m in chosen if "npo" not in get_patch_method(m).needs]
    point, held_out = _best_point(best)
    given: dict = {"methods": chosen, "merge": point}
    if lam is not None:
        given["task_arithmetic_lambda"] = lam
    if ties_density is not None:
        given["ties"] = {"density": ties_density}
    config = build_config(BaselinesConfig, given, options or {}, parse_sets(sets))
    experiment = single_step("baselines", {"model": model, "se": se, "osm": osm, "npo": npo}, config,
                             suite=suite or "quick", data_dir=data_dir, held_out_xstest=held_out)
    run_experiment(experiment, out, progress=not quiet, force=force)
    out = out / "baselines"
    typer.echo((out / "baselines.md").read_text())
