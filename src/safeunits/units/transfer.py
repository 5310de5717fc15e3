"""Role transfer (SSAH Fig. 5): how units change class between two maps of the same architecture.

Typical use: map a model before and after a (benign) fine-tune; SSAH saw over half of the SCU turn
into CU, and the classes' shares move (its Fig. 5: RU 14.85 % -> 7.44 %, CU 70.57 % -> 78.60 %, as quoted in
issue 24). A map's classes are sized by fixed fractions (`assignment.classify`), so two maps' own classes always
have the same shares; by default (`after_classes="thresholds"`) the after-model's units are therefore classed by
the *before* map's rule -- its cut-offs on the per-layer z-score keys, `assignment.class_thresholds` -- applied
to the after-scores, and shares can move. `after_classes="fractions"` compares the two maps' stored classes
(the only mode before issue 24). The 4x4 matrix has rows = class before, columns = class after, counted in units
and in parameters, plus row-normalised shares and each class's share of the unit parameters before and after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from safeunits.io import write_json
from safeunits.models.adapters import UNIT_KINDS
from safeunits.units.assignment import CLASSES, class_thresholds, classify_by_thresholds
from safeunits.units.unit_map import UnitMap

AfterClasses = Literal["thresholds", "fractions"]


class ClassShares(BaseModel):
    """Each class's share of the unit parameters before and after, and the change (after - before)."""

    before: dict[str, float]
    after: dict[str, float]
    change: dict[str, float]


class MapIdentity(BaseModel):
    """Which map a side of the comparison is: its fingerprint and the settings it was attributed with."""

    fingerprint: str
    settings: dict[str, Any]


class TransferResult(BaseModel):
    """transfer.json: the class transition matrix (rows = class before, columns = class after) in units and in
    parameters, its row-normalised parameter shares, the share of each class that kept it, and the class shares."""

    classes: list[str]
    rows: str = "class before"
    columns: str = "class after"
    after_classes: AfterClasses
    units: list[list[int]]
    params: list[list[int]]
    param_share_of_row: list[list[float]]
    kept_class_share: dict[str, float] = Field(description="share of each class's parameters that kept their class")
    class_share: ClassShares
    before: MapIdentity
    after: MapIdentity


def after_classes_of(before: UnitMap, after: UnitMap, mode: AfterClasses = "thresholds") -> dict[str, torch.Tensor]:
    """The after-model's class codes: under the before map's cut-offs (`thresholds`) or as its map stored them."""
    if mode == "fractions":
        return after.classes
    if mode != "thresholds":
        raise ValueError(f"unknown after_classes {mode!r}; use 'thresholds' or 'fractions'")
    rule = class_thresholds(before.safety, before.utility, before.classes)
    return classify_by_thresholds(after.safety, after.utility, rule)


def transition_matrix(before: UnitMap, after: UnitMap, after_classes: AfterClasses = "thresholds") -> TransferResult:
    """Transition counts (units, parameters), row shares (of parameters) and class shares before -> after."""
    before.check_compatible(after)
    classes_after = after_classes_of(before, after, after_classes)
    k = len(CLASSES)
    units = torch.zeros(k, k, dtype=torch.int64)
    params = torch.zeros(k, k, dtype=torch.int64)
    for kind in UNIT_KINDS:
        a = before.classes[kind].flatten().long()
        b = classes_after[kind].flatten().long()
        counts = torch.bincount(a * k + b, minlength=k * k).reshape(k, k)
        units += counts
        params += counts * before.unit_params[kind]
    row = params.sum(1, keepdim=True).clamp_min(1)
    total = float(params.sum())
    share_before = {c: float(params[i].sum()) / total for i, c in enumerate(CLASSES)}
    share_after = {c: float(params[:, i].sum()) / total for i, c in enumerate(CLASSES)}
    return TransferResult(
        classes=list(CLASSES), after_classes=after_classes, units=units.tolist(), params=params.tolist(),
        param_share_of_row=(params.double() / row).tolist(),
        kept_class_share={c: float(params[i, i]) / float(row[i, 0]) for i, c in enumerate(CLASSES)},
        class_share=ClassShares(before=share_before, after=share_after,
                                change={c: share_after[c] - share_before[c] for c in CLASSES}),
        before=MapIdentity(fingerprint=before.fingerprint, settings=before.settings),
        after=MapIdentity(fingerprint=after.fingerprint, settings=after.settings))


def write_transfer(before: UnitMap, after: UnitMap, out_dir: Path,
                   after_classes: AfterClasses = "thresholds") -> TransferResult:
    """transfer.json and transfer.png (heatmap of row shares) in `out_dir`."""
    from safeunits.units.plots import transfer_heatmap

    result = transition_matrix(before, after, after_classes)
    out_dir = Path(out_dir)
    data = result.model_dump(mode="json")
    write_json(out_dir / "transfer.json", data)
    transfer_heatmap(data, out_dir / "transfer.png")
    return result


def share_changes(result: TransferResult) -> str:
    """One line: each class's share of the unit parameters before -> after (what moved)."""
    shares = result.class_share
    return ", ".join(f"{c} {100 * shares.before[c]:.1f} % -> {100 * shares.after[c]:.1f} %" for c in result.classes)
