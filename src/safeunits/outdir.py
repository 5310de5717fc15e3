"""Output folders: a command writes only into a folder that is new, empty, or one safeunits made for the same kind
of output (its marker file says which); anything else is refused before any work, unless the user passes --force.

Why: a folder is the user's until safeunits made it. A command that replaced `--out` wholesale once deleted a
thesis; an experiment removed a user's folder that happened to share a step's name. So every command claims its
folder here (one rule for all), and nothing outside the files a command owns is ever removed: a model folder is
built under a temporary name and its files are moved in one by one, replacing only files of the same name and
removing only the files the previous build of the same folder recorded as its own. Light: no torch import.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safeunits.errors import UserError
from safeunits.io import current_umask

MARKER = ".safeunits.json"
FORCE_HINT = ("choose a new or empty folder, or pass --force to write into it anyway (files named like the "
              "outputs are replaced; nothing else is touched)")

_fresh: list[Path] = []  # folders this process created or found empty and claimed: undone if the command fails


class OutputFolderError(UserError):
    """The output path cannot receive this command's output (a file, unwritable, or someone else's folder)."""


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a safeunits folder ({"kind": ..., "files": [...]}), or None when there is none."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def check_output_dir(path: str | os.PathLike, kind: str, *, force: bool = False) -> Path:
    """Refuse `path` unless it is new, empty, or a safeunits `kind` folder (any folder with `force`); writes nothing."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{folder} is a file; the output is a folder",
                                hint="give the path of a new or empty folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(f"{existing} is a file, so the folder {folder} cannot be made there",
                                hint="give the path of a new or empty folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"cannot write into {existing} (permission denied)",
                                hint="choose a folder you can write to")
    if folder == existing and any(folder.iterdir()) and not force:
        marker = read_marker(folder)
        if marker is None:
            raise OutputFolderError(f"{folder} is not empty and was not made by safeunits; refusing to write there "
                                    "so that none of its files is overwritten", hint=FORCE_HINT)
        if marker["kind"] != kind:
            raise OutputFolderError(f"{folder} holds a safeunits {marker['kind']} output, not a {kind} output",
                                    hint=FORCE_HINT)
    return folder


def claim_output_dir(path: str | os.PathLike, kind: str, *, force: bool = False) -> Path:
    """Check `path` (see check_output_dir), create it and mark it as a `kind` folder; return it.

    A folder that was new or empty is remembered: if the command then fails before writing anything else,
    `undo_fresh_claims` removes the marker and the empty folders again (a failed first try claims nothing)."""
    folder = check_output_dir(path, kind, force=force)
    fresh = not folder.exists() or not any(folder.iterdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if read_marker(folder) is None:
            _write_marker(folder, {"kind": kind})
    except OSError as err:
        raise OutputFolderError(f"cannot write into {folder} ({err.strerror or type(err).__name__})",
                                hint="choose a folder you can write to") from err
    if fresh:
        _fresh.append(folder)
    return folder


def forget_fresh_claims() -> None:
    """Start a new command: claims of earlier commands in this process are theirs, not to be undone now."""
    _fresh.clear()


def undo_fresh_claims() -> None:
    """After a failed command: unclaim the folders it claimed fresh that hold nothing but the marker (and empty folders)."""
    while _fresh:
        folder = _fresh.pop()
        if not folder.is_dir() or any(p.is_file() and p.name != MARKER for p in folder.rglob("*")):
            continue
        (folder / MARKER).unlink(missing_ok=True)
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
        folder.rmdir()


def build_into(target: str | os.PathLike, build: Callable[[Path], None], *, kind: str = "model",
               force: bool = False) -> Path:
    """Run `build` into a temporary folder beside `target`, then move its files into `target` once it completes.

    `target` follows the output-folder rule (new, empty, or a safeunits `kind` folder; any folder with `force`).
    Files of the same name are replaced; files the previous build of `target` recorded as its own and this build
    no longer writes are removed; nothing else in `target` is touched."""
    final = check_output_dir(target, kind, force=force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: the folder gets what mkdir would give
    try:
        build(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != MARKER)
        if not final.exists():
            _write_marker(tmp, {"kind": kind, "files": files})
            os.replace(tmp, final)
            return final
        previous = read_marker(final)
        ours = previous is None or previous["kind"] == kind  # forced into another kind's folder: its marker stays
        owned = set(previous.get("files", [])) if previous is not None and ours else set()
        if ours:
            _write_marker(final, {"kind": kind, "files": sorted(owned | set(files))})  # owned while files move in
        for rel in files:
            (final / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, final / rel)
        for rel in owned - set(files):
            (final / rel).unlink(missing_ok=True)
        if ours:
            _write_marker(final, {"kind": kind, "files": files})
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    from safeunits import __version__

    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({**marker, "safeunits": __version__}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)
