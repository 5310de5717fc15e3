"""Training data must never contain evaluation prompts: the one overlap check every data builder uses.

Prompts are compared normalised (case, end punctuation, runs of whitespace). An evaluation set is a dataset name,
a file, or `name[:N]` (the first N rows, e.g. AdvBench's first 100 that the suites evaluate).
"""

from __future__ import annotations

import re
from typing import Any

from safeunits.data.records import Record
from safeunits.data.registry import load_dataset
from safeunits.errors import UserValueError


class OverlapError(UserValueError):
    """Training prompts also appear in an evaluation set: the evaluation would be contaminated."""


def normalise(prompt: str) -> str:
    """Compare prompts ignoring case, punctuation at the ends and runs of whitespace."""
    return re.sub(r"\s+", " ", prompt.strip().lower()).strip(" .?!")


def _load_spec(spec: str, data_dir: str | None) -> list[Record]:
    match = re.fullmatch(r"(.+)\[:(\d+)\]", spec)
    if match:
        return load_dataset(match.group(1), data_dir=data_dir, limit=int(match.group(2)))
    return load_dataset(spec, data_dir=data_dir)


def eval_prompt_set(eval_sets: list[str], data_dir: str | None = None) -> tuple[set[str], dict[str, Any]]:
    """Normalised prompts of every evaluation set that can be loaded, and a note of what was checked."""
    seen: set[str] = set()
    notes: dict[str, Any] = {}
    for spec in eval_sets:
        try:
            records = _load_spec(spec, data_dir)
        except (FileNotFoundError, ValueError) as err:
            notes[spec] = f"not checked: {err}"
            continue
        seen.update(normalise(r.prompt) for r in records)
        notes[spec] = len(records)
    return seen, notes


def check_no_overlap(train_prompts: list[str], eval_sets: list[str], data_dir: str | None = None) -> dict[str, Any]:
    """Raise OverlapError if any training prompt is in an evaluation set; return what was checked."""
    seen, notes = eval_prompt_set(eval_sets, data_dir)
    clash = [p for p in train_prompts if normalise(p) in seen]
    if clash:
        raise OverlapError(f"{len(clash)} training prompt(s) also appear in the evaluation sets {eval_sets}, e.g. "
                           f"{clash[0]!r}; choose other prompts (e.g. --offset past AdvBench's first 100)")
    return notes


def drop_overlap(records: list[Record], eval_sets: list[str], data_dir: str | None = None
                 ) -> tuple[list[Record], dict[str, Any]]:
    """The records whose prompt is in no evaluation set, and a note: what was checked and how many were dropped."""
    seen, notes = eval_prompt_set(eval_sets, data_dir)
    kept = [r for r in records if normalise(r.prompt) not in seen]
    return kept, {"checked": notes, "dropped": len(records) - len(kept)}
