"""What a finished step hands on: typed, saved in its `done.json`, read by later steps and by the report.

Paths are relative to the step's folder. The fixed keys (`model`, `unit_map`, `harmful_data`, `patch`, `best`) are what
later steps consume; `evals` (row label -> evaluation folder), `figures`, `tables` (Document files, rendered into
the report from their data) and `notes` (lines of text) are what the report shows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from safeunits.document import DOCUMENT_SUFFIX, Figure

OutputKey = Literal["model", "unit_map", "harmful_data", "patch", "best"]


class StepOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # a model folder (align, finetune, attack, apply)
    unit_map: str | None = None  # unit_map.json (attribute)
    harmful_data: str | None = None  # a D_h folder (harmful-data)
    patch: str | None = None  # a patch folder (derive, merge)
    best: str | None = None  # best.json (sweep)
    evals: dict[str, str] = {}
    figures: list[Figure] = []
    tables: list[str] = []  # `<stem>.doc.json` files (safeunits.document.Document)
    notes: list[str] = []

    @field_validator("tables")
    @classmethod
    def _documents(cls, tables: list[str]) -> list[str]:
        for name in tables:
            if not name.endswith(DOCUMENT_SUFFIX):
                raise ValueError(f"a step table is a Document file (*{DOCUMENT_SUFFIX}), not {name!r}")
        return tables

    def path(self, key: OutputKey) -> str:
        """The output `key`, which this step must have produced."""
        value = getattr(self, key)
        if value is None:
            raise KeyError(f"the step produced no {key}")
        return value
