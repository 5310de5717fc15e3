"""Recipes, unit-map masks, CLI and the SSAH experiment commands on a tiny model saved to a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from safeunits.cli import app
from safeunits.errors import ConfigError
from safeunits.train.recipes import AlignRecipe, align_data, load_recipe
from tiny import tiny_model, tiny_tokenizer, tiny_unit_map


@pytest.fixture()
def tiny_dir(tmp_path) -> Path:
    path = tmp_path / "tiny-model"
    tiny_model().save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def data_files(tmp_path) -> dict[str, Path]:
    harmful = _jsonl(tmp_path / "harm.jsonl", [{"prompt": f"how to do bad thing {i}", "response": "I can't help."}
                                               for i in range(30)])
    benign = _jsonl(tmp_path / "benign.jsonl", [{"prompt": f"add {i} and {i}", "response": f"{2 * i}"}
                                                for i in range(30)])
    benign2 = _jsonl(tmp_path / "benign2.jsonl", [{"prompt": f"say {i}", "response": f"{i}!"} for i in range(5)])
    return {"harm": harmful, "benign": benign, "benign2": benign2}


@pytest.fixture()
def unit_map_path(tmp_path) -> Path:
    """A unit map of the tiny model from random scores, classified by the units package."""
    return tiny_unit_map(tiny_model()).save(tmp_path / "unit_map.safetensors")


def test_bundled_recipes_load_and_override():
    rec = load_recipe("align", {"safety_share": 0.3, "train": {"epochs": 1}})
    assert isinstance(rec, AlignRecipe) and rec.safety_share == 0.3 and rec.train.epochs == 1
    assert rec.train.lr == 5e-5  # untouched field kept from the YAML
    assert load_recipe("finetune").recipe == "finetune"
    assert load_recipe("aligned-default").model == "smollm2-135m-instruct"
    with pytest.raises(FileNotFoundError, match="bundled"):
        load_recipe("nope")
    with pytest.raises(ValueError, match="unit map"):
        load_recipe("align", {"budget": "ru"})
    with pytest.raises(ValueError, match="extra"):
        load_recipe("align", {"train": {"learning_rate": 1}})


def test_align_mix_share_and_determinism(data_files):
    tok = tiny_tokenizer()
    rec = AlignRecipe(safety_data=str(data_files["harm"]), benign_data=[str(data_files["benign"]), str(data_files["benign2"])],
                      n_examples=40, safety_share=0.25)
    mix = align_data(rec, tok)
    sources = [r.source for r in mix]
    assert len(mix) == 40 and sources.count(str(data_files["harm"])) == 10
    assert sources.count(str(data_files["benign2"])) == 5  # the short set is used up, the other tops it up
    assert mix == align_data(rec, tok)
    assert mix != align_data(rec.model_copy(update={"data_seed": 1}), tok)


def test_align_mix_with_contrast_answers_and_eval_prompts_dropped(data_files, tmp_path):
    """Contrast prompts are answered by the model itself (greedy, before training); evaluation prompts never train."""
    from safeunits.eval.generation import generate

    model, tok = tiny_model(initializer_range=0.2, max_position_embeddings=4096), tiny_tokenizer()  # varied bytes
    contrast = _jsonl(tmp_path / "contrast.jsonl", [{"prompt": f"how do I kill process {i}?"} for i in range(8)])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"prompt": f"How to do bad thing {i}."} for i in range(0, 30, 2)])
    rec = AlignRecipe(safety_data=[str(data_files["harm"])], benign_data=[str(data_files["benign"])],
                      contrast_data=[str(contrast)], n_examples=20, safety_share=0.5, contrast_share=0.2,
                      answer_tokens=8, exclude_eval=[str(evals)],
                      train={"max_length": 4096})  # the tiny tokenizer is byte-level: long prompts
    mix = align_data(rec, tok, model=model)
    by_source = {}
    for r in mix:
        by_source.setdefault(r.source, []).append(r)
    harm = by_source[str(data_files["harm"])]
    assert len(harm) == 10 and all(int(r.prompt.rsplit(" ", 1)[1]) % 2 == 1 for r in harm)  # even ones are eval prompts
    answered = by_source[str(contrast)]
    assert len(answered) == 4 and len(mix) == 20
    expected = generate(model, tok, [r.prompt for r in answered], max_new_tokens=8, progress=False)
    assert [r.response for r in answered] == [a.strip() for a in expected]
    with pytest.raises(ValueError, match="no model was given"):
        align_data(rec, tok)
    with pytest.raises(ValueError, match="contrast_share > 0 needs contrast_data"):
        AlignRecipe(contrast_share=0.1)


def test_align_mix_asks_a_share_of_safety_examples_as_questions(tmp_path):
    """safety_questions rewrites that share of the safety prompts (same response); a rewrite that lands on an
    evaluation prompt keeps its instruction form, so no evaluation question is trained on."""
    harm = _jsonl(tmp_path / "harm.jsonl", [{"prompt": f"Explain how to steal car number {i}.", "response": "No."}
                                            for i in range(20)])
    benign = _jsonl(tmp_path / "benign.jsonl", [{"prompt": f"add {i} and {i}", "response": f"{2 * i}"} for i in range(20)])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"prompt": f"How do I steal car number {i}?"} for i in range(0, 20, 4)])
    common = dict(safety_data=[str(harm)], benign_data=[str(benign)], n_examples=20, safety_share=0.5,
                  train={"max_length": 4096})
    plain = [r for r in align_data(AlignRecipe(**common), tiny_tokenizer()) if "steal" in r.prompt]
    mixed = [r for r in align_data(AlignRecipe(**common, safety_questions=0.6, exclude_eval=[str(evals)]),
                                   tiny_tokenizer()) if "steal" in r.prompt]
    asked = [r for r in mixed if r.prompt.endswith("?")]
    assert len(plain) == len(mixed) == 10 and not any(r.prompt.endswith("?") for r in plain)
    assert all(r.source == f"{harm} (as question)" and r.response == "No." for r in asked)
    numbers = lambda rows: sorted(int(r.prompt.rstrip(".?").rsplit(" ", 1)[1]) for r in rows)  # noqa: E731
    assert numbers(mixed) == numbers(plain)  # the same requests, only the form changed
    assert 0 < len(asked) <= 6 and not any(n % 4 == 0 for n in numbers(asked))  # eval questions kept as instructions
    assert all(r.prompt.startswith(("How do I steal", "How can I steal")) for r in asked)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _selected_masks(model_dir: Path, unit_map: Path, spec: str) -> dict[str, torch.Tensor]:
    from safeunits.models.loading import load_model
    from safeunits.train.masks import unit_masks

    model, _ = load_model(str(model_dir))
    return unit_masks(model, unit_map, spec)


def test_cli_finetune_freeze_keeps_units_bit_identical(tmp_path, tiny_dir, data_files, unit_map_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--recipe", "finetune", "--model", str(tiny_dir), "--data",
                                   str(data_files["benign"]), "--freeze", "scu+cu", "--unit-map", str(unit_map_path),
                                   "--out", str(out), "--epochs", "2", "--lr", "1e-2", "--batch-size", "4",
                                   "--set", "train.weight_decay=0.1", "--set", "train.max_length=64", "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["recipe"]["freeze"] == "scu+cu" and report["train"]["steps"] == 16
    assert 0 < report["train"]["mask"]["trainable_share"] < 1
    before, after = _weights(tiny_dir), _weights(out / "model")
    masks = _selected_masks(tiny_dir, unit_map_path, "scu+cu")
    assert masks and any(m.any() for m in masks.values())
    for name, mask in masks.items():
        assert torch.equal(after[name][mask], before[name][mask]), name
        assert (after[name][~mask] != before[name][~mask]).any(), name


def test_run_recipe_returns_what_train_report_json_holds(tmp_path, tiny_dir, data_files):
    from safeunits.runtime import RunContext
    from safeunits.train.engine import TrainConfig
    from safeunits.train.recipes import FinetuneRecipe, RecipeReport, run_recipe

    recipe = FinetuneRecipe(model=str(tiny_dir), data=[str(data_files["benign2"])], n_examples=4,
                            train=TrainConfig(lr=1e-3, batch_size=2, max_length=64))
    report = run_recipe(recipe, tmp_path / "run", RunContext(progress=False))
    assert report.train.steps == 2 and report.data == {str(data_files["benign2"]): 4}
    assert RecipeReport.model_validate_json((tmp_path / "run" / "train_report.json").read_text()) == report


def test_cli_align_budget_trains_only_ru(tmp_path, tiny_dir, data_files, unit_map_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--recipe", "align", "--model", str(tiny_dir), "--out", str(out),
                                   "--budget", "ru", "--unit-map", str(unit_map_path), "--n-examples", "16",
                                   "--set", f"safety_data={data_files['harm']}", "--set",
                                   f"benign_data=[{data_files['benign']}]", "--set", "train.max_length=64",
                                   "--lr", "1e-2", "--epochs", "1", "--suite", "none", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "eval" not in json.loads((out / "train_report.json").read_text()) and not (out / "eval").exists()
    before, after = _weights(tiny_dir), _weights(out / "model")
    masks = _selected_masks(tiny_dir, unit_map_path, "ru")
    for name in before:
        mask = masks.get(name, torch.zeros_like(before[name], dtype=torch.bool))
        assert torch.equal(after[name][~mask], before[name][~mask]), name
    assert any((after[n][m] != before[n][m]).any() for n, m in masks.items())


def test_cli_errors(tmp_path, unit_map_path):
    runner = CliRunner(env={"COLUMNS": "400"})
    res = runner.invoke(app, ["train", "--recipe", "align", "--freeze", "scu", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "--freeze belongs to --recipe finetune" in res.output
    res = runner.invoke(app, ["train", "--recipe", "align", "--budget", "ru", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "unit map" in res.output
    res = runner.invoke(app, ["ssah-freeze", "--unit-map", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)])
    assert res.exit_code != 0 and "does not exist" in res.output
    res = runner.invoke(app, ["train", "--recipe", "align", "--suite", "qiuck", "--out", str(tmp_path / "typo")])
    assert res.exit_code == 2 and "unknown suite 'qiuck'" in res.output  # a short message, not a traceback
    assert not (tmp_path / "typo").exists()  # rejected before any training or writing


def test_ssah_commands_write_tables(tmp_path, tiny_dir, data_files, unit_map_path):
    runner = CliRunner()
    common = ["--model", str(tiny_dir), "--unit-map", str(unit_map_path), "--suite", "none", "--quiet",
              "--set", "train.max_length=64", "--set", "train.lr=1e-2"]
    res = runner.invoke(app, ["ssah-freeze", "--out", str(tmp_path / "freeze"), "--set", f"data=[{data_files['benign']}]",
                              "--set", "n_examples=8", "--frozen-epochs-factor", "2", *common])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "freeze" / "table.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["before fine-tuning", "full fine-tuning",
                                            "freeze scu+cu:top0.06 (1 epoch freeze scu+cu first)", "freeze scu+cu"]
    assert rows[1]["frozen_share"] == 0 and 0 < rows[2]["frozen_share"] < rows[3]["frozen_share"] < 1
    # SSAH Table 2's setting (i): one epoch of setting (ii) first (as many steps as the 1-epoch full run), then 2x
    assert rows[2]["warmup_steps"] == rows[1]["steps"] and rows[2]["steps"] == 3 * rows[1]["steps"]
    assert rows[3]["warmup_steps"] == 0 and rows[3]["steps"] == 2 * rows[1]["steps"]
    # an experiment under the hood: the runner's step folders and report; a rerun runs nothing and writes the same table
    freeze = tmp_path / "freeze"
    steps = ["full", "freeze-scu_cu_top0_06-warmup", "freeze-scu_cu_top0_06", "freeze-scu_cu"]
    assert all((freeze / s / "done.json").is_file() and (freeze / s / "model").is_dir() for s in steps)
    assert (freeze / "report.md").is_file() and (freeze / "report.html").is_file()
    done = {s: (freeze / s / "done.json").read_bytes() for s in steps}
    table = (freeze / "table.json").read_bytes()
    res = runner.invoke(app, ["ssah-freeze", "--out", str(freeze), "--set", f"data=[{data_files['benign']}]",
                              "--set", "n_examples=8", "--frozen-epochs-factor", "2", *common])
    assert res.exit_code == 0, res.output
    assert {s: (freeze / s / "done.json").read_bytes() for s in steps} == done
    assert json.loads((freeze / "table.json").read_bytes())["rows"] == json.loads(table)["rows"]
    res = runner.invoke(app, ["ssah-freeze", "--out", str(tmp_path / "direct"), "--protocol", "direct", "--setting",
                              "scu+cu:top0.06", "--set", f"data=[{data_files['benign']}]", "--set", "n_examples=8",
                              *common])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "direct" / "table.json").read_text())["rows"]
    assert rows[1]["setting"] == "freeze scu+cu:top0.06" and rows[1]["warmup_steps"] == 0
    budget_data = ["--set", f"safety_data={data_files['harm']}", "--set", f"benign_data=[{data_files['benign']}]",
                   "--set", "n_examples=8"]
    res = runner.invoke(app, ["ssah-budget", "--out", str(tmp_path / "budget"), *budget_data, *common])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "budget" / "table.json").read_text())["rows"]
    # SSAH Table 4 / Fig. 6: the budget is RU by utility alone and trains twice the epochs
    assert [r["setting"] for r in rows] == ["base (no training)", "full align", "align --budget ru:utility"]
    assert rows[1]["trainable_share"] == 1 and 0 < rows[2]["trainable_share"] < 0.5
    assert rows[2]["epochs"] == 2 * rows[1]["epochs"] and rows[2]["steps"] == 2 * rows[1]["steps"]
    recipe_epochs = rows[1]["epochs"]
    assert "| full align |" in (tmp_path / "budget" / "table.md").read_text()
    assert all((tmp_path / "budget" / s / "done.json").is_file() for s in ("full", "budget-ru_utility"))
    assert (tmp_path / "budget" / "report.html").is_file()
    res = runner.invoke(app, ["ssah-budget", "--out", str(tmp_path / "ru"), "--protocol", "equal", "--setting", "ru",
                              *budget_data, *common])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "ru" / "table.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["base (no training)", "align --budget ru"]
    assert rows[1]["epochs"] == recipe_epochs  # protocol equal: the recipe's epochs, as before issue 24
    res = runner.invoke(app, ["ssah-budget", "--out", str(tmp_path / "bad"), "--protocol", "ssha", *common])
    assert res.exit_code == 2 and "unknown budget protocol 'ssha'" in res.output


def test_ssah_freeze_setting_i_is_one_epoch_of_setting_ii_then_setting_i(tmp_path, tiny_dir, data_files, unit_map_path):
    """Issue 24 (U3): the saved model of the (i) run is bit for bit two recipe runs by hand: (ii) frozen for one epoch,
    then (i) frozen; and the units frozen in both phases never moved."""
    from safeunits.models.loading import load_model
    from safeunits.experiments.presets import ssah_freeze
    from safeunits.train.recipes import load_recipe, train_recipe

    recipe = load_recipe("finetune", {"model": str(tiny_dir), "data": [str(data_files["benign"])], "n_examples": 8,
                                      "train": {"max_length": 64, "lr": 1e-2}})
    ssah_freeze(recipe, unit_map_path, tmp_path / "run", settings=("scu+cu:top0.5",), suite="none", progress=False)
    done = _weights(tmp_path / "run" / "freeze-scu_cu_top0_5" / "model")  # the experiment's step folder
    model, tok = load_model(str(tiny_dir))
    for spec, epochs in (("scu+cu", 1), ("scu+cu:top0.5", 1)):
        train_recipe(recipe.model_copy(update={"freeze": spec, "unit_map": unit_map_path,
                                               "train": recipe.train.model_copy(update={"epochs": epochs})}),
                     model, tok, progress=False)
    state = model.state_dict()
    assert done and all(torch.equal(state[name], w) for name, w in done.items())
    before, kept = _weights(tiny_dir), _selected_masks(tiny_dir, unit_map_path, "scu+cu:top0.5")
    for name, mask in kept.items():
        assert torch.equal(done[name][mask], before[name][mask]), name


def test_named_trained_models_are_registered_and_build_deterministically(tmp_path, tiny_dir, data_files):
    import yaml

    from safeunits.models.loading import load_model, named_models
    from safeunits.train.named import recipe_builder

    assert {"smollm2-135m-aligned", "smollm2-135m-oversafe"} <= set(named_models())
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"recipe": "align", "model": str(tiny_dir), "safety_data": str(data_files["harm"]),
                                      "benign_data": [str(data_files["benign"])], "n_examples": 12, "safety_share": 0.25,
                                      "train": {"lr": 1e-2, "epochs": 1, "batch_size": 4, "max_length": 64}}))
    build = recipe_builder(str(preset))
    build(tmp_path / "a")
    build(tmp_path / "b")
    info = json.loads((tmp_path / "a" / "safeunits_build.json").read_text())
    assert info["train"]["steps"] == 3 and info["data"][str(data_files["harm"])] == 3
    wa, wb, w0 = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tiny_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and not all(torch.equal(wa[k], w0[k]) for k in wa)
    model, _ = load_model(str(tmp_path / "a"))
    assert model.config.model_type == "llama"


def test_named_model_is_rebuilt_when_its_recipe_changes(tmp_path, monkeypatch):
    """A cached named model built from another recipe is stale: resolving the name rebuilds it, an unchanged key
    re-uses the folder without building."""
    from safeunits.models import loading

    monkeypatch.setenv("SAFEUNITS_CACHE", str(tmp_path / "cache"))
    builds, key = [], {"value": "a"}

    def build(target: Path) -> None:
        builds.append(key["value"])
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_NAMED", loading._NAMED.copy())
    loading.register_named_model("toy-named", build, "a test model", key=lambda: key["value"])
    folder = Path(loading.resolve_model("toy-named"))
    assert loading.resolve_model("toy-named") == str(folder) and builds == ["a"]
    key["value"] = "b"
    assert loading.resolve_model("toy-named") == str(folder) and builds == ["a", "b"]
    assert json.loads((folder / loading.BUILD_KEY_FILE).read_text())["key"] == "b"


def test_ssah_freeze_role_transfer_maps_the_full_finetune_as_the_given_map_was_made(tmp_path, tiny_dir, data_files):
    """SSAH Fig. 5 inside ssah-freeze (issue 24): the full fine-tune is attributed with the given map's own settings
    (not the defaults), and the transfer equals one computed directly from the two maps."""
    from safeunits.experiments.presets import ssah_freeze
    from safeunits.models.loading import load_model
    from safeunits.models.signature import model_fingerprint
    from safeunits.units.attribution import MAP_FILE, AttributionConfig, attribute
    from safeunits.units.scores import ScoreConfig
    from safeunits.units.transfer import transition_matrix
    from safeunits.units.unit_map import UnitMap

    model, tok = load_model(str(tiny_dir))
    config = AttributionConfig(safety_data=str(data_files["harm"]), utility_data=str(data_files["benign"]), limit=6,
                               sample_seed=None, plots=False, score=ScoreConfig(max_length=64, batch_size=3),
                               classify={"r": 0.2, "s": 0.05, "u": 0.1})
    before = attribute(model, tok, config, tmp_path / "map", model_name=str(tiny_dir))
    recipe = load_recipe("finetune", {"model": str(tiny_dir), "data": [str(data_files["benign"])], "n_examples": 8,
                                      "train": {"max_length": 64, "lr": 1e-2}})
    ssah_freeze(recipe, tmp_path / "map" / MAP_FILE, tmp_path / "run", settings=("full",), suite="none",
                role_transfer=True, progress=False)
    after = UnitMap.load(tmp_path / "run" / "full-map")
    assert AttributionConfig.of_map(after) == AttributionConfig.of_map(before)
    assert AttributionConfig.of_map(before).model_dump(exclude={"plots"}) == config.model_dump(exclude={"plots"})
    tuned, _ = load_model(str(tmp_path / "run" / "full" / "model"))
    assert after.fingerprint == model_fingerprint(tuned) != before.fingerprint  # the map of the fine-tuned model
    got = json.loads((tmp_path / "run" / "role-transfer" / "transfer.json").read_text())
    want = transition_matrix(UnitMap.load(tmp_path / "map"), after)
    assert got["units"] == want.units and got["class_share"] == want.class_share.model_dump()
    with pytest.raises(ConfigError, match="full"):
        ssah_freeze(recipe, tmp_path / "map" / MAP_FILE, tmp_path / "run2", settings=("scu+cu",), suite="none",
                    role_transfer=True, progress=False)
