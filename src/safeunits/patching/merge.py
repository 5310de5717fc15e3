"""Controllable patching (SafePatching §3.3): salient difference sets of two patches, merged sparse.

    M_SE  = top-a%(S_SE)  \\ top-b%(S_OSM)      M_OSM = top-b%(S_OSM) \\ top-a%(S_SE)
    θ = θ_B + α · (M_SE ⊙ δ_SE) + β · (M_OSM ⊙ δ_OSM)

Weights salient to both patches stay at θ_B. Random retention (DARE, on by default as in SafePatching): each
kept entry survives with probability p (seeded per tensor) and is rescaled by 1/p. Everything runs tensor by
tensor from the memory-mapped patch folders, so memory stays near one tensor of each input plus the sparse output.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Literal

import torch
from pydantic import Field

from safeunits.config import Config
from safeunits.io import stream_tensors
from safeunits.models.signature import check_fits
from safeunits.patching.patches import DensePatch
from safeunits.patching.saliency import Scope, global_threshold, topk_mask
from safeunits.patching.sparse import SparsePatch, SparseTensorDelta, _index_dtype


DEFAULT_DARE_P = 0.5  # SafePatching retains at random; its p could not be checked (docs/fidelity.md)


def retains(dare_p: float | None) -> bool:
    """Whether a keep-rate drops anything (None and 1 keep every entry, unscaled)."""
    return dare_p is not None and dare_p < 1


class MergeConfig(Config):
    """Hyper-parameters of controllable patching; a and b are percentages of each tensor (or of the model)."""

    a: float = Field(5.0, gt=0, le=100, description="top-a % most salient weights of the safety patch δ_SE")
    b: float = Field(5.0, gt=0, le=100, description="top-b % most salient weights of the over-safety patch δ_OSM")
    alpha: float = Field(1.0, description="scale of the safety patch")
    beta: float = Field(1.0, description="scale of the over-safety patch")
    dare_p: float | None = Field(DEFAULT_DARE_P, gt=0, le=1,
                                 description="random retention, part of SafePatching's patching: DARE keep-rate p "
                                             "(kept entries rescaled by 1/p); None or 1 = no retention")
    seed: int = Field(0, description="seed of the DARE retention (per tensor: seed + crc32(name))")
    scope: Scope = Field("per_tensor", description="rank saliency within each tensor or over the whole model")
    sets: Literal["difference", "intersection"] = Field(
        "difference", description="weights each patch changes: SafePatching's difference sets, or (the paper's "
                                  "ablation) the weights salient to both patches, where both δ are added")


class EmptyDifferenceWarning(UserWarning):
    """A merge kept no weight of one patch: its top-k salient set lies inside the other's."""


def empty_difference_note(stats: dict[str, int]) -> str | None:
    """Why a merge is (half) empty, from `merge_parts`' counts; None when both parts keep some weight.

    An empty part is what two identical saliency maps give at a = b (e.g. a patch folder whose saliency was taken
    on the backbone, issue 24): the merged model is then the backbone, or one patch's part alone."""
    empty = [name for key, name in (("se", "safety (SE)"), ("osm", "over-safety (OSM)"))
             if stats[f"{key}_difference"] == 0]
    if not empty:
        return None
    return (f"the {' and the '.join(empty)} difference set{'s are' if len(empty) == 2 else ' is'} empty "
            f"({stats['both_salient']:,} weights salient to both patches stay at θ_B): the two saliency maps rank the "
            "same weights on top; check that each patch's saliency.safetensors was taken on its own patched model, "
            "or use a > b (or b > a)")


def top_sets(sal_se: torch.Tensor, sal_osm: torch.Tensor, a: float, b: float, *,
             thresholds: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-a(SE), top-b(OSM)) masks of one tensor; `thresholds` for the global scope."""
    if thresholds is None:
        return topk_mask(sal_se, a / 100), topk_mask(sal_osm, b / 100)
    return sal_se.float() >= thresholds[0], sal_osm.float() >= thresholds[1]


def difference_masks(sal_se: torch.Tensor, sal_osm: torch.Tensor, a: float, b: float, *,
                     thresholds: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-a(SE) \\ top-b(OSM), top-b(OSM) \\ top-a(SE)) for one tensor; `thresholds` for the global scope."""
    return pick_sets(*top_sets(sal_se, sal_osm, a, b, thresholds=thresholds), "difference")


def pick_sets(top_se: torch.Tensor, top_osm: torch.Tensor,
              sets: Literal["difference", "intersection"]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights each patch changes: (top_SE \\ top_OSM, top_OSM \\ top_SE), or the intersection for both."""
    if sets == "intersection":
        both = top_se & top_osm
        return both, both
    return top_se & ~top_osm, top_osm & ~top_se


def dare_mask(shape: torch.Size, p: float, seed: int, name: str) -> torch.Tensor:
    """Bernoulli(p) keep mask, reproducible per tensor whatever order tensors are visited in."""
    gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    return torch.rand(shape, generator=gen) < p


def merge_parts(se: DensePatch, osm: DensePatch, config: MergeConfig, *,
                progress: bool = True) -> tuple[SparsePatch, SparsePatch, dict[str, int]]:
    """The unscaled parts M_SE ⊙ δ_SE and M_OSM ⊙ δ_OSM (DARE's 1/p included) as two sparse patches, plus counts.

    α and β are applied afterwards (`controllable_merge`, or `apply_patch(scale=...)` in a sweep), so a sweep over
    α, β reuses one pass over the saliency and evaluates exactly the bits `controllable_merge` would save.
    """
    check_fits(se.signature, osm.signature, what="over-safety patch", on=f"the safety patch {se.folder}")
    if se.manifest.get("backbone_fingerprint") != osm.manifest.get("backbone_fingerprint"):
        raise ValueError("the safety and over-safety patches come from different backbones (fingerprints differ)")
    osm_names = set(osm.names)
    names = [n for n in se.names if n in osm_names]
    if not names:
        raise ValueError("the two patches share no tensors")
    thresholds = None
    if config.scope == "global":
        thresholds = (global_threshold(names, se.saliency, config.a / 100),
                      global_threshold(names, osm.saliency, config.b / 100))
    parts: tuple[dict[str, SparseTensorDelta], dict[str, SparseTensorDelta]] = ({}, {})
    # se / osm: weights kept; *_difference: the difference sets before random retention
    stats = {"se": 0, "osm": 0, "se_difference": 0, "osm_difference": 0, "both_salient": 0, "total": 0}
    for name in stream_tensors(names, "merge patches", progress=progress):
        s_se, s_osm = se.saliency(name), osm.saliency(name)
        top_se, top_osm = top_sets(s_se, s_osm, config.a, config.b, thresholds=thresholds)
        m_se, m_osm = pick_sets(top_se, top_osm, config.sets)
        stats["total"] += m_se.numel()
        stats["both_salient"] += int((top_se & top_osm).sum())
        stats["se_difference"] += int(m_se.sum())
        stats["osm_difference"] += int(m_osm.sum())
        rescale = 1.0
        if retains(config.dare_p):
            keep = dare_mask(m_se.shape, config.dare_p, config.seed, name)
            m_se, m_osm = m_se & keep, m_osm & keep
            rescale = 1.0 / config.dare_p
        for part, mask, patch, key in ((parts[0], m_se, se, "se"), (parts[1], m_osm, osm, "osm")):
            stats[key] += int(mask.sum())
            idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
            vals = patch.delta(name).reshape(-1)[idx].float()
            part[name] = SparseTensorDelta(_index_dtype(idx, mask.numel()), vals * rescale if rescale != 1.0 else vals,
                                           tuple(mask.shape))
    common = {"backbone_fingerprint": se.manifest.get("backbone_fingerprint"), "model_type": se.signature.get("model_type"),
              "merge_config": config.model_dump(mode="json")}
    return (SparsePatch(parts[0], se.signature, {**common, "part": "se", "patch": str(se.folder)}),
            SparsePatch(parts[1], se.signature, {**common, "part": "osm", "patch": str(osm.folder)}), stats)


def combine_parts(part_se: SparsePatch, part_osm: SparsePatch, alpha: float, beta: float, *,
                  consume: bool = False) -> SparsePatch:
    """α·part_SE + β·part_OSM: one sorted index list per tensor, values scaled like apply does (disjoint parts,
    SafePatching's); an index in both parts (the intersection ablation) gets the sum, added in float64 and rounded once.

    `consume=True` empties the parts as it goes, so the kept values exist once, not twice (merge peak memory).
    """
    deltas = {}
    for name in list(part_se.deltas):
        d_se, d_osm = (part_se.deltas.pop(name), part_osm.deltas.pop(name)) if consume else \
            (part_se.deltas[name], part_osm.deltas[name])
        idx = torch.cat([d_se.indices.long(), d_osm.indices.long()])
        vals = torch.cat([d_se.values * alpha if alpha != 1.0 else d_se.values,
                          d_osm.values * beta if beta != 1.0 else d_osm.values])
        order = torch.argsort(idx)
        idx, vals = idx[order], vals[order]
        unique, inverse = torch.unique_consecutive(idx, return_inverse=True)
        if unique.numel() < idx.numel():
            vals = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, vals.double()).float()
            idx = unique
        deltas[name] = SparseTensorDelta(_index_dtype(idx, d_se.numel), vals.contiguous(), d_se.shape)
    return SparsePatch(deltas, part_se.signature, {})


def controllable_merge(se: DensePatch, osm: DensePatch, config: MergeConfig, *, progress: bool = True) -> SparsePatch:
    """Merge the salient, non-overlapping parts of δ_SE and δ_OSM into one sparse patch (values = what to add)."""
    part_se, part_osm, stats = merge_parts(se, osm, config, progress=progress)
    empty = empty_difference_note(stats) if config.sets == "difference" else None
    if empty:
        warnings.warn(f"merge: {empty}", EmptyDifferenceWarning, stacklevel=2)
    merged = combine_parts(part_se, part_osm, config.alpha, config.beta, consume=True)
    merged.manifest = {
        "method": "safepatching" if config.sets == "difference" else "safepatching-intersection",
        "merge_config": config.model_dump(mode="json"),
        "backbone_fingerprint": se.manifest.get("backbone_fingerprint"),
        "model_type": se.signature.get("model_type"),
        "se_patch": str(se.folder), "osm_patch": str(osm.folder),
        "se_manifest": {k: se.manifest.get(k) for k in ("objective", "steps", "stopped_reason", "data")},
        "osm_manifest": {k: osm.manifest.get(k) for k in ("objective", "steps", "stopped_reason", "data")},
        "counts": stats,
        **({"warning": empty} if empty else {}),
    }
    return merged


def dense_merge_reference(backbone: dict[str, torch.Tensor], se: DensePatch, osm: DensePatch,
                          config: MergeConfig) -> dict[str, torch.Tensor]:
    """θ_B + α·(M_SE ⊙ δ_SE) + β·(M_OSM ⊙ δ_OSM) computed densely (for tests and audits; memory ~ 4 models)."""
    out = {}
    for name, theta in backbone.items():
        if name not in se.names:
            out[name] = theta.clone()
            continue
        m_se, m_osm = pick_sets(*top_sets(se.saliency(name), osm.saliency(name), config.a, config.b), config.sets)
        r_se, r_osm = m_se.float(), m_osm.float()
        if retains(config.dare_p):
            keep = dare_mask(m_se.shape, config.dare_p, config.seed, name).float() / config.dare_p
            r_se, r_osm = r_se * keep, r_osm * keep
        out[name] = theta + config.alpha * (r_se * se.delta(name)) + config.beta * (r_osm * osm.delta(name))
    return out
