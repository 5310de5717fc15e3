"""XSTest's human-labelled completions (5 models x 450 prompts): the ground truth judges are trained and scored on.

Each model's completions come in two files with the same rows (`*_streval.csv`, `*_gpteval.csv`); one per model
is used, so a completion never counts twice.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from safeunits.eval.judge_base import XSTEST_LABELS
from safeunits.paths import data_dir as default_data_dir

REQUIRED_COLUMNS = ("prompt", "completion", "final_label")
_PREFIX = "xstest_v2_completions_"


def model_of(path: Path) -> str:
    """The model a label file holds completions of (`xstest_v2_completions_gpt4_streval.csv` -> `gpt4`)."""
    return path.stem.replace(_PREFIX, "").rsplit("_", 1)[0]


def label_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The per-model human-label files: one per model, `*_streval.csv` preferred over its `*_gpteval.csv` twin."""
    root = default_data_dir(data_dir)
    if root is None:
        raise FileNotFoundError("no data directory: pass --data-dir or set SAFEUNITS_DATA_DIR (needs xstest/labels)")
    folder = root / "xstest" / "labels"
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no XSTest label files (*.csv) in {folder}")
    by_model: dict[str, Path] = {}
    for f in files:
        if model_of(f) not in by_model or f.stem.endswith("_streval"):
            by_model[model_of(f)] = f
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


def completion_key(text: str) -> str:
    """Identity of a completion across files: case and whitespace do not make a new one."""
    return " ".join(text.lower().split())
