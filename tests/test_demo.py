"""The demo's stages compose on a tiny model: every variant is evaluated and the backbone is left untouched."""

import torch
import yaml

from safeunits import demo
from safeunits.eval.suites import HarmfulSet, OverSafetySet, SuiteConfig, UtilitySet
from tiny import tiny_model, tiny_tokenizer


def test_demo_runs_every_stage_on_a_tiny_model(tmp_path, data_dir, monkeypatch):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(demo, "load_model", lambda name: (model, tokenizer))
    suite = SuiteConfig(name="tiny", max_new_tokens=4, batch_size=4,
                        harmful=[HarmfulSet(name="advbench", dataset="advbench", limit=2, system_prompts=["none"])],
                        over_safety=OverSafetySet(limit=2), utility=[UtilitySet(name="u", dataset="self-instruct:seed", limit=2)])
    suite_path = tmp_path / "tiny.yaml"
    suite_path.write_text(yaml.safe_dump(suite.model_dump(mode="json")))
    config = demo.DemoConfig(suite=str(suite_path), n_harmful=4, ascent_steps=1, descent_steps=1, n_attribution=4,
                             data_dir=str(data_dir))
    results = demo.run_demo(config, tmp_path / "run", progress=False)
    assert list(results) == ["smollm2-135m-instruct", "smollm2-135m-instruct + SafePatching", "smollm2-135m-aligned",
                             "smollm2-135m-aligned - scu", "smollm2-135m-aligned - random:scu"]
    for name, result in results.items():
        assert set(result.headline.as_dict()) >= {"asr", "xstest_refusal", "utility_nll"}, name
    # the patch was applied for its evaluation only, and pruning restored every weight
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    patched, plain = results["smollm2-135m-instruct + SafePatching"], results["smollm2-135m-instruct"]
    assert patched.headline.utility_nll != plain.headline.utility_nll
    assert (tmp_path / "run" / "patch" / "safepatching").exists()
    assert (tmp_path / "run" / "units" / "unit_map.safetensors").is_file()
    assert "SafePatching" in (tmp_path / "run" / "summary.md").read_text()
