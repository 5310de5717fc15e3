"""The four unit classes of SSAH (SPEC §2.2): redundant, safety-critical, utility-critical, complex.

Scores are z-scored per layer (separately for MLP channels and heads, so the two kinds and all
layers share one scale), then every unit of the model is ranked globally:

- RU  = the units with the lowest S + U, until a fraction ``r`` of the unit parameters;
- SCU = of the rest, the highest S - U, until a fraction ``s``;
- UCU = of the rest, the lowest S - U, until a fraction ``u``;
- CU  = everything else.

Fractions are of the **unit parameters** (all parameters that belong to some MLP channel or
attention head; embeddings, norms, output biases and shared K/V rows belong to none), counted per
unit (a head owns more parameters than a channel). A class takes the prefix of its ranking whose
size is closest to the target, so achieved shares are within one unit's size of the request.

Everything here is a pure function of score tensors and per-unit parameter counts (no model, no
files): ``units.classes.build_unit_map`` feeds it from a model and packages the result.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from safeunits.models.adapters import UNIT_KINDS
from safeunits.schema import Config

# class codes stored in unit maps; the order is also the display order
CLASSES: tuple[str, ...] = ("SCU", "UCU", "CU", "RU")
CLASS_CODE: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}


class ClassifyConfig(Config):
    """Fractions (of unit parameters) given to each class; CU gets the remainder."""

    r: float = Field(0.15, ge=0, le=1, description="redundant units (RU): lowest safety + utility z-score")
    s: float = Field(0.015, ge=0, le=1, description="safety-critical units (SCU): highest safety - utility z-score")
    u: float = Field(0.10, ge=0, le=1, description="utility-critical units (UCU): lowest safety - utility z-score")

    @model_validator(mode="after")
    def _fits(self) -> "ClassifyConfig":
        if self.r + self.s + self.u > 1:
            raise ValueError(f"r + s + u = {self.r + self.s + self.u} exceeds 1")
        return self


def layer_zscores(scores: torch.Tensor) -> torch.Tensor:
    """z-score each row (layer) of a [layers, units] score array; a constant row gives zeros."""
    x = scores.double()
    if not torch.isfinite(x).all():
        raise ValueError("scores contain NaN or inf; cannot classify units")
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(std > 0, (x - mean) / std.clamp_min(1e-300), torch.zeros_like(x))


def _take(order: torch.Tensor, sizes: torch.Tensor, available: torch.Tensor, target: float) -> torch.Tensor:
    """Indices from `order` (skipping unavailable ones) whose cumulative size is closest to `target`."""
    order = order[available[order]]
    if target <= 0 or order.numel() == 0:
        return order[:0]
    cum = sizes[order].cumsum(0)
    mid = cum - sizes[order] / 2  # include a unit when at least half of it fits
    k = int((mid <= target).sum())
    return order[:k]


def classify(
    safety: dict[str, torch.Tensor],
    utility: dict[str, torch.Tensor],
    unit_params: dict[str, int],
    config: ClassifyConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Class code (see CLASSES) of every unit, per kind, from raw safety and utility scores ([layers, units] each)."""
    config = config or ClassifyConfig()
    flat_s, flat_u, sizes, shapes = [], [], [], {}
    for kind in UNIT_KINDS:
        if safety[kind].shape != utility[kind].shape:
            raise ValueError(f"{kind}: safety and utility scores differ in shape")
        shapes[kind] = safety[kind].shape
        flat_s.append(layer_zscores(safety[kind]).flatten())
        flat_u.append(layer_zscores(utility[kind]).flatten())
        sizes.append(torch.full((safety[kind].numel(),), float(unit_params[kind]), dtype=torch.float64))
    s, u, size = torch.cat(flat_s), torch.cat(flat_u), torch.cat(sizes)
    total = float(size.sum())
    n = s.numel()
    code = torch.full((n,), CLASS_CODE["CU"], dtype=torch.int8)
    free = torch.ones(n, dtype=torch.bool)
    # stable sorts: ties keep unit order, so classification is deterministic
    for name, key, descending, frac in (
        ("RU", s + u, False, config.r),
        ("SCU", s - u, True, config.s),
        ("UCU", s - u, False, config.u),
    ):
        order = torch.sort(key, descending=descending, stable=True).indices
        chosen = _take(order, size, free, frac * total)
        code[chosen] = CLASS_CODE[name]
        free[chosen] = False
    out, start = {}, 0
    for kind in UNIT_KINDS:
        count = int(torch.tensor(shapes[kind]).prod())
        out[kind] = code[start:start + count].reshape(shapes[kind])
        start += count
    return out

