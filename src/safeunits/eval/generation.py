"""Batched, resumable generation with the model's chat template: continuous batching by default.

Two engines for the transformers backend (`Engine`): `continuous` (eval/continuous.py) decodes many rows per
step in fixed KV-cache slots and refills a finished row's slot at once; `batched` is `model.generate` on
left-padded, length-sorted batches of `batch_size` (the engine before continuous batching, kept for models the
slots cannot serve and as the benchmark's baseline). Greedy decoding gives the same text either way and one
prompt at a time (tested), up to float near-ties (bench/bench_generation.py traces every differing row).

Why resumable: evaluation runs are long; every finished batch is appended to a JSONL file at once, each
row keyed by prompt index + a hash of everything that determines the output, and a rerun skips the done rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import ConfigDict, Field
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config
from safeunits.distributed import ProcessShard
from safeunits.errors import UserValueError
from safeunits.models.chat import prompt_text


class DecodingConfig(Config):
    """Everything besides the prompt that decides a generation; part of each JSONL row's key."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1, description="Tokens generated at most per prompt (papers: 256).")
    do_sample: bool = Field(False, description="Greedy decoding when false (the default of every evaluation).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (only with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (only with do_sample).")
    seed: int = Field(0, description="Seed for sampling; batch k uses seed + k so a full run is reproducible.")


Engine = Literal["continuous", "batched"]
"""How the transformers backend batches: KV-cache slots refilled as rows finish, or padded batches of `batch_size`."""

Backend = Literal["transformers", "vllm"]
"""Who generates: transformers' `model.generate` (default, any device) or vLLM (GPU, `pip install 'safeunits[vllm]'`)."""


class ResumeMismatchError(UserValueError):
    """The JSONL file on disk was written for different prompts or decoding settings."""


def row_key(prompt: str, system_prompt: str | None, response_prefix: str, decoding: DecodingConfig) -> str:
    """A short hash of everything that decides one output: a resumed row is reused only if this matches."""
    payload = json.dumps(
        {"prompt": prompt, "system_prompt": system_prompt, "response_prefix": response_prefix,
         "decoding": decoding.model_dump()},
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


def read_done_rows(out_path: Path, keys: Sequence[str]) -> dict[int, str]:
    """Rows already generated in `out_path` (index -> response), after checking they belong to these prompts.

    A last line cut off mid-write (an interrupted run) is dropped from the file; any other unreadable line
    or a row whose key does not match the prompt at its index is an error, never silently overwritten.
    """
    done: dict[int, str] = {}
    if not out_path.is_file():
        return done
    raw = out_path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1].strip():  # no trailing newline: the last write was interrupted
        try:
            json.loads(lines[-1])
            complete = raw + b"\n"
        except json.JSONDecodeError:
            complete = raw[: len(raw) - len(lines[-1])]
        _truncate_to(out_path, complete)
        lines = complete.split(b"\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            index, key, response = int(row["index"]), str(row["key"]), str(row["response"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ResumeMismatchError(f"{out_path}:{lineno}: not a generation row ({err}); delete the file to restart") from err
        if not 0 <= index < len(keys) or keys[index] != key:
            raise ResumeMismatchError(
                f"{out_path}:{lineno}: row for prompt {index} was generated from a different prompt or decoding "
                f"settings; use another output path or delete the file to restart"
            )
        done[index] = response
    return done


def _truncate_to(path: Path, content: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(0)
        fh.write(content)
        fh.truncate()


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends an answer: the model's generation config EOS ids plus the tokenizer's EOS."""
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.extend(configured if isinstance(configured, (list, tuple)) else [configured])
    if tokenizer.eos_token_id is not None and not ids:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    decoding: DecodingConfig,
    eos: list[int],
    pad_id: int,
    add_special_tokens: bool = False,
) -> list[str]:
    """Greedy or sampled answers to already-rendered texts (left-padded batch), cut at the first EOS.

    `add_special_tokens`: chat-template texts carry their own BOS; judge prompts published as plain strings
    (HarmBench, WildGuard) are tokenized with the tokenizer's special tokens, as their authors do.
    """
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=add_special_tokens)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    kwargs: dict[str, Any] = dict(max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample,
                                  eos_token_id=eos, pad_token_id=pad_id)
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
    else:  # a model's generation_config may carry sampling defaults; greedy must not warn about or use them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **kwargs)
    stops = set(eos)
    answers = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))  # EOS and the padding after it go
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return answers


@dataclass(frozen=True)
class GenerationJob:
    """One set of prompts under one system prompt and response prefix, resumed from and written to one JSONL file.

    `generate_many` answers several jobs in one run: the continuous engine then decodes all their rows together
    (more rows a step run faster), each job's chat-template prefix run once."""

    prompts: list[str]
    system_prompt: str | None = None
    response_prefix: str = ""
    out_path: Path | None = None


@dataclass(frozen=True)
class PendingRow:
    """A prompt still to answer: its job (position in the job list), rendered text (prefix included), ids, row key."""

    job: int
    text: str
    ids: list[int]
    key: str


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    system_prompt: str | None = None,
    response_prefix: str = "",
    max_new_tokens: int = 128,
    batch_size: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    out_path: Path | None = None,
    progress: bool = True,
    engine: Engine = "continuous",
    shard: ProcessShard | None = None,
) -> list[str]:
    """Answer every prompt (chat template applied); returns the answers in prompt order.

    `response_prefix` is forced as the start of the answer (prefill attacks) and included in the returned
    text. Generation stops at EOS or after `max_new_tokens`. With `out_path`, each finished answer is appended
    to that JSONL file (`index`, `key`, `prompt`, `response`, ...) and a rerun resumes where it stopped.
    `batch_size`: rows decoded together (None: `continuous` sizes it from free memory, `batched` uses 16).
    Sampling (`do_sample`) is reproducible per `seed`: `continuous` seeds each prompt's own generator from the
    seed and the prompt's row key, `batched` seeds batch k with seed + k. With `shard` (several processes),
    each process answers its share and all get every answer (`generate_rows`). One job of `generate_many`.
    """
    job = GenerationJob(prompts, system_prompt=system_prompt, response_prefix=response_prefix, out_path=out_path)
    return generate_many(model, tokenizer, [job], max_new_tokens=max_new_tokens, batch_size=batch_size,
                         do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed, progress=progress,
                         engine=engine, shard=shard)[0]


def generate_many(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    jobs: Sequence[GenerationJob],
    *,
    max_new_tokens: int = 128,
    batch_size: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    engine: Engine = "continuous",
    shard: ProcessShard | None = None,
) -> list[list[str]]:
    """`generate` for several jobs in one run; each job's answers in prompt order, the same as separate calls give.

    The continuous engine decodes the rows of every job together (one prefix group a job); a job its slots cannot
    serve (a sliding window shorter than its prompts), and every job with `engine="batched"`, gets padded batches
    of its own, numbered per job as `generate` numbers them, so greedy and sampled answers equal separate calls'.
    """
    if tokenizer.pad_token_id is None and any(job.prompts for job in jobs):
        raise ValueError("the tokenizer has no pad token; load models with safeunits.models.loading.load_model")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if engine not in get_args(Engine):
        raise UserValueError(f"unknown generation engine {engine!r}; choose one of {', '.join(get_args(Engine))}")
    decoding = DecodingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_p=top_p, seed=seed)
    eos = eos_token_ids(model, tokenizer)

    def answer(texts: list[str], batch_no: int) -> list[str]:
        if do_sample:
            torch.manual_seed(seed + batch_no)
        return generate_batch(model, tokenizer, texts, decoding, eos, tokenizer.pad_token_id)

    batched = in_batches(answer, batch_size or 16)

    def stream(rows: list[PendingRow]) -> Iterator[tuple[int, str]]:
        from safeunits.eval.continuous import SlotDecoder, unsupported_reason

        longest: dict[int, int] = {}
        for r in rows:
            longest[r.job] = max(longest.get(r.job, 0), len(r.ids))
        slot_jobs = {job for job, n in longest.items()
                     if engine == "continuous" and unsupported_reason(model, n + max_new_tokens) is None}
        slotted = [j for j, r in enumerate(rows) if r.job in slot_jobs]
        if len(slotted) < len(rows):
            rest = [j for j, r in enumerate(rows) if r.job not in slot_jobs]
            yield from ((rest[k], text) for k, text in batched([rows[j] for j in rest]))
        if not slotted:
            return
        decoder = SlotDecoder(model, max_new_tokens=max_new_tokens, eos=eos, pad_id=tokenizer.pad_token_id,
                              do_sample=do_sample, temperature=temperature, top_p=top_p, slots=batch_size)
        run = decoder.run([rows[j].ids for j in slotted], [int(rows[j].key, 16) ^ seed for j in slotted],
                          groups=[rows[j].job for j in slotted])
        for k, tokens in run:
            yield slotted[k], tokenizer.decode(tokens, skip_special_tokens=True)

    return generate_rows(tokenizer, jobs, stream, decoding, progress=progress, shard=shard)


AnswerBatch = Callable[[list[str], int], list[str]]
"""A batch step: chat-rendered texts (prefix included) and the batch number -> answers without the prefix."""

AnswerStream = Callable[[list[PendingRow]], Iterable[tuple[int, str]]]
"""A backend's answerer: the rows to answer (longest first, jobs mixed) -> (position in that list, answer without
the prefix), yielded as each answer is finished."""


def in_batches(answer_batch: AnswerBatch, batch_size: int) -> AnswerStream:
    """An `AnswerStream` over fixed batches of `batch_size` rendered texts (the padded-batch and vLLM backends).

    Each job gets batches of its own, numbered from 0, as a separate call would: a padded batch's answers (its
    padding, its sampling seed) then do not depend on which other jobs ran in the same call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def stream(rows: list[PendingRow]) -> Iterator[tuple[int, str]]:
        for job in dict.fromkeys(r.job for r in rows):
            at = [j for j, r in enumerate(rows) if r.job == job]
            for b, start in enumerate(range(0, len(at), batch_size)):
                answers = answer_batch([rows[j].text for j in at[start:start + batch_size]], b)
                yield from ((at[start + k], a) for k, a in enumerate(answers))
    return stream


def generate_rows(
    tokenizer: PreTrainedTokenizerBase,
    jobs: Sequence[GenerationJob],
    answer: AnswerStream,
    decoding: DecodingConfig,
    *,
    progress: bool = True,
    shard: ProcessShard | None = None,
) -> list[list[str]]:
    """The resumable, length-sorted loop every generation backend shares (one JSONL format for all).

    Why shared: the transformers and vLLM backends must write the same rows and keys, so that a run folder
    reads the same whichever backend produced it. Prompts are rendered and tokenized once; the ones not yet
    answered, of every job, go to `answer` together, longest first (memory problems show up at once). Each
    job resumes from and appends to its own `out_path`.

    With `shard` (several processes, `safeunits.distributed.process_shard`), each process answers every N-th
    prompt still to do, the answers are gathered into every process, and the main process alone writes the
    rows (once the set is complete: an interrupted sharded run resumes from the last complete set).
    """
    paths = [Path(job.out_path) for job in jobs if job.out_path is not None]
    if len(set(paths)) < len(paths):
        raise ValueError("two generation jobs write the same file; give each its own out_path")
    keys = [[row_key(p, job.system_prompt, job.response_prefix, decoding) for p in job.prompts] for job in jobs]
    results: list[dict[int, str]] = [{} for _ in jobs]
    pending: list[tuple[int, int]] = []  # (job, prompt index) still to answer
    texts: dict[tuple[int, int], str] = {}
    for b, job in enumerate(jobs):
        if job.out_path is not None and job.prompts:
            Path(job.out_path).parent.mkdir(parents=True, exist_ok=True)
            results[b] = read_done_rows(Path(job.out_path), keys[b])
        for i, p in enumerate(job.prompts):
            if i not in results[b]:
                pending.append((b, i))
                texts[b, i] = prompt_text(tokenizer, p, job.system_prompt) + job.response_prefix
    ids = {bi: tokenizer(text, add_special_tokens=False)["input_ids"] for bi, text in texts.items()}
    todo = sorted(pending, key=lambda bi: (-len(ids[bi]), bi))
    shard = shard or ProcessShard()
    mine = shard.take(todo)

    def answers() -> Iterator[tuple[tuple[int, int], str]]:
        """((job, prompt index), answer) as they come (one process), or all at once after gathering (several)."""
        rows = [PendingRow(b, texts[b, i], ids[b, i], keys[b][i]) for b, i in mine]
        stream = answer(rows) if rows else []
        if shard.world == 1:
            yield from ((mine[j], text) for j, text in stream)
            return
        local = dict(stream)
        yield from zip(todo, shard.gather([local[j] for j in range(len(mine))]))

    total = sum(len(job.prompts) for job in jobs)
    bar = tqdm(total=total, initial=sum(map(len, results)), desc="generate", unit="prompt",
               disable=not progress or not total)
    sinks = {b: Path(job.out_path).open("a", encoding="utf-8") for b, job in enumerate(jobs)
             if job.out_path is not None and job.prompts and shard.is_main}
    try:
        for (b, i), text in answers():
            job = jobs[b]
            results[b][i] = job.response_prefix + text
            if b in sinks:
                row = {"index": i, "key": keys[b][i], "prompt": job.prompts[i], "system_prompt": job.system_prompt,
                       "response_prefix": job.response_prefix, "response": results[b][i]}
                sinks[b].write(json.dumps(row, ensure_ascii=False) + "\n")
                sinks[b].flush()
            bar.update(1)
        for sink in sinks.values():
            os.fsync(sink.fileno())
    finally:
        bar.close()
        for sink in sinks.values():
            sink.close()
    return [[results[b][i] for i in range(len(job.prompts))] for b, job in enumerate(jobs)]


def read_generations(path: Path) -> list[dict[str, Any]]:
    """The rows of a generation JSONL file in prompt order (for re-judging a finished run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({err})") from err
    return sorted(rows, key=lambda r: r["index"])
