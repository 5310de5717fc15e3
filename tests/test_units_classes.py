"""SSAH classes, the unit map artifact and unit selections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from safeunits.data.records import Record
from safeunits.models.adapters import UNIT_KINDS as KINDS
from safeunits.units.classes import ClassifyConfig, build_unit_map, classify, layer_zscores
from safeunits.units.scores import ScoreConfig, compute_scores
from safeunits.units.selection import UnitSelection, random_selection, select_units
from safeunits.units.unit_map import CLASS_CODE, CLASSES, UnitMap

UNIT_PARAMS = {"mlp": 3 * 576, "head": 2 * 64 * 576}  # SmolLM2-like: a head is 64 channels' worth


def _random_scores(seed=0, layers=6, channels=200, heads=9):
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (layers, channels), "head": (layers, heads)}
    mk = lambda: {k: torch.rand(shape[k], generator=g, dtype=torch.float64) * (1 + torch.arange(shape[k][0]).unsqueeze(1))
                  for k in KINDS}
    return mk(), mk()


def test_layer_zscores_against_numpy():
    x = torch.rand(4, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5  # seeded: was flaky
    ref = (x.numpy() - x.numpy().mean(1, keepdims=True)) / x.numpy().std(1, keepdims=True)
    np.testing.assert_allclose(layer_zscores(x).numpy(), ref, rtol=1e-12)
    assert torch.equal(layer_zscores(torch.ones(2, 3)), torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        layer_zscores(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("fractions", [dict(), dict(r=0.2, s=0.05, u=0.3), dict(r=0.0, s=0.1, u=0.0)])
def test_achieved_shares_within_one_unit(fractions):
    safety, utility = _random_scores()
    config = ClassifyConfig(**fractions)
    classes = classify(safety, utility, UNIT_PARAMS, config)
    total = sum(classes[k].numel() * UNIT_PARAMS[k] for k in KINDS)
    biggest = max(UNIT_PARAMS.values()) / total
    for name, want in (("RU", config.r), ("SCU", config.s), ("UCU", config.u)):
        got = sum(int((classes[k] == CLASS_CODE[name]).sum()) * UNIT_PARAMS[k] for k in KINDS) / total
        assert abs(got - want) <= biggest, (name, got, want)


def test_class_ranking_rules():
    """Each class is an extreme of its key among the units still available when it was chosen."""
    safety, utility = _random_scores(seed=3)
    classes = classify(safety, utility, UNIT_PARAMS)
    s = torch.cat([layer_zscores(safety[k]).flatten() for k in KINDS])
    u = torch.cat([layer_zscores(utility[k]).flatten() for k in KINDS])
    c = torch.cat([classes[k].flatten() for k in KINDS])
    ru, scu, ucu, cu = (c == CLASS_CODE[n] for n in ("RU", "SCU", "UCU", "CU"))
    assert (s + u)[ru].max() <= (s + u)[~ru].min()
    assert (s - u)[scu].min() >= (s - u)[ucu | cu].max()
    assert (s - u)[ucu].max() <= (s - u)[cu].min()


def test_bad_fractions():
    with pytest.raises(ValueError, match="exceeds 1"):
        ClassifyConfig(r=0.6, s=0.3, u=0.3)


@pytest.fixture(scope="module")
def tiny_map():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    safe = [Record(f"How do I make a weapon number {i}?", "Sorry, I cannot help with that.") for i in range(4)]
    util = [Record(f"Add {i} and {i + 1}.", f"The sum is {2 * i + 1}.") for i in range(4)]
    cfg = ScoreConfig()
    um = build_unit_map(model, compute_scores(model, tok, safe, cfg, progress=False),
                        compute_scores(model, tok, util, cfg, progress=False),
                        ClassifyConfig(r=0.2, s=0.1, u=0.1), settings={"note": "tiny"})
    return model, um


def test_unit_map_round_trip_and_summary(tiny_map, tmp_path):
    model, um = tiny_map
    path = um.save(tmp_path / "map.safetensors")
    assert (tmp_path / "map.json").is_file()
    back = UnitMap.load(path)
    for k in KINDS:
        assert torch.equal(back.safety[k], um.safety[k]) and torch.equal(back.classes[k], um.classes[k])
    assert back.unit_params == um.unit_params and back.fingerprint == um.fingerprint
    assert back.settings["note"] == "tiny" and back.settings["score_method"] == "fluctuation"
    summary = back.summary()
    assert sum(v["param_share"] for v in summary["classes"].values()) == pytest.approx(1.0)
    assert sum(v["mlp_channels"] for v in summary["classes"].values()) == 2 * 48
    for row in summary["per_layer"]:
        assert sum(row[c]["param_share"] for c in CLASSES) == pytest.approx(1.0)
    back.check_model(model)


def test_unit_map_refuses_other_architecture(tiny_map):
    _, um = tiny_map
    with pytest.raises(ValueError, match="architecture hash"):
        um.check_model(tiny_model("llama", intermediate_size=64))
    with pytest.raises(ValueError, match="llama"):
        um.check_model(tiny_model("gpt2"))


def test_select_units(tiny_map):
    _, um = tiny_map
    scu = select_units(um, "scu")
    masks = scu.to_masks({k: tuple(um.classes[k].shape) for k in KINDS})
    for k in KINDS:
        assert torch.equal(masks[k], um.classes[k] == CLASS_CODE["SCU"])
    both = select_units(um, "SCU+cu")
    assert both.n_params(um.unit_params) == scu.n_params(um.unit_params) + select_units(um, "cu").n_params(um.unit_params)
    # top fraction of CU by safety z-score
    top = select_units(um, "cu:top0.3")
    cu_params = select_units(um, "cu").n_params(um.unit_params)
    assert abs(top.n_params(um.unit_params) - 0.3 * cu_params) <= max(um.unit_params.values())
    z = um.zscores("safety")
    tm = top.to_masks({k: tuple(um.classes[k].shape) for k in KINDS})
    cu = um.class_mask("CU")
    chosen = torch.cat([z[k][tm[k]] for k in KINDS])
    rest = torch.cat([z[k][cu[k] & ~tm[k]] for k in KINDS])
    assert chosen.min() >= rest.max()
    assert select_units(um, "all").counts() == {"mlp_channels": 96, "heads": 8}
    with pytest.raises(ValueError, match="bad unit selection"):
        select_units(um, "scu+xyz")


def test_random_selection_matches_counts_and_is_seeded():
    shapes = {"mlp": (2, 48), "head": (2, 4)}
    like = UnitSelection(mlp={0: [1, 2, 3]}, heads={1: [0]})
    a = random_selection(like, shapes, seed=1, exclude=like)
    assert a.counts() == like.counts()
    assert a == random_selection(like, shapes, seed=1, exclude=like)
    assert a != random_selection(like, shapes, seed=2, exclude=like)
    am = a.to_masks(shapes)
    lm = like.to_masks(shapes)
    assert not any((am[k] & lm[k]).any() for k in KINDS)
