"""One fit check for every artifact: unit maps and patches refuse models they were not made for, old files still load."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from safeunits.data.records import Record
from safeunits.io import save_safetensors, write_json
from safeunits.models.loading import save_model
from safeunits.models.signature import (
    ArchitectureMismatchError,
    architecture_description,
    architecture_signature,
    check_fits,
)
from safeunits.patching.apply import apply_patch, apply_patch_to_checkpoint, undo_patch
from safeunits.patching.sparse import FORMAT, PatchMismatchError, SparsePatch
from safeunits.units.classes import build_unit_map
from safeunits.units.scores import compute_scores
from safeunits.units.unit_map import CLASSES, UnitMap


def old_arch_hash(model) -> str:
    """The hash unit maps stored as `arch_hash` before the signature recorded heads, computed from scratch."""
    shapes = {n: list(t.shape) for n, t in sorted(model.state_dict().items())}
    return hashlib.blake2b(json.dumps({"model_type": model.config.model_type, "shapes": shapes}, sort_keys=True).encode(),
                           digest_size=16).hexdigest()


@pytest.fixture(scope="module")
def mapped():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    safety = compute_scores(model, tok, [Record(f"Harm {i}?", "Sorry, no.") for i in range(3)], progress=False)
    utility = compute_scores(model, tok, [Record(f"Question {i}?", f"Answer number {i}.") for i in range(3)], progress=False)
    return model, build_unit_map(model, safety, utility, fingerprint=False)


def test_mismatch_error_says_what_the_artifact_was_made_for(mapped):
    model, um = mapped
    um.check_model(model)
    um.check_model(tiny_model("llama", seed=3))  # other weights, same architecture: fits
    with pytest.raises(ArchitectureMismatchError) as err:
        um.check_model(tiny_model("llama", num_hidden_layers=3))
    message = str(err.value)
    assert "'llama' model (2 layers, 4 heads, 48 MLP channels)" in message
    assert um.signature in message and architecture_signature(tiny_model("llama", num_hidden_layers=3)) in message
    assert "rebuild the unit map" in message
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working


def test_unit_map_refuses_same_shapes_with_other_heads():
    """Plain multi-head attention with 4 or 8 heads has identical tensor shapes; a unit map of one must not fit the other."""
    neox4, tok = tiny_model("gpt_neox"), tiny_tokenizer()
    scores = compute_scores(neox4, tok, [Record("Hi?", "Hello there.")], progress=False)
    um = build_unit_map(neox4, scores, scores, fingerprint=False)
    with pytest.raises(ArchitectureMismatchError, match="architecture hash"):
        um.check_model(tiny_model("gpt_neox", num_attention_heads=8))


def test_unit_map_written_the_old_way_still_loads_and_checks(mapped, tmp_path):
    """Format 1 (as written before this change): `arch_hash` in the JSON and metadata, no `signature`."""
    model, um = mapped
    path = tmp_path / "unit_map.safetensors"
    tensors = {}
    for kind in ("mlp", "head"):
        tensors |= {f"{kind}.safety": um.safety[kind], f"{kind}.utility": um.utility[kind], f"{kind}.class": um.classes[kind]}
    save_safetensors(path, tensors, {"format": "safeunits.unit_map", "version": "1", "model_type": "llama",
                                     "arch_hash": old_arch_hash(model), "fingerprint": "",
                                     "unit_params": json.dumps(um.unit_params), "classes": json.dumps(list(CLASSES))})
    write_json(tmp_path / "unit_map.json", {"format": "safeunits.unit_map", "version": 1, "tensors": path.name,
                                            "model_type": "llama", "arch_hash": old_arch_hash(model), "fingerprint": "",
                                            "geometry": um.geometry, "unit_params": um.unit_params, "settings": {}})
    old = UnitMap.load(tmp_path)
    assert old.signature == old_arch_hash(model) != um.signature
    assert all(torch.equal(old.classes[k], um.classes[k]) for k in ("mlp", "head"))
    old.check_model(model)
    with pytest.raises(ArchitectureMismatchError, match="architecture hash"):
        old.check_model(tiny_model("llama", intermediate_size=64))
    saved = um.save(tmp_path / "new" / "unit_map.safetensors")  # a new map records `signature` (format 2)
    assert json.loads((tmp_path / "new" / "unit_map.json").read_text())["signature"] == um.signature
    UnitMap.load(saved).check_model(model)


def _patch(model, seed: int = 0) -> SparsePatch:
    gen = torch.Generator().manual_seed(seed)
    dense = {n: torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) < 0.1)
             for n, p in model.named_parameters() if "mlp" in n}
    return SparsePatch.from_dense(dense, architecture_description(model))


def test_patch_written_the_old_way_still_applies_and_refuses(tmp_path):
    """A patch whose description has no head layout (as written before this change) still works, checkpoint included."""
    model = tiny_model("llama")
    new = _patch(model)
    assert new.signature["heads"] == [4, 2]
    old_description = {"model_type": "llama", "shapes": {n: list(t.shape) for n, t in model.state_dict().items()}}
    tensors = {}
    for name, d in new.deltas.items():
        tensors[name + "::indices"], tensors[name + "::values"] = d.indices, d.values
    (tmp_path / "old").mkdir()
    save_safetensors(tmp_path / "old" / "patch.safetensors", tensors,
                     {"format": FORMAT, "signature": json.dumps(old_description),
                      "shapes": json.dumps({n: list(d.shape) for n, d in new.deltas.items()})})
    old = SparsePatch.load(tmp_path / "old")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    undo = apply_patch(model, old)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(new.deltas)
    undo_patch(model, undo)
    src = save_model(model, tiny_tokenizer(), tmp_path / "model")
    apply_patch_to_checkpoint(src, old, tmp_path / "patched", progress=False)  # tied embeddings absent from the file
    with pytest.raises(PatchMismatchError, match="shape"):
        apply_patch(tiny_model("llama", intermediate_size=64), old)
    assert PatchMismatchError is ArchitectureMismatchError


def test_patch_checks_heads_when_both_sides_record_them():
    neox4, neox8 = tiny_model("gpt_neox"), tiny_model("gpt_neox", num_attention_heads=8)
    with pytest.raises(ArchitectureMismatchError, match=r"heads \[8, 8\] != \[4, 4\]"):
        apply_patch(neox8, _patch(neox4))
    with pytest.raises(ArchitectureMismatchError, match="does not fit the patch it is added to"):
        _patch(neox4) + _patch(tiny_model("gpt_neox", intermediate_size=64))


def test_check_fits_inputs():
    model = tiny_model("llama")
    description = architecture_description(model)
    assert architecture_description(description) == description  # descriptions are a fixed point
    check_fits(architecture_signature(model), description)
    check_fits(architecture_signature(model), model.config)
    with pytest.raises(TypeError, match="only be checked against"):
        check_fits(description, architecture_signature(model))
    with pytest.raises(TypeError, match="expected a model, a config or an architecture description"):
        architecture_signature("llama")  # type: ignore[arg-type]
