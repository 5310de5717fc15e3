"""LoRA training through `peft`: the low-rank way an attacker (or a user) fine-tunes, merged back into plain weights.

Why here and not in the engine: the engine trains whatever parameters require a gradient, so a PEFT-wrapped model
trains its adapters alone. What this module adds is the round trip (wrap, train, merge and unload, so every later
step sees an ordinary model folder) and frozen units under LoRA: the merged low-rank update touches whole
matrices, so entries a defence freezes are put back bit for bit after the merge (a projection of the update;
docs/attack.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from pydantic import Field
from transformers import PreTrainedModel

from safeunits.config import Config

T = TypeVar("T")


class LoraSettings(Config):
    """The adapter: rank, scale, dropout and which linear layers get one (peft's LoraConfig fields)."""

    r: int = Field(8, ge=1, description="rank of each adapter")
    alpha: int = Field(16, ge=1, description="scale numerator (update = alpha / r * B A)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | str = Field("all-linear", description="module names, or 'all-linear' (every linear "
                                                                      "layer but the output head)")


def train_lora(model: PreTrainedModel, settings: LoraSettings, fit: Callable[[PreTrainedModel], T],
               frozen: dict[str, torch.Tensor] | None = None) -> T:
    """Wrap `model` in LoRA adapters, run `fit(wrapped)` (which trains what requires a gradient: the adapters), merge
    the adapters into `model`'s weights in place and drop them; entries `frozen` marks (True = keep) get their
    values from before training back. Returns what `fit` returned."""
    from peft import LoraConfig, get_peft_model

    keep = {name: p.detach()[frozen[name]].clone() for name, p in model.named_parameters()
            if frozen is not None and name in frozen}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}  # peft switches them off
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, bias="none", task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, config)
    try:
        result = fit(wrapped)
    finally:
        merged = wrapped.merge_and_unload()
    if merged is not model:  # peft merges into the same modules; a copy would leave `model` untouched
        raise RuntimeError("peft returned a new model object from merge_and_unload")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in keep:
                p[frozen[name]] = keep[name]
            p.requires_grad_(grads[name])
    return result
