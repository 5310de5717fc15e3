"""Utility as the NLL of reference answers: cheap, deterministic, and runs on CPU.

Only response tokens count (prompt tokens carry -100 labels from models.chat.encode_pair), and the mean is
token-weighted over the whole set, so long answers weigh in proportion to their length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.data.records import Record
from safeunits.distributed import ProcessShard
from safeunits.models.chat import collate, encode_pair


@dataclass
class NLLStats:
    """Summed NLL and token count of a set, plus each record's own mean NLL and token count (paired tests)."""

    total_nll: float
    n_tokens: int
    per_record: list[float] = field(default_factory=list)
    per_record_tokens: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return self.total_nll / self.n_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)


@torch.no_grad()
def response_nll_stats(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    system_prompt: str | None = None,
    progress: bool = True,
    shard: ProcessShard | None = None,
) -> NLLStats:
    """Sum of response-token NLLs over `records` (reference answers), batched by similar length.

    With `shard` (several processes), each process scores its share of the length-sorted records and every
    process gets all per-record sums; the set's total is summed over records in order either way, so it does
    not depend on how many processes scored it.
    """
    if not records:
        raise ValueError("response_nll needs at least one record")
    missing = [i for i, r in enumerate(records) if not r.response]
    if missing:
        raise ValueError(f"records {missing[:5]} have no reference response (source {records[missing[0]].source!r})")
    pairs = [encode_pair(tokenizer, r.prompt, r.response, system_prompt=system_prompt, max_length=max_length)
             for r in records]
    shard = shard or ProcessShard()
    order = shard.take(sorted(range(len(pairs)), key=lambda i: -len(pairs[i].input_ids)))
    scored: list[tuple[int, float, int]] = []  # (record, summed NLL, tokens)
    device = model.device
    for s in tqdm(range(0, len(order), batch_size), desc="nll", unit="batch", disable=not progress):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate([pairs[i] for i in idx], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        mask = labels != -100
        sums = (token_nll * mask).sum(1)
        counts = mask.sum(1)
        if not torch.isfinite(sums).all():
            raise FloatingPointError("NaN/inf NLL: the model's weights or logits are not finite")
        for j, i in enumerate(idx):
            if counts[j] == 0:
                raise ValueError(f"record {i} has no response tokens left after max_length={max_length}")
            scored.append((i, float(sums[j]), int(counts[j])))
    by_record = {i: (nll, count) for i, nll, count in shard.gather(scored)}
    sums_in_order = [by_record[i][0] for i in range(len(pairs))]
    per_record_tokens = [by_record[i][1] for i in range(len(pairs))]
    per_record = [nll / count for nll, count in zip(sums_in_order, per_record_tokens)]
    return NLLStats(math.fsum(sums_in_order), sum(per_record_tokens), per_record, per_record_tokens)


def response_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    system_prompt: str | None = None,
    progress: bool = True,
) -> float:
    """Mean NLL over the response tokens of `records` (token-weighted); perplexity is its exp."""
    return response_nll_stats(model, tokenizer, records, batch_size=batch_size, max_length=max_length,
                              system_prompt=system_prompt, progress=progress).mean
