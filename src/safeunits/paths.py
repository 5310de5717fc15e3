"""Where safeunits keeps caches and looks for offline datasets."""

from __future__ import annotations

import os
from pathlib import Path

from safeunits.errors import UserFileNotFoundError


def cache_dir() -> Path:
    """The cache for converted models and built artifacts (`$SAFEUNITS_CACHE`, default `~/.cache/safeunits`)."""
    root = Path(os.environ.get("SAFEUNITS_CACHE", Path.home() / ".cache" / "safeunits")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The offline data folder: an explicit `--data-dir`, else `$SAFEUNITS_DATA_DIR`, else none."""
    value = explicit if explicit is not None else os.environ.get("SAFEUNITS_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserFileNotFoundError(f"data directory {path} does not exist (from --data-dir or SAFEUNITS_DATA_DIR)")
    return path
