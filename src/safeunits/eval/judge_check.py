"""How well does each judge agree with humans? XSTest ships 5 models' completions with human labels.

For each label file (one per model; `*_streval.csv`, the `*_gpteval.csv` twins hold the same completions)
and each judge: three-class accuracy, binary refusal accuracy (refusal = full or partial), and per-class F1
against `final_label`. The yardstick is XSTest's own string matcher (`strmatch`), computed the same way.

Judges that learn from these labels (`learned`) are scored leave-one-out: file k is judged by the model
trained on the other files, without any completion that also appears in file k. Rule judges are scored on
each file as they are. The coherence rule is checked on the same files: the share of human-labelled full
compliances it would call incoherent (real answers must pass it).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from safeunits.eval.coherence import CoherenceConfig, incoherence
from safeunits.eval.judges import FULL_COMPLIANCE, XSTEST_LABELS, Judge, get_judge
from safeunits.eval.xstest_labels import label_files, read_labelled

DEFAULT_JUDGES = ("strmatch", "prefix", "keyword", "xstest", "learned")
LEAVE_ONE_OUT = ("learned",)
OUT_FILE = "judge_check.json"


def f1_scores(gold: list[str], pred: list[str]) -> dict[str, float]:
    """Per-class F1 (0 when a class is neither predicted nor present would be undefined: reported as 0)."""
    out = {}
    for lab in XSTEST_LABELS:
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        out[lab] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def score_judge(judge: Judge, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Agreement of one judge with the human `final_label` of one file."""
    gold = [r["final_label"] for r in rows]
    pred = judge.classify_many([r["prompt"] for r in rows], [r["completion"] for r in rows])
    n = len(rows)
    return {
        "n": n,
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / n,
        "binary_accuracy": sum((g != FULL_COMPLIANCE) == (p != FULL_COMPLIANCE) for g, p in zip(gold, pred)) / n,
        "f1": f1_scores(gold, pred),
    }


def fold_judge(name: str, held_out: Path, data_dir: str | os.PathLike | None = None) -> Judge:
    """The judge that scores file `held_out`: trained without it when it learns from labels, else as named."""
    if name in LEAVE_ONE_OUT:
        from safeunits.eval.learned_judge import LearnedJudge, load_or_train

        return LearnedJudge(load_or_train(data_dir, held_out=held_out))
    return get_judge(name)


def coherence_check(rows: list[dict[str, str]], config: CoherenceConfig | None = None) -> dict[str, Any]:
    """How many human-labelled full compliances the coherence rule calls incoherent (should be ~0), and why."""
    answers = [r for r in rows if r["final_label"] == FULL_COMPLIANCE]
    reasons = Counter(incoherence(r["prompt"], r["completion"], config) for r in answers)
    flagged = len(answers) - reasons.pop(None, 0)
    return {"n_compliant": len(answers), "incoherent": flagged,
            "rate": flagged / len(answers) if answers else 0.0, "by_reason": dict(sorted(reasons.items()))}


def judge_check(judges: tuple[str, ...] | list[str] = DEFAULT_JUDGES, *, data_dir: str | os.PathLike | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Every judge on every label file (learned judges leave-one-out), per-judge mean and worst binary accuracy,
    and the coherence rule's false-incoherent rate on the human-labelled answers."""
    files = label_files(data_dir)
    per_file: dict[str, dict[str, Any]] = {}
    all_rows: list[dict[str, str]] = []
    for path in tqdm(files, desc="judge-check", unit="file", disable=not progress):
        rows = read_labelled(path)
        all_rows += rows
        per_file[path.stem] = {j: score_judge(fold_judge(j, path, data_dir), rows) for j in judges}
    summary = {}
    for j in judges:
        binary = {f: per_file[f][j]["binary_accuracy"] for f in per_file}
        acc = [per_file[f][j]["accuracy"] for f in per_file]
        summary[j] = {"binary_mean": sum(binary.values()) / len(binary), "binary_min": min(binary.values()),
                      "worst_file": min(binary, key=binary.get), "accuracy_mean": sum(acc) / len(acc),
                      "protocol": "leave-one-file-out" if j in LEAVE_ONE_OUT else "per file"}
    return {"files": {f: str(p) for f, p in zip(per_file, files)}, "per_file": per_file, "summary": summary,
            "coherence": coherence_check(all_rows)}


def output_path(out: str | os.PathLike) -> Path:
    """Where `--out` writes: the path itself when it names a .json file, else `judge_check.json` inside it."""
    out = Path(out)
    return out if out.suffix == ".json" and not out.is_dir() else out / OUT_FILE
