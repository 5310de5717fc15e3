"""`safeunits eval` and `safeunits judge-check`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from safeunits.eval.suites import available_suites


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        model: str = typer.Option("smollm2-135m-instruct", "--model", "-m",
                                  help="Registered model name, local model folder, or Hugging Face hub id."),
        suite: str = typer.Option("quick", "--suite", "-s",
                                  help=f"Suite name ({', '.join(available_suites())}) or a suite YAML file."),
        out: Path = typer.Option(..., "--out", "-o", help="Run directory; rerunning into it resumes generation."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Offline data folder (default $SAFEUNITS_DATA_DIR)."),
        judge: Optional[str] = typer.Option(None, "--judge",
                                            help="ASR judge (keyword, prefix, strmatch, xstest, model:PATH); default: the suite's."),
        xstest_judge: Optional[str] = typer.Option(None, "--xstest-judge", help="Three-class over-safety judge; default: the suite's."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Override the suite's generation budget."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Override the suite's generation batch size."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Cut every set to at most this many items (smoke runs)."),
        dtype: str = typer.Option("float32", "--dtype", help="Model weights dtype (float32, bfloat16, float16)."),
        device: str = typer.Option("cpu", "--device", help="Torch device (cpu, cuda, cuda:1, ...)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                              help="torch CPU threads (1 is much faster when other jobs share the cores)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Evaluate a model on the three axes (safety ASR, XSTest over-refusal, utility NLL) into a run directory."""
        from safeunits.eval.report import compare_table
        from safeunits.eval.runner import evaluate
        from safeunits.eval.suites import load_suite
        from safeunits.models.loading import load_model

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        try:
            config = load_suite(suite).with_limit(limit)
        except (FileNotFoundError, ValueError) as err:
            raise typer.BadParameter(str(err), param_hint="--suite") from err
        updates = {k: v for k, v in {"asr_judge": judge, "max_new_tokens": max_new_tokens, "batch_size": batch_size}.items()
                   if v is not None}
        if xstest_judge and config.over_safety:
            updates["over_safety"] = config.over_safety.model_copy(update={"judge": xstest_judge})
        config = config.model_copy(update=updates)
        lm, tok = load_model(model, dtype=dtype, device=device)
        result = evaluate(lm, tok, config, out_dir=out, data_dir=data_dir, progress=not quiet, model_name=model)
        compare_table({model: result})
        typer.echo(f"run directory: {out} (metrics.json, summary.md, generations/)")

    @app.command("eval-compare")
    def eval_compare_command(
        runs: list[Path] = typer.Argument(..., help="Run directories written by `safeunits eval` (each holds metrics.json)."),
    ) -> None:
        """Print the three-axis table of earlier runs side by side."""
        from safeunits.eval.report import compare_table
        from safeunits.eval.runner import EvalResult

        compare_table({str(r): EvalResult.load(r) for r in runs})

    @app.command("judge-check")
    def judge_check_command(
        judges: Optional[list[str]] = typer.Option(None, "--judge", "-j",
                                                   help="Judges to measure (repeatable; default strmatch, prefix, keyword, "
                                                        "xstest, learned); strmatch is XSTest's own string matcher."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Offline data folder holding xstest/labels."),
        out: Optional[Path] = typer.Option(None, "--out", "-o",
                                           help="Also write the full results as JSON: a .json file, or a folder "
                                                "(judge_check.json inside)."),
    ) -> None:
        """Agreement of each judge with XSTest's human labels (5 models' completions): accuracy, binary, per-class F1.

        The learned judge is scored leave-one-out: each file by the model trained on the other four."""
        from safeunits.eval.judge_check import DEFAULT_JUDGES, judge_check, output_path
        from safeunits.io import write_json

        try:
            result = judge_check(judges or DEFAULT_JUDGES, data_dir=data_dir)
        except (FileNotFoundError, ValueError) as err:
            raise typer.BadParameter(str(err)) from err
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
        Console().print(table)
        coh = result["coherence"]
        Console().print(f"coherence rule: {coh['incoherent']} of {coh['n_compliant']} human-labelled full compliances "
                        f"called incoherent ({coh['rate']:.2%}); learned judges scored leave-one-file-out")
        if out is not None:
            write_json(output_path(out), result)
