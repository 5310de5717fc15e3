"""D_h building, patch derivation, CLI round trips and the sweep on tiny models (and one real-model check)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from safeunits.data.overlap import load_spec
from safeunits.data.records import Record
from safeunits.models.loading import model_fingerprint, save_model
from safeunits.patching.harmful_data import (HarmfulDataConfig, OverlapError, build_harmful_data, check_no_overlap,
                                             load_harmful_data, select_prompts)
from safeunits.patching.patches import DensePatch, PatchConfig, derive_patch
from safeunits.patching.saliency import SaliencyConfig, snip_saliency
from tiny import tiny_model, tiny_tokenizer

RECORDS = [Record(f"Explain how to do bad thing number {i}", f"Sure, here is how to do bad thing {i}: step one.")
           for i in range(6)]


def test_select_prompts_skips_eval_prompts_and_overlap_is_caught(data_dir):
    splits = select_prompts(HarmfulDataConfig(n_train=20, n_val=10), str(data_dir))
    from safeunits.data.registry import load_dataset

    first100 = {r.prompt for r in load_dataset("advbench", data_dir=data_dir, limit=100)}
    chosen = [r.prompt for s in splits.values() for r in s]
    assert len(set(chosen)) == 30 and not first100 & set(chosen)
    assert not {r.prompt for r in splits["train"]} & {r.prompt for r in splits["val"]}
    check_no_overlap(chosen, ["advbench[:100]"], str(data_dir))
    with pytest.raises(OverlapError, match="appear in the evaluation sets"):
        check_no_overlap(chosen[:3] + [sorted(first100)[0].upper() + "  "], ["advbench[:100]"], str(data_dir))
    with pytest.raises(OverlapError):
        build_harmful_data(HarmfulDataConfig(offset=0, n_train=120, n_val=0, responses="dataset"), "/nonexistent",
                           data_dir=str(data_dir))


def test_build_data_from_a_dataset_with_responses(tmp_path, data_dir):
    src = tmp_path / "harm.jsonl"
    src.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in RECORDS))
    config = HarmfulDataConfig(prompts=str(src), offset=0, n_train=4, n_val=2, responses="dataset", eval_sets=["advbench[:100]"])
    build_harmful_data(config, tmp_path / "dh", data_dir=str(data_dir))
    train, info = load_harmful_data(tmp_path / "dh", "train")
    val, _ = load_harmful_data(tmp_path / "dh", "val")
    assert len(train) == 4 and len(val) == 2 and all(r.response for r in train + val)
    assert info["counts"] == {"train": 4, "val": 2} and info["eval_sets_checked"] == {"advbench[:100]": 100}
    missing = tmp_path / "noresp.jsonl"
    missing.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in RECORDS))
    with pytest.raises(ValueError, match="no responses"):
        build_harmful_data(config.model_copy(update={"prompts": str(missing)}), tmp_path / "x", data_dir=str(data_dir))


def test_build_data_by_prefill_uses_generation(tmp_path, data_dir):
    model, tok = tiny_model(), tiny_tokenizer()
    config = HarmfulDataConfig(n_train=3, n_val=1, responses="prefill", max_new_tokens=4, require_compliance=False,
                               eval_sets=["advbench[:100]"])
    result = build_harmful_data(config, tmp_path / "dh", model, tok, data_dir=str(data_dir), progress=False)
    assert all(r.response.startswith("Sure, here is") for r in result["train"])


def test_derive_patch_restores_backbone_and_records_manifest(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp = model_fingerprint(model)
    config = PatchConfig(objective="ascent", train={"max_steps": 3, "lr": 1e-2, "batch_size": 2, "stop_nll_above": 1e9})
    patch = derive_patch(model, tok, RECORDS, config, tmp_path / "se", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    m = patch.manifest
    assert m["backbone_fingerprint"] == fp and m["steps"] == 3 and m["objective"] == "ascent"
    assert m["train_config"]["lr"] == 1e-2 and m["stopped_reason"] == "completed"
    # δ is exactly what the same training run does to a fresh copy of the backbone
    from safeunits.train.engine import train

    ref = tiny_model()
    train(ref, tok, RECORDS, config.train_config(), progress=False)
    for n, p in ref.named_parameters():
        assert torch.equal(patch.delta(n), (p.detach() - before[n]).float()), n
    # saliency on the patched (trained) model
    sal = snip_saliency(ref, tok, RECORDS, SaliencyConfig(), progress=False)
    for n in sal:
        torch.testing.assert_close(patch.saliency(n), sal[n], rtol=1e-5, atol=1e-10)
    # the ascent really raised the harmful responses' NLL
    assert patch.manifest["losses"][-1] < patch.manifest["losses"][0]


def test_backbone_saliency_is_refused_because_it_gives_both_patches_the_same_scores(tmp_path):
    """Issue 24 (B1): SNIP on θ_B of the ascent and of the descent loss are the same map (|∇(−L)| = |∇L|), so the
    merge's difference sets are empty at a = b. Checked numerically first, then the option must be refused."""
    import warnings

    from safeunits.patching.merge import EmptyDifferenceWarning, MergeConfig, controllable_merge
    from safeunits.patching.patches import save_dense_patch
    from safeunits.models.signature import architecture_description

    model, tok = tiny_model(), tiny_tokenizer()
    sal = snip_saliency(model, tok, RECORDS, SaliencyConfig(), progress=False)  # the one map both patches would get
    manifest = {"signature": architecture_description(model), "backbone_fingerprint": model_fingerprint(model)}
    gen = torch.Generator().manual_seed(0)
    patches = [save_dense_patch(tmp_path / k, {n: torch.randn(t.shape, generator=gen) for n, t in sal.items()}, sal,
                                manifest) for k in ("se", "osm")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = controllable_merge(*patches, MergeConfig(a=5, b=5), progress=False)
    assert merged.nnz == 0 and "empty" in merged.manifest["warning"]
    assert [w.category for w in caught] == [EmptyDifferenceWarning]
    with pytest.raises(ValueError, match="same signal.*use 'patched'"):
        PatchConfig(objective="ascent", saliency_on="backbone")
    res = CliRunner().invoke(__import__("safeunits.cli", fromlist=["app"]).app,
                             ["patch", "derive", "--harmful-data", str(tmp_path), "--out", str(tmp_path / "p"),
                              "--saliency-on", "backbone"])
    assert res.exit_code == 2 and "same signal" in res.output


def test_ascent_bound_stops_early(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    config = PatchConfig(objective="ascent", train={"max_steps": 50, "lr": 5e-2, "batch_size": 6, "stop_nll_above": 6.0})
    patch = derive_patch(model, tok, RECORDS, config, tmp_path / "se", progress=False)
    assert patch.manifest["stopped_reason"] == "nll_above" and patch.manifest["steps"] < 50


def _cli(*args: str) -> None:
    from safeunits.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_cli_derive_merge_apply_round_trip(tmp_path, data_dir):
    model, tok = tiny_model(), tiny_tokenizer()
    base = save_model(model, tok, tmp_path / "base")
    src = tmp_path / "harm.jsonl"
    src.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in RECORDS))
    _cli("patch", "harmful-data", "--out", str(tmp_path / "dh"), "--prompts", str(src), "--offset", "0", "--n-train", "5",
         "--n-val", "1", "--responses", "dataset", "--eval-set", "advbench[:100]", "--data-dir", str(data_dir))
    _cli("patch", "derive", "--model", str(base), "--harmful-data", str(tmp_path / "dh"), "--out", str(tmp_path / "p"),
         "--max-steps", "2", "--lr", "1e-2", "--batch-size", "2", "-q")
    _cli("patch", "merge", "--se", str(tmp_path / "p/se"), "--osm", str(tmp_path / "p/osm"), "--out",
         str(tmp_path / "merged"), "--a", "10", "--b", "10", "--alpha", "2", "-q")
    _cli("patch", "apply", "--model", str(base), "--patch", str(tmp_path / "merged"), "--out", str(tmp_path / "patched"), "-q")
    _cli("patch", "apply", "--model", str(tmp_path / "patched"), "--patch", str(tmp_path / "merged"), "--scale", "-1",
         "--out", str(tmp_path / "restored"), "-q")
    from safeunits.models.loading import load_model
    from safeunits.patching.apply import apply_patch
    from safeunits.patching.merge import MergeConfig, controllable_merge

    patched, _ = load_model(str(tmp_path / "patched"))
    restored, _ = load_model(str(tmp_path / "restored"))
    expected = controllable_merge(DensePatch(tmp_path / "p/se"), DensePatch(tmp_path / "p/osm"),
                                  MergeConfig(a=10, b=10, alpha=2), progress=False)
    apply_patch(model, expected)
    for (n, p), (_, q), (_, r), (_, b0) in zip(model.named_parameters(), patched.named_parameters(),
                                               restored.named_parameters(), tiny_model().named_parameters()):
        assert torch.equal(p, q), n
        ulp = torch.finfo(torch.float32).eps * torch.maximum(q.abs(), b0.abs())
        assert ((r - b0).abs() <= ulp).all(), n
    manifest = json.loads((tmp_path / "merged/manifest.json").read_text())
    assert manifest["merge_config"]["alpha"] == 2 and manifest["se_manifest"]["steps"] == 2


def test_sweep_on_tiny_model(tmp_path, data_dir, monkeypatch):
    from safeunits.eval.context import EvalContext
    from safeunits.patching.evaluation import ValidationConfig
    from safeunits.patching.sweep import SweepConfig, SweepPoint, SweepResult, run_sweep
    from test_patching_merge import _fake_patch

    model, tok = tiny_model(), tiny_tokenizer()
    src = tmp_path / "harm.jsonl"
    src.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in RECORDS))
    build_harmful_data(HarmfulDataConfig(prompts=str(src), offset=0, n_train=3, n_val=3, responses="dataset",
                                         eval_sets=[]), tmp_path / "dh")
    se, osm = _fake_patch(model, tmp_path / "se", 1), _fake_patch(model, tmp_path / "osm", 2)
    config = SweepConfig(a=[5, 50], b=[5], alpha=[1, 2], beta=[1],
                         validation=ValidationConfig(n_xstest=3, n_utility=2, max_new_tokens=3))
    monkeypatch.delenv("SAFEUNITS_DATA_DIR", raising=False)  # the context's data folder alone must serve every set
    ctx = EvalContext.create(None, data_dir=data_dir, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run_sweep(model, tok, se, osm, tmp_path / "dh", config, tmp_path / "sweep", ctx)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # every point undone exactly
    assert len(result.rows) == 3 + 4 and result.best.method == "safepatching"
    assert (tmp_path / "sweep/pareto.png").stat().st_size > 1000 and "Pareto" in (tmp_path / "sweep/sweep.md").read_text()
    # what `--best` hands on: the chosen point and the XSTest prompts it was chosen on (left out of test scores)
    from safeunits.commands.patch import _best_point

    point, held_out = _best_point(tmp_path / "sweep/best.json")
    assert point == {**{k: getattr(result.best, k) for k in ("a", "b", "alpha", "beta")}, "dare_p": 0.5}
    assert result.best.key.endswith(",p=0.5")  # the DARE keep-rate is a grid dimension (issue 24, U4)
    assert held_out == ["xstest:safe[200:203]"]
    held = [json.loads(x)["prompt"] for x in (tmp_path / "sweep/xstest_val.jsonl").read_text().splitlines()]
    assert held == [r.prompt for r in load_spec(held_out[0], data_dir)]
    saturated = result.baseline.asr == 0
    # best.json and sweep.jsonl hold exactly the returned result (the rows without their Pareto marks)
    assert SweepResult.model_validate_json((tmp_path / "sweep/best.json").read_text()) == result.model_copy(update={"rows": []})
    assert [SweepPoint.model_validate_json(line) for line in (tmp_path / "sweep/sweep.jsonl").read_text().splitlines()] \
        == [r.model_copy(update={"pareto": None}) for r in result.rows]
    assert json.loads((tmp_path / "sweep/best.json").read_text())["harmful_axis_saturated"] is saturated
    assert ("**Warning:**" in (tmp_path / "sweep/sweep.md").read_text()) is saturated
    # resume: nothing is evaluated again
    lines = (tmp_path / "sweep/sweep.jsonl").read_text().count("\n")
    run_sweep(model, tok, se, osm, tmp_path / "dh", config, tmp_path / "sweep", ctx)
    assert (tmp_path / "sweep/sweep.jsonl").read_text().count("\n") == lines
    # the command: an experiment of one sweep step on the patch and D_h folders; `--best` takes its run folder
    from safeunits.cli import app

    save_model(model, tok, tmp_path / "m")
    args = ["patch", "sweep", "--se", str(tmp_path / "se"), "--osm", str(tmp_path / "osm"), "--harmful-data", str(tmp_path / "dh"),
            "--model", str(tmp_path / "m"), "--out", str(tmp_path / "cli"), "--a", "50", "--b", "5", "--alpha", "1",
            "--beta", "1", "--n-xstest", "3", "--n-utility", "2", "--max-new-tokens", "3", "--data-dir", str(data_dir),
            "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli/sweep/done.json").is_file() and (tmp_path / "cli/report.md").is_file()
    assert _best_point(tmp_path / "cli")[0]["a"] == 50 and "Pareto" in res.output
    done = (tmp_path / "cli/sweep/done.json").read_bytes()
    assert CliRunner().invoke(app, args).exit_code == 0 and (tmp_path / "cli/sweep/done.json").read_bytes() == done


def test_sweep_saturation_note_only_when_the_backbone_refuses_every_held_out_prompt():
    from safeunits.patching.sweep import saturation_note

    assert saturation_note(1 / 64) is None
    assert "not aligned on" in saturation_note(0.0)


def test_baselines_and_continual_on_tiny_model(tmp_path, data_dir, monkeypatch):
    from safeunits.eval.context import EvalContext
    from safeunits.patching.baselines import BaselinesConfig, MethodRow, run_baselines
    from safeunits.patching.continual import ContinualConfig
    from test_patching_merge import _fake_patch

    monkeypatch.delenv("SAFEUNITS_DATA_DIR", raising=False)  # the real evaluation path, data folder from the context
    model, tok = tiny_model(), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    se, osm = _fake_patch(model, tmp_path / "se", 1), _fake_patch(model, tmp_path / "osm", 2)
    ctx = EvalContext(_tiny_suite(data_dir), data_dir=data_dir, progress=False)
    config = BaselinesConfig(methods=["none", "ga", "gd", "task_arithmetic", "ties", "safepatching"])
    rows = run_baselines(model, tok, se, osm, config, tmp_path / "b", ctx)
    assert [r.method for r in rows] == config.methods
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert rows[0].nnz == 0 and rows[1].nnz == sum(p.numel() for p in model.parameters())
    assert "| ties |" in (tmp_path / "b/baselines.md").read_text()
    assert (tmp_path / "b/ga/metrics.json").is_file() and rows[0].significant == "-"
    saved = json.loads((tmp_path / "b/baselines.json").read_text())["rows"]  # the file holds what was returned
    assert [MethodRow.model_validate(r) for r in saved] == rows and list(saved[0])[:3] == ["method", "nnz", "asr"]
    # continual: two Do-Not-Answer categories, tiny budgets; the model ends patched by both steps
    import yaml

    import safeunits.patching as patching
    from safeunits.experiments.presets import continual
    from safeunits.models.loading import load_model
    from safeunits.patching.apply import apply_patch
    from safeunits.patching.sparse import SparsePatch

    save_model(model, tok, tmp_path / "m")
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump(_tiny_suite(data_dir).model_dump(mode="json")))
    cconf = ContinualConfig(categories=["malicious_uses", "information_hazard"],
                            data=HarmfulDataConfig(prompts="donotanswer", offset=0, n_train=3, n_val=0, max_new_tokens=4,
                                                   require_compliance=False, eval_sets=["advbench[:100]"]),
                            se=PatchConfig(objective="ascent", train={"max_steps": 1, "batch_size": 3}),
                            osm=PatchConfig(objective="descent", train={"max_steps": 1, "batch_size": 3}))
    run = dict(suite=str(suite), data_dir=data_dir, progress=False)
    crows = continual(cconf, str(tmp_path / "m"), tmp_path / "c", **run)
    assert [r["step"] for r in crows] == [0, 1, 2]
    assert (tmp_path / "c/report.md").is_file() and (tmp_path / "c/continual.md").is_file()  # an experiment's folder
    names = ("step1_malicious_uses", "step2_information_hazard")
    steps = [SparsePatch.load(tmp_path / f"c/{n}-merge/patch") for n in names]
    fresh, _ = load_model(str(tmp_path / "m"))
    for p in steps:
        apply_patch(fresh, p)
    final, _ = load_model(str(tmp_path / f"c/{names[1]}/model"))
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), final.parameters()))
    assert any(not torch.equal(p, before[n]) for n, p in final.named_parameters())
    assert {r.category for r in load_harmful_data(tmp_path / f"c/{names[0]}-data")[0]} == {"malicious_uses"}
    # step 2's D_h is built on step 1's model: the chain of keys makes every later step depend on every earlier one
    assert json.loads((tmp_path / f"c/{names[1]}-data/done.json").read_text())["settings"]["model"] == names[0]

    # a rerun into the same folder resumes: no data, no derivation, no generation; same rows, same final model
    def fail(*a, **k):
        raise AssertionError("a resumed continual run should reuse what the first run saved")

    done = {p: p.read_bytes() for p in (tmp_path / "c").glob("*/done.json")}
    for name in ("build_harmful_data", "derive_patch"):
        monkeypatch.setattr(patching, name, fail)
    resumed = continual(cconf, str(tmp_path / "m"), tmp_path / "c", **run)
    keys = ("step", "n_train", "nnz", "se_steps", "asr", "xstest_refusal", "utility_nll")
    assert [{k: r.get(k) for k in keys} for r in resumed] == [{k: r.get(k) for k in keys} for r in crows]
    assert {p: p.read_bytes() for p in (tmp_path / "c").glob("*/done.json")} == done
    # fewer categories into the same folder: the first category's steps are the same steps (cached), nothing runs
    fewer = continual(cconf.model_copy(update={"categories": ["malicious_uses"]}), str(tmp_path / "m"), tmp_path / "c",
                      **run)
    assert [r["step"] for r in fewer] == [0, 1] and fewer[1]["nnz"] == crows[1]["nnz"]


def test_cli_patch_baselines_with_data_dir_only(tmp_path, data_dir, monkeypatch):
    """`--data-dir` alone (no SAFEUNITS_DATA_DIR) reaches every dataset the evaluation loads."""
    import yaml

    from safeunits.cli import app
    from test_patching_merge import _fake_patch

    monkeypatch.delenv("SAFEUNITS_DATA_DIR", raising=False)
    model, tok = tiny_model(), tiny_tokenizer()
    save_model(model, tok, tmp_path / "m")
    _fake_patch(model, tmp_path / "se", 1), _fake_patch(model, tmp_path / "osm", 2)
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump(_tiny_suite(data_dir).model_dump(mode="json")))
    res = CliRunner().invoke(app, ["patch", "baselines", "--se", str(tmp_path / "se"), "--osm", str(tmp_path / "osm"),
                                   "--out", str(tmp_path / "b"), "--model", str(tmp_path / "m"), "--methods", "none,ga",
                                   "--suite", str(suite), "--data-dir", str(data_dir), "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b/baselines/ga/config.json").read_text())["data_dir"] == str(data_dir)
    assert (tmp_path / "b/baselines/done.json").is_file() and (tmp_path / "b/report.md").is_file()  # an experiment


def _tiny_suite(data_dir):
    from safeunits.eval.suites import HarmfulSet, OverSafetySet, SuiteConfig, UtilitySet

    return SuiteConfig(name="tiny", max_new_tokens=2, batch_size=4,
                       harmful=[HarmfulSet(name="advbench", dataset="advbench", limit=2, system_prompts=["none"])],
                       over_safety=OverSafetySet(limit=2), utility=[UtilitySet(name="u", dataset="self-instruct:seed", limit=2)])


def test_cli_train_overrides_are_checked(tmp_path):
    from safeunits.cli import app

    for args in (["patch", "continual", "--out", str(tmp_path), "--set", "se.train=[1]"],
                 ["patch", "continual", "--out", str(tmp_path), "--set", "osm.train=[1]"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and ("se.train" in result.output or "osm.train" in result.output)
    assert not any(tmp_path.iterdir())  # rejected before any model is loaded or anything written


def test_sweep_refuses_a_point_whose_difference_sets_are_empty(tmp_path, monkeypatch):
    """Issue 24 (B1): two patches with the same saliency map give empty difference sets at a = b; the sweep must stop
    instead of ranking the untouched backbone as a SafePatching point."""
    from safeunits.errors import UserValueError
    from safeunits.eval.context import EvalContext
    from safeunits.eval.suites import SuiteConfig
    from safeunits.models.signature import architecture_description
    from safeunits.patching import sweep
    from safeunits.patching.patches import save_dense_patch

    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    sal = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    manifest = {"signature": architecture_description(model), "backbone_fingerprint": model_fingerprint(model)}
    se, osm = (save_dense_patch(tmp_path / k, {n: torch.randn(t.shape, generator=gen) for n, t in sal.items()}, sal,
                                manifest) for k in ("se", "osm"))
    row = {"asr": 0.5, "xstest_refusal": 0.1, "utility_nll": 2.0}
    monkeypatch.setattr(sweep, "validation_suite", lambda *a, **k: SuiteConfig(name="fake"))
    monkeypatch.setattr(sweep, "evaluate_model", lambda *a, **k: (dict(row), None))
    monkeypatch.setattr(sweep, "evaluate_patched", lambda *a, **k: (dict(row), None))
    ctx = EvalContext(SuiteConfig(name="fake"), progress=False)
    with pytest.raises(UserValueError, match="a=5, b=5: the safety .*and the over-safety .*difference sets are empty"):
        sweep.run_sweep(model, None, se, osm, tmp_path, sweep.SweepConfig(a=[5], b=[5], alpha=[1]), tmp_path / "s", ctx)
    # a > b leaves the safety part non-empty (its top-a is larger than the other's top-b) but the over-safety part empty
    with pytest.raises(UserValueError, match="a=20, b=5: the over-safety \\(OSM\\) difference set is empty"):
        sweep.run_sweep(model, None, se, osm, tmp_path, sweep.SweepConfig(a=[20], b=[5], alpha=[1]), tmp_path / "s2", ctx)


def test_dare_keep_rate_is_a_sweep_dimension_and_old_best_files_keep_their_point(tmp_path):
    from pydantic import ValidationError

    from safeunits.io import write_json
    from safeunits.patching.sweep import SweepChoice, SweepConfig, _key

    def chosen_point(best_json: dict) -> dict:
        write_json(tmp_path / "best.json", best_json)
        return SweepChoice.read(tmp_path / "best.json").point

    assert SweepConfig().dare_p == [0.5] and SweepConfig(dare_p=None).dare_p == [1.0]
    assert SweepConfig(dare_p=[0.3, 1]).dare_p == [0.3, 1.0]
    with pytest.raises(ValidationError, match="keep-rates"):
        SweepConfig(dare_p=[0.0])
    assert _key(5, 5, 1, 1, 1.0) == "a=5,b=5,alpha=1,beta=1" and _key(5, 5, 1, 1, 0.3) == "a=5,b=5,alpha=1,beta=1,p=0.3"
    point = {"a": 5.0, "b": 1.0, "alpha": 2.0, "beta": 1.0}
    assert chosen_point({"best": {**point, "dare_p": 0.3}}) == {**point, "dare_p": 0.3}
    # a best.json written before the grid: no p per point, the sweep's one keep-rate (None: no retention) in its config
    assert chosen_point({"best": point, "config": {"dare_p": None}}) == {**point, "dare_p": None}
    assert chosen_point({"best": None}) == {}
    write_json(tmp_path / "best.json", {"best": {**point, "dare_p": 0.3}, "held_out_xstest": "xstest:safe[:25]"})
    assert SweepChoice.read(tmp_path / "best.json").held_out == ["xstest:safe[:25]"]
