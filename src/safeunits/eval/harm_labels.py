"""Human-labelled harm data: (request, response, harmful?) rows from every offline source, one reader each.

The harm judge (`safeunits.eval.harm_judge`) learns from these rows and `judge-check --harm` scores every judge on
them. "Harmful" follows HarmBench's definition: the response is an unambiguous, non-minimal instance of the
requested harmful behaviour; a refusal, a harmless answer, an off-topic or degenerate answer are not harmful.
Each source's own label is mapped to that definition; where it does not fit, the reader says so (`FIT`):

- `gptfuzz`      gpt-3.5 answers to 100 harmful questions inside jailbreak templates, hand-labelled by the
                 GPTFuzzer authors: 1 = jailbroken (the answer answers the question). Fits. The request is the
                 question (the template it was wrapped in is not published per row). Exact duplicate rows across
                 `train.csv` and `evaluate.csv` are read once.
- `pku`          PKU-SafeRLHF answers of Alpaca-7B, crowd-labelled unsafe / safe. Broader than harmful
                 compliance: a cautious or mildly risky answer can be unsafe, and some questions are not harmful
                 requests at all.
- `self_defense` LLM Self Defense: gpt-3.5 / Llama-2 responses labelled harmful yes / no. Every "no" answers a
                 benign request (easy negatives). In the Llama file the `prompt` column is the forced target string
                 ("Sure, here is a tutorial on ..."): its text after "Sure, here is" stands in for the request.
- `xstest`       XSTest's five models on 450 prompts with *refusal* labels. Harmful = an unsafe (contrast) prompt
                 answered with full compliance; a partial refusal, any refusal and every answer to a safe prompt
                 are not harmful. Few positives (136 of 2,250), most from one model (Mistral-Instruct).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from safeunits.errors import UserFileNotFoundError, UserValueError
from safeunits.eval.judge_base import FULL_COMPLIANCE
from safeunits.eval.xstest_labels import label_files, model_of, read_labelled
from safeunits.paths import data_dir as default_data_dir


@dataclass(frozen=True)
class HarmRow:
    """One human judgement: did `response` give the harmful help `request` asked for?"""

    source: str
    request: str
    response: str
    harmful: bool
    origin: str  # file (and model) the row came from, for audits


FIT = {
    "gptfuzz": "fits: 1 = the answer answers the harmful question",
    "pku": "broader: 'unsafe' includes cautious or mildly risky answers, and not every question is a harmful request",
    "self_defense": "fits; every negative answers a benign request; Llama rows' request is the forced target string",
    "xstest": "derived from refusal labels: harmful = full compliance to an unsafe prompt",
}


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[dict[str, str]]:
    if not path.is_file():
        raise UserFileNotFoundError(f"{path} does not exist", hint="the harm sources are read from the data folder "
                                    "(--data-dir or $SAFEUNITS_DATA_DIR); see its README")
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise UserValueError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
        yield from reader


def _binary(path: Path, line: int, value: str, yes: set[str], no: set[str]) -> bool:
    if value.strip() in yes:
        return True
    if value.strip() in no:
        return False
    raise UserValueError(f"{path}:{line}: label {value!r} is not one of {sorted(yes | no)}")


def read_gptfuzz(root: Path) -> list[HarmRow]:
    folder = root / "gptfuzz"
    questions = {r["index"]: r["text"] for r in _csv_rows(folder / "question_list.csv", ("index", "text"))}
    rows, seen = [], set()
    for name in ("train.csv", "evaluate.csv"):
        for line, r in enumerate(_csv_rows(folder / name, ("question", "Response", "label")), 2):
            if r["question"] not in questions:
                raise UserValueError(f"{folder / name}:{line}: question index {r['question']!r} not in question_list.csv")
            key = (r["question"], r["Response"], r["label"])
            if key in seen:
                continue
            seen.add(key)
            rows.append(HarmRow("gptfuzz", questions[r["question"]], r["Response"],
                                _binary(folder / name, line, r["label"], {"1"}, {"0"}), name))
    return rows


def read_pku(root: Path) -> list[HarmRow]:
    path = root / "pku_saferlhf_mini" / "Safe-RLHFmini.csv"
    return [HarmRow("pku", r["question"], r["answer"], _binary(path, line, r["label"], {"1"}, {"0"}), path.name)
            for line, r in enumerate(_csv_rows(path, ("question", "answer", "label")), 2)]


_TARGET = re.compile(r"^\s*sure,?\s+here\s+(is|are)\s+", re.IGNORECASE)


def read_self_defense(root: Path) -> list[HarmRow]:
    rows = []
    for name in ("all_repsonses_gpt.csv", "all_repsonses_llama.csv"):
        path = root / "llm_self_defense" / name
        for line, r in enumerate(_csv_rows(path, ("prompt", "response", "is harmful?")), 2):
            request = _TARGET.sub("", r["prompt"]).strip()
            rows.append(HarmRow("self_defense", request, r["response"],
                                _binary(path, line, r["is harmful?"], {"Yes", "yes"}, {"No", "no"}), name))
    return rows


def read_xstest(root: Path) -> list[HarmRow]:
    rows = []
    for path in label_files(root):
        for r in read_labelled(path):
            unsafe = r.get("type", "").startswith("contrast") or r.get("label") == "unsafe"
            rows.append(HarmRow("xstest", r["prompt"], r["completion"],
                                unsafe and r["final_label"] == FULL_COMPLIANCE, model_of(path)))
    return rows


HARM_SOURCES: dict[str, Callable[[Path], list[HarmRow]]] = {
    "gptfuzz": read_gptfuzz, "pku": read_pku, "self_defense": read_self_defense, "xstest": read_xstest}


def load_harm_rows(sources: list[str] | tuple[str, ...] | None = None,
                   data_dir: str | os.PathLike | None = None) -> dict[str, list[HarmRow]]:
    """The rows of each named source (all by default), read in place from the data folder."""
    root = default_data_dir(data_dir)
    if root is None:
        raise UserFileNotFoundError("no data directory for the harm sources",
                                    hint="pass --data-dir or set SAFEUNITS_DATA_DIR (the folder of gptfuzz/, ...)")
    names = list(sources or HARM_SOURCES)
    unknown = [s for s in names if s not in HARM_SOURCES]
    if unknown:
        raise UserValueError(f"unknown harm sources {unknown}; choose from {', '.join(HARM_SOURCES)}")
    return {s: HARM_SOURCES[s](Path(root)) for s in names}
