"""Read local .jsonl / .json / .csv / .txt files into rows, reporting malformed rows with file and line."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safeunits.errors import UserFileNotFoundError, UserValueError

SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


class MalformedRowError(UserValueError):
    """A row that cannot be read; the message names the file and line."""


Row = tuple[int, Any]  # (line number or list index, parsed row)


def read_rows(path: Path) -> Iterator[Row]:
    """Yield `(line, row)` for each row of a data file; `row` is a dict (or a str for .txt)."""
    if not path.is_file():
        raise UserFileNotFoundError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path)
    elif suffix == ".json":
        yield from _json(path)
    elif suffix == ".csv":
        yield from _csv(path)
    elif suffix == ".txt":
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    yield i, line.rstrip("\n")
    else:
        raise UserValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as err:
                raise MalformedRowError(f"{path}:{i}: not valid JSON ({err.msg})") from err


def _json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MalformedRowError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
    if isinstance(data, dict):  # {"instructions": [...], "inputs": [...]} and similar column-wise layouts
        lists = {k: v for k, v in data.items() if isinstance(v, list) and v}
        if not lists:
            raise MalformedRowError(f"{path}: a JSON object with no non-empty list to read rows from")
        n = max(len(v) for v in lists.values())
        cols = {k: v for k, v in lists.items() if len(v) == n}
        data = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    if not isinstance(data, list):
        raise MalformedRowError(f"{path}: expected a JSON list of rows or an object of columns")
    yield from enumerate(data, 1)


def _csv(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            return
        for row in reader:
            if None in row:  # more fields than the header
                raise MalformedRowError(f"{path}:{reader.line_num}: more fields than the header has")
            yield reader.line_num, row
