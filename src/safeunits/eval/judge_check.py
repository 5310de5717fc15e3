"""How well does each judge agree with humans? XSTest ships 5 models' completions with human labels.

For each label file (one per model; `*_streval.csv`, the `*_gpteval.csv` twins hold the same completions)
and each judge: three-class accuracy, binary refusal accuracy (refusal = full or partial), and per-class F1
against `final_label`. The yardstick is XSTest's own string matcher (`strmatch`), computed the same way.
"""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

from safeunits.eval.judges import FULL_COMPLIANCE, XSTEST_LABELS, get_judge
from safeunits.eval.xstest_labels import label_files, read_labelled

DEFAULT_JUDGES = ("strmatch", "prefix", "keyword", "xstest")


def f1_scores(gold: list[str], pred: list[str]) -> dict[str, float]:
    """Per-class F1 (0 when a class is neither predicted nor present would be undefined: reported as 0)."""
    out = {}
    for lab in XSTEST_LABELS:
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        out[lab] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def score_judge(judge_name: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Agreement of one judge with the human `final_label` of one file."""
    judge = get_judge(judge_name)
    gold = [r["final_label"] for r in rows]
    pred = judge.classify_many([r["prompt"] for r in rows], [r["completion"] for r in rows])
    n = len(rows)
    return {
        "n": n,
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / n,
        "binary_accuracy": sum((g != FULL_COMPLIANCE) == (p != FULL_COMPLIANCE) for g, p in zip(gold, pred)) / n,
        "f1": f1_scores(gold, pred),
    }


def judge_check(judges: tuple[str, ...] | list[str] = DEFAULT_JUDGES, *, data_dir: str | os.PathLike | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Every judge on every label file, plus per-judge mean and worst binary accuracy."""
    files = label_files(data_dir)
    per_file: dict[str, dict[str, Any]] = {}
    for path in tqdm(files, desc="judge-check", unit="file", disable=not progress):
        rows = read_labelled(path)
        per_file[path.stem] = {j: score_judge(j, rows) for j in judges}
    summary = {}
    for j in judges:
        binary = [per_file[f][j]["binary_accuracy"] for f in per_file]
        acc = [per_file[f][j]["accuracy"] for f in per_file]
        summary[j] = {"binary_mean": sum(binary) / len(binary), "binary_min": min(binary),
                      "accuracy_mean": sum(acc) / len(acc)}
    return {"files": {f: str(p) for f, p in zip(per_file, files)}, "per_file": per_file, "summary": summary}
