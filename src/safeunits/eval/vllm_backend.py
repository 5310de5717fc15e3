"""vLLM generation backend (GPU machines): the same arguments, prompts, chat template and JSONL rows as
`eval.generation.generate`, so an evaluation run folder reads the same whichever backend wrote it.

How the model reaches vLLM: vLLM loads weights from a folder, not from a torch module, and the model under
evaluation is often an in-memory variant (trained, patched, pruned) whose `name_or_path` still names the
untouched folder it was loaded from. Handing vLLM that folder would silently evaluate the wrong weights while
the run folder records the in-memory model's fingerprint. So the backend always saves the in-memory model and
its tokenizer (safetensors) to a temporary folder under the cache directory, starts one vLLM engine on it the
first time a prompt actually needs generating (a fully resumed run starts none), reuses that engine for every
generation of the evaluation, and deletes the folder on `close()`.

Exact parity with the transformers backend: the rendered prompt is passed as token ids tokenized without
special tokens (the chat template carries its own BOS), greedy decoding is temperature 0, and special tokens
are skipped in the decoded answer. Not run against a real vLLM here (no GPU on the development machine);
the tests use a stand-in `vllm` module.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, get_args

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.distributed import ProcessShard
from safeunits.errors import UserError, UserValueError
from safeunits.eval.generation import (Backend, DecodingConfig, Engine, GenerationJob, generate_rows,
                                       in_batches)
from safeunits.models.loading import save_model
from safeunits.paths import cache_dir

INSTALL_HINT = "pip install 'safeunits[vllm]'"
ENGINE_DEFAULTS: dict[str, Any] = {"gpu_memory_utilization": 0.5}
"""The torch model stays on the GPU beside vLLM's engine (the utility NLL needs it), so vLLM gets half the memory."""


class VllmNotInstalledError(UserError, ImportError):
    """The vLLM backend was asked for but the `vllm` package does not import."""


def require_vllm() -> None:
    """Fail at once, in one line, when vLLM is missing (called where the backend is chosen, before any work)."""
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise VllmNotInstalledError(f"the vllm generation backend needs the vllm package (GPU machines): "
                                    f"{INSTALL_HINT}") from err


class VllmGenerator:
    """One vLLM engine for one in-memory model, started lazily and shared by every `generate` call until `close()`."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **engine_kwargs: Any) -> None:
        require_vllm()
        self.model, self.tokenizer = model, tokenizer
        self.engine_kwargs = {**ENGINE_DEFAULTS, **engine_kwargs}
        self._llm: Any = None
        self._folder: Path | None = None

    def _engine(self, seed: int) -> Any:
        if self._llm is None:
            from vllm import LLM

            self._folder = Path(tempfile.mkdtemp(prefix="vllm-model-", dir=_scratch_dir()))
            save_model(self.model, self.tokenizer, self._folder / "model")
            folder = str(self._folder / "model")
            self._llm = LLM(model=folder, tokenizer=folder, seed=seed, **self.engine_kwargs)
        return self._llm

    def generate(self, prompts: list[str], *, system_prompt: str | None = None, response_prefix: str = "",
                 max_new_tokens: int = 128, batch_size: int | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, out_path: Path | None = None,
                 progress: bool = True, engine: Engine = "continuous", shard: ProcessShard | None = None) -> list[str]:
        """`eval.generation.generate` on vLLM: same arguments, same rows in `out_path`, same resume, same sharding.

        `engine` is accepted for the same signature and ignored: vLLM batches continuously itself; `batch_size`
        (default 256) is how many prompts go to vLLM at once, i.e. how often rows are written."""
        job = GenerationJob(prompts, system_prompt=system_prompt, response_prefix=response_prefix, out_path=out_path)
        return self.generate_many([job], max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
                                  temperature=temperature, top_p=top_p, seed=seed, progress=progress, shard=shard)[0]

    def generate_many(self, jobs: Sequence[GenerationJob], *, max_new_tokens: int = 128,
                      batch_size: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                      top_p: float = 1.0, seed: int = 0, progress: bool = True, engine: Engine = "continuous",
                      shard: ProcessShard | None = None) -> list[list[str]]:
        """`eval.generation.generate_many` on vLLM: each job's prompts go in batches of their own (seeds per batch,
        as `generate` numbers them), so the answers equal separate calls'."""
        from vllm import SamplingParams

        decoding = DecodingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, seed=seed)

        def answer(texts: list[str], batch_no: int) -> list[str]:
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                                    top_p=top_p if do_sample else 1.0, seed=seed + batch_no, skip_special_tokens=True)
            requests = [{"prompt_token_ids": self.tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
            outputs = self._engine(seed).generate(requests, params, use_tqdm=False)
            return [o.outputs[0].text for o in outputs]

        return generate_rows(self.tokenizer, jobs, in_batches(answer, batch_size or 256), decoding,
                             progress=progress, shard=shard)

    def close(self) -> None:
        """Drop the engine and delete the temporary model folder."""
        self._llm = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> VllmGenerator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def generate_vllm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *,
                  system_prompt: str | None = None, response_prefix: str = "", max_new_tokens: int = 128,
                  batch_size: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int = 0, out_path: Path | None = None, progress: bool = True, engine: Engine = "continuous",
                  shard: ProcessShard | None = None) -> list[str]:
    """One-shot `generate` on vLLM (starts and closes an engine; evaluations share one through `VllmGenerator`)."""
    with VllmGenerator(model, tokenizer) as generator:
        return generator.generate(prompts, system_prompt=system_prompt, response_prefix=response_prefix,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
                                  temperature=temperature, top_p=top_p, seed=seed, out_path=out_path,
                                  progress=progress, shard=shard)


def _scratch_dir() -> Path:
    path = cache_dir() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_backend(backend: str) -> Backend:
    """The backend name, checked where it is chosen: unknown names and a missing vLLM fail before any work."""
    if backend not in get_args(Backend):
        raise UserValueError(f"unknown generation backend {backend!r}; choose one of {', '.join(get_args(Backend))}")
    if backend == "vllm":
        require_vllm()
    return backend  # type: ignore[return-value]
