"""The bundled demo experiment (`make demo`) composes on a tiny model: every step runs, every model is evaluated,
the backbone is left untouched, a re-run runs nothing and a changed setting re-runs exactly its dependents."""

import copy
from pathlib import Path

import pytest
import torch
import yaml

from safeunits.eval.suites import HarmfulSet, OverSafetySet, SuiteConfig, UtilitySet
from safeunits.experiments import runner, steps
from safeunits.experiments.config import load_experiment
from safeunits.models import loading
from safeunits.train.recipes import run as recipes  # where run_recipe loads its model
from tiny import tiny_model, tiny_tokenizer

TINY_STEPS = {  # the bundled demo-quick, with every budget cut to seconds
    "map-base": {"settings": {"limit": 4}}, "map-aligned": {"settings": {"limit": 4}},
    "map-finetuned": {"settings": {"limit": 4}},
    # the tiny tokenizer is byte-level: prompts + the model's own contrast answers need a longer max_length
    "align-full": {"settings": {"n_examples": 8, "answer_tokens": 8,
                                "train": {"max_steps": 1, "batch_size": 4, "max_length": 1024}}},
    "align-ru": {"settings": {"n_examples": 8, "answer_tokens": 8,
                              "train": {"max_steps": 1, "batch_size": 4, "max_length": 1024}}},
    "finetune": {"settings": {"n_examples": 4, "train": {"max_steps": 1, "batch_size": 4}}},
    "finetune-frozen": {"settings": {"n_examples": 4, "train": {"max_steps": 1, "batch_size": 4}}},
    "probe-base": {"limit": 2}, "probe-aligned": {"limit": 2},
    "harmful-data": {"settings": {"n_train": 4, "n_val": 2, "max_new_tokens": 4}},
    "patch-se": {"settings": {"train": {"max_steps": 1, "batch_size": 4}, "saliency": {"max_examples": 4}}},
    "patch-osm": {"settings": {"train": {"max_steps": 1, "batch_size": 4}, "saliency": {"max_examples": 4}}},
    "sweep": {"settings": {"validation": {"n_xstest": 2, "n_utility": 2, "max_new_tokens": 4}}},
}


def tiny_suite(path) -> str:
    suite = SuiteConfig(name="tiny", max_new_tokens=4, batch_size=4,
                        harmful=[HarmfulSet(name="advbench", dataset="advbench", limit=2, system_prompts=["none"])],
                        over_safety=OverSafetySet(limit=2),
                        utility=[UtilitySet(name="u", dataset="self-instruct:seed", limit=2)])
    path.write_text(yaml.safe_dump(suite.model_dump(mode="json")))
    return str(path)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, data_dir):
    """The demo run once for the module: (experiment, run folder, the named model, its weights before)."""
    tmp = tmp_path_factory.mktemp("demo")
    # varied weights, so the model's own answers to the contrast prompts are not empty
    model, tokenizer = tiny_model(initializer_range=0.2, max_position_embeddings=4096), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    real_load = loading.load_model

    def named_or_folder(shared: bool):
        def load(name, **kwargs):
            if (tmp / "run") in Path(name).parents:
                return real_load(name, **kwargs)  # a model a step trained
            return (model if shared else copy.deepcopy(model)), tokenizer
        return load

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steps, "load_model", named_or_folder(shared=True))
        mp.setattr(recipes, "load_model", named_or_folder(shared=False))  # training gets its own copy
        experiment = load_experiment("demo-quick", {"suite": tiny_suite(tmp / "tiny.yaml"), "data_dir": str(data_dir),
                                                    "steps": TINY_STEPS})
        result = runner.run_experiment(experiment, tmp / "run", progress=False)
        yield experiment, tmp / "run", result, model, before, mp


def test_demo_runs_every_step_and_reports_every_model(demo_run):
    experiment, run_dir, result, model, before, _ = demo_run
    assert result.ran == [s.name for s in experiment.steps]
    for step in experiment.steps:
        assert (run_dir / step.name / "done.json").is_file(), step.name
    labels = ["instruct (baseline)", "aligned (all weights)", "aligned (RU budget)", "align-full - pruned scu",
              "align-full - pruned random:scu", "aligned + fine-tuned", "aligned + fine-tuned (SCU+CU frozen)",
              "aligned + fine-tuned + SafePatching"]
    report = (run_dir / "report.md").read_text()
    for label in labels:
        assert f"| {label} |" in report, label
    for figure in ("map-aligned/unit_map.png", "probe-aligned/probe.png", "sweep/pareto.png", "role-transfer/transfer.png"):
        assert f"({figure})" in report and (run_dir / figure).is_file(), figure
    # the patch was applied for its evaluation only, pruning restored every weight, training trained copies
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # the RU-budget alignment changed fewer weights than the full one, and some
    changed = {name: sum(int((loading.load_model(str(run_dir / name / "model"))[0].state_dict()[k] != before[k]).sum())
                         for k in before) for name in ("align-full", "align-ru")}
    assert 0 < changed["align-ru"] < changed["align-full"]


def test_a_rerun_runs_nothing_and_a_changed_setting_reruns_exactly_its_dependents(demo_run):
    experiment, run_dir, _, _, _, _ = demo_run
    again = runner.run_experiment(experiment, run_dir, progress=False)
    assert again.ran == [] and all(p.cached for p in again.plan)
    changed = load_experiment("demo-quick", {
        "suite": experiment.suite, "data_dir": experiment.data_dir,
        "steps": {**TINY_STEPS, "finetune": {"settings": {"n_examples": 5, "train": {"max_steps": 1, "batch_size": 4}}}}})
    plan = runner.make_plan(changed, run_dir, runner.evaluation_context(changed, progress=False))
    # finetune and everything downstream of it (listed by hand from demo-quick.yaml), nothing else
    assert {p.step.name for p in plan if not p.cached} == {
        "finetune", "eval-finetuned", "map-finetuned", "role-transfer", "harmful-data", "patch-se", "patch-osm",
        "sweep", "safepatching", "final"}
    cheap = load_experiment("demo-quick", {"suite": experiment.suite, "data_dir": experiment.data_dir,
                                           "steps": {**TINY_STEPS, "probe-aligned": {"limit": 3}}})
    assert runner.run_experiment(cheap, run_dir, progress=False).ran == ["probe-aligned"]
