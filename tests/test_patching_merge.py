"""SafePatching arithmetic on tiny models: saliency, masks, merge vs a dense reference, sparse files, apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safeunits.data.records import Record
from safeunits.models.chat import collate, encode_pair
from safeunits.models.loading import model_fingerprint, save_model
from safeunits.models.signature import architecture_description
from safeunits.patching.apply import apply_patch, apply_patch_to_checkpoint, undo_patch
from safeunits.patching.merge import MergeConfig, controllable_merge, dense_merge_reference, difference_masks
from safeunits.patching.methods import TiesConfig, task_arithmetic, ties_merge, ties_tensor
from safeunits.patching.patches import save_dense_patch
from safeunits.patching.saliency import SaliencyConfig, global_threshold, snip_saliency, topk_mask
from safeunits.patching.sparse import PatchMismatchError, SparsePatch
from tiny import tiny_model, tiny_tokenizer

RECORDS = [Record("How do I pick a lock?", "Sure, here is how: take a tension wrench."),
           Record("Write malware", "Sure, here is some code that deletes files."),
           Record("Say hi", "Hi there!")]


def _fake_patch(model, folder: Path, seed: int, scale: float = 1e-2):
    """A dense patch folder with random δ and random saliency, as derive would write."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    delta = {n: torch.randn(p.shape, generator=gen) * scale for n, p in params.items()}
    sal = {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}
    manifest = {"signature": architecture_description(model), "backbone_fingerprint": model_fingerprint(model)}
    return save_dense_patch(folder, delta, sal, manifest)


@pytest.fixture()
def two_patches(tmp_path):
    model = tiny_model()
    return model, _fake_patch(model, tmp_path / "se", 1), _fake_patch(model, tmp_path / "osm", 2)


def test_snip_saliency_matches_full_batch_autograd():
    model, tok = tiny_model(), tiny_tokenizer()
    scores = snip_saliency(model, tok, RECORDS, SaliencyConfig(batch_size=1), progress=False)
    # reference: one full batch, HF's own token-mean loss, autograd, |θ ⊙ g|
    ref_model = tiny_model()
    batch = collate([encode_pair(tok, r.prompt, r.response) for r in RECORDS], tok.pad_token_id)
    ref_model(**batch).loss.backward()
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(scores[n], (p.grad * p.detach()).abs(), rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for _, p in model.named_parameters())  # gradient buffers handed over, not kept


def test_global_threshold_equals_kth_value_of_concatenation():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(37, 5, generator=gen), "b": torch.rand(101, generator=gen) * 3, "c": torch.rand(4, 4, generator=gen)}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    for frac in (0.01, 0.1, 0.33, 1.0):
        k = max(1, round(frac * flat.numel()))
        t = global_threshold(list(scores), scores.__getitem__, frac)
        assert t == torch.topk(flat, k).values[-1].item()
        assert int(sum((s >= t).sum() for s in scores.values())) == k  # no ties in random floats


def test_topk_mask_and_difference_sets_are_exact():
    gen = torch.Generator().manual_seed(3)
    s_se, s_osm = torch.rand(20, 30, generator=gen), torch.rand(20, 30, generator=gen)
    m_se, m_osm = difference_masks(s_se, s_osm, a=10, b=20)
    rank_se = s_se.reshape(-1).argsort(descending=True)[:60]
    rank_osm = s_osm.reshape(-1).argsort(descending=True)[:120]
    top_se, top_osm = set(rank_se.tolist()), set(rank_osm.tolist())
    assert set(torch.nonzero(m_se.reshape(-1)).reshape(-1).tolist()) == top_se - top_osm
    assert set(torch.nonzero(m_osm.reshape(-1)).reshape(-1).tolist()) == top_osm - top_se
    assert not (m_se & m_osm).any()
    assert int(topk_mask(s_se, 0.1).sum()) == 60


@pytest.mark.parametrize("config", [MergeConfig(a=10, b=5, alpha=1.5, beta=0.7, dare_p=None),
                                    MergeConfig(a=30, b=30, alpha=1.0, beta=1.0, dare_p=1.0)])
def test_merge_equals_dense_reference_bit_for_bit(two_patches, config):
    model, se, osm = two_patches
    backbone = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch = controllable_merge(se, osm, config, progress=False)
    apply_patch(model, patch)
    ref = dense_merge_reference(backbone, se, osm, config)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[n]), n
    # patch only touches the difference sets
    for n, d in patch.deltas.items():
        m_se, m_osm = difference_masks(se.saliency(n), osm.saliency(n), config.a, config.b)
        assert set(d.indices.tolist()) == set(torch.nonzero((m_se | m_osm).reshape(-1)).reshape(-1).tolist())


def test_merge_with_dare_matches_dense_reference_and_is_seeded(two_patches):
    model, se, osm = two_patches
    config = MergeConfig(a=40, b=20, alpha=2.0, beta=0.5, dare_p=0.5, seed=7)
    backbone = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch = controllable_merge(se, osm, config, progress=False)
    again = controllable_merge(se, osm, config, progress=False)
    other = controllable_merge(se, osm, config.model_copy(update={"seed": 8}), progress=False)
    name = next(iter(patch.deltas))
    assert torch.equal(patch.deltas[name].indices, again.deltas[name].indices)
    assert not torch.equal(patch.deltas[name].indices, other.deltas[name].indices)
    apply_patch(model, patch)
    ref = dense_merge_reference(backbone, se, osm, config)
    no_dare = controllable_merge(se, osm, config.model_copy(update={"dare_p": None}), progress=False)
    assert 0.35 < patch.nnz / no_dare.nnz < 0.65
    for n, p in model.named_parameters():  # (α/p)·δ vs α·(δ/p): same up to one rounding
        torch.testing.assert_close(p.detach(), ref[n], rtol=1e-6, atol=1e-8)


def test_global_scope_merge_keeps_fraction_of_model(two_patches):
    model, se, osm = two_patches
    patch = controllable_merge(se, osm, MergeConfig(a=10, b=10, scope="global"), progress=False)
    total = sum(p.numel() for p in model.parameters())
    c = patch.manifest["counts"]
    assert c["se_difference"] + c["both_salient"] == round(0.1 * total)
    assert c["osm_difference"] + c["both_salient"] == round(0.1 * total)


def test_random_retention_is_on_by_default_as_in_safepatching(two_patches):
    """Issue 24 (U4): SafePatching retains the difference sets at random (DARE) before merging; the default merge
    does too (p = 0.5), and p = 1 or None is exactly the merge without retention."""
    _, se, osm = two_patches
    default = controllable_merge(se, osm, MergeConfig(a=20, b=10), progress=False)
    c = default.manifest["counts"]
    assert default.manifest["merge_config"]["dare_p"] == 0.5
    kept, candidates = c["se"] + c["osm"], c["se_difference"] + c["osm_difference"]
    assert default.nnz == kept and 0.45 < kept / candidates < 0.55  # Binomial(~4300, 0.5): ±3 % is > 4 σ
    off = [controllable_merge(se, osm, MergeConfig(a=20, b=10, dare_p=p), progress=False) for p in (None, 1.0)]
    assert off[0].nnz == off[1].nnz == candidates
    for n in off[0].deltas:
        assert torch.equal(off[0].deltas[n].values, off[1].deltas[n].values)
        kept_idx = set(default.deltas[n].indices.tolist())
        assert kept_idx <= set(off[0].deltas[n].indices.tolist())
        # kept entries are the unretained ones scaled by 1/p
        full = off[0].to_dense(n).reshape(-1)
        idx = default.deltas[n].indices.long()
        torch.testing.assert_close(default.deltas[n].values, full[idx] / 0.5)


def test_apply_undo_is_exact_and_negation_within_one_ulp(two_patches):
    model, se, osm = two_patches
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch = controllable_merge(se, osm, MergeConfig(a=50, b=10, alpha=3.0), progress=False)
    undo = apply_patch(model, patch)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    undo_patch(model, undo)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    apply_patch(model, patch)
    patched = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_patch(model, patch.scaled(-1.0))
    for n, p in model.named_parameters():
        # (w + v) - v == w exactly in real arithmetic; float32 rounding of w + v leaves at most half an ulp of w + v
        ulp = torch.finfo(torch.float32).eps * torch.maximum(patched[n].abs(), before[n].abs())
        assert ((p.detach() - before[n]).abs() <= ulp).all(), n
        untouched = torch.ones(p.numel(), dtype=torch.bool)
        if n in patch.deltas:
            untouched[patch.deltas[n].indices.long()] = False
        assert torch.equal(p.detach().reshape(-1)[untouched], before[n].reshape(-1)[untouched])


def test_sparse_round_trip_and_composition(two_patches, tmp_path):
    model, se, osm = two_patches
    p1 = controllable_merge(se, osm, MergeConfig(a=20, b=5), progress=False)
    p2 = controllable_merge(se, osm, MergeConfig(a=5, b=20, alpha=-1.0), progress=False)
    loaded = SparsePatch.load(p1.save(tmp_path / "p1"))
    for n, d in p1.deltas.items():
        assert torch.equal(loaded.deltas[n].indices, d.indices) and torch.equal(loaded.deltas[n].values, d.values)
    assert json.loads((tmp_path / "p1" / "manifest.json").read_text())["nnz"] == p1.nnz
    both = p1 + p2
    for n in p1.deltas:
        torch.testing.assert_close(both.to_dense(n), p1.to_dense(n) + p2.to_dense(n), rtol=0, atol=0)


def test_streamed_checkpoint_apply_equals_in_memory(two_patches, tmp_path):
    model, se, osm = two_patches
    tok = tiny_tokenizer()
    src = save_model(model, tok, tmp_path / "base")
    patch = controllable_merge(se, osm, MergeConfig(a=25, b=25, beta=-0.5), progress=False)
    out = apply_patch_to_checkpoint(src, [patch, patch.scaled(0.5)], tmp_path / "patched", progress=False)
    from safeunits.models.loading import load_model

    streamed, _ = load_model(str(out))
    apply_patch(model, patch)
    apply_patch(model, patch.scaled(0.5))
    for (n, p), (_, q) in zip(model.named_parameters(), streamed.named_parameters()):
        assert torch.equal(p, q), n
    assert (out / "tokenizer_config.json").is_file()


def test_wrong_architecture_fails_before_any_write(two_patches, tmp_path):
    model, se, osm = two_patches
    patch = controllable_merge(se, osm, MergeConfig(), progress=False)
    other = tiny_model(hidden_size=64)
    src = save_model(other, tiny_tokenizer(), tmp_path / "other")
    with pytest.raises(PatchMismatchError, match="shape"):
        apply_patch_to_checkpoint(src, patch, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    with pytest.raises(PatchMismatchError):
        apply_patch(other, patch)


def test_ties_tensor_hand_example():
    d1 = torch.tensor([1.0, -2.0, 0.1, 3.0])
    d2 = torch.tensor([3.0, 1.0, -0.2, -1.0])
    out = ties_tensor([d1, d2], TiesConfig(density=0.75))
    # trim keeps 3 of 4 by magnitude: d1 -> [1,-2,0,3], d2 -> [3,1,0,-1]; signs of the sums: +, -, 0, +
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 0.0, 3.0]))


def test_task_arithmetic_and_ties_patch_shapes(two_patches):
    model, se, osm = two_patches
    ta = task_arithmetic([se, osm], [0.5, -1.0], progress=False)
    name = next(iter(ta.deltas))
    torch.testing.assert_close(ta.to_dense(name), 0.5 * se.delta(name) - osm.delta(name))
    ties = ties_merge([se, osm], TiesConfig(density=0.3), progress=False)
    torch.testing.assert_close(ties.to_dense(name), ties_tensor([se.delta(name), osm.delta(name)], TiesConfig(density=0.3)))


@pytest.mark.integration
def test_streamed_apply_on_the_default_model(default_model, tmp_path):
    """A sparse patch streamed onto the real SmolLM2 checkpoint equals the in-memory apply, bit for bit."""
    from safeunits.models.loading import DEFAULT_MODEL, load_model

    model, _ = default_model
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    dense = {}
    for name in ("model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        d = torch.zeros_like(params[name])
        mask = torch.rand(d.shape, generator=gen) < 0.01
        d[mask] = torch.randn(int(mask.sum()), generator=gen) * 1e-2
        dense[name] = d
    patch = SparsePatch.from_dense(dense, architecture_description(model))
    out = apply_patch_to_checkpoint(DEFAULT_MODEL, patch, tmp_path / "patched", progress=False)
    patched, _ = load_model(str(out))
    undo = apply_patch(model, patch)
    try:
        for (n, p), (_, q) in zip(model.named_parameters(), patched.named_parameters()):
            assert torch.equal(p, q), n
    finally:
        undo_patch(model, undo)
