"""The unit map artifact: safety and utility scores and the class (RU/SCU/UCU/CU) of every unit.

Stored as two files side by side: ``<path>`` (safetensors: ``mlp.safety``, ``mlp.utility``,
``mlp.class`` of shape [layers, channels], the same for ``head.*`` [layers, heads]) and
``<path>.json`` next to it (``unit_map.json`` for ``unit_map.safetensors``): the summary
(per-class parameter shares, per-layer counts), the inputs and settings, and the model hash.
Every later step (freezing, pruning, transfer) takes the map as input and refuses a model of a
different architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from safeunits.errors import UserValueError
from safeunits.io import load_safetensors, read_json, save_safetensors, write_json
from safeunits.models.loading import architecture_signature

# class codes stored in the map; order is also the display order
CLASSES: tuple[str, ...] = ("SCU", "UCU", "CU", "RU")
CLASS_CODE: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
KINDS: tuple[str, ...] = ("mlp", "head")
FORMAT_VERSION = 1


def architecture_hash(model: PreTrainedModel) -> str:
    """Hash of model type and parameter shapes: what must match for a map to apply to a model."""
    return hashlib.blake2b(json.dumps(architecture_signature(model), sort_keys=True).encode(), digest_size=16).hexdigest()


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
    arch_hash: str
    fingerprint: str = ""
    geometry: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    # --- views ---------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.classes["mlp"].shape[0])

    def zscores(self, which: str) -> dict[str, torch.Tensor]:
        """Per-layer z-scores (population std) of the safety or utility scores, per kind."""
        from safeunits.units.classes import layer_zscores

        source = self.safety if which == "safety" else self.utility
        return {kind: layer_zscores(source[kind]) for kind in KINDS}

    def class_mask(self, name: str) -> dict[str, torch.Tensor]:
        if name not in CLASS_CODE:
            raise ValueError(f"unknown unit class {name!r}; choose from {', '.join(CLASSES)}")
        return {kind: self.classes[kind] == CLASS_CODE[name] for kind in KINDS}

    def total_params(self) -> int:
        return sum(self.classes[k].numel() * self.unit_params[k] for k in KINDS)

    def summary(self) -> dict[str, Any]:
        """Per-class unit counts and parameter shares, overall and per layer."""
        total = self.total_params()
        classes: dict[str, Any] = {}
        for name in CLASSES:
            mask = self.class_mask(name)
            params = sum(int(mask[k].sum()) * self.unit_params[k] for k in KINDS)
            classes[name] = {
                "mlp_channels": int(mask["mlp"].sum()),
                "heads": int(mask["head"].sum()),
                "params": params,
                "param_share": params / total if total else 0.0,
            }
        per_layer = []
        for layer in range(self.n_layers):
            row: dict[str, Any] = {"layer": layer}
            layer_total = sum(self.classes[k].shape[1] * self.unit_params[k] for k in KINDS)
            for name in CLASSES:
                code = CLASS_CODE[name]
                m = int((self.classes["mlp"][layer] == code).sum())
                h = int((self.classes["head"][layer] == code).sum())
                row[name] = {"mlp_channels": m, "heads": h,
                             "param_share": (m * self.unit_params["mlp"] + h * self.unit_params["head"]) / layer_total}
            per_layer.append(row)
        return {"unit_params_total": total, "classes": classes, "per_layer": per_layer}

    # --- compatibility -------------------------------------------------------------------
    def check_model(self, model: PreTrainedModel) -> None:
        """Refuse a model whose architecture (type and parameter shapes) differs from the mapped one."""
        if model.config.model_type != self.model_type or architecture_hash(model) != self.arch_hash:
            raise UserValueError(
                f"this unit map was computed for a {self.model_type!r} model with architecture hash {self.arch_hash}; "
                f"the given model is {model.config.model_type!r} with hash {architecture_hash(model)}"
            )

    def check_compatible(self, other: "UnitMap") -> None:
        if self.arch_hash != other.arch_hash:
            raise UserValueError(f"unit maps of different architectures ({self.model_type} {self.arch_hash} vs "
                             f"{other.model_type} {other.arch_hash})")

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (safetensors) and its JSON summary beside it, both atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        tensors: dict[str, torch.Tensor] = {}
        for kind in KINDS:
            tensors[f"{kind}.safety"] = self.safety[kind].double()
            tensors[f"{kind}.utility"] = self.utility[kind].double()
            tensors[f"{kind}.class"] = self.classes[kind].to(torch.int8)
        meta = {
            "format": "safeunits.unit_map", "version": str(FORMAT_VERSION), "model_type": self.model_type,
            "arch_hash": self.arch_hash, "fingerprint": self.fingerprint,
            "unit_params": json.dumps(self.unit_params), "classes": json.dumps(list(CLASSES)),
        }
        save_safetensors(path, tensors, meta)
        write_json(summary_path(path), {
            "format": "safeunits.unit_map", "version": FORMAT_VERSION, "tensors": path.name,
            "model_type": self.model_type, "arch_hash": self.arch_hash, "fingerprint": self.fingerprint,
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
        missing = [f"{k}.{t}" for k in KINDS for t in ("safety", "utility", "class") if f"{k}.{t}" not in tensors]
        if missing:
            raise ValueError(f"{path}: unit map is missing tensors {missing}")
        return cls(
            safety={k: tensors[f"{k}.safety"] for k in KINDS},
            utility={k: tensors[f"{k}.utility"] for k in KINDS},
            classes={k: tensors[f"{k}.class"] for k in KINDS},
            unit_params={k: int(v) for k, v in info["unit_params"].items()},
            model_type=info["model_type"], arch_hash=info["arch_hash"], fingerprint=info.get("fingerprint", ""),
            geometry=info.get("geometry", {}), settings=info.get("settings", {}),
        )
