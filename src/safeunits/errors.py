"""Errors a user causes and can fix (a wrong name, a missing or malformed file, a bad option value).

Why one base: the CLI prints any `UserError` as one short message plus what to do, exit status 2, with no
traceback; every other exception is a bug and keeps its traceback. The subclasses also derive from the
builtin exception they replace (FileNotFoundError, ValueError, ...) so callers catching those still work.
Light on purpose: no torch or transformers import.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; `hint` says what to do about it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file, folder or named thing (suite, recipe, dataset) the user asked for does not exist."""


class UserValueError(UserError, ValueError):
    """A value the user gave (a row, a name, an option) is not acceptable."""


class ModelNotFoundError(UserFileNotFoundError):
    """The model is neither a registered name, a local model folder, nor a reachable Hugging Face Hub id."""


class ConfigError(UserValueError):
    """A configuration built from options, `--set key=value` or YAML is invalid."""


class UnsupportedArchitectureError(UserError, NotImplementedError):
    """The model's architecture has no unit adapter (MLP channels / attention heads are unknown)."""


class PathIsDirectoryError(UserError, IsADirectoryError):
    """A file was to be written where a folder already exists."""


class CorruptFileError(UserValueError):
    """A file the user gave is damaged (truncated download, interrupted copy): it cannot be parsed."""
