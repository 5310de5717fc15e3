"""The four unit classes of a model (SPEC §2.2): from two score passes to a :class:`UnitMap`.

The assignment itself (z-scores, ranking, parameter-share budgets) is pure and lives in
``units.assignment``; this module is the entry that takes it to a model: it reads the unit geometry
from the model's adapter and its architecture signature, and packages scores and classes as a map.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from safeunits.models.adapters import UNIT_KINDS, get_adapter
from safeunits.models.signature import architecture_signature, model_fingerprint
from safeunits.units.assignment import ClassifyConfig, classify, layer_zscores
from safeunits.units.scores import UnitScores
from safeunits.units.unit_map import UnitMap

__all__ = ["ClassifyConfig", "build_unit_map", "classify", "layer_zscores"]  # the pure parts stay importable here


def build_unit_map(
    model: PreTrainedModel,
    safety: UnitScores,
    utility: UnitScores,
    config: ClassifyConfig | None = None,
    *,
    settings: dict[str, Any] | None = None,
    fingerprint: bool = True,
) -> UnitMap:
    """Classify units from a safety and a utility score pass and package the result as a UnitMap."""
    config = config or ClassifyConfig()
    if safety.method != utility.method:
        raise ValueError(f"safety scores ({safety.method}) and utility scores ({utility.method}) use different methods")
    adapter = get_adapter(model)
    unit_params = {kind: adapter.unit_params(kind) for kind in UNIT_KINDS}
    classes = classify(safety.scores, utility.scores, unit_params, config)
    info = {
        "score_method": safety.method,
        "fractions": config.model_dump(),
        "safety_data": {"n_examples": safety.n_examples, "n_tokens": safety.n_tokens, **safety.extra},
        "utility_data": {"n_examples": utility.n_examples, "n_tokens": utility.n_tokens, **utility.extra},
        **(settings or {}),
    }
    return UnitMap(
        safety={k: v.double() for k, v in safety.scores.items()},
        utility={k: v.double() for k, v in utility.scores.items()},
        classes=classes, unit_params=unit_params, model_type=adapter.model_type,
        signature=architecture_signature(model), fingerprint=model_fingerprint(model) if fingerprint else "",
        geometry=adapter.describe(), settings=info,
    )
