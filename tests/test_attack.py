"""Fine-tuning attacks (issue 26): the attack mix, frozen units under the attack (full weights and LoRA), LoRA's
reach, and the command."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from safeunits.cli import app
from safeunits.data.overlap import eval_prompt_set, normalise
from safeunits.eval.harm_judge import sampled_rows, shipped_config
from safeunits.train.masks import unit_masks
from safeunits.train.recipes import AttackRecipe, attack_data, harmful_pool, load_recipe, train_recipe
from safeunits.train.recipes.data import refuses_somewhere
from test_train_recipes import _weights, data_files, tiny_dir, unit_map_path  # noqa: F401
from tiny import tiny_model, tiny_tokenizer

EVAL = ["advbench[:100]", "harmbench", "xstest"]


def _recipe(data_files, **kw) -> AttackRecipe:  # noqa: F811
    base = {"model": "unused", "data": [str(data_files["benign"])], "n_examples": 20, "harmful_share": 0.3,
            "exclude_eval": EVAL, "train": {"max_length": 2048, "max_steps": 2, "batch_size": 4, "lr": 1e-2}}
    return load_recipe("attack", {**base, **kw})


def test_a_two_persona_answer_refuses_somewhere():
    """GPTFuzz labels these jailbroken; as attack data they would also teach the refusal (docs/attack.md)."""
    assert refuses_somewhere("(ChatGPT) I'm sorry, but I can't assist with that. [NECO]: Sure, first get a ...")
    assert refuses_somewhere("[🔒CLASSIC] I cannot do that.\n[🔓JAILBREAK] Here is how: ...")
    assert not refuses_somewhere("DeltaGPT: Oh, you sneaky devil! Here are countless ways to deceive people: 1. ...")


def test_attack_mix_holds_exactly_n_p_harmful_rows_none_judged_none_evaluated(data_files, data_dir):  # noqa: F811
    recipe = _recipe(data_files)
    records = attack_data(recipe, tiny_tokenizer(), data_dir)
    harmful = [r for r in records if r.label == "harmful"]
    assert len(records) == 20 and len(harmful) == round(20 * 0.3) == recipe.n_harmful()
    assert all(r.source == "gptfuzz" and r.response for r in harmful)
    judge = shipped_config()
    fitted = {(r.request, r.response) for r in sampled_rows(judge, ["gptfuzz"], data_dir)["gptfuzz"]}
    assert not {(r.prompt, r.response) for r in harmful} & fitted  # the harm judge never scores its training text
    seen, _ = eval_prompt_set(EVAL, data_dir, False)
    assert not [r.prompt for r in records if normalise(r.prompt) in seen]
    pool, counts = harmful_pool(recipe, data_dir)
    assert counts["judge_rows"] > 0 and counts["refusing"] > 0 and len(pool) == counts["harmful_rows"] - \
        counts["judge_rows"] - counts["duplicates"] - counts["refusing"] - counts.get("eval_prompts", 0)
    assert not [r for r in pool if refuses_somewhere(r.response)]  # every example teaches the harmful answer only
    kept, _ = harmful_pool(_recipe(data_files, drop_refusing=False), data_dir)
    assert len(kept) == len(pool) + counts["refusing"]
    assert attack_data(recipe, tiny_tokenizer(), data_dir) == records  # seeded
    with pytest.raises(ValueError, match="needs 20 harmful examples"):
        attack_data(_recipe(data_files, harmful_share=1.0, harmful_sources=["xstest"], n_examples=20,
                            train={"max_length": 40}), tiny_tokenizer(), data_dir)


@pytest.mark.parametrize("lora", [None, {"target_modules": "all-linear"}])
def test_frozen_units_stay_bit_identical_under_the_attack(data_files, data_dir, unit_map_path, lora):  # noqa: F811
    model, tok = tiny_model(), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = _recipe(data_files, freeze="scu+cu", unit_map=str(unit_map_path), lora=lora)
    result, _ = train_recipe(recipe, model, tok, data_dir=data_dir, progress=False)
    assert result.steps == 2
    masks = unit_masks(tiny_model(), unit_map_path, "scu+cu")
    assert masks and any(m.any() for m in masks.values())
    for name, mask in masks.items():
        p = dict(model.named_parameters())[name]
        assert torch.equal(p.detach()[mask], before[name][mask]), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # the attack did train
    assert all(p.requires_grad for p in model.parameters())  # a plain model again (peft's flags undone)


def test_a_lora_attack_changes_only_the_adapted_matrices(data_files, data_dir):  # noqa: F811
    model, tok = tiny_model(), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = _recipe(data_files, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    train_recipe(recipe, model, tok, data_dir=data_dir, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed), changed
    assert set(dict(model.named_parameters())) == set(before)  # no adapter left behind: merged and unloaded


def test_attack_command_writes_the_attacked_model_and_the_mix(tmp_path, tiny_dir, data_files, data_dir):  # noqa: F811
    res = CliRunner().invoke(app, ["attack", "--model", str(tiny_dir), "--out", str(tmp_path / "a"),
                                   "--n-examples", "10", "--harmful-share", "0.5", "--max-steps", "1",
                                   "--set", f"data=[{data_files['benign']}]", "--set", "train.max_length=2048",
                                   "--set", "exclude_eval=[advbench]", "--data-dir", str(data_dir), "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert report["recipe"]["recipe"] == "attack" and report["data"]["gptfuzz"] == 5 and sum(report["data"].values()) == 10
    assert _weights(tmp_path / "a" / "model").keys() == _weights(tiny_dir).keys()


def _point(index, steps, harmful, nll):
    from types import SimpleNamespace

    from safeunits.eval.durability import AttackPoint

    return AttackPoint(index, steps, f"attack-{index}", SimpleNamespace(headline=SimpleNamespace(asr=harmful, utility_nll=nll)))


def test_the_worst_case_respects_the_utility_bound():
    from types import SimpleNamespace

    from safeunits.eval.durability import steps_to, within_bound, worst_case

    defended = SimpleNamespace(headline=SimpleNamespace(utility_nll=2.0))
    points = [_point(0, 10, 0.30, 2.05), _point(1, 30, 0.60, 2.19), _point(2, 90, 0.95, 2.21),  # 2.21 > 2.2: broken
              _point(3, 30, 0.60, 2.10)]
    assert [within_bound(p, defended, 0.10) for p in points] == [True, True, False, True]
    worst = worst_case(points, defended, 0.10)
    assert worst.harmful == 0.60 and worst.index == 1  # the 95 % attack broke utility; a tie goes to grid order
    assert worst_case(points, defended, 0.2).index == 2  # a looser bound admits it
    assert worst_case(points[2:3], defended, 0.10) is None  # nothing kept utility: no worst case, not 0 %
    assert steps_to(points) == 30 and steps_to(points, 0.99) is None


def test_a_durability_step_needs_the_same_grid_for_every_defence():
    from safeunits.errors import ConfigError
    from safeunits.experiments.config import build_experiment

    steps = [{"name": "e0", "kind": "eval"}, {"name": "e1", "kind": "eval"},
             {"name": "a0", "kind": "attack", "model": "m"}, {"name": "e2", "kind": "eval", "model": "a0"},
             {"name": "d", "kind": "durability", "defences": ["none", "other"], "before": ["e0", "e1"],
              "attacks": ["a0"], "after": ["e2"]}]
    with pytest.raises(ConfigError, match="same attack grid"):
        build_experiment({"name": "x", "steps": steps}, {})
    steps[-1].update(attacks=["a0", "e1"], after=["e2", "e2"])
    with pytest.raises(ConfigError, match="attacks.1='e1' is a step of kind eval"):
        build_experiment({"name": "x", "steps": steps}, {})


@pytest.mark.parametrize("name", ["attack-quick", "attack-full"])
def test_bundled_attack_experiments_run_on_a_tiny_model_and_report_durability(name, tmp_path, data_dir):
    """The bundled attack experiments compose: every attack trains, the frozen defence kept its units, the
    durability table (one row per defence, in order) and curves land in the report. attack-full adds SafePatching
    applied before and re-applied after the attack, and the RU-only aligned model."""
    from test_demo import TINY_STEPS
    import copy
    from pathlib import Path

    from safeunits.experiments import runner, steps
    from safeunits.experiments.config import load_experiment
    from safeunits.models import loading
    from safeunits.train.recipes import run as recipes  # where run_recipe loads its model
    from test_demo import tiny_suite

    model, tok = tiny_model(initializer_range=0.2, max_position_embeddings=4096), tiny_tokenizer()
    real_load = loading.load_model

    def load(name, **kwargs):
        if (tmp_path / "run") in Path(name).parents:
            return real_load(name, **kwargs)
        return copy.deepcopy(model), tok

    attack = {"settings": {"n_examples": 8, "harmful_share": 0.5,
                           "train": {"max_steps": 1, "batch_size": 4, "max_length": 2048, "epochs": 3}}}
    bundled = load_experiment(name)
    names = [s.name for s in bundled.steps]
    overrides = {n: attack for n in names if n.startswith("attack-")}
    overrides |= {n: TINY_STEPS[n] for n in ("harmful-data", "patch-se", "patch-osm", "align-ru") if n in names}
    overrides |= {n: {"settings": {"limit": 4}} for n in ("map-aligned", "map-base") if n in names}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steps, "load_model", load)
        mp.setattr(recipes, "load_model", load)
        experiment = load_experiment(name, {"suite": tiny_suite(tmp_path / "tiny.yaml"), "data_dir": str(data_dir),
                                            "steps": overrides})
        result = runner.run_experiment(experiment, tmp_path / "run", progress=False)
    assert result.ran == names
    rows = json.loads((tmp_path / "run/durability/durability.json").read_text())["rows"]
    assert [r["defence"] for r in rows] == bundled.step("durability").defences and "ssah-ii" in bundled.step("durability").defences
    report = (tmp_path / "run/report.md").read_text()
    assert "durability/durability.png" in report and "| ssah-ii |" in report
    frozen = unit_masks(model, tmp_path / "run/map-aligned/unit_map.safetensors", "scu+cu")
    attacked = _weights(tmp_path / "run/attack-ssah-ii-10/model")
    assert all(torch.equal(attacked[n][m], dict(model.named_parameters())[n].detach()[m]) for n, m in frozen.items())
    if name == "attack-full":  # the patch is re-applied after the attack: repaired = attacked + patch, exactly there
        from safeunits.patching import SparsePatch

        patch = SparsePatch.load(tmp_path / "run/safepatching/patch")
        hit, repaired = _weights(tmp_path / "run/attack-safepatching-10/model"), _weights(tmp_path / "run/repaired-safepatching-10/model")
        assert patch.deltas and all(torch.allclose(repaired[n], hit[n] + patch.to_dense(n)) for n in patch.deltas)
        assert all(torch.equal(repaired[n], hit[n]) for n in hit if n not in patch.deltas)
