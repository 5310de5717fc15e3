"""Role transfer (SSAH Fig. 5): how units change class between two maps of the same architecture.

Typical use: map a model before and after a (benign) fine-tune; SSAH saw over half of the SCU turn
into CU. The 4x4 matrix has rows = class before, columns = class after, counted in units and in
parameters, plus row-normalised shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from safeunits.io import write_json
from safeunits.models.adapters import UNIT_KINDS
from safeunits.units.assignment import CLASSES
from safeunits.units.unit_map import UnitMap


def transition_matrix(before: UnitMap, after: UnitMap) -> dict[str, Any]:
    """Transition counts (units, parameters) and row shares (of parameters) from `before`'s to `after`'s classes."""
    before.check_compatible(after)
    k = len(CLASSES)
    units = torch.zeros(k, k, dtype=torch.int64)
    params = torch.zeros(k, k, dtype=torch.int64)
    for kind in UNIT_KINDS:
        a = before.classes[kind].flatten().long()
        b = after.classes[kind].flatten().long()
        counts = torch.bincount(a * k + b, minlength=k * k).reshape(k, k)
        units += counts
        params += counts * before.unit_params[kind]
    row = params.sum(1, keepdim=True).clamp_min(1)
    return {
        "classes": list(CLASSES),
        "rows": "class before", "columns": "class after",
        "units": units.tolist(),
        "params": params.tolist(),
        "param_share_of_row": (params.double() / row).tolist(),
        "kept_class_share": {c: float(params[i, i]) / float(row[i, 0]) for i, c in enumerate(CLASSES)},
        "before": {"fingerprint": before.fingerprint, "settings": before.settings},
        "after": {"fingerprint": after.fingerprint, "settings": after.settings},
    }


def write_transfer(before: UnitMap, after: UnitMap, out_dir: Path) -> dict[str, Any]:
    """transfer.json and transfer.png (heatmap of row shares) in `out_dir`."""
    from safeunits.units.plots import transfer_heatmap

    result = transition_matrix(before, after)
    out_dir = Path(out_dir)
    write_json(out_dir / "transfer.json", result)
    transfer_heatmap(result, out_dir / "transfer.png")
    return result
