"""`safeunits eval`, `safeunits eval-compare` and `safeunits judge-check`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from safeunits.cli_options import (DATA_DIR, DEVICE, DTYPE, FORCE, LIMIT, QUIET, config_options, model_option,
                                  out_option, sets_option, suite_option)
from safeunits.config import build_config, parse_sets
from safeunits.eval.generation import Backend
from safeunits.eval.suites import SuiteConfig

app = typer.Typer()


@app.command("eval")
@config_options(SuiteConfig, ["max_new_tokens", "batch_size", "generation"])
def eval_command(
    model: str = model_option(),
    suite: str = suite_option(),
    out: Path = out_option("Run directory; rerunning into it resumes generation."),
    data_dir: Optional[Path] = DATA_DIR,
    judge: Optional[str] = typer.Option(None, "--judge", help="Harm judge, whose harmful rate is the ASR (harm, "
                                        "PRESET:PATH for a field judge model, or a refusal judge as a proxy); default: "
                                        "the suite's."),
    refusal_judge: Optional[str] = typer.Option(None, "--refusal-judge", help="Refusal judge of the harmful answers "
                                                "(learned, keyword, prefix, strmatch, xstest, model:PATH); default: the "
                                                "suite's."),
    xstest_judge: Optional[str] = typer.Option(None, "--xstest-judge", help="Three-class over-safety judge; default: the suite's."),
    limit: Optional[int] = LIMIT,
    sets: list[str] = sets_option("nll_max_length=256"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    quiet: bool = QUIET,
    force: bool = FORCE,
    backend: Backend = typer.Option("transformers", "--backend",
                                    help="Generation backend: transformers, or vllm (GPU; pip install 'safeunits[vllm]')."),
    options: Optional[dict] = None,
) -> None:
    """Evaluate a model on the three axes (safety: harmful rate = ASR and refusal rate; XSTest over-refusal; utility
    NLL) into a run directory."""
    from safeunits.eval.context import EvalContext
    from safeunits.eval.report import compare_table
    from safeunits.models.loading import load_model
    from safeunits.outdir import claim_output_dir

    ctx = EvalContext.create(suite, data_dir=data_dir, progress=not quiet, limit=limit, backend=backend)
    base = ctx.suite
    given = dict(options or {})
    if judge:
        given["harm_judge"] = judge
    if refusal_judge:
        given["refusal_judge"] = refusal_judge
    if xstest_judge and base.over_safety:
        given["over_safety"] = {"judge": xstest_judge}
    ctx = ctx.with_suite(build_config(SuiteConfig, given, parse_sets(sets), base=base))
    claim_output_dir(out, "eval", force=force)
    lm, tok = load_model(model, dtype=dtype, device=device)
    result = ctx.evaluate(lm, tok, out, name=model)
    compare_table({model: result})
    typer.echo(f"run directory: {out} (metrics.json, summary.md, generations/)")


@app.command("eval-compare")
def eval_compare_command(
    runs: list[Path] = typer.Argument(..., help="Run directories written by `safeunits eval` (each holds "
                                      "metrics.json); the first is the baseline of the paired tests."),
    by_source: bool = typer.Option(False, "--by-source", help="Print one Markdown table instead: a row per harmful "
                                   "source and system-prompt mode (rate [CI] (incoherent)), XSTest, NLL; a column a run."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated column names, one per run "
                                         "(default: the run paths)."),
) -> None:
    """Print the three-axis table of earlier runs side by side, and whether each difference from the first run
    is significant (paired tests on the same prompts: McNemar exact for rates, bootstrap for NLL)."""
    from rich.console import Console

    from safeunits.eval.report import compare_table, delta_table, source_document
    from safeunits.eval.result import EvalResult
    from safeunits.eval.significance import PairingError

    names = [x.strip() for x in labels.split(",")] if labels else [str(r) for r in runs]
    if len(names) != len(runs) or len(set(names)) != len(names):
        raise typer.BadParameter(f"--labels needs {len(runs)} distinct names, one per run; got {len(names)}")
    results = {name: EvalResult.load(r) for name, r in zip(names, runs)}
    if by_source:
        typer.echo(source_document(results).markdown())
        return
    console = Console()
    compare_table(results, console=console)
    (base_name, base), *others = results.items()
    for name, other in others:
        try:
            console.print(delta_table(base_name, base, name, other))
        except PairingError as err:
            typer.echo(f"{name}: no paired test against {base_name}: {err}", err=True)


@app.command("judge-check")
def judge_check_command(
    judges: Optional[list[str]] = typer.Option(None, "--judge", "-j",
                                               help="Judges to measure (repeatable; default strmatch, prefix, keyword, "
                                                    "xstest, learned); strmatch is XSTest's own string matcher."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Offline data folder holding xstest/labels."),
    out: Optional[Path] = out_option("Also write the full results as JSON: a .json file, or a folder "
                                     "(judge_check.json inside).", default=None),
    harm: bool = typer.Option(False, "--harm", help="Agreement on *harm* instead: every judge on every human-labelled "
                              "harm source (GPTFuzz, PKU-SafeRLHF mini, LLM Self Defense, XSTest), the harm judge "
                              "leave-one-source-out; accuracy, F1, kappa, FPR, FNR with bootstrap 95 % intervals."),
    sources: Optional[list[str]] = typer.Option(None, "--source", help="With --harm: sources to score (repeatable; "
                                                "default all)."),
) -> None:
    """Agreement of each judge with humans: on refusal (XSTest's human labels of 5 models' completions: accuracy,
    binary, per-class F1; the learned judge leave-one-file-out), or with --harm on harm.

    The learned judge is scored leave-one-out: each file by the model trained on the other four."""
    from safeunits.eval.judge_check import DEFAULT_JUDGES, judge_check, output_path
    from safeunits.io import check_file_target, write_json

    target = output_path(out) if out is not None else None
    if target is not None:
        check_file_target(target)
    if harm:
        from safeunits.eval.harm_check import DEFAULT_HARM_JUDGES, harm_check

        result = harm_check(judges or DEFAULT_HARM_JUDGES, sources=sources, data_dir=data_dir)
        Console().print(harm_table(result))
        if target is not None:
            write_json(target, result)
        return
    result = judge_check(judges or DEFAULT_JUDGES, data_dir=data_dir)
    table = Table(title="Judge agreement with XSTest human labels (final_label)")
    for col in ("file", "judge", "accuracy (3-class)", "binary refusal acc.", "F1 compliance", "F1 full refusal",
                "F1 partial"):
        table.add_column(col, justify="left" if col in ("file", "judge") else "right")
    for file, per_judge in result["per_file"].items():
        short = file.replace("xstest_v2_completions_", "").replace("_streval", "")
        for j, s in per_judge.items():
            f1 = s["f1"]
            table.add_row(short, j, f"{s['accuracy']:.3f}", f"{s['binary_accuracy']:.3f}",
                          f"{f1['1_full_compliance']:.3f}", f"{f1['2_full_refusal']:.3f}", f"{f1['3_partial_refusal']:.3f}")
        table.add_section()
    for j, s in result["summary"].items():
        table.add_row("MEAN", j, f"{s['accuracy_mean']:.3f}", f"{s['binary_mean']:.3f} (worst {s['binary_min']:.3f})",
                      "", "", "")
    console = Console()
    console.print(table)
    coh = result["coherence"]
    console.print(f"coherence rule: {coh['incoherent']} of {coh['n_compliant']} human-labelled full compliances "
                  f"called incoherent ({coh['rate']:.2%}); learned judges scored leave-one-file-out")
    if target is not None:
        write_json(target, result)


def harm_table(result: dict) -> Table:
    """judge-check --harm as a table: a row per source and judge, each metric with its bootstrap interval."""
    table = Table(title="Judge agreement with human harm labels (harmful = the answer gives the requested harmful "
                        "help); [95 % bootstrap CI]")
    for col in ("source", "judge", "n (harmful)", "accuracy", "kappa", "F1 harmful", "FPR", "FNR"):
        table.add_column(col, justify="left" if col in ("source", "judge") else "right")
    for source, per_judge in result["per_source"].items():
        for name, s in per_judge.items():
            cells = [f"{s[m]:.3f} [{s['ci95'][m][0]:.2f}, {s['ci95'][m][1]:.2f}]"
                     for m in ("accuracy", "kappa", "f1", "fpr", "fnr")]
            table.add_row(source, name, f"{s['n']} ({s['harmful']})", *cells)
        table.add_section()
    for name, s in result["summary"].items():
        table.add_row("ALL", name, s["scored"], f"mean {s['accuracy_mean']:.3f}, worst {s['accuracy_min']:.3f}",
                      f"worst {s['kappa_min']:.3f}", "", "", "")
    return table


@app.command("rejudge")
def rejudge_command(
    run: Path = typer.Argument(..., help="Folder of a `safeunits eval` run (config.json + generations/)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Harm judge (ASR = its harmful rate): harm, "
                                        "PRESET:PATH, or a refusal judge as a proxy; default: the run's."),
    refusal_judge: Optional[str] = typer.Option(None, "--refusal-judge", help="Refusal judge; default: the run's."),
    xstest_judge: Optional[str] = typer.Option(None, "--xstest-judge", help="Over-safety judge; default: the run's."),
    data_dir: Optional[Path] = DATA_DIR,
    quiet: bool = QUIET,
) -> None:
    """Recompute a finished run's metrics from its saved answers with other judges (no model, no generation).

    Utility, MT-Bench answers and lm-eval results are carried over; the previous metrics.json is kept as
    metrics.prev.json and config.json records the new judges (a later `eval` into the folder resumes)."""
    from safeunits.eval.rejudge import rejudge
    from safeunits.eval.report import compare_table

    result = rejudge(run, harm_judge=judge, refusal_judge=refusal_judge, xstest_judge=xstest_judge,
                     data_dir=data_dir, progress=not quiet)
    compare_table({str(run): result})


@app.command("judge-train")
def judge_train_command(
    out: Path = out_option("Folder for the trained harm judge (judge.json + weights.safetensors); the shipped one "
                           "is safeunits/configs/judges/harm."),
    data_dir: Optional[Path] = DATA_DIR,
    limit_per_source: Optional[int] = typer.Option(None, "--limit-per-source", min=2,
                                                   help="Train on the first N rows of each source (a quick check)."),
    sets: list[str] = sets_option("c=0.1"),
    quiet: bool = QUIET,
    force: bool = FORCE,
) -> None:
    """Train the `harm` judge on every human-labelled harm source; on the same machine and software it reproduces the
    shipped parameters bit for bit (`cmp` the two weights.safetensors)."""
    from safeunits.eval.harm_judge import HarmJudgeConfig, train_harm_model
    from safeunits.outdir import build_into, check_output_dir

    given = {"limit_per_source": limit_per_source} if limit_per_source else {}
    config = build_config(HarmJudgeConfig, given, parse_sets(sets), base=HarmJudgeConfig())
    check_output_dir(out, "harm-judge", force=force)  # before an hour of feature extraction
    model = train_harm_model(config, data_dir=data_dir, progress=not quiet)
    build_into(out, model.save, kind="harm-judge", force=force)
    typer.echo(f"harm judge written to {out}: " + ", ".join(f"{s} {v['rows']} rows ({v['harmful']} harmful)"
                                                            for s, v in model.provenance["sources"].items()))
