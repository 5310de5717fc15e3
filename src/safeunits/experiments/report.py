"""The experiment report: one Markdown file and one self-contained HTML page rendered from it.

Why one source: the HTML is the Markdown rendered by a small converter (headings, tables, lists, code, figures),
so the two cannot disagree. The page has no external resource: styles are inline and every figure is embedded
as a base64 PNG, so it opens offline and survives being mailed around.
"""

from __future__ import annotations

import base64
import html
import os
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from safeunits.eval.context import EvalContext
from safeunits.eval.report import accuracy_compare_markdown, markdown_table, md_cell
from safeunits.eval.result import EvalResult
from safeunits.experiments.config import AttributeStep, Experiment, HarmfulDataStep, ProbeStep, StepBase, TrainStep
from safeunits.io import write_text

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PACKAGES = ("safeunits", "torch", "transformers", "accelerate", "pydantic", "numpy", "matplotlib")
_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<path>[^)]+)\)$")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { border-bottom: 2px solid #d62728; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .55rem; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85rem; }
pre { background: #f6f6f6; padding: .8rem; overflow-x: auto; border: 1px solid #e4e4e4; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .85rem; }
"""


def collect_results(plan: list, outputs: dict[str, dict[str, Any]], run_dir: Path) -> dict[str, EvalResult]:
    """Every evaluation the steps produced, in step order (the first is the baseline of the significance marks)."""
    results: dict[str, EvalResult] = {}
    for p in plan:
        for label, rel in outputs.get(p.step.name, {}).get("evals", {}).items():
            results[label] = EvalResult.load(run_dir / p.step.name / rel)
    return results


def report_markdown(experiment: Experiment, run_dir: Path, plan: list, outputs: dict[str, dict[str, Any]],
                    evaluation: EvalContext, *, ran: list[str] | None = None) -> str:
    """The whole report as Markdown; figure paths are relative to the run folder."""
    ran = ran or []
    results = collect_results(plan, outputs, run_dir)
    lines = [f"# Experiment `{experiment.name}`", ""]
    if experiment.description:
        lines += [experiment.description.strip(), ""]
    lines += [f"Run folder `{run_dir}`; report written {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    lines += ["## Three-axis evaluation", ""]
    if results and evaluation.suite is not None:
        lines += [f"Every model the experiment produced, on suite `{evaluation.suite.name}` "
                  f"({evaluation.suite.description or 'no description'}"
                  + (f"; every set cut to at most {experiment.limit} items by `limit`" if experiment.limit else "")
                  + "). Harmful prompts are judged on two axes: "
                  f"`harmful` (the ASR: the answer gives the requested harmful help; judge "
                  f"`{evaluation.suite.harm_judge}`) and `refused` (judge `{evaluation.suite.refusal_judge}`); "
                  "`incoherent`: degenerate answers to harmful prompts. Lower is better in the harmful, XSTest and "
                  f"utility columns; [95 % Wilson interval]; marks are against the first row, "
                  f"`{next(iter(results))}`.", "",
                  markdown_table(results), ""]
        accuracy = accuracy_compare_markdown(results)
        lines += ["### Zero-shot task accuracy (utility)", "", accuracy] if accuracy else []
    else:
        lines += ["No step evaluated a model.", ""]
    lines += ["## Steps", "", "| step | kind | consumes | this run | wall s (when computed) | cache key |",
              "|---|---|---|---|---:|---|"]
    for p in plan:
        uses = ", ".join(f"{f}: {ref}" for f, ref in p.inputs.items()) or "-"
        status = "ran" if p.step.name in ran else "cached" if p.cached else "not run"
        secs = "-" if p.seconds is None else f"{p.seconds:.1f}"
        lines.append(f"| {md_cell(p.step.name)} | {p.step.kind} | {md_cell(uses)} | {status} | {secs} | `{p.key}` |")
    lines.append("")
    for p in plan:
        out = outputs.get(p.step.name, {})
        if not (out.get("notes") or out.get("tables") or out.get("figures")):
            continue
        lines += [f"## Step `{p.step.name}` ({p.step.kind})", ""]
        lines += [f"- {note}" for note in out.get("notes", [])] + ([""] if out.get("notes") else [])
        for table in out.get("tables", []):
            lines += [_demote((run_dir / p.step.name / table).read_text(encoding="utf-8")), ""]
        for rel, caption in out.get("figures", []):
            lines += [f"![{caption}]({Path(p.step.name, rel).as_posix()})", ""]
    lines += ["## Data", "", f"Data folder: `{evaluation.data_dir}`.", ""] + _data_lines(experiment, evaluation)
    lines += ["", "## Settings", "", "```yaml", yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False).rstrip(),
              "```", "", "## Software and machine", ""] + _software_lines()
    return "\n".join(lines) + "\n"


def _demote(markdown: str) -> str:
    """A step's own Markdown file inside the report: its headings become sub-headings."""
    return re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", markdown, flags=re.M).strip()


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


# --- Markdown -> self-contained HTML ----------------------------------------------------------------------------

def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    """The cells of a table row; `\\|` (md_cell) is a `|` inside a cell, not a border."""
    inner = line.strip().removeprefix("|")
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def _table(rows: list[str]) -> str:
    head, spec, body = _cells(rows[0]), _cells(rows[1]), [_cells(r) for r in rows[2:]]
    right = [s.endswith(":") for s in spec]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead>", "<tbody>"]
    for row in body:
        out.append("<tr>" + "".join(f"<td class=\"num\">{_inline(c)}</td>" if i < len(right) and right[i]
                                    else f"<td>{_inline(c)}</td>" for i, c in enumerate(row)) + "</tr>")
    return "\n".join(out + ["</tbody>", "</table>"])


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _figure(alt: str, rel: str, base: Path) -> str:
    """A PNG the run produced (a file inside the run folder `base`), embedded; any other image reference
    (`/etc/hostname`, `../../secret.txt`, a link out of the folder) stays text, so a shared report leaks no file."""
    path = (base / rel).resolve()
    if not path.is_relative_to(base.resolve()):
        return f"<p>{_inline(f'![{alt}]({rel})')} <em>(not embedded: only figures inside the run folder are)</em></p>"
    if not path.is_file():
        return f"<p><em>figure missing: {html.escape(rel)}</em></p>"
    with path.open("rb") as fh:
        if fh.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            return f"<p>{_inline(f'![{alt}]({rel})')} <em>(not embedded: not a PNG figure)</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{_inline(alt)}</figcaption></figure>")


def markdown_to_html(markdown: str, base: Path, title: str) -> str:
    """Render the report's Markdown subset; PNG figures inside the run folder `base` are embedded (see _figure)."""
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            body.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        if line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            body.append(_table(lines[i:j]))
            i = j
            continue
        if line.startswith("- "):
            j = i
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            body.append("<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines[i:j]) + "</ul>")
            i = j
            continue
        heading = re.match(r"^(#{1,6}) (.*)$", line)
        image = _IMAGE.match(line.strip())
        if heading:
            n = len(heading.group(1))
            body.append(f"<h{n}>{_inline(heading.group(2))}</h{n}>")
        elif image:
            body.append(_figure(image.group("alt"), image.group("path"), base))
        elif line.strip():
            j = i + 1
            while j < len(lines) and lines[j].strip() and not re.match(r"^(#|\||- |```|!\[)", lines[j]):
                j += 1
            body.append("<p>" + _inline(" ".join(lines[i:j])) + "</p>")
            i = j
            continue
        i += 1
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(experiment: Experiment, run_dir: str | os.PathLike, plan: list, outputs: dict[str, dict[str, Any]],
                 evaluation: EvalContext, *, ran: list[str] | None = None) -> dict[str, Path]:
    """report.md and report.html in the run folder."""
    run_dir = Path(run_dir)
    text = report_markdown(experiment, run_dir, plan, outputs, evaluation, ran=ran)
    paths = {"markdown": run_dir / REPORT_MD, "html": run_dir / REPORT_HTML}
    write_text(paths["markdown"], text)
    write_text(paths["html"], markdown_to_html(text, run_dir, f"safeunits experiment {experiment.name}"))
    return paths
