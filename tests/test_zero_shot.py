"""Zero-shot task accuracy: the local splits, lm-eval's prompts on them, and the scorer against direct log-likelihoods."""

from __future__ import annotations

import re

import pytest
import torch

from safeunits.data.zero_shot import TASKS, load_zero_shot_docs


def readme_rows(data_dir) -> dict[str, int]:
    """First file of each `zero_shot/` row of the data README -> its first row count."""
    rows = {}
    for line in (data_dir / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `zero_shot/([^`]+)`.*?\|.*?\| ([\d,]+)", line)
        if m:
            rows[m.group(1)] = int(m.group(2).replace(",", ""))
    return rows


def test_every_local_split_has_the_readme_row_count(data_dir):
    rows = readme_rows(data_dir)
    assert {t.files[0] for t in TASKS.values()} == set(rows)  # every zero_shot file of the README has a loader
    for name, task in TASKS.items():
        docs = load_zero_shot_docs(name, data_dir)
        assert len(docs) == rows[task.files[0]] == task.rows, name


def test_local_documents_carry_the_hub_fields(data_dir):
    """Spot checks against the files: gold answers map to the fields lm-eval's configs read."""
    arc = load_zero_shot_docs("arc_easy", data_dir)
    assert arc[0]["question"].startswith("Which statement best explains") and arc[0]["answerKey"] == "A"
    assert all(d["answerKey"] in d["choices"]["label"] for d in arc)
    challenge = load_zero_shot_docs("arc_challenge", data_dir)
    assert {len(d["choices"]["text"]) for d in challenge} >= {4}
    assert all(d["answerKey"] in d["choices"]["label"] for d in challenge)
    hs = load_zero_shot_docs("hellaswag", data_dir)
    assert hs[0]["activity_label"] == "Roof shingle removal" and len(hs[0]["endings"]) == 4 and hs[0]["label"] == "3"
    rte = load_zero_shot_docs("rte", data_dir)
    assert rte[0]["label"] == 1 and rte[1]["label"] == 0  # not_entailment, entailment (GLUE ids)
    wino = load_zero_shot_docs("winogrande", data_dir)
    assert wino[0]["answer"] == "2" and "_" in wino[0]["sentence"]
    mmlu = load_zero_shot_docs("mmlu", data_dir)
    assert len({d["subject"] for d in mmlu}) == 57 and {d["answer"] for d in mmlu} == {0, 1, 2, 3}
