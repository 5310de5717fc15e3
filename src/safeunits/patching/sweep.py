"""Sweep (a, b, α, β, DARE p) of controllable patching on held-out prompts; Pareto table + plot; pick the default.

The kept masks depend on (a, b, p) only, so each (a, b, p) is merged once and every (α, β) is applied
as `apply_patch(scale=...)` of the two parts: the same bits `controllable_merge` saves. Each evaluated
point is appended to `sweep.jsonl` at once, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config
from safeunits.eval.context import EvalContext
from safeunits.document import Document, Heading, Paragraph, Table
from safeunits.eval.report import SIGNIFICANCE_NOTE
from safeunits.eval.result import Headline
from safeunits.io import read_json, write_json
from safeunits.patching.evaluation import (ValidationConfig, evaluate_model, evaluate_patched,
                                           pareto_front, validation_suite)
from safeunits.errors import UserValueError
from safeunits.patching.merge import DEFAULT_DARE_P, MergeConfig, empty_difference_note, merge_parts, retains
from safeunits.patching.patches import DensePatch

log = logging.getLogger(__name__)


class SweepConfig(Config):
    """The grid (CPU-sized by default) and the rule that picks the default point."""

    a: list[float] = Field([1.0, 5.0, 20.0], description="top-a % of δ_SE values to try")
    b: list[float] = Field([1.0, 5.0], description="top-b % of δ_OSM values to try")
    alpha: list[float] = Field([1.0, 2.0], description="safety-patch scales to try")
    beta: list[float] = Field([1.0], description="over-safety-patch scales to try")
    dare_p: list[float] = Field([DEFAULT_DARE_P], description="random-retention (DARE) keep-rates p to try "
                                "(1 = no retention)")
    seed: int = 0
    scope: str = Field("per_tensor", description="saliency ranking scope: per_tensor | global")
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    utility_tolerance: float = Field(0.05, ge=0, description="selection: utility NLL at most (1 + tol) x backbone's")

    @field_validator("dare_p", mode="before")
    @classmethod
    def _grid(cls, value: object) -> object:
        """One keep-rate (or None, as sweeps before issue 24 wrote it) is a grid of one; None means no retention."""
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"DARE keep-rates must be in (0, 1], got {v!r}")
        return [1.0 if v is None else v for v in values]


class _PointSettings(BaseModel):
    """Which point a sweep row is: the backbone, one patch alone, or a grid point (its merge settings and counts)."""

    key: str
    method: str = Field(description="backbone | se_alone | osm_alone | safepatching")
    a: float | None = None
    b: float | None = None
    alpha: float | None = None
    beta: float | None = None
    dare_p: float | None = None
    nnz: int | None = Field(None, description="weights the point changes")
    se_kept: int | None = None
    osm_kept: int | None = None
    both_salient: int | None = None


class SweepPoint(Headline, _PointSettings):
    """One row of sweep.jsonl: the point, then its held-out headline numbers; `pareto` once the front is marked.

    A row holds only the fields it was given (a backbone has no merge settings), in this order, as it always did."""

    model_config = ConfigDict(extra="allow")  # rows of older sweeps resume whatever they hold

    significant: str | None = Field(None, description="headline columns that differ from the backbone (p < 0.05)")
    eval_seconds: float | None = None
    pareto: bool | None = None

    @model_serializer(mode="wrap")
    def _given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set or k in (self.model_extra or {})}


class SweepResult(BaseModel):
    """best.json (the chosen point, the backbone's row, the grid and rule, the held-out XSTest prompts that test
    evaluations leave out, whether the harmful axis was saturated) and every row (`rows`, not written there)."""

    best: SweepPoint | None
    baseline: SweepPoint
    config: SweepConfig
    held_out_xstest: str
    harmful_axis_saturated: bool
    rows: list[SweepPoint] = Field(default_factory=list, exclude=True, description="every point, as in sweep.jsonl")


def _key(a: float, b: float, alpha: float, beta: float, dare_p: float = 1.0) -> str:
    """A point's name; without retention it is the pre-DARE-grid name, so older sweep.jsonl files resume."""
    return f"a={a:g},b={b:g},alpha={alpha:g},beta={beta:g}" + (f",p={dare_p:g}" if retains(dare_p) else "")


@dataclass(frozen=True)
class SweepChoice:
    """What a sweep's best.json says: the merge settings (a, b, α, β, DARE p) of the chosen point ({} when none
    was chosen) and the XSTest prompt sets it was chosen on (to leave out of test evaluations). The one reader of
    best.json, for `patch merge|baselines --best` and the experiment's merge step."""

    point: dict[str, Any]
    held_out: list[str]

    @classmethod
    def read(cls, path: str | os.PathLike) -> SweepChoice:
        """`path`: a best.json, a sweep step's folder, or the run folder of `patch sweep` (its `sweep/` step).
        A sweep written before the DARE grid has no p per point: its one keep-rate (None: none) is in its config."""
        path = Path(path)
        for candidate in (path / "best.json", path / "sweep" / "best.json"):
            if path.is_dir() and candidate.is_file():
                path = candidate
                break
        best_json = read_json(path)
        best = best_json.get("best") or {}
        point = {k: best[k] for k in ("a", "b", "alpha", "beta")} if best else {}
        if best:
            point["dare_p"] = best["dare_p"] if "dare_p" in best else (best_json.get("config") or {}).get("dare_p")
        held_out = best_json.get("held_out_xstest")
        return cls(point, [held_out] if held_out else [])


def select_default(rows: list[SweepPoint], baseline: SweepPoint, tolerance: float) -> SweepPoint:
    """Lowest ASR + XSTest refusal among points whose utility NLL stays within tolerance of the backbone's."""
    bound = baseline.utility_nll * (1 + tolerance)
    ok = [r for r in rows if r.utility_nll <= bound] or rows
    return min(ok, key=lambda r: (r.asr + r.xstest_refusal, r.utility_nll))


def saturation_note(baseline_asr: float) -> str | None:
    """Why the sweep cannot rank safety when the backbone already refuses every held-out harmful prompt.

    At 0 % held-out ASR no point can do better, so `select_default` ranks over-refusal and utility alone: the
    usual cause is D_h drawn from the source family the backbone was aligned on (story (d), docs/patching.md)."""
    if baseline_asr > 0:
        return None
    return ("the backbone complies with none of the held-out harmful prompts, so no point can lower the harmful "
            "rate and the choice ranks over-refusal and utility only; build D_h from a source the backbone was not "
            "aligned on (e.g. `patch harmful-data --prompts donotanswer --offset 0`)")


def run_sweep(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    se: DensePatch,
    osm: DensePatch,
    dh_folder: str | Path,
    config: SweepConfig,
    out_dir: str | Path,
    evaluation: EvalContext | None = None,
) -> SweepResult:
    """Evaluate every grid point on the held-out suite (`evaluate_grid`), choose the default (`choose`), write
    sweep.md, pareto.png, best.json (`write_sweep`).

    The suite is built from held-out prompts (`validation_suite`); `evaluation` gives the data folder and progress."""
    evaluation = evaluation or EvalContext.create(None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held_out = evaluation.with_suite(validation_suite(dh_folder, out, config.validation, evaluation.data_dir))
    rows = evaluate_grid(model, tokenizer, se, osm, config, held_out, out)
    baseline = next(r for r in rows if r.key == "backbone")
    result = SweepResult(best=choose(rows, baseline, config), baseline=baseline, config=config,
                         held_out_xstest=config.validation.xstest_prompts,
                         harmful_axis_saturated=saturation_note(baseline.asr) is not None, rows=rows)
    write_sweep(out, result)
    return result


def evaluate_grid(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, se: DensePatch, osm: DensePatch,
                  config: SweepConfig, held_out: EvalContext, out: Path) -> list[SweepPoint]:
    """The backbone, each patch alone and every (a, b, p, α, β) on the held-out suite, one row each. Each row is
    appended to `out/sweep.jsonl` as it is evaluated; rows already there are not evaluated again (resume)."""
    rows_path = out / "sweep.jsonl"
    done = {}
    if rows_path.is_file():
        for line in rows_path.read_text().splitlines():
            if line.strip():
                row = SweepPoint.model_validate_json(line)
                done[row.key] = row

    def record(**row: Any) -> None:
        point = done[row["key"]] = SweepPoint(**row)
        with rows_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(point.model_dump(mode="json")) + "\n")

    backbone_row, backbone = evaluate_model(model, tokenizer, held_out, out / "backbone")  # resumes from its files
    if "backbone" not in done:
        record(key="backbone", method="backbone", **backbone_row)
    for single, patch in (("se_alone", se), ("osm_alone", osm)):
        if single not in done:
            from safeunits.patching.methods import task_arithmetic

            full = task_arithmetic([patch], [1.0], progress=False)
            row, _ = evaluate_patched(model, tokenizer, [(full, 1.0)], held_out, None, baseline=backbone)
            record(key=single, method=single, nnz=full.nnz, **row)
            del full
    for a, b, p in itertools.product(config.a, config.b, config.dare_p):
        todo = [(al, be) for al, be in itertools.product(config.alpha, config.beta)
                if _key(a, b, al, be, p) not in done]
        if not todo:
            continue
        merge = MergeConfig(a=a, b=b, dare_p=p, seed=config.seed, scope=config.scope)
        part_se, part_osm, stats = merge_parts(se, osm, merge, progress=held_out.progress)
        empty = empty_difference_note(stats)
        if empty:  # a point that patches nothing (or one side only) would be ranked as if it were SafePatching
            raise UserValueError(f"sweep point a={a:g}, b={b:g}: {empty}",
                                 hint="re-derive the patches with `patch derive` (saliency on each patched model)")
        for alpha, beta in todo:
            metrics, _ = evaluate_patched(model, tokenizer, [(part_se, alpha), (part_osm, beta)], held_out, None,
                                          baseline=backbone)
            record(key=_key(a, b, alpha, beta, p), method="safepatching", a=a, b=b, alpha=alpha, beta=beta, dare_p=p,
                   nnz=part_se.nnz + part_osm.nnz, se_kept=stats["se"], osm_kept=stats["osm"],
                   both_salient=stats["both_salient"], **metrics)
    return list(done.values())


def choose(rows: list[SweepPoint], baseline: SweepPoint, config: SweepConfig) -> SweepPoint | None:
    """Mark the Pareto front on every row and pick the default among the grid points (`select_default`)."""
    front = set(pareto_front(rows))
    for i, r in enumerate(rows):
        r.pareto = i in front
    grid = [r for r in rows if r.method == "safepatching"]
    return select_default(grid, baseline, config.utility_tolerance) if grid else None


def write_sweep(out: Path, result: SweepResult) -> None:
    """sweep.md (the table, the rule, a warning when the harmful axis is saturated), best.json, pareto.png."""
    best, config = result.best, result.config
    saturated = saturation_note(result.baseline.asr)
    if saturated:
        log.warning("sweep: %s", saturated)
    columns = [("key", "point", ""), ("asr", "harmful % (val)", "%"), ("refusal", "refused % (val)", "%"),
               ("xstest_refusal", "XSTest refusal %", "%"),
               ("utility_nll", "utility NLL", ".3f"), ("incoherent", "incoherent %", "%"),
               ("significant", "significant vs backbone", ""), ("nnz", "weights changed", ","), ("pareto", "Pareto", "")]
    Document().add(
        Heading(level=1, text="SafePatching sweep (held-out split)"),
        Paragraph(text=f"Selection: lowest harmful + refusal rate with utility NLL <= (1 + {config.utility_tolerance}) "
                       f"x backbone ({result.baseline.utility_nll:.3f}). {SIGNIFICANCE_NOTE}"),
        Paragraph(text=f"**Warning:** {saturated}.") if saturated else None,
        Table.from_rows([r.model_dump() for r in result.rows], columns),
        Paragraph(text=f"Chosen: `{best.key}`") if best else None).write(out, "sweep")
    write_json(out / "best.json", result.model_dump(mode="json"))
    plot_pareto(result.rows, out / "pareto.png", best)


def plot_pareto(rows: list[SweepPoint], path: Path, best: SweepPoint | None = None) -> None:
    """Harmful rate vs XSTest refusal, colour = utility NLL, Pareto points ringed, the chosen point starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safeunits.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [100 * r.xstest_refusal for r in rows]
    ys = [100 * r.asr for r in rows]
    sc = ax.scatter(xs, ys, c=[r.utility_nll for r in rows], cmap="viridis_r", s=40, zorder=2)
    fig.colorbar(sc, ax=ax, label="utility NLL (lower is better)")
    for r, x, y in zip(rows, xs, ys):
        if r.pareto:
            ax.scatter([x], [y], s=140, facecolors="none", edgecolors="red", zorder=3)
        if r.method != "safepatching":
            ax.annotate(r.key, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if best:
        ax.scatter([100 * best.xstest_refusal], [100 * best.asr], marker="*", s=220, c="red", zorder=4,
                   label=f"chosen {best.key}")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("XSTest safe refusal % (over-safety, lower better)")
    ax.set_ylabel("harmful-prompt ASR % (held-out, lower better)")
    ax.set_title("SafePatching sweep: Pareto points ringed")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
