"""The zero-shot accuracy tasks' evaluation splits, read in place from `<data dir>/zero_shot/`.

Each loader turns one task's local files into documents with the fields of the Hugging Face dataset that
lm-evaluation-harness's own task config reads (`boolq` from `super_glue`, `rte` from `glue`, `allenai/ai2_arc`,
...), so lm-eval's prompt (`doc_to_text`), choices and metrics apply unchanged (safeunits.eval.zero_shot).
Where a local copy lost information, the document carries what is left; docs/eval.md lists these differences:
HellaSwag's `ctx_b` is not split from `ctx_a` (so lm-eval's capitalisation of `ctx_b` cannot apply) and 11
ARC-Easy items of llm-foundry's copy have 4 choices where upstream has 3 or 5.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeunits.errors import UserFileNotFoundError, UserValueError
from safeunits.paths import data_dir as default_data_dir

Doc = dict[str, Any]
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ZeroShotTask:
    """One task (named as lm-eval names it): its local files under `zero_shot/`, its size and its reader."""

    name: str
    files: tuple[str, ...]
    rows: int  # documents in the split (data README)
    read: Callable[[list[Path]], list[Doc]]
    description: str


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _joined(docs: list[dict], labels: list[str], path: Path) -> list[tuple[dict, str]]:
    if len(docs) != len(labels):
        raise UserValueError(f"{path}: {len(labels)} labels for {len(docs)} items")
    return list(zip(docs, labels))


def _boolq(paths: list[Path]) -> list[Doc]:
    return [{"question": d["question"], "passage": d["passage"], "idx": i, "label": int(bool(d["answer"]))}
            for i, d in enumerate(_jsonl(paths[0]))]


RTE_LABELS = {"entailment": 0, "not_entailment": 1}  # GLUE's label ids (lm-eval `rte` reads nyu-mll/glue)


def _rte(paths: list[Path]) -> list[Doc]:
    return [{"sentence1": d["premise"], "sentence2": d["hypothesis"], "label": RTE_LABELS[d["label"]], "idx": d["idx"]}
            for d in _jsonl(paths[0])]


def _hellaswag(paths: list[Path]) -> list[Doc]:
    """llama.cpp's text form, 6 lines an item: `activity_label: context`, gold index, 4 endings."""
    with bz2.open(paths[0], mode="rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserValueError(f"{paths[0]}: {len(lines)} lines, not 6 an item")
    docs = []
    for i in range(0, len(lines), 6):
        label, _, ctx = lines[i].partition(": ")
        docs.append({"ind": i // 6, "activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "endings": lines[i + 2:i + 6], "label": str(int(lines[i + 1]))})
    return docs


def _winogrande(paths: list[Path]) -> list[Doc]:
    rows = _joined(_jsonl(paths[0]), _labels(paths[1]), paths[1])
    for d, label in rows:
        if d.get("answer") not in (None, label):
            raise UserValueError(f"{paths[1]}: label {label} disagrees with {d['qID']}'s answer {d['answer']}")
    return [{"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": label}
            for d, label in rows]


def _arc_jsonl(paths: list[Path]) -> list[Doc]:
    """ARC's own JSONL (`question.stem`, `question.choices`, `answerKey`); extra per-choice fields ignored."""
    return [{"id": d["id"], "question": d["question"]["stem"],
             "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                         "label": [c["label"] for c in d["question"]["choices"]]},
             "answerKey": d["answerKey"]} for d in _jsonl(paths[0])]


def _arc_foundry(paths: list[Path]) -> list[Doc]:
    """llm-foundry's ARC-Easy (`query: "Question: ..."`, `choices`, `gold`): letters as in ARC."""
    docs = []
    for i, d in enumerate(_jsonl(paths[0])):
        question = d["query"].removeprefix("Question:").strip()
        docs.append({"id": str(i), "question": question,
                     "choices": {"text": list(d["choices"]), "label": list(LETTERS[:len(d["choices"])])},
                     "answerKey": LETTERS[int(d["gold"])]})
    return docs


def _openbookqa(paths: list[Path]) -> list[Doc]:
    return [{"id": d["id"], "question_stem": d["question"]["stem"],
             "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                         "label": [c["label"] for c in d["question"]["choices"]]},
             "answerKey": d["answerKey"]} for d in _jsonl(paths[0])]


def _piqa(paths: list[Path]) -> list[Doc]:
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(label)}
            for d, label in _joined(_jsonl(paths[0]), _labels(paths[1]), paths[1])]


def _mmlu(paths: list[Path]) -> list[Doc]:
    """The 57 subjects' test CSVs (no header: question, A, B, C, D, answer letter), subjects in name order."""
    docs = []
    with zipfile.ZipFile(paths[0]) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("data/test/") and n.endswith("_test.csv"))
        for name in names:
            subject = Path(name).name.removesuffix("_test.csv")
            with zf.open(name) as raw:
                for row in csv.reader(io.TextIOWrapper(raw, encoding="utf-8")):
                    docs.append({"question": row[0], "subject": subject, "choices": row[1:5],
                                 "answer": LETTERS.index(row[5].strip())})
    return docs


TASKS: dict[str, ZeroShotTask] = {t.name: t for t in (
    ZeroShotTask("boolq", ("boolq/dev.jsonl",), 3270, _boolq, "BoolQ validation (yes/no reading)"),
    ZeroShotTask("rte", ("rte/val.jsonl",), 277, _rte, "RTE validation (entailment, True/False)"),
    ZeroShotTask("hellaswag", ("hellaswag/hellaswag_val_full.txt.bz2",), 10042, _hellaswag,
                 "HellaSwag validation (4 endings; llama.cpp's reformatted copy)"),
    ZeroShotTask("winogrande", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), 1267,
                 _winogrande, "WinoGrande v1.1 dev (xl), partial scoring"),
    ZeroShotTask("arc_easy", ("arc_easy/arc_easy.jsonl",), 2376, _arc_foundry,
                 "ARC-Easy test (llm-foundry's copy)"),
    ZeroShotTask("arc_challenge", ("arc_challenge/ARC-Challenge-Test_qapredictions_dgem_default.jsonl",),
                 1172, _arc_jsonl, "ARC-Challenge test"),
    ZeroShotTask("openbookqa", ("openbookqa/test.jsonl",), 500, _openbookqa, "OpenBookQA main test"),
    ZeroShotTask("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), 1838, _piqa, "PIQA validation"),
    ZeroShotTask("mmlu", ("mmlu/mmlu.zip",), 14042, _mmlu, "MMLU test, 57 subjects as one task (A-D letters)"),
)}


def zero_shot_task(name: str) -> ZeroShotTask:
    if name not in TASKS:
        raise UserValueError(f"unknown zero-shot task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def local_files(name: str, data_dir: str | os.PathLike | None = None) -> list[Path] | None:
    """The task's files under `<data dir>/zero_shot/`, or None when the data folder lacks any of them."""
    task = zero_shot_task(name)
    root = default_data_dir(data_dir)
    if root is None:
        return None
    paths = [root / "zero_shot" / f for f in task.files]
    return paths if all(p.is_file() for p in paths) else None


def load_zero_shot_docs(name: str, data_dir: str | os.PathLike | None = None) -> list[Doc]:
    """Every document of the task's local split, in file order, checked against the split's known size."""
    task = zero_shot_task(name)
    paths = local_files(name, data_dir)
    if paths is None:
        raise UserFileNotFoundError(f"zero-shot task {name}: no local copy (needs {', '.join(task.files)} under "
                                    f"<data dir>/zero_shot/)", hint="set --data-dir / SAFEUNITS_DATA_DIR, or go online "
                                    "to let lm-eval read the task from the Hugging Face Hub")
    docs = task.read(paths)
    if len(docs) != task.rows:
        raise UserValueError(f"zero-shot task {name}: {len(docs)} documents in {paths[0]}, expected {task.rows}")
    return docs
