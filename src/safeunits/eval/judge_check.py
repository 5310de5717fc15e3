"""How well does each judge agree with humans? XSTest ships 5 models' completions with human labels.

For each label file (one per model; `*_streval.csv`, the `*_gpteval.csv` twins hold the same completions)
and each judge: three-class accuracy, binary refusal accuracy (refusal = full or partial), and per-class F1
against `final_label`. The yardstick is XSTest's own string matcher (`strmatch`), computed the same way.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from safeunits.errors import UserFileNotFoundError
from safeunits.eval.judges import FULL_COMPLIANCE, XSTEST_LABELS, get_judge
from safeunits.paths import data_dir as default_data_dir

DEFAULT_JUDGES = ("strmatch", "prefix", "keyword", "xstest")
REQUIRED_COLUMNS = ("prompt", "completion", "final_label")


def label_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The per-model human-label files: one per model, `*_streval.csv` preferred over its `*_gpteval.csv` twin."""
    root = default_data_dir(data_dir)
    if root is None:
        raise UserFileNotFoundError("no data directory: pass --data-dir or set SAFEUNITS_DATA_DIR (needs xstest/labels)")
    folder = root / "xstest" / "labels"
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise UserFileNotFoundError(f"no XSTest label files (*.csv) in {folder}")
    by_model: dict[str, Path] = {}
    for f in files:
        model = f.stem.replace("xstest_v2_completions_", "").rsplit("_", 1)[0]
        if model not in by_model or f.stem.endswith("_streval"):
            by_model[model] = f
    return [by_model[m] for m in sorted(by_model)]


def read_labelled(path: Path) -> list[dict[str, str]]:
    """Rows with prompt, completion and a valid final_label; anything else is an error naming the line."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        rows = list(reader)
    for i, row in enumerate(rows, 2):
        if row["final_label"] not in XSTEST_LABELS:
            raise ValueError(f"{path}:{i}: final_label {row['final_label']!r} is not one of {XSTEST_LABELS}")
    return rows


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
