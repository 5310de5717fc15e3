"""The CLI's vocabulary and its errors: a user-caused error is one short message (exit 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from safeunits import __version__ as safeunits_version
from safeunits.cli import app
from safeunits.cli_options import config_options
from safeunits.config import build_config, parse_sets
from safeunits.errors import UserError
from safeunits.models.loading import load_model, save_model
from safeunits.units.attribution import AttributionConfig, attribute
from safeunits.units.classes import build_unit_map
from safeunits.units.pruning import prune_and_save, resolve_target
from safeunits.units.scores import ScoreConfig, compute_scores
from safeunits.units.selection import unit_parameter_masks
from safeunits.units.unit_map import UnitMap
from tiny import tiny_model, tiny_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"
UTILITY = '{"prompt": "Add 2 and 3.", "response": "Five."}\n{"prompt": "Say hi.", "response": "Hi there!"}\n'


def run(*args: str, **env: str):
    return CliRunner(env={"COLUMNS": "200", **env}).invoke(app, [str(a) for a in args])


def assert_short_error(res, *words: str) -> None:
    """Exit status 2, a few lines, no traceback, and the words that say what went wrong."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    lines = res.output.strip().splitlines()
    assert len(lines) <= 4, res.output
    assert "Traceback" not in res.output
    for word in words:
        assert word in res.output, (word, res.output)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_model(tiny_model("qwen2"), tiny_tokenizer(), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def util_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("d") / "util.jsonl"
    path.write_text(UTILITY)
    return path


# --- one test per user error -------------------------------------------------------------------------------

def test_unknown_model_name_fails_fast_listing_the_registered_names(tmp_path):
    start = time.perf_counter()
    res = run("eval", "--model", "no-such-model", "--out", tmp_path / "r")
    assert_short_error(res, "unknown model 'no-such-model'", "smollm2-135m-instruct", "hint:")
    assert time.perf_counter() - start < 5  # no Hub retries for a name that cannot be a Hub id
    assert not (tmp_path / "r").exists()


def test_hub_id_offline_or_unreachable_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run("attribute", "--model", "no-such-org/no-such-model", "--out", tmp_path)
    assert_short_error(res, "no-such-org/no-such-model", "HF_HUB_OFFLINE", "smollm2-135m-instruct")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import huggingface_hub

    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(kwargs.get("timeout"))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    start = time.perf_counter()
    res = run("eval", "--model", "no-such-org/no-such-model", "--out", tmp_path)
    assert_short_error(res, "Hub is unreachable", "smollm2-135m-instruct")
    assert calls and calls[0] <= 10 and time.perf_counter() - start < 5  # one short check, no retries


def test_malformed_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    assert_short_error(run("datasets", "--show", bad), "bad.jsonl:2", "not valid JSON")


def test_missing_file_and_unknown_dataset(tmp_path):
    assert_short_error(run("datasets", "--show", tmp_path / "missing.jsonl"), "missing.jsonl", "does not exist")
    assert_short_error(run("datasets", "--show", "no-such-set"), "unknown dataset 'no-such-set'", "advbench")
    assert_short_error(run("eval-compare", tmp_path / "no-run"), "metrics.json", "does not exist")


def test_out_that_is_a_folder_is_refused_before_work(tmp_path, data_dir):
    """`--out FOLDER` writes judge_check.json inside it; a folder standing where that file goes is refused first."""
    (tmp_path / "existing" / "judge_check.json").mkdir(parents=True)
    res = run("judge-check", "--judge", "strmatch", "--data-dir", data_dir, "--out", tmp_path / "existing")
    assert_short_error(res, "judge_check.json is a folder", "hint:")
    assert list((tmp_path / "existing" / "judge_check.json").iterdir()) == []


def test_unsupported_architecture(tmp_path, data_dir, util_file):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("bloom", vocab_size=259, hidden_size=32, n_layer=2, n_head=4, pad_token_id=256)
    folder = save_model(AutoModelForCausalLM.from_config(config), tiny_tokenizer(), tmp_path / "bloom")
    res = run("attribute", "--model", folder, "--out", tmp_path / "map", "--limit", "2", "--utility-data", util_file,
              "--data-dir", data_dir, "--quiet")
    assert_short_error(res, "architecture 'bloom' is not supported", "llama")


def test_artifact_for_another_model(tmp_path, tiny_dir, data_dir, util_file):
    config = AttributionConfig(utility_data=str(util_file), limit=2, plots=False, score=ScoreConfig(max_length=200))
    model, tok = load_model(str(tiny_dir))
    attribute(model, tok, config, tmp_path / "map", data_dir=data_dir)
    other = save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "other")
    res = run("prune", "--unit-map", tmp_path / "map", "--save-model", "--target", "scu", "--model", other,
              "--out", tmp_path / "pruned")
    assert_short_error(res, "unit map was computed for a 'qwen2' model")
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("args, words", [
    (["eval", "--suite", "nope"], ["unknown suite 'nope'", "quick"]),
    (["train", "--recipe", "align", "--config", "nope"], ["recipe 'nope'", "aligned-default"]),
    (["judge-check", "--judge", "nope"], ["unknown judge 'nope'", "strmatch"]),
    (["patch", "derive", "--harmful-data", "dh", "--objective", "nope"], ["objective", "unknown training objective 'nope'", "ascent"]),
])
def test_unknown_names(tmp_path, data_dir, args, words):
    assert_short_error(run(*args, "--out", tmp_path / "x", *(["--data-dir", data_dir] if args[0] == "judge-check" else [])),
                       *words)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("item, words", [
    ("max_new_tokens=abc", ["max_new_tokens", "valid integer"]),
    ("no_such_field=1", ["no field 'no_such_field'", "max_new_tokens"]),
    ("over_safety.nope=1", ["no field over_safety.'nope'"]),
    ("just-a-key", ["--set expects key=value"]),
])
def test_bad_set(tmp_path, item, words):
    assert_short_error(run("eval", "--set", item, "--out", tmp_path / "r"), *words)


def test_usage_errors_keep_exit_status_2(tmp_path):
    res = run("eval", "--no-such-option")
    assert res.exit_code == 2 and "No such option" in res.output


def test_debug_shows_the_traceback(tmp_path):
    res = run("--debug", "datasets", "--show", tmp_path / "missing.jsonl")
    assert isinstance(res.exception, UserError)  # re-raised, not turned into a message
    res = run("datasets", "--show", tmp_path / "missing.jsonl", SAFEUNITS_DEBUG="1")
    assert isinstance(res.exception, UserError)
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", "from safeunits.cli import app; app()", "--debug", "datasets", "--show",
                           str(tmp_path / "missing.jsonl")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "does not exist" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "from safeunits.cli import app; app()", "datasets", "--show",
                           str(tmp_path / "missing.jsonl")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


# --- the vocabulary ----------------------------------------------------------------------------------------

def _commands() -> dict:
    from safeunits.cli import COMMANDS, load_command

    out = {}
    for name in COMMANDS:
        cmd = load_command(name)
        if hasattr(cmd, "commands"):  # a sub-group (typer's click may be vendored: no isinstance)
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            out[name] = cmd
    return out


def _visible_options(cmd) -> set[str]:
    return {o for p in cmd.params if not getattr(p, "hidden", False) for o in p.opts + p.secondary_opts}


LOADS_MODEL = {"eval", "train", "attack", "ssah-budget", "ssah-freeze", "attribute", "prune", "probe", "patch harmful-data",
               "patch derive", "patch apply", "patch sweep", "patch continual", "patch baselines"}
WRITES = LOADS_MODEL | {"judge-check", "transfer", "patch merge", "demo"}
EVALUATES = {"eval", "train", "attack", "ssah-budget", "ssah-freeze", "prune", "patch continual", "patch baselines", "demo", "run"}
HAS_CONFIG = (EVALUATES | {"attribute", "probe", "patch harmful-data", "patch derive", "patch merge", "patch sweep"})
PROGRESS = HAS_CONFIG | {"patch apply"}
DEPRECATED = {"--eval", "--no-progress", "--map", "--train-json", "--se-train", "--osm-train", "--tolerance"}


def test_every_command_speaks_the_same_vocabulary():
    commands = _commands()
    assert LOADS_MODEL | WRITES <= set(commands)
    for name, cmd in commands.items():
        opts = _visible_options(cmd)
        for needed, group in ((("--model", "-m"), LOADS_MODEL), (("--out", "-o"), WRITES), (("--suite", "-s"), EVALUATES),
                              (("--set",), HAS_CONFIG), (("--quiet", "-q"), PROGRESS)):
            if name in group:
                assert set(needed) <= opts, (name, needed)
        assert not opts & DEPRECATED, (name, opts & DEPRECATED)
        if "--data-dir" in opts or name in {"eval", "attribute", "probe", "prune", "patch harmful-data"}:
            assert "--data-dir" in opts, name
        assert "--threads" in opts, name
        if name in (WRITES | {"run"}) - {"judge-check"}:
            assert "--force" in opts, name


def test_a_step_kind_and_its_command_have_one_name():
    """One vocabulary across CLI and YAML: the command doing what a step kind does carries the kind's name (0.1 had
    `patch build-data` for `harmful-data` steps, `eval` for `evaluate` steps), a D_h folder is `--harmful-data`
    as the steps' `harmful_data`, and `--data` names datasets to train on, never a folder of results."""
    from safeunits.experiments.config import STEP_CLASSES

    commands = _commands()
    by_recipe, experiment_only = {"align", "finetune"}, {"durability"}  # `train --recipe align|finetune`
    for kind in set(STEP_CLASSES) - by_recipe - experiment_only:
        assert kind in commands or f"patch {kind}" in commands, kind
    assert {"patch derive", "patch sweep"} <= {n for n, c in commands.items() if "--harmful-data" in _visible_options(c)}
    for name, cmd in commands.items():
        for param in cmd.params:
            if "--data" in param.opts:
                assert name in {"train", "attack"} and "folder" not in (param.help or ""), name


def test_the_lazy_command_table_matches_the_commands():
    """`safeunits --help` lists the table's copy of each command's help: it must say what the command says."""
    from safeunits.cli import COMMANDS, load_command

    for name, (_, help_text) in COMMANDS.items():
        assert help_text == load_command(name).help.split("\n\n")[0].replace("\n", " ").strip(), name


def test_help_version_and_a_mistyped_command_import_no_command_module():
    code = ("import sys; from safeunits.cli import main; sys.argv = ['safeunits'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    heavy = {'torch', 'transformers', 'safeunits.commands.eval'}\n"
            "    print('LOADED', sorted(heavy & set(sys.modules)), e.code)")
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "200"}
    for args, code_expected in ((["--help"], 0), (["--version"], 0), (["evall"], 2), ([], 2)):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)
        assert f"LOADED [] {code_expected}" in proc.stdout, (args, proc.stdout, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "safeunits", "--version"], capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == f"safeunits {safeunits_version}"


def test_options_generated_from_config_fields_carry_their_description():
    merge = _commands()["patch merge"]
    help_of = {p.opts[0]: p.help for p in merge.params}
    assert "DARE keep-rate" in help_of["--dare-p"] and "(default: 5.0)" in help_of["--a"]


def test_removed_deprecated_names_are_refused(tmp_path):
    """0.1's deprecated spellings are gone (CHANGELOG.md): each is an unknown option, nothing is written."""
    for args in (("train", "--recipe", "align", "--eval", "quick"), ("prune", "--map", tmp_path / "m"),
                 ("ssah-freeze", "--unit-map", tmp_path / "m", "--no-progress"),
                 ("patch", "continual", "--se-train", "{}"), ("patch", "continual", "--osm-train", "{}"),
                 ("patch", "derive", "--train-json", "{}"), ("patch", "sweep", "--tolerance", "0.1")):
        res = run(*args, "--out", tmp_path / "o")
        assert res.exit_code == 2 and "No such option" in res.output, args
    assert not (tmp_path / "o").exists()


def test_config_options_hand_only_given_values_to_the_command():
    class Inner(BaseModel):
        depth: int = Field(3, description="how deep")

    class Outer(BaseModel):
        name: str = Field("x", description="a name")
        flag: bool = Field(False, description="a switch")
        inner: Inner = Field(default_factory=Inner)

    seen: list = []
    sub = typer.Typer()

    @sub.command()
    @config_options(Outer, ["name", "flag", "inner.depth"])
    def cmd(sets: list[str] = typer.Option([], "--set"), options: dict | None = None) -> None:
        seen.append(build_config(Outer, options or {}, parse_sets(sets)))

    runner = CliRunner()
    assert runner.invoke(sub, ["--depth", "7", "--flag"]).exit_code == 0
    assert runner.invoke(sub, ["--set", "inner.depth=9", "--name", "y"]).exit_code == 0
    assert runner.invoke(sub, []).exit_code == 0
    assert seen == [Outer(flag=True, inner=Inner(depth=7)), Outer(name="y", inner=Inner(depth=9)), Outer()]
    assert "how deep (default: 3)" in runner.invoke(sub, ["--help"], env={"COLUMNS": "200"}).output


def test_set_on_a_nested_default_keeps_its_other_fields():
    """`--set se.train.lr=...` on `patch continual` once replaced the default δ_SE config by a partial dict
    (error: se.objective missing); `--prompts` replaced the default step data config (offset 100, 64 prompts)."""
    from safeunits.patching.continual import ContinualConfig

    config = build_config(ContinualConfig, {"harmful_data": {"prompts": "advbench"}},
                          parse_sets(["se.train.lr=0.0001", "osm.train.max_steps=5"]))
    default = ContinualConfig()
    assert (config.se.objective, config.osm.objective) == (default.se.objective, default.osm.objective)
    assert config.se.train == {"lr": 1e-4} and config.osm.train == {"max_steps": 5}
    assert config.harmful_data == default.harmful_data.model_copy(update={"prompts": "advbench"})


def test_set_values_and_config_files_read_exponents_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` as the string "1e-4"; every documented command writes `lr=1e-4`, and a string
    in a free-form dict (`se.train`) reached the run's recorded config as text."""
    from safeunits.experiments.config import EXPERIMENT_DIR, load_experiment

    assert parse_sets(["se.train.lr=1e-4", "x=-2E3", "y=[5e-5, 1]", "n=12", "s='1e-4'", "w=abc"]) == \
        {"se": {"train": {"lr": 1e-4}}, "x": -2000.0, "y": [5e-5, 1], "n": 12, "s": "1e-4", "w": "abc"}
    assert isinstance(parse_sets(["n=12"])["n"], int)
    # a file: the derive step's `train` is a free-form dict, where pydantic coerces nothing
    experiment = tmp_path / "e.yaml"
    experiment.write_text((EXPERIMENT_DIR / "demo-quick.yaml").read_text().replace("lr: 1.0e-4", "lr: 1e-4"))
    step = next(s for s in load_experiment(experiment).steps if s.name == "patch-se")
    assert step.settings.train["lr"] == 1e-4


# --- library functions behind the commands -----------------------------------------------------------------

def test_attribute_equals_the_steps_done_by_hand(tmp_path, data_dir, util_file):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    config = AttributionConfig(utility_data=str(util_file), limit=3, sample_seed=None, score=ScoreConfig(max_length=200))
    unit_map = attribute(model, tok, config, tmp_path, data_dir=data_dir, model_name="tiny", progress=False)
    from safeunits.data.registry import load_dataset

    safety = compute_scores(model, tok, load_dataset("advbench-refusals", data_dir=data_dir, limit=3), config.score,
                            progress=False)
    utility = compute_scores(model, tok, load_dataset(str(util_file), limit=3), config.score, progress=False)
    reference = build_unit_map(model, safety, utility, config.classify)
    saved = UnitMap.load(tmp_path)
    for kind in ("mlp", "head"):
        assert torch.equal(unit_map.classes[kind], reference.classes[kind])
        assert torch.equal(saved.classes[kind], reference.classes[kind])
        assert torch.allclose(saved.safety[kind], reference.safety[kind])
    assert saved.settings["model"] == "tiny" and saved.settings["utility"] == str(util_file)
    assert (tmp_path / "unit_map.png").is_file() and (tmp_path / "class_shares.png").is_file()


def test_attribution_samples_rows_like_wei_et_al(data_dir):
    """The default takes a seeded random sample (the first 128 rows of advbench-refusals repeat 53 prompts)."""
    from safeunits.data.registry import load_dataset
    from safeunits.units.attribution import _take

    rows = load_dataset("advbench-refusals", data_dir=data_dir)
    first, sampled = _take(rows, 128, None), _take(rows, 128, 0)
    assert first == rows[:128] and len(sampled) == 128 and sampled == _take(rows, 128, 0) != _take(rows, 128, 1)
    assert len({r.prompt for r in sampled}) > len({r.prompt for r in first})
    assert [rows.index(r) for r in sampled] == sorted(rows.index(r) for r in sampled)


def test_prune_and_save_zeroes_exactly_the_target(tmp_path, data_dir, util_file):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    config = AttributionConfig(utility_data=str(util_file), limit=2, plots=False, score=ScoreConfig(max_length=200))
    unit_map = attribute(model, tok, config, None, data_dir=data_dir, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zeroed, units = prune_and_save(model, tok, unit_map, "scu", tmp_path / "pruned")
    masks = unit_parameter_masks(model, resolve_target(unit_map, "scu"))
    assert zeroed == sum(int(m.sum()) for m in masks.values()) > 0
    saved, _ = load_model(str(tmp_path / "pruned"))
    for name, param in saved.named_parameters():
        mask = masks.get(name, torch.zeros_like(param, dtype=torch.bool))
        assert torch.equal(param[mask], torch.zeros_like(param[mask])), name
        assert torch.equal(param[~mask], before[name][~mask]), name
    other = tiny_model("qwen2")
    with pytest.raises(UserError, match="computed for a 'llama' model"):
        prune_and_save(other, tok, unit_map, "scu", tmp_path / "never")
    assert not (tmp_path / "never").exists()
