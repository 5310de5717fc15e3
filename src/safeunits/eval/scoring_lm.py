"""The model side of lm-eval's log-likelihood requests, for an in-memory model, sized for CPU.

lm-eval's HFLM scores every (context, choice) pair as its own sequence, so a 4-choice item prefills its context
four times. `ScoringLM` keeps lm-eval's tokenisation (`_encode_pair`: context and continuation split as HFLM
splits them) and its request order, but scores each distinct context once: the contexts of a batch (similar
lengths, left-padded) are prefilled with the KV cache kept and only the last position's logits computed; the
cache is repeated once per choice and the choices (right-padded) are scored in a second, short pass. The
numbers equal HFLM's up to float rounding (tests/test_zero_shot.py compares them); requests that would exceed the
model's length go to HFLM's own path, which truncates them from the left.
"""

from __future__ import annotations

import copy
import inspect
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5 renamed the KV cache argument and output field `past_key_values` to `cache`
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
Request = tuple[tuple[str, str], list[int], list[int]]


class ScoringLM(HFLM):
    """lm-eval's HFLM around a model already in memory, each context prefilled once for all its choices."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 16,
                 progress: bool = True) -> None:
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.progress = progress
        self.scored_tokens = 0  # token positions run through the model, padding included (the bench's unit)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        too_long = []
        for i, (_, ctx, cont) in enumerate(requests):
            if len(ctx) + len(cont) > self.max_length + 1:
                too_long.append(i)
            else:
                groups[tuple(ctx)].append(i)
        if too_long:  # HFLM's own left truncation
            for i, res in zip(too_long, super()._loglikelihood_tokens([requests[i] for i in too_long], disable_tqdm)):
                results[i] = res
        contexts = sorted(groups, key=len, reverse=True)
        batches, batch, rows = [], [], 0
        for ctx in contexts:  # contexts of similar length together; at most batch_size choice rows a batch
            if batch and rows + len(groups[ctx]) > int(self.batch_size):
                batches.append(batch)
                batch, rows = [], 0
            batch.append(ctx)
            rows += len(groups[ctx])
        if batch:
            batches.append(batch)
        bar = tqdm(total=len(requests) - len(too_long), desc="zero-shot", unit="choice",
                   disable=disable_tqdm or not self.progress)
        for batch in batches:
            for i, res in self._score_batch(batch, groups, requests):
                results[i] = res
                self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
            bar.update(sum(len(groups[c]) for c in batch))
        bar.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(self, contexts: list[tuple[int, ...]], groups: dict[tuple[int, ...], list[int]],
                     requests: list[Request]) -> list[tuple[int, tuple[float, bool]]]:
        device, pad = self.device, self.tokenizer.pad_token_id or 0
        width = max(len(c) for c in contexts)
        ctx_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        ctx_mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for b, ctx in enumerate(contexts):  # left padding: every context ends at the same column
            ctx_ids[b, width - len(ctx):] = torch.tensor(ctx)
            ctx_mask[b, width - len(ctx):] = 1
        ctx_ids, ctx_mask = ctx_ids.to(device), ctx_mask.to(device)
        self.scored_tokens += ctx_ids.numel()
        positions = (ctx_mask.cumsum(1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        out = self.model(input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=positions, use_cache=True, **keep)
        first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # the distribution of each choice's first token
        owners = [(b, i) for b, ctx in enumerate(contexts) for i in groups[ctx]]
        owners.sort(key=lambda o: -len(requests[o[1]][2]))
        chunks = _length_chunks([len(requests[i][2]) for _, i in owners])
        cache = getattr(out, CACHE)
        scored = []
        for n, (start, stop) in enumerate(chunks):  # choices of similar length together: little padding
            rows = owners[start:stop]
            index = torch.tensor([b for b, _ in rows], device=device)
            rows_cache = cache if n == len(chunks) - 1 else copy.deepcopy(cache)
            rows_cache.reorder_cache(index)  # one cache row per choice
            scored += self._score_choices([(i, requests[i][2]) for _, i in rows], first[index], ctx_mask[index],
                                          rows_cache)
        return scored

    def _score_choices(self, rows: list[tuple[int, list[int]]], first: torch.Tensor, ctx_mask: torch.Tensor,
                       cache) -> list[tuple[int, tuple[float, bool]]]:
        """Each row's continuation scored after its context's cache; `first`: the distribution of its first token."""
        device, pad = self.device, self.tokenizer.pad_token_id or 0
        width = max(len(c) for _, c in rows)
        cont_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        cont_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, cont) in enumerate(rows):
            cont_ids[r, :len(cont)] = torch.tensor(cont)
            cont_mask[r, :len(cont)] = 1
        cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
        token_lp = first.gather(1, cont_ids[:, :1])
        greedy = first.argmax(-1, keepdim=True) == cont_ids[:, :1]
        if width > 1:  # the later tokens, attending to their context through the cache
            self.scored_tokens += len(rows) * (width - 1)
            positions = ctx_mask.sum(1).unsqueeze(1) + torch.arange(width - 1, device=device)
            rest = self.model(input_ids=cont_ids[:, :-1], attention_mask=torch.cat([ctx_mask, cont_mask[:, :-1]], 1),
                              position_ids=positions, use_cache=True, **{CACHE: cache}).logits.float()
            # log-softmax at the continuation's tokens only: no second vocabulary-sized tensor per position
            rest_lp = rest.gather(2, cont_ids[:, 1:, None]).squeeze(2) - rest.logsumexp(-1)
            token_lp = torch.cat([token_lp, rest_lp], 1)
            greedy = torch.cat([greedy, rest.argmax(-1) == cont_ids[:, 1:]], 1)
        scored = []
        for r, (i, cont) in enumerate(rows):
            scored.append((i, (float(token_lp[r, :len(cont)].sum()), bool(greedy[r, :len(cont)].all()))))
        return scored


def _length_chunks(lengths: list[int]) -> list[tuple[int, int]]:
    """Split lengths sorted longest first where a row is under half its chunk's longest: [start, stop) ranges."""
    chunks, start = [], 0
    for r, n in enumerate(lengths):
        if r > start and 2 * n < lengths[start]:
            chunks.append((start, r))
            start = r
    return chunks + [(start, len(lengths))]
