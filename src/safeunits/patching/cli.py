"""`safeunits patch ...`: build D_h, derive patches, merge, apply, sweep, continual, baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

patch_app = typer.Typer(name="patch", help="SafePatching: safety / over-safety patches, controllable merge, sparse "
                        "patch files, sweep, continual alignment, baselines.", no_args_is_help=True)

MODEL = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Registered model name or local model folder.")
DATA_DIR = typer.Option(None, "--data-dir", help="Offline data folder (default: $SAFEUNITS_DATA_DIR).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from err


def _context(suite: str | None, data_dir: Optional[str], quiet: bool):
    """Suite and data folder resolved once, before any model is loaded (a typo fails in a second)."""
    from safeunits.eval.context import EvalContext

    try:
        return EvalContext.create(suite, data_dir=data_dir, progress=not quiet)
    except (FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="--suite / --data-dir") from err


def _load(model: str):
    from safeunits.models.loading import load_model

    return load_model(model)


def _merge_config(a: float, b: float, alpha: float, beta: float, dare_p: Optional[float], seed: int, scope: str,
                  best: Optional[Path]):
    from safeunits.patching.merge import MergeConfig

    if best is not None:
        from safeunits.io import read_json

        chosen = read_json(best).get("best")
        if not chosen:
            raise typer.BadParameter(f"{best} has no chosen point")
        a, b, alpha, beta = chosen["a"], chosen["b"], chosen["alpha"], chosen["beta"]
    return MergeConfig(a=a, b=b, alpha=alpha, beta=beta, dare_p=dare_p, seed=seed, scope=scope)


@patch_app.command("build-data")
def build_data(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for train.jsonl, val.jsonl and manifest.json."),
    model: str = MODEL,
    prompts: str = typer.Option("advbench", help="Dataset name or file with the harmful prompts."),
    offset: int = typer.Option(100, help="Skip the first N prompts (AdvBench's first 100 are evaluation prompts)."),
    n_train: int = typer.Option(64, help="Prompts in the training split."),
    n_val: int = typer.Option(32, help="Held-out prompts for the sweep."),
    responses: str = typer.Option("prefill", help="dataset | self (model's own answers) | prefill (forced prefix)."),
    response_prefix: str = typer.Option("Sure, here is", help="Forced answer start for --responses prefill."),
    max_new_tokens: int = typer.Option(64, help="Length of generated responses."),
    category: list[str] = typer.Option([], "--category", help="Keep only these harm categories (repeatable)."),
    eval_set: list[str] = typer.Option([], "--eval-set", help="Evaluation sets that must not overlap (repeatable; "
                                       "default advbench[:100], harmbench, xstest)."),
    keep_refusals: bool = typer.Option(False, help="Keep generated answers the judge calls refusals."),
    seed: int = typer.Option(0, help="Shuffle seed for the split."),
    data_dir: Optional[str] = DATA_DIR,
    quiet: bool = QUIET,
) -> None:
    """Build D_h: harmful prompts with harmful responses, split train/val, checked against evaluation prompts."""
    from safeunits.patching.harmful_data import HarmfulDataConfig, build_harmful_data

    fields = dict(prompts=prompts, offset=offset, n_train=n_train, n_val=n_val, responses=responses,
                  response_prefix=response_prefix, max_new_tokens=max_new_tokens, categories=category or None,
                  require_compliance=not keep_refusals, seed=seed)
    if eval_set:
        fields["eval_sets"] = eval_set
    config = HarmfulDataConfig(**fields)
    m, tok = (None, None) if responses == "dataset" else _load(model)
    result = build_harmful_data(config, out, m, tok, data_dir=data_dir, model_name=model, progress=not quiet)
    typer.echo(f"D_h in {out}: " + ", ".join(f"{k} {len(v)}" for k, v in result.items()))


@patch_app.command("derive")
def derive(
    data: Path = typer.Option(..., "--data", "-d", help="D_h folder from `patch build-data`."),
    out: Path = typer.Option(..., "--out", "-o", help="Writes OUT/se, OUT/osm (and OUT/npo) patch folders."),
    model: str = MODEL,
    objective: list[str] = typer.Option(["ascent", "descent"], "--objective",
                                        help="ascent (δ_SE), descent (δ_OSM), npo (baseline); repeatable."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default per objective, see docs/patching.md)."),
    max_steps: Optional[int] = typer.Option(None, help="Step budget."),
    stop_nll_above: Optional[float] = typer.Option(None, help="Ascent bound: stop once the batch NLL passes this."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per step."),
    train_json: Optional[str] = typer.Option(None, help="JSON object of further TrainConfig overrides."),
    saliency_on: str = typer.Option("patched", help="SNIP on the patched model (paper) or on the backbone."),
    exclude: list[str] = typer.Option([], "--exclude", help="Regex of parameter names never patched (repeatable)."),
    saliency_examples: Optional[int] = typer.Option(None, help="SNIP on the first N training examples (default all)."),
    quiet: bool = QUIET,
) -> None:
    """Derive δ_SE by bounded gradient ascent and δ_OSM by descent on D_h's train split, with SNIP saliency."""
    from safeunits.patching.harmful_data import load_harmful_data
    from safeunits.patching.patches import PatchConfig, derive_patch
    from safeunits.patching.saliency import SaliencyConfig

    records, info = load_harmful_data(data, "train")
    overrides = _json_option(train_json, "--train-json")
    for key, value in (("lr", lr), ("max_steps", max_steps), ("batch_size", batch_size)):
        if value is not None:
            overrides[key] = value
    m, tok = _load(model)
    names = {"ascent": "se", "descent": "osm", "npo": "npo"}
    for obj in objective:
        if obj not in names:
            raise typer.BadParameter(f"unknown objective {obj!r}; use ascent, descent or npo")
        train = dict(overrides)
        if stop_nll_above is not None and obj != "descent":
            train["stop_nll_above"] = stop_nll_above
        config = PatchConfig(objective=obj, train=train, saliency_on=saliency_on, saliency=SaliencyConfig(exclude=exclude, max_examples=saliency_examples))
        patch = derive_patch(m, tok, records, config, out / names[obj], data_info={**info, "model": model},
                             progress=not quiet)
        mf = patch.manifest
        typer.echo(f"{names[obj]}: {out / names[obj]} ({mf['steps']} steps, stopped: {mf['stopped_reason']}, "
                   f"|δ| = {mf['delta_norm']:.4f})")


def _json_option(text: Optional[str], flag: str) -> dict:
    """A JSON-object option (TrainConfig overrides); a clear error instead of a traceback when it is not one."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{flag} must be a JSON object, e.g. '{{\"lr\": 1e-4}}': {exc}") from exc
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


@patch_app.command("merge")
def merge(
    se: Path = typer.Option(..., "--se", help="Safety patch folder (from `patch derive`)."),
    osm: Path = typer.Option(..., "--osm", help="Over-safety patch folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the sparse patch."),
    a: float = typer.Option(5.0, help="Top-a % most salient weights of δ_SE."),
    b: float = typer.Option(5.0, help="Top-b % most salient weights of δ_OSM."),
    alpha: float = typer.Option(1.0, help="Scale α of the safety part."),
    beta: float = typer.Option(1.0, help="Scale β of the over-safety part."),
    dare_p: Optional[float] = typer.Option(None, help="DARE keep-rate p (rescale 1/p); off by default."),
    seed: int = typer.Option(0, help="DARE seed."),
    scope: str = typer.Option("per_tensor", help="Saliency ranking: per_tensor or global."),
    best: Optional[Path] = typer.Option(None, help="best.json from `patch sweep`: take a, b, α, β from it."),
    quiet: bool = QUIET,
) -> None:
    """Controllable patching: merge the salient difference sets of δ_SE and δ_OSM into a sparse patch."""
    from safeunits.patching.merge import controllable_merge
    from safeunits.patching.patches import DensePatch

    config = _merge_config(a, b, alpha, beta, dare_p, seed, scope, best)
    patch = controllable_merge(DensePatch(se), DensePatch(osm), config, progress=not quiet)
    patch.save(out)
    c = patch.manifest["counts"]
    typer.echo(f"sparse patch in {out}: {patch.nnz:,} weights ({100 * patch.kept_fraction():.2f} %): "
               f"SE {c['se']:,}, OSM {c['osm']:,}, left at θ_B (salient to both) {c['both_salient']:,}")


@patch_app.command("apply")
def apply(
    patch: list[Path] = typer.Option(..., "--patch", "-p", help="Sparse patch folder (repeatable: applied in order)."),
    out: Path = typer.Option(..., "--out", "-o", help="New model folder (written atomically)."),
    model: str = MODEL,
    scale: list[float] = typer.Option([], "--scale", help="Scale per patch (repeatable; default 1; -1 undoes)."),
    quiet: bool = QUIET,
) -> None:
    """Stream sparse patches onto a checkpoint of the same architecture (checked before anything is written)."""
    from safeunits.patching.apply import apply_patch_to_checkpoint
    from safeunits.patching.sparse import SparsePatch

    if scale and len(scale) != len(patch):
        raise typer.BadParameter(f"{len(scale)} --scale values for {len(patch)} --patch folders")
    patches = [SparsePatch.load(p) for p in patch]
    target = apply_patch_to_checkpoint(model, patches, out, scales=scale or None, progress=not quiet)
    typer.echo(f"patched model in {target}")


@patch_app.command("sweep")
def sweep(
    se: Path = typer.Option(..., "--se", help="Safety patch folder."),
    osm: Path = typer.Option(..., "--osm", help="Over-safety patch folder."),
    data: Path = typer.Option(..., "--data", "-d", help="D_h folder (its val split is the held-out harmful set)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for sweep.jsonl/.md, pareto.png, best.json."),
    model: str = MODEL,
    a: str = typer.Option("1,5,20", help="Comma-separated top-a % values."),
    b: str = typer.Option("1,5", help="Comma-separated top-b % values."),
    alpha: str = typer.Option("1,2", help="Comma-separated α values."),
    beta: str = typer.Option("1", help="Comma-separated β values."),
    dare_p: Optional[float] = typer.Option(None, help="DARE keep-rate for every point."),
    scope: str = typer.Option("per_tensor", help="Saliency ranking: per_tensor or global."),
    n_xstest: int = typer.Option(24, help="Held-out XSTest safe prompts (from index 200)."),
    n_utility: int = typer.Option(16, help="Self-Instruct seed references for the utility NLL."),
    max_new_tokens: int = typer.Option(48, help="Generation budget per answer."),
    tolerance: float = typer.Option(0.05, help="Selection: utility NLL within (1 + tol) x the backbone's."),
    data_dir: Optional[str] = DATA_DIR,
    quiet: bool = QUIET,
) -> None:
    """Grid over (a, b, α, β) on held-out prompts; Pareto plot and table; writes the chosen point to best.json."""
    from safeunits.patching.evaluation import ValidationConfig
    from safeunits.patching.patches import DensePatch
    from safeunits.patching.sweep import SweepConfig, run_sweep

    config = SweepConfig(a=_floats(a), b=_floats(b), alpha=_floats(alpha), beta=_floats(beta), dare_p=dare_p,
                         scope=scope, utility_tolerance=tolerance,
                         validation=ValidationConfig(n_xstest=n_xstest, n_utility=n_utility,
                                                     max_new_tokens=max_new_tokens))
    m, tok = _load(model)
    run_sweep(m, tok, DensePatch(se), DensePatch(osm), data, config, out, _context(None, data_dir, quiet))
    typer.echo((out / "sweep.md").read_text())


@patch_app.command("continual")
def continual(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (per-step data, patches, evaluations, table)."),
    model: str = MODEL,
    prompts: str = typer.Option("donotanswer", help="Dataset whose categories are the steps."),
    category: list[str] = typer.Option([], "--category", help="Harm categories in order (repeatable; default: "
                                       "malicious_uses, information_hazard, discrimination_...)."),
    n_train: int = typer.Option(24, help="D_h prompts per category."),
    max_steps: Optional[int] = typer.Option(None, help="Step budget of each patch's training."),
    se_train: Optional[str] = typer.Option(None, help="JSON of TrainConfig overrides for δ_SE, e.g. '{\"lr\": 1e-4}'."),
    osm_train: Optional[str] = typer.Option(None, help="JSON of TrainConfig overrides for δ_OSM."),
    a: float = typer.Option(5.0, help="Top-a % of δ_SE."),
    b: float = typer.Option(5.0, help="Top-b % of δ_OSM."),
    alpha: float = typer.Option(1.0, help="α."),
    beta: float = typer.Option(1.0, help="β."),
    best: Optional[Path] = typer.Option(None, help="best.json from `patch sweep` for a, b, α, β."),
    suite: str = typer.Option("quick", help="Evaluation suite after each step."),
    data_dir: Optional[str] = DATA_DIR,
    quiet: bool = QUIET,
) -> None:
    """Continual post-safety alignment: one SafePatching step per harm category, the three axes after each."""
    from safeunits.patching.continual import ContinualConfig, run_continual
    from safeunits.patching.harmful_data import HarmfulDataConfig
    from safeunits.patching.patches import PatchConfig

    train = {"max_steps": max_steps} if max_steps else {}
    se_conf = PatchConfig(objective="ascent", train={**train, **_json_option(se_train, "--se-train")})
    osm_conf = PatchConfig(objective="descent", train={**train, **_json_option(osm_train, "--osm-train")})
    fields = dict(prompts=prompts, data=HarmfulDataConfig(prompts=prompts, offset=0, n_train=n_train, n_val=0),
                  se=se_conf, osm=osm_conf,
                  merge=_merge_config(a, b, alpha, beta, None, 0, "per_tensor", best))
    if category:
        fields["categories"] = category
    ctx = _context(suite, data_dir, quiet)
    m, tok = _load(model)
    run_continual(m, tok, ContinualConfig(**fields), out, ctx)
    typer.echo((out / "continual.md").read_text())


@patch_app.command("baselines")
def baselines(
    se: Path = typer.Option(..., "--se", help="Safety patch folder (GA = θ_B + δ_SE)."),
    osm: Path = typer.Option(..., "--osm", help="Over-safety patch folder (GD = θ_B + δ_OSM)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: one evaluation per method + baselines.md."),
    model: str = MODEL,
    npo: Optional[Path] = typer.Option(None, help="NPO patch folder (`patch derive --objective npo`)."),
    methods: str = typer.Option("none,ga,gd,npo,task_arithmetic,ties,safepatching", help="Comma-separated methods."),
    lam: float = typer.Option(0.5, "--lambda", help="Task arithmetic θ_B + λ·δ_SE."),
    ties_density: float = typer.Option(0.2, help="TIES: share of each patch kept by magnitude."),
    a: float = typer.Option(5.0, help="SafePatching top-a %."),
    b: float = typer.Option(5.0, help="SafePatching top-b %."),
    alpha: float = typer.Option(1.0, help="SafePatching α."),
    beta: float = typer.Option(1.0, help="SafePatching β."),
    best: Optional[Path] = typer.Option(None, help="best.json from `patch sweep` for SafePatching's a, b, α, β."),
    suite: str = typer.Option("quick", help="Evaluation suite (test prompts)."),
    data_dir: Optional[str] = DATA_DIR,
    quiet: bool = QUIET,
) -> None:
    """Compare no intervention, GA, GD, NPO, task arithmetic, TIES and SafePatching on the same evaluation."""
    from safeunits.patching.baselines import BaselinesConfig, run_baselines
    from safeunits.patching.methods import TiesConfig
    from safeunits.patching.patches import DensePatch

    chosen = [x.strip() for x in methods.split(",") if x.strip()]
    if "npo" in chosen and npo is None:
        typer.echo("no --npo patch given: skipping the NPO baseline", err=True)
        chosen.remove("npo")
    config = BaselinesConfig(methods=chosen, task_arithmetic_lambda=lam, ties=TiesConfig(density=ties_density),
                             merge=_merge_config(a, b, alpha, beta, None, 0, "per_tensor", best))
    ctx = _context(suite, data_dir, quiet)
    m, tok = _load(model)
    run_baselines(m, tok, DensePatch(se), DensePatch(osm), config, out, ctx, npo=DensePatch(npo) if npo else None)
    typer.echo((out / "baselines.md").read_text())


def register(app: typer.Typer) -> None:
    app.add_typer(patch_app, name="patch")
