"""Weight-space baselines on dense patches: task arithmetic θ_B + Σ λ_i δ_i and TIES merging.

Both return a SparsePatch (the additive change), so every method is applied, saved and evaluated the
same way as SafePatching's controllable merge. Tensor by tensor from the memory-mapped patch folders.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

import torch

from safeunits.io import stream_tensors
from safeunits.models.signature import check_fits
from safeunits.patching.patches import DensePatch
from safeunits.patching.sparse import SparsePatch, SparseTensorDelta, _index_dtype


def _common(patches: list[DensePatch]) -> list[str]:
    if not patches:
        raise ValueError("no patches given")
    for p in patches[1:]:
        check_fits(p.signature, patches[0].signature, what=f"patch {p.folder}", on=f"patch {patches[0].folder}")
    names = [n for n in patches[0].names if all(n in set(p.names) for p in patches[1:])]
    if not names:
        raise ValueError("the patches share no tensors")
    return names


def _sparse(name: str, dense: torch.Tensor) -> SparseTensorDelta:
    flat = dense.reshape(-1)
    idx = torch.nonzero(flat).reshape(-1)
    return SparseTensorDelta(_index_dtype(idx, flat.numel()), flat[idx].float().clone(), tuple(dense.shape))


def task_arithmetic(patches: list[DensePatch], weights: list[float], *, progress: bool = True) -> SparsePatch:
    """Σ_i λ_i δ_i (Ilharco et al. 2023): λ = 1 on δ_SE alone is the GA baseline, on δ_OSM the GD baseline."""
    if len(weights) != len(patches):
        raise ValueError(f"{len(weights)} weights for {len(patches)} patches")
    names = _common(patches)
    deltas = {}
    for name in stream_tensors(names, "task arithmetic", progress=progress):
        total = weights[0] * patches[0].delta(name).float()
        for w, p in zip(weights[1:], patches[1:]):
            total = total + w * p.delta(name).float()
        deltas[name] = _sparse(name, total)
    return SparsePatch(deltas, patches[0].signature, {
        "method": "task_arithmetic", "weights": weights, "patches": [str(p.folder) for p in patches],
        "backbone_fingerprint": patches[0].manifest.get("backbone_fingerprint")})


class TiesConfig(BaseModel):
    """TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean."""

    density: float = Field(0.2, gt=0, le=1, description="share of each task vector kept by magnitude (per tensor)")
    weights: list[float] | None = Field(None, description="per-patch weights (default 1 each)")
    lam: float = Field(1.0, description="scale of the merged task vector")
    normalize: bool = Field(True, description="divide by the summed weights of the agreeing patches (disjoint mean)")


def ties_tensor(deltas: list[torch.Tensor], config: TiesConfig) -> torch.Tensor:
    """TIES on one tensor: keep each δ's top-`density` magnitudes, elect the sign of Σ, average those that agree."""
    weights = config.weights or [1.0] * len(deltas)
    trimmed = []
    for d in deltas:
        flat = d.float().reshape(-1)
        k = max(1, round(config.density * flat.numel()))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
        trimmed.append(torch.where(keep, flat, torch.zeros_like(flat)))
    stacked = torch.stack([w * t for w, t in zip(weights, trimmed)])
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    merged = (stacked * agree).sum(0)
    if config.normalize:
        wsum = (torch.tensor(weights).view(-1, 1) * agree).sum(0)
        merged = torch.where(wsum > 0, merged / wsum.clamp_min(1e-12), torch.zeros_like(merged))
    return (config.lam * merged).view(deltas[0].shape)


def ties_merge(patches: list[DensePatch], config: TiesConfig | None = None, *, progress: bool = True) -> SparsePatch:
    """TIES merge of several dense patches (e.g. δ_SE and δ_OSM) into one sparse patch."""
    config = config or TiesConfig()
    names = _common(patches)
    deltas = {n: _sparse(n, ties_tensor([p.delta(n) for p in patches], config))
              for n in stream_tensors(names, "TIES", progress=progress)}
    return SparsePatch(deltas, patches[0].signature, {
        "method": "ties", "ties_config": config.model_dump(mode="json"), "patches": [str(p.folder) for p in patches],
        "backbone_fingerprint": patches[0].manifest.get("backbone_fingerprint")})
