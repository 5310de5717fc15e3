"""The CLI vocabulary: one option name per meaning, shared by every command (listed in docs/cli.md).

Why a module: the same option (`--model`, `--suite`, `--data-dir`, `--out`, `--quiet`, `--set`) used to be
written out again in every command with drifting names and defaults. Options that mirror a pydantic config
field are generated from the field (`config_options`), and `--set key=value` reaches any field of the
command's config, so a new config field needs no new hand-written option. The deprecated spellings of 0.1
(`--eval`, `--no-progress`, `--map`, `--tolerance`, `--train-json`, `--se-train`, `--osm-train`) are gone
(CHANGELOG.md).
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import typer
from pydantic import BaseModel

from safeunits.config import DEFAULT_MODEL, model_class, set_dotted
from safeunits.runtime import set_verbosity

M = TypeVar("M", bound=BaseModel)

MODEL_HELP = "Registered model name (see `safeunits models`), local model folder, or Hugging Face Hub id (org/name)."
SET_HELP = "Any field of the command's config, dotted, value in YAML: --set {example} (repeatable; see docs/cli.md)."


# --- the shared options ----------------------------------------------------------------------------------

def model_option(default: str | None = DEFAULT_MODEL, extra_help: str = "") -> Any:
    """`--model/-m`: what every command that loads a model accepts."""
    return typer.Option(default, "--model", "-m", help=(MODEL_HELP + " " + extra_help).strip())


def out_option(help: str, default: Any = ...) -> Any:
    """`--out/-o`: where every command that writes puts its result."""
    return typer.Option(default, "--out", "-o", help=help)


def suite_option(default: str | None = "quick", extra_help: str = "") -> Any:
    """`--suite/-s`: the evaluation suite of every command that evaluates."""
    return typer.Option(default, "--suite", "-s",
                        help=("Evaluation suite: quick, standard, full, or a suite YAML file. " + extra_help).strip())


def sets_option(example: str) -> Any:
    """`--set key=value` (repeatable) into the command's pydantic config."""
    return typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP.format(example=example))


def unit_map_option(required: bool = True) -> Any:
    return typer.Option(... if required else None, "--unit-map",
                        help="Unit map (unit_map.safetensors or its folder) from `safeunits attribute`.")


def _quiet_callback(value: bool) -> bool:
    if value:
        set_verbosity(logging.WARNING)
    return value


DATA_DIR: Any = typer.Option(None, "--data-dir", help="Offline data folder (default $SAFEUNITS_DATA_DIR).")
QUIET: Any = typer.Option(False, "--quiet", "-q", help="No progress bars and no progress messages.",
                          callback=_quiet_callback)
DTYPE: Any = typer.Option("float32", "--dtype", help="Model weights dtype: float32, bfloat16 or float16.")
DEVICE: Any = typer.Option("cpu", "--device", help="Torch device: cpu, cuda, cuda:1, ...")
LIMIT: Any = typer.Option(None, "--limit", min=1, help="Cut every evaluation set to at most this many items (smoke runs).")
FORCE: Any = typer.Option(False, "--force", help="Write into an --out folder that is not empty and was not made by "
                          "this command (files named like its outputs are replaced; nothing else is touched).")


def _option_type(annotation: Any) -> type:
    """The scalar type a command-line value is parsed as (pydantic validates Literals and ranges afterwards)."""
    if typing.get_origin(annotation) is Literal:
        return str
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _option_type(args[0])
    if annotation in (int, float, str, bool, Path):
        return annotation
    raise TypeError(f"no command-line option type for {annotation!r}: reach this field with --set")


def _field(cls: type[BaseModel], dotted: str):
    for part in dotted.split(".")[:-1]:
        sub = model_class(cls.model_fields[part].annotation)
        assert sub is not None, f"{dotted}: {part} is not a nested config"
        cls = sub
    return cls.model_fields[dotted.split(".")[-1]]


def config_options(cls: type[BaseModel], fields: Sequence[str], *, into: str = "options") -> Callable:
    """Decorator: add one option per (dotted) field of `cls`, named after the field's last part
    (`score.max_length` -> `--max-length`), with the field's description as help. The command receives the
    options given on the command line as one nested dict `into` (omitted ones are absent, so the config's
    default, a YAML or a named best point still decides them). Modelled on mergekit's `add_merge_options`."""

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        names = {f: f.split(".")[-1] for f in fields}
        taken = set(sig.parameters)
        params = [p for p in sig.parameters.values() if p.name != into]
        annotations = {k: v for k, v in typing.get_type_hints(fn).items() if k != into}
        for dotted, name in names.items():
            assert name not in taken, f"{fn.__name__}: option {name} defined twice"
            field = _field(cls, dotted)
            typ = _option_type(field.annotation)
            choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is Literal else ()
            help_text = (field.description or name).rstrip(".")
            if choices:
                help_text += f" ({' | '.join(map(str, choices))})"
            flag = "--" + name.replace("_", "-")
            decls = (f"{flag}/--no-{name.replace('_', '-')}",) if typ is bool else (flag,)
            if not field.is_required() and field.default_factory is None:
                help_text += f" (default: {field.default})"
            option = typer.Option(None, *decls, help=help_text + ".", show_default=False)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=Optional[typ]))
            annotations[name] = Optional[typ]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            given: dict = {}
            for dotted, name in names.items():
                value = kwargs.pop(name)
                if value is not None:
                    set_dotted(given, dotted, value)
            return fn(**kwargs, **{into: given})

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = annotations
        del wrapper.__wrapped__  # typer must see the new signature, not the wrapped one
        return wrapper

    return decorate
