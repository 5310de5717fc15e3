"""The vLLM backend through `evaluate`, against a stand-in `vllm` module (no GPU here): the arguments vLLM receives,
and run folders identical to the transformers backend's."""

from __future__ import annotations

import inspect
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safeunits.eval.context import EvalContext
from safeunits.eval.generation import generate
from safeunits.eval.runner import RunDirMismatchError, evaluate
from safeunits.eval.vllm_backend import VllmNotInstalledError, generate_vllm
from safeunits.models.chat import prompt_text
from safeunits.models.loading import model_fingerprint
from test_eval_runner import tiny_suite
from tiny import tiny_model, tiny_tokenizer


class FakeLLM:
    """Loads the folder it is given and answers each token-id request alone with transformers' greedy decoding."""

    instances: list["FakeLLM"] = []

    def __init__(self, model: str, tokenizer: str, seed: int, **kwargs) -> None:
        self.path, self.kwargs, self.requests, self.params = Path(model), kwargs, [], []
        assert tokenizer == model and seed == 0
        assert any(self.path.glob("*.safetensors")) and not any(self.path.glob("*.bin"))
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        FakeLLM.instances.append(self)

    @torch.no_grad()
    def generate(self, requests: list[dict], params, use_tqdm: bool = True) -> list:
        self.requests += requests
        self.params.append(params)
        outputs = []
        for req in requests:
            ids = torch.tensor([req["prompt_token_ids"]])
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=params.max_tokens, temperature=None, top_p=None, top_k=None,
                                      pad_token_id=self.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
            stop = self.model.generation_config.eos_token_id
            cut = next((k for k, t in enumerate(out) if t == stop), len(out))
            text = self.tokenizer.decode(out[:cut], skip_special_tokens=params.skip_special_tokens)
            outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text)]))
        return outputs


@pytest.fixture()
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances = []
    return FakeLLM


@pytest.fixture()
def patched_model():
    """An in-memory variant: vLLM must get these weights, not whatever folder `name_or_path` names."""
    model = tiny_model(initializer_range=0.2, max_position_embeddings=4096)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    return model


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*.jsonl"))}


def test_vllm_backend_writes_the_transformers_backends_files(fake_vllm, patched_model, data_dir, tmp_path):
    tok = tiny_tokenizer()
    suite = tiny_suite()
    ref = evaluate(patched_model, tok, suite, out_dir=tmp_path / "hf", data_dir=data_dir, progress=False)
    ctx = EvalContext.create(suite, data_dir=data_dir, progress=False, backend="vllm")
    got = ctx.evaluate(patched_model, tok, tmp_path / "vllm")
    assert _files(tmp_path / "vllm") == _files(tmp_path / "hf")  # generations and judgements, byte for byte
    assert len(_files(tmp_path / "hf")) >= 5
    assert got.headline.as_dict() == pytest.approx(ref.headline.as_dict())
    assert got.environment["generation_backend"] == "vllm"
    assert json.loads((tmp_path / "vllm" / "config.json").read_text())["backend"] == "vllm"

    [llm] = fake_vllm.instances  # one engine for the whole evaluation
    assert model_fingerprint(llm.model) == model_fingerprint(patched_model)
    assert not llm.path.exists()  # the temporary model folder is gone after the evaluation
    assert llm.kwargs == {"gpu_memory_utilization": 0.5}
    assert all(p.temperature == 0.0 and p.top_p == 1.0 and p.max_tokens == suite.max_new_tokens for p in llm.params)
    from safeunits.data.registry import load_dataset

    first = load_dataset(suite.harmful[0].dataset, data_dir=data_dir, limit=suite.harmful[0].limit)
    expected = {tuple(tok(prompt_text(tok, r.prompt), add_special_tokens=False)["input_ids"]) for r in first}
    assert expected <= {tuple(r["prompt_token_ids"]) for r in llm.requests}  # no extra BOS from vLLM's tokenizing

    # a rerun resumes without starting vLLM; the transformers backend may not resume into a vLLM run
    again = ctx.evaluate(patched_model, tok, tmp_path / "vllm")
    assert len(fake_vllm.instances) == 1 and again.headline.as_dict() == pytest.approx(got.headline.as_dict())
    with pytest.raises(RunDirMismatchError, match="vllm backend"):
        evaluate(patched_model, tok, suite, out_dir=tmp_path / "vllm", data_dir=data_dir, progress=False)


def test_generate_vllm_takes_generates_arguments(fake_vllm, patched_model, tmp_path):
    tok = tiny_tokenizer()
    ours = inspect.signature(generate_vllm).parameters
    assert list(ours) == list(inspect.signature(generate).parameters)
    assert all(ours[k].default == v.default for k, v in inspect.signature(generate).parameters.items())
    prompts = ["hi", "a much longer prompt about several things", "why?"]
    kw = dict(system_prompt="be brief", response_prefix="Sure", max_new_tokens=5, batch_size=2, progress=False)
    generate(patched_model, tok, prompts, out_path=tmp_path / "hf.jsonl", **kw)
    assert generate_vllm(patched_model, tok, prompts, out_path=tmp_path / "v.jsonl", **kw) == \
        [json.loads(line)["response"] for line in sorted((tmp_path / "hf.jsonl").read_text().splitlines(),
                                                         key=lambda line: json.loads(line)["index"])]
    assert (tmp_path / "v.jsonl").read_bytes() == (tmp_path / "hf.jsonl").read_bytes()


def test_missing_vllm_and_unknown_backend_fail_at_the_entry_point(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(VllmNotInstalledError, match=r"pip install 'safeunits\[vllm\]'"):
        EvalContext.create("quick", backend="vllm")
    with pytest.raises(ValueError, match="unknown generation backend 'vlm'"):
        EvalContext.create("quick", backend="vlm")
