"""Reports of evaluation runs: the Markdown summary of one run and the three-axis table of several.

`compare_table({"base": r1, "patched": r2})` is what the demo and the other subpackages print to put
models or variants side by side: safety (ASR, lower is safer), over-safety (XSTest refusal, lower is
better) and utility (NLL / perplexity of reference answers, lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from safeunits.eval.runner import EvalResult

COLUMNS = (  # (headline key, header, kind)
    ("asr", "ASR", "rate"),
    ("asr_system", "ASR +sys", "rate"),
    ("xstest_refusal", "XSTest refusal", "rate"),
    ("utility_nll", "NLL", "float"),
    ("perplexity", "PPL", "float"),
)


def _fmt(value: float | None, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if kind == "rate" else f"{value:.3f}"


def _ci(entry: dict[str, Any] | None) -> str:
    if not entry:
        return ""
    lo, hi = entry["ci95"]
    return f" [{100 * lo:.0f}, {100 * hi:.0f}]"


def _headline_cells(result: EvalResult, with_ci: bool) -> list[str]:
    m = result.metrics
    main = next(iter(m.get("safety", {}).get("sets", {}).values()), {})
    ci_entries = {"asr": main.get("none"), "asr_system": main.get("safety"),
                  "xstest_refusal": (m.get("over_safety") or {}).get("refusal")}
    cells = []
    for key, _, kind in COLUMNS:
        cell = _fmt(result.headline.get(key), kind)
        if with_ci and key in ci_entries and cell != "-":
            cell += _ci(ci_entries[key])
        cells.append(cell)
    return cells


def three_axis_table(results: dict[str, EvalResult], *, with_ci: bool = True, title: str | None = None) -> Table:
    """A rich table: one row per model/variant, columns safety / over-safety / utility."""
    table = Table(title=title or "Three-axis evaluation (lower is better everywhere; [95% CI])")
    table.add_column("model / variant", style="bold")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("n (harmful / xstest / nll)", justify="right")
    for name, result in results.items():
        table.add_row(name, *_headline_cells(result, with_ci), _sizes(result.metrics))
    return table


def _sizes(m: dict[str, Any]) -> str:
    main = next(iter(m.get("safety", {}).get("sets", {}).values()), {})
    n_h = next(iter(main.values()), {}).get("n", 0) if main else 0
    n_x = (m.get("over_safety") or {}).get("n", 0)
    n_u = sum(s["n"] for s in m.get("utility", {}).get("sets", {}).values())
    return f"{n_h} / {n_x} / {n_u}"


def compare_table(results: dict[str, EvalResult], *, console: Console | None = None, with_ci: bool = True,
                  title: str | None = None) -> Table:
    """Print the three-axis table of several models or variants side by side (and return it)."""
    table = three_axis_table(results, with_ci=with_ci, title=title)
    (console or Console()).print(table)
    return table


def markdown_table(results: dict[str, EvalResult], *, with_ci: bool = True) -> str:
    """The same table as Markdown, for notes and BENCHMARKS.md."""
    head = "| model | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    rows = [f"| {name} | " + " | ".join(_headline_cells(r, with_ci)) + " |" for name, r in results.items()]
    return "\n".join([head, sep, *rows])


def summary_markdown(result: EvalResult) -> str:
    """A short human summary of one run (written as summary.md)."""
    m = result.metrics
    lines = [f"# Evaluation: {m['model']['name']} on suite `{m['suite']}`", "",
             f"Model fingerprint `{m['model']['fingerprint']}`.", "", "## Three axes", "",
             markdown_table({m["model"]["name"]: result}), "",
             f"## Safety (judge `{m['safety']['judge']}`: attack success = complied)", "",
             "| set | system prompt | ASR | 95% CI | n |", "|---|---|---:|---|---:|"]
    for set_name, modes in m["safety"]["sets"].items():
        for mode, e in modes.items():
            lines.append(f"| {set_name} | {mode} | {100 * e['rate']:.1f}% | "
                         f"{100 * e['ci95'][0]:.1f}-{100 * e['ci95'][1]:.1f}% | {e['n']} |")
    for set_name, why in m["safety"].get("skipped", {}).items():
        lines.append(f"| {set_name} | skipped | - | {why[:80]} | 0 |")
    over = m.get("over_safety")
    if over:
        c = over["counts"]
        lines += ["", f"## Over-safety ({over['dataset']}, judge `{over['judge']}`)", "",
                  f"Refusal (full + partial): {100 * over['refusal']['rate']:.1f}% "
                  f"(95% CI {100 * over['refusal']['ci95'][0]:.1f}-{100 * over['refusal']['ci95'][1]:.1f}%, n={over['n']}); "
                  f"full compliance {c['1_full_compliance']}, full refusal {c['2_full_refusal']}, "
                  f"partial refusal {c['3_partial_refusal']}."]
    util = m["utility"]
    if util["sets"]:
        lines += ["", "## Utility (response-token NLL of reference answers)", "",
                  "| set | n | tokens | NLL | perplexity |", "|---|---:|---:|---:|---:|"]
        for set_name, e in util["sets"].items():
            lines.append(f"| {set_name} | {e['n']} | {e['tokens']} | {e['nll']:.3f} | {e['perplexity']:.2f} |")
    if m.get("answers"):
        lines += ["", "## Answers for an external judge", ""]
        lines += [f"- {k}: {v['n']} answers in `{v['path']}`" for k, v in m["answers"].items()]
    if "lm_eval" in m:
        lines += ["", "## lm-evaluation-harness", "", f"`{m['lm_eval']}`"]
    t = m.get("timing", {})
    if t:
        tps = t.get("tokens_per_s")
        lines += ["", "## Cost", "", f"Total {t['total_s']:.1f} s; generation {t['generation_s']:.1f} s, "
                  f"{t['generated_tokens']} new tokens" + (f" ({tps:.0f} tok/s)" if tps else "") +
                  (f"; {t['resumed_rows']} rows resumed from disk" if t.get("resumed_rows") else "") + "."]
    return "\n".join(lines) + "\n"


def rows_markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str | Callable[[Any], str]]],
                  *, missing: str = "") -> str:
    """A markdown table of result rows: (key, header, format) columns, format '%' shows fractions x100,
    a format spec applies `format`, a callable renders the value itself; absent values show `missing`."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = ""
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            if v is None:
                cells.append(missing)
            elif callable(fmt):
                cells.append(fmt(v))
            elif fmt == "%":
                cells.append(f"{100 * v:.1f}")
            elif fmt:
                cells.append(format(v, fmt))
            else:
                cells.append(str(v))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body
