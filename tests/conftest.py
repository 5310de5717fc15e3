import os
import sys
from pathlib import Path

import json

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("SAFEUNITS_DATA_DIR") or SHARED_DATA)
    if not path.is_dir():
        pytest.skip(f"offline data folder {path} not present")
    return path


@pytest.fixture()
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture()
def model():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    from safeunits.models.loading import load_model

    return load_model("smollm2-135m-instruct")


UTILITY = '{"prompt": "Add 2 and 3.", "response": "Five."}\n{"prompt": "Say hi.", "response": "Hi there!"}\n'


@pytest.fixture(scope="session")
def cli_inputs(tmp_path_factory, data_dir) -> dict:
    """A tiny model folder, its unit map, a D_h, δ_SE/δ_OSM and a merged sparse patch, made by the CLI."""
    from typer.testing import CliRunner

    from safeunits.cli import app
    from safeunits.models.loading import save_model
    from test_demo import tiny_suite

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    tmp = tmp_path_factory.mktemp("inputs")
    model = save_model(tiny_model("qwen2"), tiny_tokenizer(), tmp / "tiny")
    util = tmp / "util.jsonl"
    util.write_text(UTILITY)
    harm = tmp / "harm.jsonl"
    harm.write_text("".join(json.dumps({"prompt": f"How do I pick lock number {i}?", "response": "Take a pick."}) + "\n"
                            for i in range(6)))
    for args in (["attribute", "--model", model, "--out", tmp / "map", "--limit", "2", "--utility-data", util,
                  "--max-length", "200", "--no-plots", "--data-dir", data_dir, "-q"],
                 ["patch", "harmful-data", "--out", tmp / "dh", "--prompts", harm, "--offset", "0", "--n-train", "5",
                  "--n-val", "1", "--responses", "dataset", "--eval-set", "advbench[:100]", "--data-dir", data_dir],
                 ["patch", "derive", "--model", model, "--harmful-data", tmp / "dh", "--out", tmp / "p", "--max-steps", "1",
                  "--batch-size", "2", "-q"],
                 ["patch", "merge", "--se", tmp / "p/se", "--osm", tmp / "p/osm", "--out", tmp / "merged", "-q"]):
        res = run(*args)
        assert res.exit_code == 0, res.output
    suite = tiny_suite(tmp / "tiny.yaml")
    exp = tmp / "exp.yaml"
    exp.write_text(yaml.safe_dump({"name": "canary", "suite": suite, "data_dir": str(data_dir),
                                   "steps": [{"name": "baseline", "kind": "eval", "model": str(model)}]}))
    return {"model": model, "map": tmp / "map", "util": util, "dh": tmp / "dh", "p": tmp / "p",
            "merged": tmp / "merged", "suite": suite, "exp": exp, "data_dir": data_dir}
