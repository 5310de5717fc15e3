"""Experiments: schema checks, the cache and its plan, failures that keep finished steps, the CLI, the report
(self-contained HTML) and its render in headless Chromium."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from safeunits.cli import app
from safeunits.errors import ConfigError, UserFileNotFoundError
from safeunits.experiments import runner, steps
from safeunits.experiments.config import bundled_experiments, build_experiment, load_experiment
from safeunits.document import Bullets, Code, Document, Figure, Heading, Table
from safeunits.experiments.outputs import StepOutputs
from safeunits.experiments.report import collect_results
from test_demo import tiny_suite
from tiny import tiny_model, tiny_tokenizer

BROWSER = Path(__file__).parent / "browser"  # package.json: @sparticuz/chromium + puppeteer-core (`make setup`)


@pytest.fixture(scope="session")
def browser_packages() -> None:
    """The npm packages of the render test, installed from the lock file when missing (what `make setup` does);
    the test is skipped only where Node is absent."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js (node and npm) is not installed: the real-browser render of report.html needs it")
    if not (BROWSER / "node_modules" / "puppeteer-core").is_dir():
        proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BROWSER,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"npm ci in {BROWSER} failed:\n{proc.stderr[-2000:]}"


def small(tmp_path, data_dir, **extra) -> dict:
    """A three-step experiment on the tiny model: an evaluation, a unit map (two figures), a probe."""
    return {"name": "small", "suite": tiny_suite(tmp_path / "tiny.yaml"), "data_dir": str(data_dir), **extra,
            "steps": [{"name": "baseline", "kind": "eval"},
                      {"name": "map", "kind": "attribute", "settings": {"limit": 4}},
                      {"name": "probe", "kind": "probe", "limit": 2}]}


@pytest.fixture()
def tiny_load(monkeypatch):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    monkeypatch.setattr(steps, "load_model", lambda name, **kw: (model, tokenizer))
    return model


@pytest.fixture()
def small_run(tmp_path, data_dir, tiny_load):
    experiment = build_experiment(small(tmp_path, data_dir), {})
    result = runner.run_experiment(experiment, tmp_path / "run", progress=False)
    return experiment, tmp_path / "run", result


# --- schema ---------------------------------------------------------------------------------------------------

def test_bundled_experiments_validate():
    assert {"demo-quick", "demo-full", "gpu-template"} <= set(bundled_experiments())
    for name in bundled_experiments():
        assert load_experiment(name).steps


def test_every_evaluation_of_a_run_with_a_sweep_leaves_out_its_held_out_xstest_prompts():
    experiment = load_experiment("demo-full")
    sweeps = [s for s in experiment.steps if s.kind == "sweep"]
    exclude = runner.evaluation_context(experiment, progress=False).suite.over_safety.exclude
    assert len(sweeps) == 1 and exclude == ["xstest:safe[200:224]"]  # the default held-out slice: 24 from 200


@pytest.mark.parametrize("steps_, message", [
    ([{"name": "p", "kind": "prune", "unit_map": "m"}], "unit_map='m' is not a step name"),
    ([{"name": "p", "kind": "prune", "unit_map": "m"}, {"name": "m", "kind": "attribute"}], "comes later"),
    ([{"name": "e", "kind": "eval"}, {"name": "p", "kind": "prune", "unit_map": "e"}], "is a step of kind eval; expected kind attribute"),
    ([{"name": "a", "kind": "attribute", "settings": {"limt": 3}}], "AttributionConfig has no field settings.'limt'"),
    ([{"name": "a", "kind": "align", "budget": "ru"}], "budget needs unit_map"),
    ([{"name": "a", "kind": "align", "recipe": "finetune"}], "a align step needs one of kind align"),
    ([{"name": "a", "kind": "eval"}, {"name": "a", "kind": "eval"}], "two steps are named 'a'"),
    ([{"name": "a", "kind": "fly"}], "does not match any of the expected tags"),
    ([{"name": "a", "kind": "evaluate"}], "step kind `evaluate` is now `eval`"),  # 0.1's words, said in 0.2's
    ([{"name": "d", "kind": "derive", "data": "dh", "settings": {"objective": "ascent"}}], "is now `harmful_data`"),
])
def test_a_bad_experiment_fails_before_anything_runs_with_the_reason(steps_, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_experiment({"name": "x", "steps": steps_}, {})


def test_overrides_reach_one_step_by_name_and_unknown_names_are_refused():
    exp = load_experiment("demo-quick", {"steps": {"probe-base": {"limit": 3}}, "suite": "full"})
    assert exp.step("probe-base").limit == 3 and exp.step("probe-aligned").limit == 16 and exp.suite == "full"
    with pytest.raises(ConfigError, match="no step named 'probe'"):
        load_experiment("demo-quick", {"steps": {"probe": {"limit": 3}}})
    with pytest.raises(ConfigError, match="no experiment field sute"):
        load_experiment("demo-quick", {"sute": "full"})
    with pytest.raises(UserFileNotFoundError, match="neither a file nor a bundled experiment"):
        load_experiment("demo-quik")


# --- the cache --------------------------------------------------------------------------------------------------

def test_keys_change_exactly_downstream_of_a_changed_setting(tmp_path, data_dir):
    base = build_experiment(small(tmp_path, data_dir), {})
    evaluation = runner.evaluation_context(base, progress=False)
    keys = runner.step_keys(base, evaluation)
    assert keys == runner.step_keys(build_experiment(small(tmp_path, data_dir), {}), evaluation)  # deterministic
    changed = runner.step_keys(build_experiment(small(tmp_path, data_dir), {"steps": {"map": {"settings": {"limit": 5}}}}),
                               evaluation)
    assert [k for k in keys if keys[k] != changed[k]] == ["map"]
    # a suite change reaches the steps that evaluate, not the unit map or the probe
    other = runner.evaluation_context(build_experiment(small(tmp_path, data_dir), {"limit": 1}), progress=False)
    suite_changed = runner.step_keys(base, other)
    assert [k for k in keys if keys[k] != suite_changed[k]] == ["baseline"]


def test_a_step_finished_with_outputs_of_an_older_form_runs_again(small_run):
    """0.1 wrote step tables as Markdown files and figures as [path, caption] pairs: such a done.json is not
    trusted half (the report could not render it from data); that step runs again, the others stay cached."""
    experiment, run_dir, _ = small_run
    done = json.loads((run_dir / "map" / "done.json").read_text())
    assert done["outputs"]["figures"][0]["path"] == "class_shares.png"
    done["outputs"]["tables"] = ["map.md"]
    (run_dir / "map" / "done.json").write_text(json.dumps(done))
    assert runner.run_experiment(experiment, run_dir, progress=False).ran == ["map"]


def test_rerun_is_all_cached_and_a_failing_step_keeps_the_finished_ones(small_run, tmp_path, data_dir):
    experiment, run_dir, result = small_run
    assert result.ran == ["baseline", "map", "probe"]
    done = {s: (run_dir / s / "done.json").read_bytes() for s in result.ran}
    assert runner.run_experiment(experiment, run_dir, progress=False).ran == []
    # a user error in the last step: the message names it, the finished steps stay as they were
    broken = build_experiment(small(tmp_path, data_dir), {"steps": {"probe": {"prompts": "no-such-dataset"}}})
    with pytest.raises(runner.StepFailedError, match=r"step 'probe' \(probe\) failed: .*no-such-dataset"):
        runner.run_experiment(broken, run_dir, progress=False)
    assert {s: (run_dir / s / "done.json").read_bytes() for s in ("baseline", "map")} == \
        {s: done[s] for s in ("baseline", "map")}
    assert not (run_dir / "probe" / "done.json").exists()
    # a bug (any other exception) keeps its type and traceback, with a note naming the step
    def crash(step, ctx):
        raise RuntimeError("boom")
    saved = steps.STEP_FUNCTIONS.get("probe")
    steps.STEP_FUNCTIONS.add("probe", crash, replace=True)
    try:
        with pytest.raises(RuntimeError, match="boom") as info:
            runner.run_experiment(experiment, run_dir, progress=False)
    finally:
        steps.STEP_FUNCTIONS.add("probe", saved, replace=True)
    assert any("step 'probe' (probe)" in note for note in info.value.__notes__)
    # fixed: only the failed step runs
    assert runner.run_experiment(experiment, run_dir, progress=False).ran == ["probe"]


def test_every_step_kind_has_a_function():
    from safeunits.experiments.config import STEP_CLASSES

    assert set(steps.STEP_FUNCTIONS) == set(STEP_CLASSES)


# --- CLI ------------------------------------------------------------------------------------------------------

def test_dry_run_prints_the_plan_and_runs_nothing(small_run, tmp_path, data_dir):
    experiment, run_dir, _ = small_run
    path = tmp_path / "small.yaml"
    before = (run_dir / "probe" / "done.json").read_bytes()
    path.write_text(yaml.safe_dump(small(tmp_path, data_dir)))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(run_dir), "--dry-run", "--set", "steps.probe.limit=3"])
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines()[1:-1]}
    assert "cached" in lines["baseline"] and "cached" in lines["map"]
    assert "run: settings changed" in lines["probe"]
    assert res.output.rstrip().endswith("1 step(s) to run, 2 cached")
    assert (run_dir / "probe" / "done.json").read_bytes() == before  # nothing ran
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "fresh"), "--dry-run"])
    assert res.exit_code == 0 and "role-transfer" in res.output and "22 step(s) to run, 0 cached" in res.output
    res = CliRunner().invoke(app, ["run", "demo-quick", "--dry-run", "--set", "steps.nope.limit=1"])
    assert res.exit_code == 2 and "no step named 'nope'" in res.output


# --- report -----------------------------------------------------------------------------------------------------

def test_report_html_is_self_contained_with_tables_and_inlined_figures(small_run):
    _, run_dir, result = small_run
    text = result.report["html"].read_text()
    assert text.count("<table>") >= 2 and "<th>XSTest refusal</th>" in text
    images = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)  # 2 map + probe
    for attr in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert "http" not in attr
    assert "<link" not in text and "<script" not in text
    md = result.report["markdown"].read_text()
    assert "| baseline |" in md and "## Software and machine" in md and "transformers" in md


def test_document_renders_the_same_data_to_markdown_and_escaped_aligned_html(tmp_path):
    doc = Document().add(Heading(level=1, text="T <x>"), Table(columns=["a", "b"], rows=[["`c`", "1"]], numeric=[False, True]),
                         Code(text="<raw>"), Bullets(items=["item"]))
    html = doc.html(tmp_path, "t")
    assert "<h1>T &lt;x&gt;</h1>" in html and '<td class="num">1</td>' in html and "<td><code>c</code></td>" in html
    assert "<pre><code>&lt;raw&gt;</code></pre>" in html and "<li>item</li>" in html
    assert doc.markdown() == "# T <x>\n\n| a | b |\n|---|---:|\n| `c` | 1 |\n\n```\n<raw>\n```\n\n- item\n"
    name = doc.write(tmp_path, "doc")  # the data round-trips: a report re-renders what a step wrote
    assert Document.load(tmp_path / name) == doc and (tmp_path / "doc.md").read_text() == doc.markdown()


def test_report_embeds_only_figures_of_the_run_and_a_pipe_in_a_label_stays_in_its_cell(small_run, tmp_path):
    """A shared report must not carry local files: a figure pointing at /etc/hostname or ../../secret.txt stays
    text; a `|` or a line break in a label does not shift the table's columns, in the HTML or the Markdown."""
    from safeunits.eval.report import headline_document

    experiment, run_dir, result = small_run
    (tmp_path / "secret.txt").write_bytes(b"\x89PNG\r\n\x1a\nTOP SECRET")  # even a PNG-looking file outside
    outside = Path("../" * len(run_dir.parts)) / tmp_path.relative_to("/") / "secret.txt"
    (run_dir / "link.png").symlink_to(tmp_path / "secret.txt")
    figures = [Figure(path=path, caption=alt) for alt, path in
               [("x", "/etc/hostname"), ("y", "../secret.txt"), ("z", str(outside)), ("w", "link.png"),
                ("map", "map/unit_map.png")]]
    page = Document(blocks=figures).html(run_dir, "t")
    assert page.count("<img") == 1 and 'alt="map"' in page  # the run's own figure only
    assert "U0VDUkVU" not in page and "SECRET" not in page and "not embedded" in page and "/etc/hostname" in page
    row = next(iter(collect_results(result.plan, {"baseline": StepOutputs(evals={"b": "eval"})}, run_dir).values()))
    table = headline_document({"a | b\nc": row, "plain": row})
    cells = re.findall(r"<tr>(.*?)</tr>", table.html(run_dir, "t"), re.S)
    assert cells[1].startswith("<td>a | b\nc</td>") and all(c.count("<td") == cells[1].count("<td") for c in cells[1:])
    md_rows = [line for line in table.markdown().splitlines() if line.startswith("|")]
    assert md_rows[2].startswith("| a \\| b c |")
    assert len({len(re.split(r"(?<!\\)\|", line)) for line in md_rows}) == 1  # every row: the same number of cells


def test_report_renders_offline_in_headless_chromium(browser_packages, small_run, tmp_path):
    """The page a reader opens: tables present, every image loaded (none broken), no request leaves the file,
    no script error, and a screenshot that is not blank (headless Chromium driven by puppeteer-core)."""
    from PIL import Image

    _, run_dir, result = small_run
    shot = tmp_path / "shot.png"
    proc = subprocess.run(["node", str(BROWSER / "render.mjs"), str(result.report["html"]), str(shot)],
                          capture_output=True, text=True, timeout=300, cwd=BROWSER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["tables"] >= 2 and seen["rows"] >= 6, seen
    assert len(seen["images"]) == 3 and all(img["complete"] and img["width"] > 0 for img in seen["images"]), seen
    assert seen["external"] == [] and seen["errors"] == [], seen
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # text, tables and figures, not a blank page
    assert (pixels < 128).mean() > 0.005  # dark ink covers part of the page


def test_a_train_step_is_keyed_by_the_recipe_it_resolves_to(tmp_path):
    """A train step's settings are overrides of a recipe: a change of the recipe itself (its YAML, or a default
    such as the attack's data filter) must re-run the step, not reuse a model trained on other data."""
    from safeunits.eval.context import EvalContext

    recipe = tmp_path / "ft.yaml"
    recipe.write_text("recipe: finetune\ndata: [t0]\nn_examples: 8\n")
    raw = {"name": "x", "suite": "none", "steps": [{"name": "ft", "kind": "finetune", "model": "m", "recipe": str(recipe)}]}
    evaluation = EvalContext.create(None)
    first = runner.step_keys(build_experiment(raw, {}), evaluation)
    assert runner.step_keys(build_experiment(raw, {}), evaluation) == first
    recipe.write_text("recipe: finetune\ndata: [t0]\nn_examples: 9\n")  # the step's own fields are unchanged
    assert runner.step_keys(build_experiment(raw, {}), evaluation) != first


def test_a_unit_map_file_named_by_a_step_is_keyed_by_its_content(tmp_path):
    """A train step may name a unit map file instead of an attribute step; replacing the file re-runs the step, a
    step name used before its step exists is refused."""
    from safeunits.eval.context import EvalContext

    unit_map = tmp_path / "unit_map.safetensors"
    unit_map.write_bytes(b"first")
    raw = {"name": "x", "suite": "none", "steps": [{"name": "ft", "kind": "finetune", "model": "some-model",
                                                     "unit_map": str(unit_map), "freeze": "scu"}]}
    experiment, evaluation = build_experiment(raw, {}), EvalContext.create(None)
    first = runner.step_keys(experiment, evaluation)
    assert runner.step_keys(build_experiment(raw, {}), evaluation) == first
    unit_map.write_bytes(b"second")
    assert runner.step_keys(experiment, evaluation) != first
    later = {**raw, "steps": [{**raw["steps"][0], "model": "ev"}, {"name": "ev", "kind": "eval"}]}
    with pytest.raises(ConfigError, match="comes later"):
        build_experiment(later, {})


def test_a_harmful_data_folder_named_by_a_derive_step_is_keyed_by_its_files(tmp_path):
    """A derive step may name a D_h folder instead of a harmful-data step: adding a file to it re-runs the step,
    and two steps deriving from the same folder with the same settings share a key."""
    import os

    from safeunits.eval.context import EvalContext

    folder = tmp_path / "dh"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    derive = {"kind": "derive", "model": "some-model", "harmful_data": str(folder), "settings": {"objective": "ascent"}}
    raw = {"name": "x", "suite": "none", "steps": [{"name": "se", **derive}, {"name": "se2", **derive}]}
    evaluation = EvalContext.create(None)
    first = runner.step_keys(build_experiment(raw, {}), evaluation)
    assert first["se"] == first["se2"]
    assert runner.step_keys(build_experiment(raw, {}), evaluation) == first
    (folder / "val.jsonl").write_text('{"prompt": "q", "response": "s"}\n')
    second = runner.step_keys(build_experiment(raw, {}), evaluation)
    assert second["se"] != first["se"]
    (folder / "val.jsonl").write_text('{"prompt": "q", "response": "a longer answer"}\n')
    os.utime(folder / "val.jsonl", (1, 1))
    assert runner.step_keys(build_experiment(raw, {}), evaluation)["se"] != second["se"]


def test_a_changed_harm_judge_judges_cached_evaluations_again_without_generating(small_run, monkeypatch):
    """Retrained harm-judge weights change the key of every evaluating step (and of what consumes it), but an
    evaluation keeps its folder: its saved answers are judged again and nothing is generated again."""
    from safeunits.eval import judges

    experiment, run_dir, _ = small_run
    answers = {p.name: p.read_bytes() for p in (run_dir / "baseline" / "eval" / "generations").iterdir()}
    monkeypatch.setattr(judges, "judge_identity", lambda name: f"{name}@retrained")
    evaluation = runner.evaluation_context(experiment, progress=False)
    plan = {p.step.name: p for p in runner.make_plan(experiment, run_dir, evaluation)}
    assert plan["baseline"].rejudges and not plan["baseline"].cached
    assert plan["map"].cached and plan["probe"].cached  # they do not evaluate
    assert "judged again from its saved answers" in runner.format_plan(list(plan.values()), run_dir)
    assert runner.run_experiment(experiment, run_dir, progress=False).ran == ["baseline"]
    metrics = json.loads((run_dir / "baseline" / "eval" / "metrics.json").read_text())
    assert metrics["timing"]["generated_tokens"] == 0 and metrics["timing"]["resumed_rows"] > 0
    assert {p.name: p.read_bytes() for p in (run_dir / "baseline" / "eval" / "generations").iterdir()} == answers
    assert runner.run_experiment(experiment, run_dir, progress=False).ran == []
    # a folder started before the judges were keyed (its key was the answers' key) is judged again too
    started = run_dir / "baseline" / "started.json"
    record = json.loads(started.read_text())
    started.write_text(json.dumps({"key": record["answers_key"]}))
    (run_dir / "baseline" / "done.json").unlink()
    monkeypatch.setattr(judges, "judge_identity", lambda name: f"{name}@retrained-again")
    plan = {p.step.name: p for p in runner.make_plan(experiment, run_dir, evaluation)}
    assert plan["baseline"].rejudges
