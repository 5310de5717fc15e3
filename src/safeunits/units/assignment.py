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

`class_thresholds` / `classify_by_thresholds` express a classification as cut-offs on the z-score keys, so a
second map's scores can be classed by the first map's rule and class shares can move (role transfer).

Everything here is a pure function of score tensors and per-unit parameter counts (no model, no
files): ``units.classes.build_unit_map`` feeds it from a model and packages the result.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field, model_validator

from safeunits.config import Config
from safeunits.models.adapters import UNIT_KINDS

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


def _flat_zscores(safety: dict[str, torch.Tensor],
                  utility: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Size]]:
    """Per-layer safety and utility z-scores of every unit, flattened kind after kind, and each kind's shape."""
    flat_s, flat_u, shapes = [], [], {}
    for kind in UNIT_KINDS:
        if safety[kind].shape != utility[kind].shape:
            raise ValueError(f"{kind}: safety and utility scores differ in shape")
        shapes[kind] = safety[kind].shape
        flat_s.append(layer_zscores(safety[kind]).flatten())
        flat_u.append(layer_zscores(utility[kind]).flatten())
    return torch.cat(flat_s), torch.cat(flat_u), shapes


def _unflatten(code: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for kind in UNIT_KINDS:
        count = int(torch.tensor(shapes[kind]).prod())
        out[kind] = code[start:start + count].reshape(shapes[kind])
        start += count
    return out


def classify(
    safety: dict[str, torch.Tensor],
    utility: dict[str, torch.Tensor],
    unit_params: dict[str, int],
    config: ClassifyConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Class code (see CLASSES) of every unit, per kind, from raw safety and utility scores ([layers, units] each)."""
    config = config or ClassifyConfig()
    s, u, shapes = _flat_zscores(safety, utility)
    size = torch.cat([torch.full((safety[kind].numel(),), float(unit_params[kind]), dtype=torch.float64)
                      for kind in UNIT_KINDS])
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
    return _unflatten(code, shapes)


# --- the same rule as fixed thresholds, so that class shares can move between two maps -------------------------


class ClassThresholds(BaseModel):  # not config.Config: an empty class has an infinite cut-off
    """A classification as cut-offs on the z-score keys: RU = S + U <= ru_max; of the rest, SCU = S - U >= scu_min;
    of the rest, UCU = S - U <= ucu_max; CU = everything else. An empty class has an infinite cut-off."""

    ru_max: float
    scu_min: float
    ucu_max: float


def class_thresholds(safety: dict[str, torch.Tensor], utility: dict[str, torch.Tensor],
                     classes: dict[str, torch.Tensor]) -> ClassThresholds:
    """The cut-offs a fraction-sized classification (`classify`) drew on these scores.

    `classify_by_thresholds` with them gives the same classes back (up to units tied exactly at a cut-off); applied
    to another model's scores, they let class shares move: a fine-tune that lowers many units' safety z-score below
    the old SCU cut-off shrinks SCU, which `classify`'s fixed fractions cannot show (SSAH Fig. 5, issue 24)."""
    s, u, _ = _flat_zscores(safety, utility)
    code = torch.cat([classes[kind].flatten() for kind in UNIT_KINDS]).long()

    def cut(key: torch.Tensor, name: str, largest: bool) -> float:
        chosen = key[code == CLASS_CODE[name]]
        if chosen.numel() == 0:
            return float("-inf") if largest else float("inf")
        return float(chosen.max() if largest else chosen.min())

    return ClassThresholds(ru_max=cut(s + u, "RU", True), scu_min=cut(s - u, "SCU", False),
                           ucu_max=cut(s - u, "UCU", True))


def classify_by_thresholds(safety: dict[str, torch.Tensor], utility: dict[str, torch.Tensor],
                           thresholds: ClassThresholds) -> dict[str, torch.Tensor]:
    """Class code of every unit under fixed cut-offs on the per-layer z-score keys (shares follow the scores)."""
    s, u, shapes = _flat_zscores(safety, utility)
    code = torch.full((s.numel(),), CLASS_CODE["CU"], dtype=torch.int8)
    ru = (s + u) <= thresholds.ru_max
    scu = ~ru & ((s - u) >= thresholds.scu_min)
    ucu = ~ru & ~scu & ((s - u) <= thresholds.ucu_max)
    code[ru], code[scu], code[ucu] = CLASS_CODE["RU"], CLASS_CODE["SCU"], CLASS_CODE["UCU"]
    return _unflatten(code, shapes)

