"""The base of every configuration model (suites, recipes, training, attribution, patching, experiments).

Why one base: a number such as `lr: .inf` or `--epochs inf` passed every field's own checks and failed hours
later (a diverged training, an OverflowError). Pydantic's `allow_inf_nan=False` here rejects infinity and NaN in
every float field of every config, with the field's name, before any work; a new config inherits it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    """A pydantic model of user settings: numbers must be finite (subclasses add their own model_config keys)."""

    model_config = ConfigDict(allow_inf_nan=False)
