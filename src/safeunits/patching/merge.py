"""Controllable patching (SafePatching §3.3): salient difference sets of two patches, merged sparse.

    M_SE  = top-a%(S_SE)  \\ top-b%(S_OSM)      M_OSM = top-b%(S_OSM) \\ top-a%(S_SE)
    θ = θ_B + α · (M_SE ⊙ δ_SE) + β · (M_OSM ⊙ δ_OSM)

Weights salient to both patches stay at θ_B. Optional DARE retention: each kept entry survives with
probability p (seeded per tensor) and is rescaled by 1/p. Everything runs tensor by tensor from the
memory-mapped patch folders, so memory stays near one tensor of each input plus the sparse output.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from safeunits.patching.patches import DensePatch
from safeunits.patching.saliency import Scope, global_threshold, topk_mask
from safeunits.patching.sparse import SparsePatch, SparseTensorDelta, _index_dtype, check_signature


class MergeConfig(BaseModel):
    """Hyper-parameters of controllable patching; a and b are percentages of each tensor (or of the model)."""

    a: float = Field(5.0, gt=0, le=100, description="top-a % most salient weights of the safety patch δ_SE")
    b: float = Field(5.0, gt=0, le=100, description="top-b % most salient weights of the over-safety patch δ_OSM")
    alpha: float = Field(1.0, description="scale of the safety patch")
    beta: float = Field(1.0, description="scale of the over-safety patch")
    dare_p: float | None = Field(None, gt=0, le=1, description="DARE keep-rate p (kept entries rescaled by 1/p); "
                                                                 "None = no random retention")
    seed: int = Field(0, description="seed of the DARE retention (per tensor: seed + crc32(name))")
    scope: Scope = Field("per_tensor", description="rank saliency within each tensor or over the whole model")


def difference_masks(sal_se: torch.Tensor, sal_osm: torch.Tensor, a: float, b: float, *,
                     thresholds: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-a(SE) \\ top-b(OSM), top-b(OSM) \\ top-a(SE)) for one tensor; `thresholds` for the global scope."""
    if thresholds is None:
        top_se, top_osm = topk_mask(sal_se, a / 100), topk_mask(sal_osm, b / 100)
    else:
        top_se, top_osm = sal_se.float() >= thresholds[0], sal_osm.float() >= thresholds[1]
    return top_se & ~top_osm, top_osm & ~top_se


def dare_mask(shape: torch.Size, p: float, seed: int, name: str) -> torch.Tensor:
    """Bernoulli(p) keep mask, reproducible per tensor whatever order tensors are visited in."""
    gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    return torch.rand(shape, generator=gen) < p


def controllable_merge(se: DensePatch, osm: DensePatch, config: MergeConfig, *, progress: bool = True) -> SparsePatch:
    """Merge the salient, non-overlapping parts of δ_SE and δ_OSM into one sparse patch (values = what to add)."""
    check_signature(se.signature, osm.signature, what="the two patches")
    if se.manifest.get("backbone_fingerprint") != osm.manifest.get("backbone_fingerprint"):
        raise ValueError("the safety and over-safety patches come from different backbones (fingerprints differ)")
    names = [n for n in se.names if n in set(osm.names)]
    if not names:
        raise ValueError("the two patches share no tensors")
    thresholds = None
    if config.scope == "global":
        thresholds = (global_threshold(names, se.saliency, config.a / 100),
                      global_threshold(names, osm.saliency, config.b / 100))
    deltas: dict[str, SparseTensorDelta] = {}
    stats = {"se": 0, "osm": 0, "both_salient": 0, "total": 0}
    for name in tqdm(names, desc="merge patches", disable=not progress):
        s_se, s_osm = se.saliency(name), osm.saliency(name)
        m_se, m_osm = difference_masks(s_se, s_osm, config.a, config.b, thresholds=thresholds)
        stats["total"] += m_se.numel()
        stats["both_salient"] += int((topk_or(s_se, config.a, thresholds, 0) & topk_or(s_osm, config.b, thresholds, 1)).sum())
        scale_se, scale_osm = config.alpha, config.beta
        if config.dare_p is not None:
            keep = dare_mask(m_se.shape, config.dare_p, config.seed, name)
            m_se, m_osm = m_se & keep, m_osm & keep
            scale_se, scale_osm = config.alpha / config.dare_p, config.beta / config.dare_p
        stats["se"] += int(m_se.sum())
        stats["osm"] += int(m_osm.sum())
        idx_se = torch.nonzero(m_se.reshape(-1)).reshape(-1)
        idx_osm = torch.nonzero(m_osm.reshape(-1)).reshape(-1)
        vals = torch.cat([se.delta(name).reshape(-1)[idx_se].float() * scale_se,
                          osm.delta(name).reshape(-1)[idx_osm].float() * scale_osm])
        idx = torch.cat([idx_se, idx_osm])
        order = torch.argsort(idx)
        deltas[name] = SparseTensorDelta(_index_dtype(idx[order], m_se.numel()), vals[order].contiguous(),
                                         tuple(m_se.shape))
    manifest: dict[str, Any] = {
        "method": "safepatching",
        "merge_config": config.model_dump(mode="json"),
        "backbone_fingerprint": se.manifest.get("backbone_fingerprint"),
        "model_type": se.signature.get("model_type"),
        "se_patch": str(se.folder), "osm_patch": str(osm.folder),
        "counts": stats,
    }
    return SparsePatch(deltas, se.signature, manifest)


def topk_or(scores: torch.Tensor, pct: float, thresholds: tuple[float, float] | None, which: int) -> torch.Tensor:
    """The top-pct% mask of one tensor, per tensor or against a global threshold."""
    return topk_mask(scores, pct / 100) if thresholds is None else scores.float() >= thresholds[which]


def dense_merge_reference(backbone: dict[str, torch.Tensor], se: DensePatch, osm: DensePatch,
                          config: MergeConfig) -> dict[str, torch.Tensor]:
    """θ_B + α·(M_SE ⊙ δ_SE) + β·(M_OSM ⊙ δ_OSM) computed densely (for tests and audits; memory ~ 4 models)."""
    out = {}
    for name, theta in backbone.items():
        if name not in se.names:
            out[name] = theta.clone()
            continue
        m_se, m_osm = difference_masks(se.saliency(name), osm.saliency(name), config.a, config.b)
        r_se, r_osm = m_se.float(), m_osm.float()
        if config.dare_p is not None:
            keep = dare_mask(m_se.shape, config.dare_p, config.seed, name).float() / config.dare_p
            r_se, r_osm = r_se * keep, r_osm * keep
        out[name] = theta + config.alpha * (r_se * se.delta(name)) + config.beta * (r_osm * osm.delta(name))
    return out
