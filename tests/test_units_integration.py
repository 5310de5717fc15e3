"""Unit attribution on the real default model (SmolLM2-135M-Instruct): small samples, each under a minute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safeunits.data.registry import load_dataset
from safeunits.models.adapters import get_adapter
from safeunits.units.classes import build_unit_map
from safeunits.units.probe import run_probe
from safeunits.units.pruning import prune_units
from safeunits.units.scores import ScoreConfig, compute_scores
from safeunits.units.selection import select_units, unit_parameter_masks

pytestmark = pytest.mark.integration


def test_default_model_geometry_and_map(default_model, data_dir, tmp_path):
    model, tok = default_model
    a = get_adapter(model)
    # SmolLM2-135M: 30 layers, 9 query heads sharing 3 K/V heads, head_dim 64, MLP 1536, hidden 576
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.n_channels) == (30, 9, 3, 64, 1536)
    assert a.unit_params("mlp") == 3 * 576 and a.unit_params("head") == 2 * 64 * 576
    cfg = ScoreConfig(batch_size=4, max_length=128)
    safety = compute_scores(model, tok, load_dataset("advbench-refusals", data_dir=data_dir, limit=4), cfg, progress=False)
    utility = compute_scores(model, tok, load_dataset("self-instruct:user", data_dir=data_dir, limit=4), cfg, progress=False)
    um = build_unit_map(model, safety, utility, fingerprint=False)
    shares = {k: v["param_share"] for k, v in um.summary()["classes"].items()}
    unit = a.unit_params("head") / um.total_params()
    assert abs(shares["SCU"] - 0.015) <= unit and abs(shares["RU"] - 0.15) <= unit and abs(shares["UCU"] - 0.10) <= unit
    # pruning SCU zeroes exactly its weights and the map survives a round trip
    scu = select_units(um, "scu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        zeroed = prune_units(model, scu)
        assert zeroed == scu.n_params(um.unit_params)
        masks = unit_parameter_masks(model, scu)
        for n, p in model.named_parameters():
            if n in masks:
                assert torch.equal(p[~masks[n]], before[n][~masks[n]])
                assert bool((p[masks[n]] == 0).all())
            else:
                assert torch.equal(p, before[n])
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(before[n])
    um.save(tmp_path / "m.safetensors")


def test_default_model_probe(default_model, data_dir):
    model, tok = default_model
    prompts = [r.prompt for r in load_dataset("advbench", data_dir=data_dir, limit=2)]
    result = run_probe(model, tok, prompts, progress=False)
    d = np.array(result.refusal_distance)
    assert d.shape == (9, 30) and np.isfinite(d).all() and (d >= -1e-9).all()
