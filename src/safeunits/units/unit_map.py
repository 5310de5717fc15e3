"""The unit map artifact: safety and utility scores and the class (RU/SCU/UCU/CU) of every unit.

Stored as two files side by side: ``<path>`` (safetensors: ``mlp.safety``, ``mlp.utility``,
``mlp.class`` of shape [layers, channels], the same for ``head.*`` [layers, heads]) and
``<path>.json`` next to it (``unit_map.json`` for ``unit_map.safetensors``): the summary
(per-class parameter shares, per-layer counts), the inputs and settings, and the model's
architecture signature (``models.signature``). Every later step (freezing, pruning, transfer) takes
the map as input and refuses a model of a different architecture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from safeunits.errors import UserValueError
from safeunits.io import load_safetensors, read_json, save_safetensors, write_json
from safeunits.models.adapters import UNIT_KINDS
from safeunits.models.signature import check_fits
from safeunits.units.assignment import CLASS_CODE, CLASSES, layer_zscores

__all__ = ["CLASSES", "CLASS_CODE", "FORMAT_VERSION", "UnitMap", "summary_path"]

# 2: "signature" (models.signature, with the head layout); version 1 stored "arch_hash" (model type and shapes only)
FORMAT_VERSION = 2


def summary_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


@dataclass
class UnitMap:
    """Per-unit scores and classes of one model; tensors are [layers, units] per kind ("mlp", "head")."""

    safety: dict[str, torch.Tensor]  # kind -> float64 [L, n] raw safety scores
    utility: dict[str, torch.Tensor]  # kind -> float64 [L, n] raw utility scores
    classes: dict[str, torch.Tensor]  # kind -> int8 [L, n] codes into CLASSES
    unit_params: dict[str, int]  # kind -> parameters owned by one unit
    model_type: str
    signature: str  # models.signature.architecture_signature of the mapped model
    fingerprint: str = ""
    geometry: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    # --- views ---------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.classes["mlp"].shape[0])

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """[layers, units] per kind."""
        return {kind: (int(self.classes[kind].shape[0]), int(self.classes[kind].shape[1])) for kind in UNIT_KINDS}

    def zscores(self, which: str) -> dict[str, torch.Tensor]:
        """Per-layer z-scores (population std) of the safety or utility scores, per kind."""
        source = self.safety if which == "safety" else self.utility
        return {kind: layer_zscores(source[kind]) for kind in UNIT_KINDS}

    def class_mask(self, name: str) -> dict[str, torch.Tensor]:
        if name not in CLASS_CODE:
            raise ValueError(f"unknown unit class {name!r}; choose from {', '.join(CLASSES)}")
        return {kind: self.classes[kind] == CLASS_CODE[name] for kind in UNIT_KINDS}

    def total_params(self) -> int:
        return sum(self.classes[k].numel() * self.unit_params[k] for k in UNIT_KINDS)

    def summary(self) -> dict[str, Any]:
        """Per-class unit counts and parameter shares, overall and per layer."""
        total = self.total_params()
        classes: dict[str, Any] = {}
        for name in CLASSES:
            mask = self.class_mask(name)
            params = sum(int(mask[k].sum()) * self.unit_params[k] for k in UNIT_KINDS)
            classes[name] = {
                "mlp_channels": int(mask["mlp"].sum()),
                "heads": int(mask["head"].sum()),
                "params": params,
                "param_share": params / total if total else 0.0,
            }
        per_layer = []
        for layer in range(self.n_layers):
            row: dict[str, Any] = {"layer": layer}
            layer_total = sum(self.classes[k].shape[1] * self.unit_params[k] for k in UNIT_KINDS)
            for name in CLASSES:
                code = CLASS_CODE[name]
                m = int((self.classes["mlp"][layer] == code).sum())
                h = int((self.classes["head"][layer] == code).sum())
                row[name] = {"mlp_channels": m, "heads": h,
                             "param_share": (m * self.unit_params["mlp"] + h * self.unit_params["head"]) / layer_total}
            per_layer.append(row)
        return {"unit_params_total": total, "classes": classes, "per_layer": per_layer}

    # --- compatibility -------------------------------------------------------------------
    def made_for(self) -> str:
        """The mapped model in words, for error messages."""
        g = self.geometry
        known = {"n_layers", "n_heads", "n_channels"} <= g.keys()
        shape = f" ({g['n_layers']} layers, {g['n_heads']} heads, {g['n_channels']} MLP channels)" if known else ""
        return f"a {self.model_type!r} model{shape}"

    def check_model(self, model: PreTrainedModel) -> None:
        """Refuse a model whose architecture (type, heads, parameter shapes) differs from the mapped one."""
        check_fits(self.signature, model, what="unit map", made_for=self.made_for())

    def check_compatible(self, other: "UnitMap") -> None:
        """Refuse to compare maps of two different architectures."""
        check_fits(self.signature, other.signature, what="unit map", made_for=self.made_for(),
                   on=f"the other unit map ({other.made_for()})")

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (safetensors) and its JSON summary beside it, both atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        tensors: dict[str, torch.Tensor] = {}
        for kind in UNIT_KINDS:
            tensors[f"{kind}.safety"] = self.safety[kind].double()
            tensors[f"{kind}.utility"] = self.utility[kind].double()
            tensors[f"{kind}.class"] = self.classes[kind].to(torch.int8)
        meta = {
            "format": "safeunits.unit_map", "version": str(FORMAT_VERSION), "model_type": self.model_type,
            "signature": self.signature, "fingerprint": self.fingerprint,
            "unit_params": json.dumps(self.unit_params), "classes": json.dumps(list(CLASSES)),
        }
        save_safetensors(path, tensors, meta)
        write_json(summary_path(path), {
            "format": "safeunits.unit_map", "version": FORMAT_VERSION, "tensors": path.name,
            "model_type": self.model_type, "signature": self.signature, "fingerprint": self.fingerprint,
            "geometry": self.geometry, "unit_params": self.unit_params, "settings": self.settings,
            "summary": self.summary(),
        })
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UnitMap":
        """Read a map written by :meth:`save` (the JSON summary must sit beside the tensors)."""
        path = Path(path)
        if path.is_dir():
            path = path / "unit_map.safetensors"
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        tensors = load_safetensors(path)
        info = read_json(summary_path(path))
        if info.get("format") != "safeunits.unit_map":
            raise UserValueError(f"{path} is not a safeunits unit map")
        signature = info.get("signature", info.get("arch_hash"))  # version 1's "arch_hash": check_fits accepts it
        if not signature:
            raise UserValueError(f"{summary_path(path)} names no architecture signature; recompute the unit map")
        missing = [f"{k}.{t}" for k in UNIT_KINDS for t in ("safety", "utility", "class") if f"{k}.{t}" not in tensors]
        if missing:
            raise ValueError(f"{path}: unit map is missing tensors {missing}")
        return cls(
            safety={k: tensors[f"{k}.safety"] for k in UNIT_KINDS},
            utility={k: tensors[f"{k}.utility"] for k in UNIT_KINDS},
            classes={k: tensors[f"{k}.class"] for k in UNIT_KINDS},
            unit_params={k: int(v) for k, v in info["unit_params"].items()},
            model_type=info["model_type"], signature=signature, fingerprint=info.get("fingerprint", ""),
            geometry=info.get("geometry", {}), settings=info.get("settings", {}),
        )
