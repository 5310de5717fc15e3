"""Optional vLLM generation backend for GPU users (same prompts, chat template and greedy default)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from safeunits.models.chat import prompt_text


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def generate_vllm(model_path: str, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *,
                  system_prompt: str | None = None, response_prefix: str = "", max_new_tokens: int = 128,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                  **llm_kwargs) -> list[str]:
    """Generate with vLLM from a saved model folder; returns answers (with the forced prefix) in prompt order."""
    if not vllm_available():
        raise ImportError("the vLLM backend needs vllm on a GPU machine: pip install 'safeunits[vllm]'")
    from vllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_p=top_p if do_sample else 1.0, seed=seed)
    llm = LLM(model=model_path, seed=seed, **llm_kwargs)
    texts = [prompt_text(tokenizer, p, system_prompt) + response_prefix for p in prompts]
    outputs = llm.generate(texts, params)
    return [response_prefix + o.outputs[0].text for o in outputs]
