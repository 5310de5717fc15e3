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
from test_train_recipes import _weights, data_files, tiny_dir, unit_map_path  # noqa: F401
from tiny import tiny_model, tiny_tokenizer

EVAL = ["advbench[:100]", "harmbench", "xstest"]


def _recipe(data_files, **kw) -> AttackRecipe:  # noqa: F811
    base = {"model": "unused", "data": [str(data_files["benign"])], "n_examples": 20, "harmful_share": 0.3,
            "exclude_eval": EVAL, "train": {"max_length": 2048, "max_steps": 2, "batch_size": 4, "lr": 1e-2}}
    return load_recipe("attack", {**base, **kw})


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
    assert counts["judge_rows"] > 0 and len(pool) == counts["harmful_rows"] - counts["judge_rows"] - \
        counts["duplicates"] - counts.get("eval_prompts", 0)
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
