"""The engine and unit masks on the real default model (SmolLM2-135M-Instruct): a few short steps."""

from __future__ import annotations

import copy

import pytest
import torch

from safeunits.data.records import Record
from safeunits.train.engine import TrainConfig, train

pytestmark = pytest.mark.integration


def test_real_model_frozen_units_bit_identical(default_model):
    from safeunits.units.selection import UnitSelection, unit_parameter_masks

    model, tok = copy.deepcopy(default_model[0]), default_model[1]  # the session fixture stays untouched
    sel = UnitSelection(mlp={0: list(range(0, 1536, 3)), 7: [1, 2, 3]}, heads={3: [0, 4], 29: [8]})
    masks = unit_parameter_masks(model, sel)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = [Record(prompt="Name a colour.", response="Blue is a colour."),
               Record(prompt="What is 2+2?", response="2+2 equals 4.")]
    res = train(model, tok, records, TrainConfig(lr=1e-4, max_steps=2, batch_size=2, weight_decay=0.1,
                                                 max_length=64, mixed_precision="no"), frozen=masks, progress=False)
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    assert res.losses[1] < res.losses[0]
    assert sum(bool(m.any()) for m in masks.values()) >= 8
    for name, p in model.named_parameters():
        m = masks.get(name)
        if m is not None and m.any():
            assert torch.equal(p.detach()[m], before[name][m]), name
            assert (p.detach()[~m] != before[name][~m]).float().mean() > 0.9, name
