"""The experiment report: a Document built from the run's data, written as report.md and a self-contained HTML page.

Why one source: both files are renderings of the same Document (safeunits.document), so they cannot disagree;
step tables come from the steps' Document files, not from their Markdown. The page has no external resource:
styles are inline and every figure is embedded as a base64 PNG, so it opens offline and survives being mailed
around (only figures inside the run folder are embedded).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

from safeunits.document import Bullets, Code, Document, Heading, Paragraph, Table
from safeunits.eval.context import EvalContext
from safeunits.eval.report import accuracy_compare_document, headline_document
from safeunits.eval.result import EvalResult
from safeunits.experiments.config import AttributeStep, Experiment, HarmfulDataStep, ProbeStep, StepBase, TrainStep
from safeunits.experiments.outputs import StepOutputs
from safeunits.io import write_text

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PACKAGES = ("safeunits", "torch", "transformers", "accelerate", "pydantic", "numpy", "matplotlib")


def collect_results(plan: list, outputs: dict[str, StepOutputs], run_dir: Path) -> dict[str, EvalResult]:
    """Every evaluation the steps produced, in step order (the first is the baseline of the significance marks)."""
    results: dict[str, EvalResult] = {}
    for p in plan:
        if p.step.name in outputs:
            for label, rel in outputs[p.step.name].evals.items():
                results[label] = EvalResult.load(run_dir / p.step.name / rel)
    return results


def report_document(experiment: Experiment, run_dir: Path, plan: list, outputs: dict[str, StepOutputs],
                    evaluation: EvalContext, *, ran: list[str] | None = None) -> Document:
    """The whole report; figure paths are relative to the run folder."""
    ran = ran or []
    results = collect_results(plan, outputs, run_dir)
    doc = Document().add(Heading(level=1, text=f"Experiment `{experiment.name}`"),
                         Paragraph(text=experiment.description.strip()) if experiment.description else None,
                         Paragraph(text=f"Run folder `{run_dir}`; report written {time.strftime('%Y-%m-%d %H:%M:%S')}."),
                         Heading(level=2, text="Three-axis evaluation"))
    if results and evaluation.suite is not None:
        doc.add(Paragraph(
            text=f"Every model the experiment produced, on suite `{evaluation.suite.name}` "
                 f"({evaluation.suite.description or 'no description'}"
                 + (f"; every set cut to at most {experiment.limit} items by `limit`" if experiment.limit else "")
                 + "). Harmful prompts are judged on two axes: "
                 f"`harmful` (the ASR: the answer gives the requested harmful help; judge "
                 f"`{evaluation.suite.harm_judge}`) and `refused` (judge `{evaluation.suite.refusal_judge}`); "
                 "`incoherent`: degenerate answers to harmful prompts. Lower is better in the harmful, XSTest and "
                 f"utility columns; [95 % Wilson interval]; marks are against the first row, `{next(iter(results))}`."),
                headline_document(results))
        accuracy = accuracy_compare_document(results)
        if accuracy is not None:
            doc.add(Heading(level=3, text="Zero-shot task accuracy (utility)"), accuracy)
    else:
        doc.add(Paragraph(text="No step evaluated a model."))
    rows = []
    for p in plan:
        status = "ran" if p.step.name in ran else "cached" if p.cached else "not run"
        rows.append([p.step.name, p.step.kind, ", ".join(f"{f}: {ref}" for f, ref in p.inputs.items()) or "-", status,
                     "-" if p.seconds is None else f"{p.seconds:.1f}", f"`{p.key}`"])
    doc.add(Heading(level=2, text="Steps"),
            Table(columns=["step", "kind", "consumes", "this run", "wall s (when computed)", "cache key"], rows=rows,
                  numeric=[False, False, False, False, True, False]))
    for p in plan:
        out = outputs.get(p.step.name)
        if out is None or not (out.notes or out.tables or out.figures):
            continue
        doc.add(Heading(level=2, text=f"Step `{p.step.name}` ({p.step.kind})"),
                Bullets(items=out.notes) if out.notes else None)
        for table in out.tables:
            doc.add(Document.load(run_dir / p.step.name / table).demoted(2, figures_under=p.step.name))
        doc.add(*(f.model_copy(update={"path": Path(p.step.name, f.path).as_posix()}) for f in out.figures))
    return doc.add(Heading(level=2, text="Data"), Paragraph(text=f"Data folder: `{evaluation.data_dir}`."),
                   Bullets(items=_data_lines(experiment, evaluation)),
                   Heading(level=2, text="Settings"),
                   Code(language="yaml", text=yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False)),
                   Heading(level=2, text="Software and machine"), Bullets(items=_software_lines()))


def _data_lines(experiment: Experiment, evaluation: EvalContext) -> list[str]:
    suite = evaluation.suite
    lines = [] if suite is None else [
        f"- evaluation `{suite.name}`: harmful " +
        ", ".join(f"{h.dataset} ({_first(h.limit)}, system prompts {'/'.join(h.system_prompts)})" for h in suite.harmful) +
        (f"; over-safety {suite.over_safety.dataset} ({_first(suite.over_safety.limit)})" if suite.over_safety else "") +
        "; utility " + ", ".join(f"{u.dataset} ({_first(u.limit)})" for u in suite.utility)]
    for step in experiment.steps:
        used = _step_data(step)
        if used:
            lines.append(f"- step `{step.name}`: {used}")
    return lines


def _first(limit: int | None) -> str:
    return "all" if limit is None else f"first {limit}"


def _step_data(step: StepBase) -> str | None:
    if isinstance(step, AttributeStep):
        s = step.settings
        return f"safety {s.safety_data}, utility {s.utility_data} (first {s.limit} each)"
    if isinstance(step, ProbeStep):
        return f"{step.prompts} (first {step.limit})"
    if isinstance(step, HarmfulDataStep):
        s = step.settings
        return f"{s.prompts} from index {s.offset}: {s.n_train} train + {s.n_val} held-out prompts, {s.responses} answers"
    if isinstance(step, TrainStep):
        from safeunits.train.recipes import AlignRecipe, load_recipe

        r = load_recipe(step.recipe, step.settings)
        if isinstance(r, AlignRecipe):
            return f"{r.n_examples} examples, {100 * r.safety_share:.0f} % {r.safety_data}, rest {', '.join(r.benign_data)}"
        return f"{r.n_examples or 'all'} examples of {', '.join(r.data)}"
    return None


def _software_lines() -> list[str]:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return [f"- Python {sys.version.split()[0]} on {platform.platform()} ({platform.machine()}, {os.cpu_count()} CPUs)",
            f"- {', '.join(versions)}"]


def write_report(experiment: Experiment, run_dir: str | os.PathLike, plan: list, outputs: dict[str, StepOutputs],
                 evaluation: EvalContext, *, ran: list[str] | None = None) -> dict[str, Path]:
    """report.md and report.html in the run folder, both rendered from one Document."""
    run_dir = Path(run_dir)
    doc = report_document(experiment, run_dir, plan, outputs, evaluation, ran=ran)
    paths = {"markdown": run_dir / REPORT_MD, "html": run_dir / REPORT_HTML}
    write_text(paths["markdown"], doc.markdown())
    write_text(paths["html"], doc.html(run_dir, f"safeunits experiment {experiment.name}"))
    return paths
