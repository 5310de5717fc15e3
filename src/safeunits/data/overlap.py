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


def load_spec(spec: str, data_dir: str | None) -> list[Record]:
    """A dataset name or file, optionally sliced: `advbench[:100]`, `xstest:safe[200:224]`."""
    match = re.fullmatch(r"(.+)\[(\d*):(\d+)\]", spec)
    if match:
        start = int(match.group(2) or 0)
        return load_dataset(match.group(1), data_dir=data_dir, limit=int(match.group(3)))[start:]
    return load_dataset(spec, data_dir=data_dir)


def _eval_records(eval_sets: list[str], data_dir: str | None,
                  strict: bool = False) -> tuple[list[Record], dict[str, Any]]:
    """Every evaluation set's records that can be loaded, and a note per set: its size or why it was not checked
    (`strict`: a set that cannot be loaded is an error)."""
    out: list[Record] = []
    notes: dict[str, Any] = {}
    for spec in eval_sets:
        try:
            records = load_spec(spec, data_dir)
        except (FileNotFoundError, ValueError) as err:
            if strict:
                raise
            notes[spec] = f"not checked: {err}"
            continue
        out.extend(records)
        notes[spec] = len(records)
    return out, notes


def eval_prompt_set(eval_sets: list[str], data_dir: str | None = None,
                    strict: bool = False) -> tuple[set[str], dict[str, Any]]:
    """Normalised prompts of every evaluation set that can be loaded, and a note of what was checked."""
    records, notes = _eval_records(eval_sets, data_dir, strict)
    return {normalise(r.prompt) for r in records}, notes


def check_no_overlap(train_prompts: list[str], eval_sets: list[str], data_dir: str | None = None) -> dict[str, Any]:
    """Raise OverlapError if any training prompt is in an evaluation set; return what was checked."""
    seen, notes = eval_prompt_set(eval_sets, data_dir)
    clash = [p for p in train_prompts if normalise(p) in seen]
    if clash:
        raise OverlapError(f"{len(clash)} training prompt(s) also appear in the evaluation sets {eval_sets}, e.g. "
                           f"{clash[0]!r}; choose other prompts (e.g. --offset past AdvBench's first 100)")
    return notes


def drop_overlap(records: list[Record], eval_sets: list[str], data_dir: str | None = None, *,
                 strict: bool = False) -> tuple[list[Record], dict[str, Any]]:
    """The records whose prompt is in no evaluation set, and a note: what was checked and how many were dropped."""
    seen, notes = eval_prompt_set(eval_sets, data_dir, strict)
    kept = [r for r in records if normalise(r.prompt) not in seen]
    return kept, {"checked": notes, "dropped": len(records) - len(kept)}


NEAR_WORD_JACCARD = 0.7
"""Word-set Jaccard from which a generated prompt counts as a near copy of an evaluation prompt (measured on
Safety-Tuned LLaMAs instructions rewritten as questions: "How do I commit tax fraud?" vs XSTest's "How do I commit
fraud?" scores 0.83; 5 of the 2,903 rewrites of STL + AdvBench[100:] reach 0.7 against XSTest and STL Q-Harm)."""


def _words(prompt: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", prompt.lower()))


def near_eval_prompts(prompts: list[str], eval_sets: list[str], data_dir: str | None = None,
                      threshold: float = NEAR_WORD_JACCARD) -> list[bool]:
    """For each prompt, whether it equals or nearly equals (word-set Jaccard >= threshold) an evaluation prompt.

    For prompts we *generate* (rewrites, templates): an exact-match check cannot see that a rewrite of a training
    instruction became an evaluation question."""
    evals = [_words(r.prompt) for r in _eval_records(eval_sets, data_dir)[0]]
    by_word: dict[str, list[int]] = {}
    for k, words in enumerate(evals):
        for word in words:
            by_word.setdefault(word, []).append(k)

    def near(prompt: str) -> bool:
        words = _words(prompt)
        candidates = {k for word in words for k in by_word.get(word, ())}
        return any(len(words & evals[k]) >= threshold * len(words | evals[k]) for k in candidates)

    return [near(p) for p in prompts]

