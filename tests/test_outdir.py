"""Output folders: no command removes or overwrites a file it did not create (canary files), one rule for all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from safeunits.cli import app
from safeunits.outdir import MARKER, OutputFolderError, build_into, check_output_dir, claim_output_dir

CANARIES = {"thesis.txt": "four years of work\n", "src/main.py": "print('mine')\n"}


def run(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(a) for a in args])


def plant(folder: Path) -> Path:
    for rel, text in CANARIES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def assert_canaries(folder: Path) -> None:
    for rel, text in CANARIES.items():
        assert (folder / rel).read_text() == text, rel


def assert_refused(res, folder: Path) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 8, res.output
    assert "--force" in res.output, res.output
    assert_canaries(folder)
    assert not (folder / MARKER).exists()


# --- the rule itself ---------------------------------------------------------------------------------------------

def test_new_empty_and_same_kind_folders_are_accepted_others_refused(tmp_path):
    assert claim_output_dir(tmp_path / "new" / "deep", "eval") == tmp_path / "new" / "deep"
    (tmp_path / "empty").mkdir()
    claim_output_dir(tmp_path / "empty", "eval")
    claim_output_dir(tmp_path / "empty", "eval")  # a rerun into its own folder
    with pytest.raises(OutputFolderError, match="holds a safeunits eval output, not a train output"):
        check_output_dir(tmp_path / "empty", "train")
    plant(tmp_path / "user")
    with pytest.raises(OutputFolderError, match="not empty and was not made by safeunits") as info:
        check_output_dir(tmp_path / "user", "eval")
    assert "--force" in info.value.hint
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        check_output_dir(tmp_path / "file", "eval")
    with pytest.raises(OutputFolderError, match="is a file, so the folder"):
        check_output_dir(tmp_path / "file" / "sub", "eval")
    claim_output_dir(tmp_path / "user", "eval", force=True)
    assert_canaries(tmp_path / "user")


def test_a_rebuilt_model_folder_replaces_only_its_own_files(tmp_path):
    def build(files):
        def write(tmp: Path) -> None:
            for name in files:
                (tmp / name).write_text(name)
        return write

    target = build_into(tmp_path / "m", build(["a.safetensors", "b.safetensors", "config.json"]))
    (target / "notes.txt").write_text("mine")  # the user adds a file to a safeunits model folder
    build_into(target, build(["a.safetensors", "config.json"]))  # one shard fewer this time
    assert sorted(p.name for p in target.iterdir()) == sorted([MARKER, "a.safetensors", "config.json", "notes.txt"])
    assert json.loads((target / MARKER).read_text())["files"] == ["a.safetensors", "config.json"]
    plant(tmp_path / "user")
    with pytest.raises(OutputFolderError):
        build_into(tmp_path / "user", build(["config.json"]))
    build_into(tmp_path / "user", build(["config.json", "thesis.txt"]), force=True)  # --force: same names replaced
    assert (tmp_path / "user" / "src" / "main.py").read_text() == CANARIES["src/main.py"]
    assert (tmp_path / "user" / "thesis.txt").read_text() == "thesis.txt"


def test_unwritable_folder_is_a_short_error(tmp_path, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(OutputFolderError, match="permission denied"):
        check_output_dir(tmp_path / "out", "eval")


# --- every command that writes: refused before any work, canaries kept -------------------------------------------

COMMANDS = {
    "prune --save-model": lambda i: ["prune", "--unit-map", i["map"], "--save-model", "--target", "scu",
                                     "--model", i["model"]],
    "patch apply": lambda i: ["patch", "apply", "--model", i["model"], "--patch", i["merged"], "-q"],
    "patch merge": lambda i: ["patch", "merge", "--se", i["p"] / "se", "--osm", i["p"] / "osm", "-q"],
    "patch derive": lambda i: ["patch", "derive", "--model", i["model"], "--harmful-data", i["dh"], "--max-steps", "1", "-q"],
    "patch harmful-data": lambda i: ["patch", "harmful-data", "--prompts", i["dh"] / "train.jsonl", "--responses", "dataset",
                                   "--data-dir", i["data_dir"]],
    "run": lambda i: ["run", i["exp"], "-q"],
    "eval": lambda i: ["eval", "--model", i["model"], "--suite", i["suite"], "--data-dir", i["data_dir"], "-q"],
    "attribute": lambda i: ["attribute", "--model", i["model"], "--limit", "2", "--utility-data", i["util"],
                            "--max-length", "200", "--no-plots", "--data-dir", i["data_dir"], "-q"],
    "train": lambda i: ["train", "--recipe", "align", "--model", i["model"], "--max-steps", "1"],
    "probe": lambda i: ["probe", "--model", i["model"], "--limit", "1", "--data-dir", i["data_dir"], "-q"],
    "transfer": lambda i: ["transfer", i["map"], i["map"]],
}
# the commands whose --force run is quick on the tiny model: it must write its output and keep every canary
FORCED = {"prune --save-model": "config.json", "patch apply": "config.json", "patch merge": "manifest.json",
          "run": "report.html", "eval": "metrics.json", "attribute": "unit_map.json", "transfer": "transfer.json"}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_foreign_folder_is_refused_and_force_keeps_its_files(command, cli_inputs, tmp_path):
    out = plant(tmp_path / "mine")
    args = [*COMMANDS[command](cli_inputs), "--out", out]
    assert_refused(run(*args), out)
    if command in FORCED:
        res = run(*args, "--force")
        assert res.exit_code == 0, res.output
        assert_canaries(out)
        assert (out / FORCED[command]).is_file()


def test_an_experiment_keeps_a_user_folder_named_like_a_step(cli_inputs, tmp_path):
    out = tmp_path / "run"
    res = run("run", cli_inputs["exp"], "--out", out, "--dry-run")
    assert res.exit_code == 0 and not out.exists(), res.output
    res = run("run", cli_inputs["exp"], "--out", out, "-q")
    assert res.exit_code == 0, res.output
    user = plant(out / "baseline2")
    exp = yaml.safe_load(cli_inputs["exp"].read_text())
    exp["steps"].append({"name": "baseline2", "kind": "eval", "model": exp["steps"][0]["model"]})
    path = tmp_path / "exp2.yaml"
    path.write_text(yaml.safe_dump(exp))
    for extra in (["--dry-run"], []):
        res = run("run", path, "--out", out, "-q", *extra)
        assert res.exit_code == 2 and "was not made by this experiment" in res.output, res.output
        assert_canaries(user)


def test_a_failed_evaluation_leaves_nothing_to_trip_the_corrected_rerun(cli_inputs, tmp_path):
    bad = tmp_path / "harm.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    suite = yaml.safe_load(Path(cli_inputs["suite"]).read_text())
    suite["harmful"][0]["dataset"] = str(bad)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    args = ["eval", "--model", cli_inputs["model"], "--suite", tmp_path / "suite.yaml", "--data-dir", cli_inputs["data_dir"],
            "--out", tmp_path / "r", "-q"]
    res = run(*args)
    assert res.exit_code == 2 and "not valid JSON" in res.output, res.output
    assert not (tmp_path / "r").exists()  # the claim is undone
    bad.write_text('{"prompt": "fine"}\n{"prompt": "also fine"}\n')
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "metrics.json").is_file()


def test_outputs_get_the_permissions_of_ordinary_files(tmp_path):
    """Temporary names are made 0600/0700; a finished output must be readable as any file the user writes."""
    import os

    from safeunits.io import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "report.md", "x")
        folder = build_into(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755 and (folder / "config.json").stat().st_mode & 0o777 == 0o644


def test_a_failing_command_gives_back_only_its_own_claim(tmp_path):
    """Another command's folder claimed earlier in the same process (tests, notebooks) is not undone."""
    assert run("datasets", "--show", tmp_path / "a.jsonl").exit_code == 2  # any failing command
    claim_output_dir(tmp_path / "earlier", "eval")  # a claim outside any command, e.g. from Python
    res = run("eval", "--model", "no-such-model", "--out", tmp_path / "r")
    assert res.exit_code == 2 and not (tmp_path / "r").exists()
    assert (tmp_path / "earlier" / MARKER).is_file()


@pytest.mark.parametrize("command", ["prune --save-model", "patch apply"])
def test_force_reaches_the_model_folder_of_another_kind(command, cli_inputs, tmp_path):
    out = claim_output_dir(tmp_path / "evalrun", "eval")
    plant(out)
    args = [*COMMANDS[command](cli_inputs), "--out", out]
    assert run(*args).exit_code == 2
    res = run(*args, "--force")
    assert res.exit_code == 0, res.output
    assert_canaries(out)
    assert (out / "config.json").is_file() and json.loads((out / MARKER).read_text())["kind"] == "eval"
