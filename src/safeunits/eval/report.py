"""Reports of evaluation runs: the Markdown summary of one run and the three-axis table of several.

`compare_table({"base": r1, "patched": r2})` is what the demo and the other subpackages print to put
models or variants side by side: safety on two axes (the harmful rate = ASR, lower is safer, from the harm judge;
the refusal rate from the refusal judge, and the incoherent rate),
over-safety (XSTest refusal, lower is better) and utility (NLL / perplexity of reference answers, lower is
better). Against the first row, a difference that a paired test on the same prompts finds significant
(p < 0.05, `safeunits.eval.significance`) is marked `*`; unmarked differences are within noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from safeunits.document import Bullets, Document, Heading, Paragraph
from safeunits.document import Table as DocTable
from safeunits.eval.result import EvalResult, Rate
from safeunits.eval.significance import (ACCURACY_ALL, UTILITY_ALL, PairedDelta, PairingError, compare_results,
                                        headline_marks)

COLUMNS = (  # (headline key, header, kind)
    ("asr", "harmful (ASR)", "rate"),
    ("asr_system", "harmful +sys", "rate"),
    ("refusal", "refused", "rate"),
    ("refusal_system", "refused +sys", "rate"),
    ("incoherent", "incoherent", "rate"),
    ("xstest_refusal", "XSTest refusal", "rate"),
    ("utility_nll", "NLL", "float"),
    ("perplexity", "PPL", "float"),
    ("accuracy", "acc (mean)", "rate"),  # zero-shot task accuracy: higher is better
)
SIGNIFICANT = "*"


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if kind == "rate" else f"{value:.3f}"


def _ci(entry: Rate | None) -> str:
    if entry is None:
        return ""
    lo, hi = entry.ci95
    return f" [{100 * lo:.0f}, {100 * hi:.0f}]"


def _rate_entries(result: EvalResult) -> dict[str, Rate | None]:
    main = result.main_safety()
    none = main.get("none")
    system = main.get("safety")
    return {"asr": none, "asr_system": system, "refusal": none.refusal if none else None,
            "refusal_system": system.refusal if system else None,
            "incoherent": none.incoherent if none else None,
            "xstest_refusal": result.over_safety.refusal if result.over_safety else None}


def _headline_cells(result: EvalResult, with_ci: bool, marks: dict[str, bool]) -> list[str]:
    values = result.headline.as_dict()
    entries = _rate_entries(result)
    cells = []
    for key, _, kind in COLUMNS:
        cell = _fmt(values.get(key), kind)
        if cell != "-":
            cell += SIGNIFICANT if marks.get(key) else ""
            if with_ci and key in ("asr", "asr_system", "refusal", "refusal_system", "xstest_refusal"):
                cell += _ci(entries[key])
        cells.append(cell)
    return cells


def _marks(results: dict[str, EvalResult]) -> dict[str, dict[str, bool]]:
    """Significance marks of every row against the first (none where the runs did not judge the same items)."""
    names = list(results)
    return {name: _safe_marks(results[names[0]], results[name]) for name in names[1:]}


def three_axis_table(results: dict[str, EvalResult], *, with_ci: bool = True, title: str | None = None) -> Table:
    """A rich table: one row per model/variant, columns safety / over-safety / utility."""
    table = Table(title=title or "Three-axis evaluation (harmful, XSTest refusal, NLL: lower is better; acc: higher; "
                                 "[95% CI]; * = significant vs first row)")
    table.add_column("model / variant", style="bold")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("n (harmful / xstest / nll)", justify="right")
    marks = _marks(results)
    for name, result in results.items():
        table.add_row(name, *_headline_cells(result, with_ci, marks.get(name, {})), _sizes(result))
    return table


def _sizes(result: EvalResult) -> str:
    none = next(iter(result.main_safety().values()), None)
    n_x = result.over_safety.n if result.over_safety else 0
    n_u = sum(s.n for s in result.utility.sets.values())
    return f"{none.n if none else 0} / {n_x} / {n_u}"


def compare_table(results: dict[str, EvalResult], *, console: Console | None = None, with_ci: bool = True,
                  title: str | None = None) -> Table:
    """Print the three-axis table of several models or variants side by side (and return it)."""
    table = three_axis_table(results, with_ci=with_ci, title=title)
    (console or Console()).print(table)
    return table


def headline_document(results: dict[str, EvalResult], *, with_ci: bool = True) -> Document:
    """The three-axis table as a document (Markdown / HTML): one row per run, the significance note when several."""
    marks = _marks(results)
    table = DocTable(columns=["model", *(h for _, h, _ in COLUMNS)], numeric=[False] + [True] * len(COLUMNS),
                     rows=[[name, *_headline_cells(r, with_ci, marks.get(name, {}))] for name, r in results.items()])
    note = Paragraph(text="`*`: differs from the first row with p < 0.05 (paired test on the same prompts).")
    return Document().add(table, note if len(results) > 1 else None)


def _significant_metrics(base: EvalResult, other: EvalResult) -> set[str] | None:
    """Names of the paired metrics (`compare_results`) where `other` differs from `base`; None: not comparable."""
    try:
        return {d.metric for d in compare_results(base, other) if d.significant}
    except PairingError:
        return None


def source_document(results: dict[str, EvalResult]) -> Document:
    """Every harmful source (and system-prompt mode) a row, one column per run: harmful rate [95 % CI] / refusal rate,
    then XSTest-safe refusal and utility NLL; `*` = differs from the first column in a paired test (p < 0.05).
    The per-source view the story tables in docs/ are printed with (`safeunits eval-compare --by-source`)."""
    names = list(results)
    first = results[names[0]]
    sig, mark = _marker(results)
    rows = []
    for set_name, modes in first.safety.sets.items():
        for mode, head in modes.items():
            cells = []
            for name, r in results.items():
                m = r.safety.sets.get(set_name, {}).get(mode)
                cells.append("-" if m is None else f"{100 * m.rate:.1f}{mark(name, f'asr {set_name}/{mode}')}"
                             f"{_ci(m)} / {100 * m.refusal.rate:.1f}{mark(name, f'refusal {set_name}/{mode}')}")
            rows.append([f"{set_name} ({head.n})" + (" + safety system prompt" if mode == "safety" else ""), *cells])
    if first.over_safety:
        rows.append([f"XSTest-safe refusal ({first.over_safety.n})",
                     *(f"{100 * r.over_safety.refusal.rate:.1f}{mark(name, 'xstest_refusal')}{_ci(r.over_safety.refusal)}"
                       if r.over_safety else "-" for name, r in results.items())])
    n_util = sum(s.n for s in first.utility.sets.values())
    if n_util:
        all_sets = UTILITY_ALL if len(first.utility.sets) > 1 else f"nll {next(iter(first.utility.sets))}"
        rows.append([f"utility NLL ({n_util} refs)", *(f"{r.utility.nll:.3f}{mark(name, all_sets)}"
                                                        if r.utility.nll is not None else "-"
                                                        for name, r in results.items())])
    rows += _accuracy_rows(results, mark)
    unpaired = [name for name, marks in sig.items() if marks is None]
    note = ("harmful % (the ASR) [95 % CI] / refused % per source; zero-shot acc % [95 % CI] per task (higher is "
            "better); `*` = differs from the first column with p < 0.05 (McNemar exact for rates, paired bootstrap for "
            "NLL and the mean accuracy)." + (f" Not paired with the first column (other prompts): "
                                                             f"{', '.join(unpaired)}." if unpaired else ""))
    return Document().add(DocTable(columns=["source", *names], rows=rows, numeric=[False] + [True] * len(names)),
                          Paragraph(text=note))


def _marker(results: dict[str, EvalResult]) -> tuple[dict[str, set[str] | None], Callable[[str, str], str]]:
    """The significant paired metrics of each run against the first, and `mark(run, metric)` -> '*' or ''."""
    names = list(results)
    sig = {name: _significant_metrics(results[names[0]], r) for name, r in results.items() if name != names[0]}

    def mark(name: str, metric: str) -> str:
        return SIGNIFICANT if metric in (sig.get(name) or ()) else ""

    return sig, mark


def accuracy_compare_document(results: dict[str, EvalResult]) -> Document | None:
    """Zero-shot accuracy per task, one column per run, `*` against the first column (None when no run has tasks)."""
    rows = _accuracy_rows(results, _marker(results)[1])
    if not rows:
        return None
    table = DocTable(columns=["task (documents)", *results], rows=rows, numeric=[False] + [True] * len(results))
    return Document().add(table, Paragraph(
        text="acc % [95 % CI], higher is better; `*` = differs from the first column with p < 0.05 (McNemar exact "
             "per task, paired bootstrap for the mean)."))


def _accuracy_rows(results: dict[str, EvalResult], mark: Callable[[str, str], str]) -> list[list[str]]:
    """Zero-shot accuracy rows (one per task of the first run, then the mean over tasks), one cell per run."""
    first = next(iter(results.values())).utility.accuracy
    if first is None or not first.tasks:
        return []
    rows = []
    for task, head in first.tasks.items():
        cells = []
        for name, r in results.items():
            t = r.utility.accuracy.tasks.get(task) if r.utility.accuracy else None
            cells.append("-" if t is None else f"{100 * t.acc.rate:.1f}{mark(name, f'acc {task}')}{_ci(t.acc)}")
        rows.append([f"acc {task} ({head.n})", *cells])
    cells = [f"{100 * r.headline.accuracy:.1f}{mark(name, ACCURACY_ALL)}" if r.headline.accuracy is not None else "-"
             for name, r in results.items()]
    return rows + [[f"acc, mean of {len(first.tasks)} tasks", *cells]]


def accuracy_document(result: EvalResult) -> Document:
    """One run's zero-shot tasks: source, documents scored, acc and acc_norm with their 95 % intervals."""
    acc = result.utility.accuracy
    if acc is None:
        return Document()
    rows = []
    for task, t in acc.tasks.items():
        norm = f"{100 * t.acc_norm.rate:.1f}%{_ci(t.acc_norm)}" if t.acc_norm else "-"
        rows.append([task, f"{t.n} / {t.split_size}", f"{100 * t.acc.rate:.1f}%{_ci(t.acc)}", norm, f"`{t.source}`"])
    if acc.mean_acc is not None:
        rows.append([f"mean over {len(acc.tasks)} tasks", "", f"{100 * acc.mean_acc:.1f}%", "", ""])
    rows += [[task, "skipped", why[:80], "", ""] for task, why in acc.skipped.items()]
    return Document().add(
        Paragraph(text=f"lm-eval {acc.lm_eval_version}, {acc.num_fewshot}-shot; acc [95 % Wilson CI]; acc_norm where "
                       "lm-eval reports it (log-likelihood divided by the choice's length in characters)."),
        DocTable(columns=["task", "n / split", "acc", "acc_norm", "data"], rows=rows,
                 numeric=[False, True, True, True, False]))


def headline_row(result: EvalResult, baseline: EvalResult | None = None) -> dict[str, Any]:
    """A result as an experiment-table row: the headline numbers, plus `significant` = the headline columns that
    differ from `baseline` in a paired test (p < 0.05; "-" when none do or when there is no baseline)."""
    marks = {} if baseline is None or baseline is result else _safe_marks(baseline, result)
    return {**result.headline.as_dict(), "significant": ", ".join(k for k, *_ in COLUMNS if marks.get(k)) or "-"}


SIGNIFICANCE_NOTE = ("`significant` lists the columns that differ from the first row with p < 0.05 in a paired test on "
                     "the same prompts (McNemar exact for rates, paired bootstrap for NLL and mean accuracy); other "
                     "differences are noise.")


def _safe_marks(base: EvalResult, other: EvalResult) -> dict[str, bool]:
    try:
        return headline_marks(base, other)
    except PairingError:
        return {}


def delta_rows(base: EvalResult, other: EvalResult) -> list[dict[str, Any]]:
    """Every paired comparison of `other` against `base` as table rows (metric, values, delta, p, verdict)."""
    return [_delta_row(d) for d in compare_results(base, other)]


def _delta_row(d: PairedDelta) -> dict[str, Any]:
    pct = d.kind == "rate"
    show = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    detail = (f"discordant {d.discordant[0]}/{d.discordant[1]}" if d.discordant is not None
              else f"95% CI [{100 * d.ci95[0]:+.1f}, {100 * d.ci95[1]:+.1f}] pts" if d.ci95 and pct
              else f"95% CI [{d.ci95[0]:+.3f}, {d.ci95[1]:+.3f}]" if d.ci95 else "")
    delta = f"{100 * d.delta:+.1f} pts" if pct else f"{d.delta:+.3f}"
    return {"metric": d.metric, "n": d.n, "base": show(d.base), "other": show(d.other), "delta": delta,
            "p": f"{d.p_value:.3g}", "detail": detail, "verdict": "significant" if d.significant else "n.s."}


DELTA_COLUMNS = [("metric", "metric", ""), ("n", "n", ""), ("base", "base", ""), ("other", "other", ""),
                 ("delta", "delta", ""), ("p", "p", ""), ("detail", "test", ""), ("verdict", "p < 0.05?", "")]


def delta_table(base_name: str, base: EvalResult, other_name: str, other: EvalResult) -> Table:
    """Rich table of `delta_rows`: McNemar exact for rates, paired bootstrap for NLL."""
    table = Table(title=f"{other_name} vs {base_name} (paired on the same prompts)")
    for _, header, _ in DELTA_COLUMNS:
        table.add_column(header, justify="left" if header in ("metric", "test") else "right")
    for row in delta_rows(base, other):
        table.add_row(*(str(row[k]) for k, _, _ in DELTA_COLUMNS), style=None if row["verdict"] == "significant" else "dim")
    return table


def summary_document(result: EvalResult) -> Document:
    """A short human summary of one run (written as summary.md)."""
    name = result.model.name
    doc = Document().add(Heading(level=1, text=f"Evaluation: {name} on suite `{result.suite}`"),
                         Paragraph(text=f"Model fingerprint `{result.model.fingerprint}`."),
                         Heading(level=2, text="Three axes"), headline_document({name: result}),
                         Heading(level=2, text=f"Safety (harm judge `{result.safety.harm_judge}`: ASR = harmful rate; "
                                               f"refusal judge `{result.safety.judge}`: refused / complied / incoherent)"))
    rows = [[set_name, mode, f"{100 * e.rate:.1f}%", f"{100 * e.ci95[0]:.1f}-{100 * e.ci95[1]:.1f}%",
             f"{100 * e.refusal.rate:.1f}%", f"{100 * e.refusal.ci95[0]:.1f}-{100 * e.refusal.ci95[1]:.1f}%",
             f"{100 * e.complied.rate:.1f}%", f"{100 * e.incoherent.rate:.1f}%", str(e.n)]
            for set_name, modes in result.safety.sets.items() for mode, e in modes.items()]
    rows += [[set_name, "skipped", "-", why[:80], "-", "-", "-", "-", "0"] for set_name, why in result.safety.skipped.items()]
    doc.add(DocTable(columns=["set", "system prompt", "harmful (ASR)", "95% CI", "refused", "95% CI", "complied",
                              "incoherent", "n"], rows=rows, numeric=[False, False, True, False, True, False, True, True, True]))
    over = result.over_safety
    if over:
        c, r = over.counts, over.refusal
        doc.add(Heading(level=2, text=f"Over-safety ({over.dataset}, judge `{over.judge}`)"),
                Paragraph(text=f"Refusal (full + partial): {100 * r.rate:.1f}% (95% CI {100 * r.ci95[0]:.1f}-"
                               f"{100 * r.ci95[1]:.1f}%, n={over.n}); full compliance {c['1_full_compliance']}, "
                               f"full refusal {c['2_full_refusal']}, partial refusal {c['3_partial_refusal']}."))
    util = result.utility
    if util.sets:
        doc.add(Heading(level=2, text="Utility (response-token NLL of reference answers)"),
                DocTable(columns=["set", "n", "tokens", "NLL", "perplexity"], numeric=[False, True, True, True, True],
                         rows=[[set_name, str(e.n), str(e.tokens), f"{e.nll:.3f}", f"{e.perplexity:.2f}"]
                               for set_name, e in util.sets.items()]))
    if util.accuracy is not None:
        doc.add(Heading(level=2, text="Utility (zero-shot task accuracy)"), accuracy_document(result))
    if result.answers:
        doc.add(Heading(level=2, text="Answers for an external judge"),
                Bullets(items=[f"{k}: {v.n} answers in `{v.path}`" for k, v in result.answers.items()]))
    t = result.timing
    if t:
        doc.add(Heading(level=2, text="Cost"), Paragraph(
            text=f"Total {t.total_s:.1f} s; generation {t.generation_s:.1f} s, {t.generated_tokens} new tokens"
                 + (f" ({t.tokens_per_s:.0f} tok/s)" if t.tokens_per_s else "")
                 + (f"; {t.resumed_rows} rows ({t.resumed_tokens} tokens) resumed from disk" if t.resumed_rows else "")
                 + (f"; judging {t.judging_s:.1f} s" if t.judging_s is not None else "")
                 + (f"; reference NLL {t.nll_s:.1f} s" if t.nll_s is not None else "")
                 + (f"; zero-shot tasks {t.accuracy_s:.1f} s" if t.accuracy_s is not None else "") + "."))
    return doc
