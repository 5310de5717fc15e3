"""Unit selections and the weight masks they cover: the bridge from a unit map to training and pruning.

``select_units(unit_map, "scu+cu:top0.06")`` names units by class (``scu``, ``ucu``, ``cu``, ``ru``,
``all``), joined with ``+``; ``:topF`` keeps only the fraction F (of that class's parameters) with
the highest safety z-score (SSAH's "SCU + top 6 % of CU"); ``ru:utility`` is RU classed by utility alone
(SSAH's alignment budget in a pretrained model, Fig. 6). ``unit_parameter_masks(model, selection)``
turns a selection into boolean masks over the model's weights (True = the weight belongs to a
selected unit), which the training engine uses to freeze or to train only those units and pruning
uses to zero them.
"""

from __future__ import annotations

import re

import torch
from pydantic import Field
from transformers import PreTrainedModel

from safeunits.config import Config
from safeunits.errors import UserValueError
from safeunits.models.adapters import UNIT_KINDS, SharedKV, UnitKind, get_adapter
from safeunits.units.unit_map import UnitMap


class UnitSelection(Config):
    """Explicit units: layer -> MLP channel indices, layer -> head indices."""

    mlp: dict[int, list[int]] = Field(default_factory=dict, description="layer -> selected MLP channels")
    heads: dict[int, list[int]] = Field(default_factory=dict, description="layer -> selected attention heads")

    def of_kind(self, kind: UnitKind) -> dict[int, list[int]]:
        return self.mlp if kind == "mlp" else self.heads

    def counts(self) -> dict[str, int]:
        return {"mlp_channels": sum(len(v) for v in self.mlp.values()), "heads": sum(len(v) for v in self.heads.values())}

    def n_params(self, unit_params: dict[str, int]) -> int:
        c = self.counts()
        return c["mlp_channels"] * unit_params["mlp"] + c["heads"] * unit_params["head"]

    def union(self, other: "UnitSelection") -> "UnitSelection":
        def merge(a: dict[int, list[int]], b: dict[int, list[int]]) -> dict[int, list[int]]:
            return {l: sorted(set(a.get(l, [])) | set(b.get(l, []))) for l in sorted(set(a) | set(b))}

        return UnitSelection(mlp=merge(self.mlp, other.mlp), heads=merge(self.heads, other.heads))

    def to_masks(self, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Dense [layers, units] boolean arrays per kind."""
        out = {}
        for kind in UNIT_KINDS:
            m = torch.zeros(shapes[kind], dtype=torch.bool)
            for layer, idx in self.of_kind(kind).items():
                m[layer, idx] = True
            out[kind] = m
        return out

    @classmethod
    def from_masks(cls, masks: dict[str, torch.Tensor]) -> "UnitSelection":
        def to_dict(m: torch.Tensor) -> dict[int, list[int]]:
            return {l: torch.nonzero(m[l]).flatten().tolist() for l in range(m.shape[0]) if bool(m[l].any())}

        return cls(mlp=to_dict(masks["mlp"]), heads=to_dict(masks["head"]))


_TERM = re.compile(r"^(scu|ucu|cu|ru|all)(:utility)?(?::top(\d*\.?\d+))?$")


def select_units(unit_map: UnitMap, spec: str) -> UnitSelection:
    """Units named by `spec`, e.g. "scu", "ru", "scu+cu", "scu+cu:top0.06" (top 6 % of CU by safety z-score),
    "ru:utility" (the map's share r of unit parameters with the lowest utility z-score, safety ignored: SSAH's
    redundant units of a pretrained model, its Fig. 6)."""
    terms = [t.strip().lower() for t in spec.split("+") if t.strip()]
    if not terms:
        raise ValueError("empty unit selection spec")
    z = unit_map.zscores("safety")
    shapes = unit_map.shapes
    total = {k: torch.zeros(shapes[k], dtype=torch.bool) for k in UNIT_KINDS}
    for term in terms:
        match = _TERM.match(term)
        if not match or (match.group(2) and match.group(1) != "ru"):
            raise UserValueError(f"bad unit selection term {term!r}: expected scu|ucu|cu|ru|ru:utility|all, "
                                 "optionally ':top<fraction>'")
        name, by_utility, top = match.group(1), match.group(2), match.group(3)
        if name == "all":
            masks = {k: torch.ones(shapes[k], dtype=torch.bool) for k in UNIT_KINDS}
        elif by_utility:
            masks = redundant_by_utility(unit_map)
        else:
            masks = unit_map.class_mask(name.upper())
        if top is not None:
            masks = _top_by_key(masks, z, unit_map.unit_params, float(top))
        for k in UNIT_KINDS:
            total[k] |= masks[k]
    return UnitSelection.from_masks(total)


def redundant_by_utility(unit_map: UnitMap) -> dict[str, torch.Tensor]:
    """SSAH's redundant units of a pretrained model (Fig. 6): classed by utility alone, the share r (the map's RU
    fraction) of unit parameters with the lowest per-layer utility z-score; the rest is utility."""
    fractions = unit_map.settings.get("fractions") or {}
    if "r" not in fractions:
        raise UserValueError("this unit map does not record its RU fraction r (settings.fractions); "
                             "re-run `safeunits attribute`")
    everything = {k: torch.ones(unit_map.shapes[k], dtype=torch.bool) for k in UNIT_KINDS}
    low_utility = {k: -v for k, v in unit_map.zscores("utility").items()}
    return _top_by_key(everything, low_utility, unit_map.unit_params, float(fractions["r"]))


def _top_by_key(masks: dict[str, torch.Tensor], z: dict[str, torch.Tensor], unit_params: dict[str, int],
                fraction: float) -> dict[str, torch.Tensor]:
    """Keep the `fraction` (in parameters) of the masked units with the highest key `z` (e.g. safety z-score)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"top fraction must be in [0, 1], got {fraction}")
    keys, sizes, where = [], [], []
    for kind in UNIT_KINDS:
        idx = torch.nonzero(masks[kind].flatten()).flatten()
        keys.append(z[kind].flatten()[idx])
        sizes.append(torch.full((idx.numel(),), float(unit_params[kind]), dtype=torch.float64))
        where += [(kind, int(i)) for i in idx]
    key, size = torch.cat(keys), torch.cat(sizes)
    order = torch.sort(key, descending=True, stable=True).indices
    mid = size[order].cumsum(0) - size[order] / 2
    keep = order[: int((mid <= fraction * float(size.sum())).sum())]
    out = {k: torch.zeros_like(masks[k]) for k in UNIT_KINDS}
    for i in keep.tolist():
        kind, flat = where[i]
        out[kind].view(-1)[flat] = True
    return out


def random_selection(like: UnitSelection, shapes: dict[str, tuple[int, int]], seed: int = 0,
                     exclude: UnitSelection | None = None) -> UnitSelection:
    """A seeded random control: as many MLP channels and heads as `like`, drawn uniformly over all layers.

    Matching the count per kind matches the parameter count exactly. Units in `exclude` are never drawn.
    """
    gen = torch.Generator().manual_seed(seed)
    excluded = exclude.to_masks(shapes) if exclude else {k: torch.zeros(shapes[k], dtype=torch.bool) for k in UNIT_KINDS}
    wanted = like.counts()
    out = {}
    for kind, key in (("mlp", "mlp_channels"), ("head", "heads")):
        candidates = torch.nonzero(~excluded[kind].flatten()).flatten()
        if wanted[key] > candidates.numel():
            raise ValueError(f"cannot draw {wanted[key]} random {kind} units from {candidates.numel()} candidates")
        pick = candidates[torch.randperm(candidates.numel(), generator=gen)[: wanted[key]]]
        m = torch.zeros(shapes[kind], dtype=torch.bool)
        m.view(-1)[pick] = True
        out[kind] = m
    return UnitSelection.from_masks(out)


def resolve_target(unit_map: UnitMap, target: str, seed: int = 0) -> UnitSelection:
    """The units a target names: a class spec, or `random:<spec>[@<seed>]`, a seeded random control with as many
    channels and heads (pruning controls, frozen-set controls)."""
    target = target.strip()
    if target.lower().startswith("random:"):
        spec, _, fixed_seed = target.split(":", 1)[1].partition("@")
        if fixed_seed and not fixed_seed.isdigit():
            raise ValueError(f"bad random control {target!r}: write random:<spec>@<seed>, e.g. random:scu@2")
        like = select_units(unit_map, spec)
        return random_selection(like, unit_map.shapes, seed=int(fixed_seed) if fixed_seed else seed)
    return select_units(unit_map, target)


def unit_parameter_masks(model: PreTrainedModel, units: UnitSelection, *, shared_kv: SharedKV = "none") -> dict[str, torch.Tensor]:
    """Parameter name -> bool mask (same shape and device as the parameter), True = weight of a selected unit.

    Only parameters that hold some unit's weights appear (every layer's MLP and attention projections);
    absent parameters (embeddings, norms, output-projection biases, shared grouped K/V rows unless
    `shared_kv="group"`) contain no selected weight.
    """
    adapter = get_adapter(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    masks: dict[str, torch.Tensor] = {}
    for layer in range(adapter.n_layers):
        for kind in UNIT_KINDS:
            chosen = units.of_kind(kind).get(layer, [])
            n = adapter.n_units(kind)
            if any(not 0 <= c < n for c in chosen):
                raise ValueError(f"layer {layer}: {kind} unit index out of range 0..{n - 1} in {chosen}")
            for s in adapter.unit_slices(layer, kind, shared_kv):
                p = params[s.name]
                m = masks.setdefault(s.name, torch.zeros(p.shape, dtype=torch.bool, device=p.device))
                if chosen:
                    idx = s.index[chosen].flatten().to(p.device)
                    m.index_fill_(s.dim, idx, True)
    for layer in set(units.mlp) | set(units.heads):
        if not 0 <= layer < adapter.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {adapter.n_layers} layers")
    return masks
