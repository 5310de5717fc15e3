"""Figures of the unit tools: real PNGs that show what they claim, and clear errors on data they cannot draw."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb

from safeunits.units.assignment import CLASS_CODE, CLASSES, ClassifyConfig, classify
from safeunits.units.plots import CLASS_COLORS, PlotInputError, probe_plot, transfer_heatmap, write_map_plots
from safeunits.units.transfer import transition_matrix
from safeunits.units.unit_map import UnitMap

SHAPES = {"mlp": (6, 40), "head": (6, 4)}
UNIT_PARAMS = {"mlp": 3 * 32, "head": 2 * 8 * 32}


def _map(seed: int) -> UnitMap:
    g = torch.Generator().manual_seed(seed)
    safety = {k: torch.rand(SHAPES[k], generator=g, dtype=torch.float64) for k in SHAPES}
    utility = {k: torch.rand(SHAPES[k], generator=g, dtype=torch.float64) for k in SHAPES}
    classes = classify(safety, utility, UNIT_PARAMS, ClassifyConfig(r=0.2, s=0.15, u=0.15))
    return UnitMap(safety, utility, classes, UNIT_PARAMS, "llama", "0" * 32, settings={"score_method": "fluctuation"})


def _pixels(path) -> np.ndarray:
    """RGB pixels of a PNG as floats in [0, 1]."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(str(path))[..., :3]


def _has_colour(pixels: np.ndarray, colour: str, min_pixels: int = 20) -> bool:
    return int((np.abs(pixels - np.array(to_rgb(colour))).max(-1) < 0.02).sum()) >= min_pixels


def test_map_figures_show_every_class(tmp_path):
    um = _map(0)
    assert all(bool((um.classes["mlp"] == CLASS_CODE[c]).any()) for c in CLASSES)
    paths = write_map_plots(um, tmp_path / "figs")
    assert [p.name for p in paths] == ["class_shares.png", "unit_map.png"]
    for path in paths:
        pixels = _pixels(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        for name in CLASSES:  # every class colour is drawn (bars / heatmap cells), not a blank canvas
            assert _has_colour(pixels, CLASS_COLORS[name]), (path.name, name)
    assert not [p for p in (tmp_path / "figs").iterdir() if p.name not in ("class_shares.png", "unit_map.png")]


def test_transfer_and_probe_figures(tmp_path):
    result = transition_matrix(_map(0), _map(1))
    pixels = _pixels(transfer_heatmap(result.model_dump(), tmp_path / "transfer.png"))
    assert len(np.unique(pixels.reshape(-1, 3).round(2), axis=0)) > 20  # shaded cells, labels, colour bar
    ks, layers = [2, 4, 8], list(range(5))
    rng = np.random.default_rng(0)
    ref, comp = rng.random((3, 5)), rng.random((3, 5))
    probe = {"ks": ks, "layers": layers, "refusal_distance": ref.tolist(), "compliance_distance": comp.tolist(),
             "gap_per_layer": (comp - ref).mean(0).tolist(), "n_prompts": 7, "verdict": "closer to refusal"}
    pixels = _pixels(probe_plot(probe, tmp_path / "probe.png"))
    assert pixels.shape[1] > 2 * pixels.shape[0]  # three panels side by side
    assert _has_colour(pixels, CLASS_COLORS["SCU"]) and _has_colour(pixels, CLASS_COLORS["UCU"])


def test_bad_input_fails_clearly_and_writes_nothing(tmp_path):
    result = transition_matrix(_map(0), _map(1)).model_dump()
    with pytest.raises(PlotInputError, match="no param_share_of_row"):
        transfer_heatmap({k: v for k, v in result.items() if k != "param_share_of_row"}, tmp_path / "a.png")
    with pytest.raises(PlotInputError, match=r"units has shape \(3, 4\), expected \(4, 4\)"):
        transfer_heatmap({**result, "units": result["units"][:3]}, tmp_path / "a.png")
    probe = {"ks": [2, 4], "layers": [0, 1, 2], "refusal_distance": [[0.1] * 3] * 2, "compliance_distance": [[0.2] * 2] * 2,
             "gap_per_layer": [0.1] * 3, "n_prompts": 1, "verdict": "x"}
    with pytest.raises(PlotInputError, match="compliance_distance has shape"):
        probe_plot(probe, tmp_path / "a.png")
    with pytest.raises(PlotInputError, match="NaN"):
        probe_plot({**probe, "compliance_distance": [[float("nan")] * 3] * 2}, tmp_path / "a.png")
    broken = _map(0)
    broken.classes["head"][0, 0] = 9
    with pytest.raises(PlotInputError, match="codes outside"):
        write_map_plots(broken, tmp_path)
    assert not list(tmp_path.iterdir())
