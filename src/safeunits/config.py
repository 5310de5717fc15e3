"""Configuration: the base of every config model, and how a config is built from layers (defaults, YAML, options,
`--set key=value`).

Why one base: a number such as `lr: .inf` or `--epochs inf` passed every field's own checks and failed hours
later (a diverged training, an OverflowError). Pydantic's `allow_inf_nan=False` here rejects infinity and NaN in
every float field of every config, with the field's name, before any work; a new config inherits it.
Why the layering lives here and not in the CLI: experiments (YAML), recipes and the CLI merge and check settings
the same way; library code must not import the command-line modules to do it.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from safeunits.errors import ConfigError
from safeunits.io import load_yaml

M = TypeVar("M", bound=BaseModel)

DEFAULT_MODEL = "smollm2-135m-instruct"  # = safeunits.models.loading.DEFAULT_MODEL (not imported: keeps torch out)


class Config(BaseModel):
    """A pydantic model of user settings: numbers must be finite (subclasses add their own model_config keys)."""

    model_config = ConfigDict(allow_inf_nan=False)


def parse_sets(sets: Sequence[str]) -> dict:
    """`["train.lr=1e-4", "limit=8"]` -> `{"train": {"lr": 1e-4}, "limit": 8}` (values parsed as YAML)."""
    out: dict = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}", hint="e.g. --set train.lr=1e-4")
        try:
            parsed = load_yaml(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {value!r} is not valid YAML ({err})") from err
        set_dotted(out, key.strip(), parsed)
    return out


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is a value, not a group of fields")
        node = child
    node[parts[-1]] = value


def merge(base: Mapping, update: Mapping) -> dict:
    """Deep merge of nested dicts; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def check_keys(cls: type[BaseModel], overrides: Mapping, where: str = "") -> None:
    """Refuse keys that are not fields of `cls` (pydantic would drop them silently, and the run would ignore them)."""
    for key, value in overrides.items():
        field = cls.model_fields.get(key)
        if field is None:
            raise ConfigError(f"{cls.__name__} has no field {where}{key!r}",
                              hint=f"fields{' of ' + where.rstrip('.') if where else ''}: {', '.join(cls.model_fields)}")
        sub = model_class(field.annotation)
        if sub is not None and isinstance(value, Mapping):
            check_keys(sub, value, f"{where}{key}.")


def build_config(cls: type[M], *layers: Mapping, base: BaseModel | Mapping | None = None) -> M:
    """Validate `base` (a config or a dict) updated by each layer in turn (options, then --set), keys checked.

    Nested configs start from their defaults, so `--set se.train.lr=1e-4` changes one key of `se` and keeps the
    rest (its objective, say) instead of replacing the whole default with a partial dict."""
    data: dict = base.model_dump() if isinstance(base, BaseModel) else merge(_nested_defaults(cls), dict(base or {}))
    for layer in layers:
        check_keys(cls, layer)
        data = merge(data, layer)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(err), hint="check the option values (safeunits COMMAND --help)") from err


def _nested_defaults(cls: type[BaseModel]) -> dict:
    """The default values of `cls`'s fields that are configs themselves (e.g. ContinualConfig.se), dumped."""
    out = {}
    for name, field in cls.model_fields.items():
        if not field.is_required():
            value = field.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                out[name] = value.model_dump()
    return out


def validation_message(err: ValidationError) -> str:
    """One line per invalid field: `se.train.lr: Input should be a valid number`."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())


def model_class(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
