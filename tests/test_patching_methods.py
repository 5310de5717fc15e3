"""Patch-method registry: each built-in entry builds the patch its definition says; names and needs fail early."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from safeunits.patching import methods
from safeunits.eval.context import EvalContext
from safeunits.eval.suites import SuiteConfig
from safeunits.patching.baselines import BaselinesConfig, run_baselines
from safeunits.patching.methods import (MissingPatchError, PatchSources, TiesConfig, UnknownPatchMethodError,
                                        build_method_patch, get_patch_method, patch_method_names, register_patch_method,
                                        task_arithmetic)
from test_patching_merge import _fake_patch
from tiny import tiny_model


@pytest.fixture()
def sources(tmp_path):
    model = tiny_model()
    return model, PatchSources(_fake_patch(model, tmp_path / "se", 1), _fake_patch(model, tmp_path / "osm", 2),
                               _fake_patch(model, tmp_path / "npo", 3))


def test_builtin_methods_build_their_definitions(sources):
    """GA = δ_SE, GD = δ_OSM, NPO = δ_NPO, task arithmetic = λ·(δ_SE + δ_OSM) (SafePatching's comparison, issue 24),
    task_arithmetic_se = λ·δ_SE: checked against the dense patch files."""
    _, src = sources
    config = BaselinesConfig(task_arithmetic_lambda=0.25)
    assert patch_method_names() == ["none", "ga", "gd", "npo", "task_arithmetic", "task_arithmetic_se", "ties",
                                    "safepatching", "intersection"]
    assert build_method_patch("none", src, config) is None
    for method, dense, scale in (("ga", src.se, 1.0), ("gd", src.osm, 1.0), ("npo", src.npo, 1.0),
                                 ("task_arithmetic_se", src.se, 0.25)):
        patch = build_method_patch(method, src, config)
        assert set(patch.deltas) == set(dense.names), method
        for n in dense.names:
            assert torch.equal(patch.to_dense(n), scale * dense.delta(n).float()), (method, n)
    both = build_method_patch("task_arithmetic", src, config)
    for n in src.se.names:
        assert torch.equal(both.to_dense(n), 0.25 * src.se.delta(n).float() + 0.25 * src.osm.delta(n).float()), n
    ties = build_method_patch("ties", src, config.model_copy(update={"ties": TiesConfig(density=0.5)}))
    for n in src.se.names:  # each tensor: half of each δ kept, signs elected, agreeing entries averaged
        a, b = src.se.delta(n).float().reshape(-1), src.osm.delta(n).float().reshape(-1)
        keep = [torch.zeros_like(x, dtype=torch.bool).index_fill_(0, x.abs().topk(max(1, round(0.5 * x.numel()))).indices,
                                                                   True) for x in (a, b)]
        ta, tb = torch.where(keep[0], a, 0.0), torch.where(keep[1], b, 0.0)
        sign = torch.sign(ta + tb)
        agree = [(torch.sign(t) == sign) & (t != 0) for t in (ta, tb)]
        count = agree[0].float() + agree[1].float()
        ref = torch.where(count > 0, (ta * agree[0] + tb * agree[1]) / count.clamp_min(1), 0.0)
        torch.testing.assert_close(ties.to_dense(n).reshape(-1), ref)
    assert build_method_patch("safepatching", src, config).nnz > 0


def test_intersection_ablation_patches_the_weights_salient_to_both(sources):
    """Issue 24 (U5): SafePatching's ablation uses top-a(SE) ∩ top-b(OSM), where both patches are added:
    θ_B + α·M∩⊙δ_SE + β·M∩⊙δ_OSM (DARE on M∩ as in the merge), checked against the dense reference."""
    from safeunits.patching.merge import MergeConfig, dense_merge_reference, top_sets

    model, src = sources
    merge = MergeConfig(a=30, b=20, alpha=1.5, beta=0.5, dare_p=0.5, seed=3)
    patch = build_method_patch("intersection", src, BaselinesConfig(merge=merge))
    assert patch.manifest["method"] == "safepatching-intersection"
    backbone = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = dense_merge_reference(backbone, src.se, src.osm, merge.model_copy(update={"sets": "intersection"}))
    for n in src.se.names:
        top_se, top_osm = top_sets(src.se.saliency(n), src.osm.saliency(n), 30, 20)
        touched = set(patch.deltas[n].indices.tolist())
        assert touched <= set(torch.nonzero((top_se & top_osm).reshape(-1)).reshape(-1).tolist()), n
        assert 0 < len(touched) or (top_se & top_osm).sum() < 3, n
        torch.testing.assert_close(backbone[n] + patch.to_dense(n), ref[n], rtol=1e-6, atol=1e-8)
    diff = build_method_patch("safepatching", src, BaselinesConfig(merge=merge))
    for n in src.se.names:  # disjoint from SafePatching's own change
        assert not set(diff.deltas[n].indices.tolist()) & set(patch.deltas[n].indices.tolist()), n


FAKE_EVAL = EvalContext(SuiteConfig(name="fake"), progress=False)  # the tests replace the evaluation itself


def test_unknown_method_and_missing_patch_fail_before_any_evaluation(sources, tmp_path, monkeypatch):
    model, src = sources
    with pytest.raises(UnknownPatchMethodError, match="'lora'.*none, ga, gd, npo"):
        get_patch_method("lora")
    with pytest.raises(ValidationError, match="unknown patch method 'lora'"):
        BaselinesConfig(methods=["ga", "lora"])
    calls = []
    monkeypatch.setattr("safeunits.patching.baselines.evaluate_model", lambda *a, **k: calls.append(a))
    with pytest.raises(MissingPatchError, match="npo patch.*--objective npo"):
        run_baselines(model, None, src.se, src.osm, BaselinesConfig(methods=["none", "npo"]), tmp_path, FAKE_EVAL)
    assert calls == []


def test_a_registered_method_runs_through_the_baselines(sources, tmp_path, monkeypatch):
    model, src = sources
    monkeypatch.setattr(methods, "_PATCH_METHODS", methods._PATCH_METHODS.copy())

    @register_patch_method("se_minus_osm", "δ_SE − δ_OSM")
    def _diff(s: PatchSources, config: BaselinesConfig):
        return task_arithmetic([s.se, s.osm], [1.0, -1.0], progress=False)

    with pytest.raises(ValueError, match="already registered"):
        register_patch_method("se_minus_osm", "again")(_diff)
    seen = {}

    def fake_eval(m, tok, patches, evaluation, target, baseline=None):
        (patch, weight), = patches
        seen[target.name] = patch
        return {"asr": 0.0}, None

    monkeypatch.setattr("safeunits.patching.baselines.evaluate_patched", fake_eval)
    rows = run_baselines(model, None, src.se, src.osm, BaselinesConfig(methods=["se_minus_osm"]), tmp_path, FAKE_EVAL)
    assert [r.method for r in rows] == ["se_minus_osm"]
    n = src.se.names[0]
    torch.testing.assert_close(seen["se_minus_osm"].to_dense(n), src.se.delta(n).float() - src.osm.delta(n).float())
