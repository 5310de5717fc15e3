"""Tiny random models and a byte-level tokenizer built in-process: no download, runs in milliseconds."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, 256 + 3 specials) with a ChatML chat template."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


VOCAB = 259

# small configs per family; hidden sizes keep head counts and GQA groups meaningful
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    "gemma": dict(model_type="gemma", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=256),
    "phi3": dict(model_type="phi3", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_inner=48, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=256),
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised model of the given family, in eval mode, float32."""
    torch.manual_seed(seed)
    kwargs = {**FAMILY_CONFIGS[family], **overrides}
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=256, eos_token_id=258, bos_token_id=257, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_unit_map(model: PreTrainedModel, seed: int = 0):
    """A unit map of a tiny llama-like model from random scores, classified by the units package."""
    from safeunits.models.signature import architecture_signature
    from safeunits.units.classes import ClassifyConfig, classify
    from safeunits.units.unit_map import UnitMap

    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    shapes = {"mlp": (cfg.num_hidden_layers, cfg.intermediate_size), "head": (cfg.num_hidden_layers, cfg.num_attention_heads)}
    safety = {k: torch.rand(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    utility = {k: torch.rand(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    unit_params = {"mlp": 3 * cfg.hidden_size, "head": 2 * head_dim * cfg.hidden_size}
    fractions = ClassifyConfig(r=0.2, s=0.1, u=0.1)
    classes = classify(safety, utility, unit_params, fractions)
    return UnitMap(safety=safety, utility=utility, classes=classes, unit_params=unit_params,
                   model_type=cfg.model_type, signature=architecture_signature(model),
                   settings={"fractions": fractions.model_dump()})  # as units.classes.build_unit_map records them
