"""Compact frozen parts (`FrozenLines`: rows/columns by index) against the dense fallback (`FrozenEntries`)."""

from __future__ import annotations

import pytest
import torch

from safeunits.models.chat import collate, encode_pair
from safeunits.train.masks import (FrozenEntries, FrozenLines, MaskedUpdate, frozen_part, unit_masks,
                                   update_masks)
from tiny import tiny_model, tiny_tokenizer, tiny_unit_map

TEXTS = [(f"Question {i}: what is {i} times {i}?", f"It is {i * i}. " * (1 + i % 3)) for i in range(8)]


def test_frozen_part_detects_rows_columns_and_falls_back():
    mask = torch.zeros(6, 5, dtype=torch.bool)
    assert frozen_part(mask) is None
    mask[[1, 4]] = True
    rows = frozen_part(mask)
    assert isinstance(rows, FrozenLines) and rows.dim == 0 and rows.index.tolist() == [1, 4]
    assert torch.equal(rows.dense(mask.shape), mask) and rows.count(mask.shape) == 10
    cols = frozen_part(mask.T.contiguous())
    assert isinstance(cols, FrozenLines) and cols.dim == 1 and cols.index.tolist() == [1, 4]
    vec = frozen_part(torch.tensor([True, False, True]))
    assert isinstance(vec, FrozenLines) and vec.index.tolist() == [0, 2]
    mask[0, 0] = True  # one stray entry: neither whole rows nor whole columns
    dense = frozen_part(mask)
    assert isinstance(dense, FrozenEntries) and torch.equal(dense.mask, mask)
    block = torch.zeros(6, 5, dtype=torch.bool)
    block[:2, :2] = True
    assert isinstance(frozen_part(block), FrozenEntries)


def test_update_masks_trainable_is_the_complement_and_absent_is_fully_frozen():
    model = tiny_model()
    name = "model.layers.0.mlp.down_proj.weight"
    sel = torch.zeros_like(dict(model.named_parameters())[name], dtype=torch.bool)
    sel[:, [2, 7]] = True
    parts = update_masks(model, trainable={name: sel})
    part = parts[name]
    assert isinstance(part, FrozenLines) and part.dim == 1
    assert torch.equal(part.dense(sel.shape), ~sel)
    other = dict(model.named_parameters())["model.norm.weight"]
    assert parts["model.norm.weight"].count(other.shape) == other.numel()
    assert update_masks(model) is None


def test_tied_weights_freeze_the_union_of_both_names():
    model = tiny_model()  # lm_head.weight is model.embed_tokens.weight
    emb = model.model.embed_tokens.weight
    a, b = torch.zeros_like(emb, dtype=torch.bool), torch.zeros_like(emb, dtype=torch.bool)
    a[3], b[10] = True, True
    masker = MaskedUpdate(model, update_masks(model, frozen={"model.embed_tokens.weight": a, "lm_head.weight": b}))
    (entry,) = masker._partial
    assert isinstance(entry.part, FrozenLines) and entry.part.index.tolist() == [3, 10]
    b[0, 0] = True  # no longer whole rows: the union falls back to a dense mask
    masker = MaskedUpdate(model, update_masks(model, frozen={"model.embed_tokens.weight": a, "lm_head.weight": b}))
    (entry,) = masker._partial
    assert isinstance(entry.part, FrozenEntries) and torch.equal(entry.part.mask, a | b)


def _train(model, parts, *, hooks: bool, steps: int = 4) -> None:
    """AdamW with weight decay and clipping; frozen gradients zeroed by hooks (freeze_units) or after backward
    (the engine), frozen values restored after every step."""
    tok = tiny_tokenizer()
    batch = collate([encode_pair(tok, p, r) for p, r in TEXTS], tok.pad_token_id)
    masker = MaskedUpdate(model, parts)
    handles = masker.hook_gradients() if hooks else []
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        if not hooks:
            masker.mask_gradients()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        masker.restore()
    for h in handles:
        h.remove()
    masker.release()


def test_a_random_control_freezes_as_many_weights_elsewhere():
    """`--freeze random:scu+cu@1`: the frozen-set control of SSAH's setting (ii), same size, other units."""
    model, umap = tiny_model(), tiny_unit_map(tiny_model())
    real, control = unit_masks(model, umap, "scu+cu"), unit_masks(model, umap, "random:scu+cu@1")
    count = lambda masks: sum(int(m.sum()) for m in masks.values())  # noqa: E731
    assert count(real) == count(control) > 0
    assert any(not torch.equal(real[n], control[n]) for n in real)
    assert all(torch.equal(control[n], m) for n, m in unit_masks(model, umap, "random:scu+cu@1").items())


@pytest.mark.parametrize("hooks", [False, True])
@pytest.mark.parametrize("mode", ["frozen", "trainable"])
def test_compact_and_dense_paths_give_bit_identical_weights(hooks, mode):
    initial = tiny_model()
    masks = unit_masks(initial, tiny_unit_map(tiny_model()), "scu+cu")
    compact = update_masks(initial, **{mode: masks})
    assert compact and all(isinstance(p, FrozenLines) for p in compact.values())
    assert {p.dim for p in compact.values()} == {0, 1}  # rows (q/k/v, gate/up) and columns (o, down)
    dense = {name: FrozenEntries(part.dense(dict(initial.named_parameters(remove_duplicate=False))[name].shape))
             for name, part in compact.items()}
    a, b = tiny_model(), tiny_model()
    _train(a, compact, hooks=hooks)
    _train(b, dense, hooks=hooks)
    before = dict(initial.named_parameters(remove_duplicate=False))
    moved = 0
    b_params = dict(b.named_parameters(remove_duplicate=False))
    for name, pa in a.named_parameters(remove_duplicate=False):
        pb = b_params[name]
        assert torch.equal(pa, pb), f"{name}: compact and dense paths differ"
        frozen = dense[name].mask if name in dense else torch.zeros_like(pa, dtype=torch.bool)
        assert torch.equal(pa.detach()[frozen], before[name].detach()[frozen]), f"frozen entries of {name} moved"
        moved += int((pa.detach()[~frozen] != before[name].detach()[~frozen]).sum())
    assert moved > 0


def test_irregular_mask_uses_the_dense_fallback_and_keeps_its_entries():
    initial = tiny_model()
    gen = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.4 for n, p in initial.named_parameters() if p.dim() == 2}
    parts = update_masks(initial, frozen=masks)
    assert all(isinstance(p, FrozenEntries) for p in parts.values())
    model = tiny_model()
    _train(model, parts, hooks=True)
    before = dict(initial.named_parameters())
    for name, p in model.named_parameters():
        if name in masks:
            m = masks[name]
            assert torch.equal(p.detach()[m], before[name].detach()[m]), name
            assert (p.detach()[~m] != before[name].detach()[~m]).any(), name
