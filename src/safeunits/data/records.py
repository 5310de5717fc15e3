"""The one record type every dataset is read into."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Record:
    """A prompt, optionally with a reference response, a label (e.g. `safe`/`unsafe`) and a category."""

    prompt: str
    response: str | None = None
    label: str | None = None
    category: str | None = None
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)
