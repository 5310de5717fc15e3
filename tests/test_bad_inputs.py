"""The bad-input table: what a new user gets wrong, each answered by a short error (exit 2, at most 8 lines, no
traceback), before or without harm to the output folder: a file the user keeps there survives every case."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from safeunits.cli import app
from safeunits.models.loading import save_model
from safeunits.outdir import claim_output_dir
from tiny import tiny_model, tiny_tokenizer

CANARY = "notes.txt"


class Case:
    """Paths a case may need: `out` is a safeunits folder of the command's kind holding the user's notes.txt."""

    def __init__(self, inputs: dict, tmp: Path) -> None:
        self.i, self.tmp = inputs, tmp
        self.model, self.data_dir, self.suite = inputs["model"], inputs["data_dir"], inputs["suite"]

    def out(self, kind: str) -> Path:
        folder = claim_output_dir(self.tmp / "out", kind)
        (folder / CANARY).write_text("mine")
        return folder

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def model_copy(self, name: str, weights: bytes | None = None, drop: str | None = None) -> Path:
        folder = self.tmp / name
        shutil.copytree(self.model, folder)
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
        if drop:
            (folder / drop).unlink()
        return folder

    def weights(self, n: int | None = None) -> bytes:
        data = (Path(self.model) / "model.safetensors").read_bytes()
        return data[:n] if n else data

    def eval(self, *args) -> list:
        return ["eval", "--model", self.model, "--suite", self.suite, "--data-dir", self.data_dir, "-q",
                "--out", self.out("eval"), *args]

    def train(self, *args) -> list:
        return ["train", "--recipe", "align", "--model", self.model, "--suite", "none", "--out", self.out("train"),
                *args]

    def run(self, steps: list[dict], *args, raw: str | None = None) -> list:
        exp = self.file("exp.yaml", raw if raw is not None else yaml.safe_dump(
            {"name": "bad", "suite": self.suite, "data_dir": str(self.data_dir), "steps": steps}))
        return ["run", exp, "--out", self.out("experiment"), *args]


def _pickle_only(c: Case) -> list:
    folder = c.model_copy("bin-only", drop="model.safetensors")
    torch.save({}, folder / "pytorch_model.bin")
    return c.eval() + ["--model", folder]


def _onto_itself(c: Case) -> list:
    own = c.model_copy("own")
    (own / CANARY).write_text("mine")
    return ["patch", "apply", "--model", own, "--patch", c.i["merged"], "--out", own, "--force"]


CASES: dict[str, tuple] = {
    # models
    "unknown model name": (lambda c: c.eval("--model", "no-such-model"), "unknown model 'no-such-model'"),
    "hub id offline": (lambda c: c.eval("--model", "no-such-org/no-such-model"), "no-such-org/no-such-model"),
    "folder without config.json": (lambda c: c.eval("--model", c.tmp), "no config.json"),
    "pickle-only model folder": (_pickle_only, "safetensors"),
    "truncated safetensors": (lambda c: c.eval() + ["--model", c.model_copy("trunc", c.weights(3000))],
                              "not readable safetensors"),
    "garbage safetensors": (lambda c: c.eval() + ["--model", c.model_copy("junk", b"\x01" * 4096)],
                            "not readable safetensors"),
    "unknown dtype": (lambda c: c.eval("--dtype", "float8"), "unknown dtype 'float8'"),
    # output folders
    "eval --out FILE": (lambda c: ["eval", "--model", c.model, "--out", c.file(CANARY, "mine")], "is a file"),
    "eval --out under a file": (lambda c: ["eval", "--out", c.file(CANARY, "mine") / "run"], "is a file"),
    "attribute --out FILE": (lambda c: ["attribute", "--model", c.model, "--out", c.file(CANARY, "mine")], "is a file"),
    "eval --out someone's folder": (lambda c: ["eval", "--model", c.model, "--out", c.file(f"theirs/{CANARY}", "mine").parent],
                                    "not made by safeunits"),
    "eval --out a train folder": (lambda c: ["eval", "--model", c.model, "--out", c.out("train")],
                                  "holds a safeunits train output"),
    # suites and options
    "unknown suite": (lambda c: c.eval("--suite", "nope"), "unknown suite 'nope'"),
    "suite YAML not YAML": (lambda c: c.eval("--suite", c.file("s.yaml", "name: [unclosed\n")), "s.yaml"),
    "suite with an unknown field": (lambda c: c.eval("--suite", c.file("s.yaml", "name: x\nharmfull: []\n")), "harmfull"),
    "--set without =": (lambda c: c.eval("--set", "just-a-key"), "--set expects key=value"),
    "--set unknown field": (lambda c: c.eval("--set", "no_such_field=1"), "no field 'no_such_field'"),
    "--set not a number": (lambda c: c.eval("--set", "max_new_tokens=abc"), "max_new_tokens"),
    "--set infinite class share": (lambda c: ["attribute", "--model", c.model, "--set", "classify.r=.inf",
                                              "--out", c.out("attribute")], "finite"),
    "--limit 0": (lambda c: c.eval("--limit", "0"), "--limit"),
    "--threads 0": (lambda c: c.eval("--threads", "0"), "--threads"),
    "unknown option": (lambda c: c.eval("--no-such-option"), "No such option"),
    "unknown judge": (lambda c: c.eval("--judge", "nope"), "unknown judge 'nope'"),
    # data
    "malformed dataset row": (lambda c: ["datasets", "--show", c.file("bad.jsonl", '{"prompt": \n')], "not valid JSON"),
    "unknown dataset": (lambda c: ["attribute", "--model", c.model, "--safety-data", "no-such-set",
                                   "--out", c.out("attribute")], "unknown dataset 'no-such-set'"),
    "missing utility file": (lambda c: ["attribute", "--model", c.model, "--utility-data", c.tmp / "missing.jsonl",
                                        "--data-dir", c.data_dir, "--out", c.out("attribute")], "does not exist"),
    # training numbers
    "--epochs inf": (lambda c: c.train("--epochs", "inf"), "finite"),
    "--lr nan": (lambda c: c.train("--lr", "nan"), "finite"),
    "recipe YAML with lr: .inf": (lambda c: c.train("--config", c.file("r.yaml", "recipe: align\ntrain:\n  lr: .inf\n")),
                                  "finite"),
    "unknown recipe": (lambda c: c.train("--config", "nope"), "recipe 'nope'"),
    "--recipe bogus": (lambda c: ["train", "--recipe", "bogus", "--out", c.out("train")], "align, finetune or attack"),
    # unit maps
    "missing unit map": (lambda c: ["prune", "--unit-map", c.tmp / "nope", "--save-model", "--target", "scu",
                                    "--out", c.out("model")], "does not exist"),
    "corrupt unit map": (lambda c: ["prune", "--unit-map", c.file("map/unit_map.safetensors", b"\x08" * 64),
                                    "--save-model", "--target", "scu", "--out", c.out("model")], "safetensors"),
    "unit map of another model": (lambda c: ["prune", "--unit-map", c.i["map"], "--save-model", "--target", "scu",
                                             "--model", save_model(tiny_model("llama"), tiny_tokenizer(), c.tmp / "ll"),
                                             "--out", c.out("model")], "computed for a 'qwen2' model"),
    "--save-model with two targets": (lambda c: ["prune", "--unit-map", c.i["map"], "--save-model", "-t", "scu", "-t", "ru",
                                                 "--out", c.out("model")], "exactly one --target"),
    "unknown target": (lambda c: ["prune", "--unit-map", c.i["map"], "--save-model", "-t", "nope", "--model", c.model,
                                  "--out", c.out("model")], "nope"),
    # patches
    "missing patch": (lambda c: ["patch", "apply", "--model", c.model, "--patch", c.tmp / "nope", "--out", c.out("model")],
                      "does not exist"),
    "corrupt patch": (lambda c: ["patch", "apply", "--model", c.model, "--patch",
                                 c.file("pp/patch.safetensors", b"\x10" * 64).parent, "--out", c.out("model")],
                      "safetensors"),
    "--scale inf": (lambda c: ["patch", "apply", "--model", c.model, "--patch", c.i["merged"], "--scale", "inf",
                               "--out", c.out("model")], "finite"),
    "apply onto its own source": (_onto_itself, "must differ from the source"),
    "merge of a non-patch folder": (lambda c: ["patch", "merge", "--se", c.tmp, "--osm", c.i["p"] / "osm",
                                               "--out", c.out("sparse-patch")], "not a patch folder"),
    "merge --alpha inf": (lambda c: ["patch", "merge", "--se", c.i["p"] / "se", "--osm", c.i["p"] / "osm", "--alpha",
                                     "inf", "--out", c.out("sparse-patch")], "finite"),
    "derive from missing D_h": (lambda c: ["patch", "derive", "--harmful-data", c.tmp / "nope", "--out", c.out("patches")],
                                "nope"),
    # experiments
    "unknown experiment": (lambda c: ["run", "nope", "--out", c.out("experiment")], "nope"),
    "experiment YAML not YAML": (lambda c: c.run([], raw="steps: [unclosed\n"), "exp.yaml"),
    "step naming an unknown model (dry run)": (lambda c: c.run([{"name": "b", "kind": "eval", "model": "no-such"}],
                                                               "--dry-run"), "step 'b'"),
    "--set an unknown step": (lambda c: ["run", "demo-quick", "--dry-run", "--set", "steps.nope.limit=1",
                                         "--out", c.out("experiment")], "no step named 'nope'"),
    "eval-compare of a missing run": (lambda c: ["eval-compare", c.tmp / "no-run"], "does not exist"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_short_error_and_the_users_file_survives(name, cli_inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build, words = CASES[name]
    case = Case(cli_inputs, tmp_path)
    args = [str(a) for a in build(case)]
    res = CliRunner(env={"COLUMNS": "100"}).invoke(app, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, (res.output, res.exception)
    assert len(lines) <= 8 and "Traceback" not in res.output, res.output
    assert words in res.output, res.output
    for canary in tmp_path.rglob(CANARY):  # cases without an output folder (datasets, eval-compare) have none
        assert canary.read_text() == "mine"
