"""Continuous batching for the transformers backend: a fixed set of KV-cache slots, a finished row's slot refilled.

Why: decoding one token per row per step reads every weight once per step, as a prefill step does, so the
decode rate approaches the prefill rate only when many rows share each step and no step is spent on rows that
have finished. `model.generate` on a padded batch keeps finished rows until the longest one ends, grows its
cache by concatenation every step, and is limited to the batch it was given. Here every slot has its own
region of one preallocated cache; new prompts are prefilled (left-padded among themselves) into the slots that
freed up, and each step decodes every live slot at its own position (per-row rotary positions and a per-row
mask over the slot's region). When no prompt is waiting, the cache is compacted to the live rows.

Prefix groups: prompts come in groups (one group per job: the same system prompt and chat rendering), and each
group's common prefix (the chat template's system turn, often half of a prompt's tokens or more) is run once,
batch 1, and its keys/values kept. A slot filled by a prompt of group g gets that prefix copied into positions
[0, len_g) of its region; the prompt's own tokens start at P, the longest group prefix, so one rectangular write
serves a prefill of prompts of several groups. A row's mask sees [0, len_g) and its own [start, end]; its rotary
positions continue from len_g, as if prefix and own tokens were contiguous. Prefill then costs only each prompt's
own tokens, and many jobs (a suite's every prompt set and system prompt) share one run, so every step has many
rows (on CPU a linear's throughput roughly doubles from 32 to 112 rows a step).

Why not transformers' own `generate_batch` (generation/continuous_batching): it packs every live row into one
varlen sequence and, without flash attention (CPU), attends through a dense block-diagonal mask whose size
grows with the square of the tokens in flight; its sampling seed is per engine, not per prompt. This module
reuses the model's own forward (any causal LM whose layers call `cache.update`, SDPA or eager attention) and
only replaces the cache and the mask.

Greedy text equals `model.generate` on a padded batch up to float reduction order (a different set of padded
positions changes the last bits of a logit): rows can differ only where two logits nearly tie
(bench/bench_generation.py traces each). Sampling draws from a generator seeded per prompt, so a prompt's
sample does not depend on the other prompts or on the order they were run in.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

MAX_SLOTS = 128
"""Rows decoded together at most: past ~100 rows a step of the default model is compute-bound on CPU, and more
slots only lengthen the time a freed slot waits; GPUs are capped by memory long before this."""
PREFILL_OVERHEAD = 128
"""A prefill forward's fixed cost, in padded tokens: new prompts are split into forwards of similar own length
when that saves more padding than this (the quick suite's first prefill: 2,266 instead of 2,800 tokens)."""
MEMORY_SHARE = 0.25
"""Share of the free memory (RAM on CPU, device memory on GPU) the slots' KV cache and logits may take."""

_NEUTRAL = GenerationConfig()
_PROCESSOR_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "encoder_repetition_penalty", "bad_words_ids",
                     "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
                     "min_length", "min_new_tokens", "sequence_bias", "exponential_decay_length_penalty",
                     "renormalize_logits", "epsilon_cutoff", "eta_cutoff", "typical_p", "min_p", "watermarking_config")


def unsupported_reason(model: PreTrainedModel, max_total_len: int) -> str | None:
    """Why this model cannot use slot decoding (it then falls back to padded-batch `generate`), or None."""
    config = model.config
    if config.is_encoder_decoder:
        return "encoder-decoder model"
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r} (slot decoding needs sdpa or eager)"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        window = getattr(config, "sliding_window", None)
        if window is None or window < max_total_len:
            return "sliding-window or non-attention layers"
    gen = model.generation_config
    changed = [f for f in _PROCESSOR_FIELDS if getattr(gen, f, None) != getattr(_NEUTRAL, f, None)]
    if changed:
        return f"the model's generation config sets {', '.join(changed)}"
    if "cache" not in inspect.signature(model.forward).parameters:
        return "the model's forward takes no `cache`"
    return None


def slots_for_memory(model: PreTrainedModel, max_total_len: int, n_prompts: int) -> int:
    """How many rows to decode together: as many as fit `MEMORY_SHARE` of free memory, at most `MAX_SLOTS`."""
    layers, kv_heads, head_dim = _kv_shape(model)
    element = torch.finfo(model.dtype).bits // 8
    per_row = 2 * layers * kv_heads * head_dim * max_total_len * element + 8 * model.config.get_text_config().vocab_size
    device = model.device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _available_ram()
    return max(1, min(MAX_SLOTS, n_prompts, int(free * MEMORY_SHARE) // per_row))


def _kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the model's KV cache."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim


def _available_ram() -> int:
    """Bytes of RAM available to new allocations (Linux's MemAvailable: free plus reclaimable page cache)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class _SlotLayer(CacheLayerMixin):
    """One layer's keys/values of every slot, `[slots, kv_heads, max_len, head_dim]`; the owner says where to write."""

    def __init__(self, owner: SlotCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.owner, self.keys, self.values = owner, keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("slot caches are allocated up front")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.write(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0

    def get_seq_length(self) -> int:
        return self.owner.width

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """A KV cache of fixed slots: prefill writes new rows into chosen slots, decode writes each slot at its own end."""

    def __init__(self, model: PreTrainedModel, slots: int, max_len: int) -> None:
        n_layers, kv_heads, head_dim = _kv_shape(model)
        shape = (slots, kv_heads, max_len, head_dim)
        layers = [_SlotLayer(self, torch.zeros(shape, dtype=model.dtype, device=model.device),
                             torch.zeros(shape, dtype=model.dtype, device=model.device))
                  for _ in range(n_layers)]
        super().__init__(layers=layers)
        self.shared = 0  # positions [0, shared) of a slot hold its group's prefix (len_g <= shared); own tokens follow
        self.rows: torch.Tensor | None = None  # prefill: the slots written (after the prefix); decode: None
        self.positions: torch.Tensor | None = None  # decode: per-slot write index
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # a group prefix's run: its keys/values
        self.width = 0

    def write(self, layer: _SlotLayer, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.captured is not None:  # a group's prefix, batch 1: kept aside, copied into slots as they are filled
            self.captured.append((keys, values))
            return keys, values
        if self.rows is not None:  # prefill: new rows attend to their prefix and to themselves
            end = self.shared + keys.shape[2]
            layer.keys[self.rows, :, self.shared:end] = keys
            layer.values[self.rows, :, self.shared:end] = values
            if not self.shared:
                return keys, values
            return layer.keys[self.rows, :, :end], layer.values[self.rows, :, :end]
        slots = torch.arange(keys.shape[0], device=keys.device)
        layer.keys[slots, :, self.positions] = keys[:, :, 0]
        layer.values[slots, :, self.positions] = values[:, :, 0]
        return layer.keys[:, :, :self.width], layer.values[:, :, :self.width]

    def load_prefix(self, slots: torch.Tensor, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a group's prefix keys/values (one `[1, kv_heads, len_g, head_dim]` pair a layer) into `slots`."""
        for layer, (keys, values) in zip(self.layers, prefix):
            layer.keys[slots, :, :keys.shape[2]] = keys
            layer.values[slots, :, :values.shape[2]] = values

    def keep(self, slots: torch.Tensor) -> None:
        """Compact the cache to `slots`, in that order (the rows still decoding once no prompt waits)."""
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[slots], layer.values[slots]


@dataclass
class _Row:
    index: int
    prefix: int  # length of its group's prefix, in cache positions [0, prefix)
    start: int  # cache position of the prompt's first own token (after the prefix region and the left padding)
    end: int  # next cache position to write
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


class SlotDecoder:
    """Greedy or sampled decoding of many prompts through a `SlotCache`, yielding each answer when it is finished."""

    def __init__(self, model: PreTrainedModel, *, max_new_tokens: int, eos: Sequence[int], pad_id: int,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 slots: int | None = None, refill_fraction: float = 0.125) -> None:
        self.model, self.max_new_tokens, self.eos, self.pad_id = model, max_new_tokens, set(eos), pad_id
        self.do_sample, self.slots, self.refill_fraction = do_sample, slots, refill_fraction
        self.warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.bool_mask = model.config._attn_implementation == "sdpa"

    @torch.no_grad()
    def run(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None = None,
            groups: Sequence[int] | None = None) -> Iterator[tuple[int, list[int]]]:
        """Yield (prompt position, generated token ids without the EOS) in the order rows finish.

        Prompts are admitted in the order given (put the longest first: a memory problem shows at once).
        `seeds`: one per prompt, for sampling. `groups`: one label per prompt (None: one group); each group's
        common prefix is run once and shared by its prompts (give each job, i.e. each system prompt, its own).
        """
        if not prompts:
            return
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        groups = list(groups) if groups is not None else [0] * len(prompts)
        if len(groups) != len(prompts):
            raise ValueError(f"{len(groups)} group labels for {len(prompts)} prompts")
        lengths = _prefix_lengths(prompts, groups)
        shared = max(lengths.values())
        max_len = shared + max(len(p) - lengths[g] for p, g in zip(prompts, groups)) + self.max_new_tokens
        n_slots = self.slots or slots_for_memory(self.model, max_len, len(prompts))
        n_slots = min(n_slots, len(prompts))
        cache = SlotCache(self.model, n_slots, max_len)
        cache.shared = shared
        device = self.model.device
        first = {g: i for i, g in reversed(list(enumerate(groups)))}
        prefixes = {g: self._prefix(cache, prompts[first[g]][:n], device) for g, n in lengths.items() if n}
        rows: list[_Row | None] = [None] * n_slots
        queue = list(range(len(prompts)))[::-1]  # pop() takes the next prompt
        refill_at = max(1, int(n_slots * self.refill_fraction))
        while queue or any(r is not None for r in rows):
            free = [s for s, r in enumerate(rows) if r is None]
            live = len(rows) - len(free)
            if queue and free and (len(free) >= min(refill_at, len(queue)) or live == 0):
                take = [queue.pop() for _ in range(min(len(free), len(queue)))]
                take.sort(key=lambda i: lengths[groups[i]] - len(prompts[i]))  # own tokens, longest first
                slots = free[:len(take)]
                for g in dict.fromkeys(groups[i] for i in take):
                    if g in prefixes:
                        cache.load_prefix(torch.tensor([s for s, i in zip(slots, take) if groups[i] == g],
                                                       device=device), prefixes[g])
                for a, b in _prefill_chunks([len(prompts[i]) - lengths[groups[i]] for i in take]):
                    yield from self._prefill(cache, rows, slots[a:b], take[a:b], prompts,
                                             [lengths[groups[i]] for i in take[a:b]], seeds, device)
            if not any(r is not None for r in rows):
                continue
            yield from self._decode(cache, rows, device)
            if not queue:
                live_slots = [s for s, r in enumerate(rows) if r is not None]
                if live_slots and len(live_slots) <= len(rows) // 2:
                    cache.keep(torch.tensor(live_slots, device=device))
                    rows[:] = [rows[s] for s in live_slots]

    def _prefix(self, cache: SlotCache, prefix: Sequence[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run one group's common prefix alone (batch 1, causal); its keys and values, one pair a layer."""
        pos = torch.arange(len(prefix), device=device)
        causal = pos[None, None, :, None] >= pos
        cache.captured = []
        try:
            self._forward(torch.tensor([list(prefix)], device=device), causal, pos[None], cache)
            return cache.captured
        finally:
            cache.captured = None

    def _prefill(self, cache: SlotCache, rows: list[_Row | None], slots: list[int], take: list[int],
                 prompts: Sequence[Sequence[int]], prefix: list[int], seeds: Sequence[int] | None,
                 device) -> Iterator[tuple[int, list[int]]]:
        """Run the new prompts' own tokens (left-padded among themselves) into `slots`; `prefix`: each one's len_g."""
        shared = cache.shared
        width = max(len(prompts[i]) - n for i, n in zip(take, prefix))
        ids = torch.full((len(take), width), self.pad_id, dtype=torch.long)
        starts = []
        for j, (i, n) in enumerate(zip(take, prefix)):
            start = width - (len(prompts[i]) - n)
            ids[j, start:] = torch.tensor(list(prompts[i][n:]), dtype=torch.long)
            starts.append(start)
            generator = None
            if self.do_sample:
                generator = torch.Generator(device=device)
                generator.manual_seed(int(seeds[i]) if seeds is not None else i)
            rows[slots[j]] = _Row(index=i, prefix=n, start=shared + start, end=shared + width, generator=generator)
        start_t = torch.tensor(starts, device=device)
        prefix_t = torch.tensor(prefix, device=device)
        pos = torch.arange(width, device=device)
        position_ids = prefix_t[:, None] + (pos[None, :] - start_t[:, None]).clamp(min=0)
        # the row's prefix, then causal within its own tokens; a padding query sees the prefix and itself (no NaN)
        own = (pos[None, :, None] >= pos[None, None, :]) & (pos[None, None, :] >= start_t[:, None, None])
        own |= torch.eye(width, dtype=torch.bool, device=device)[None]
        seen = (torch.arange(shared, device=device)[None, :] < prefix_t[:, None])[:, None, :].expand(-1, width, -1)
        allowed = torch.cat([seen, own], dim=2)
        cache.rows, cache.width = torch.tensor(slots, device=device), shared + width
        logits = self._forward(ids.to(device), allowed[:, None], position_ids, cache)
        cache.rows = None
        yield from self._choose(rows, slots, logits)

    def _decode(self, cache: SlotCache, rows: list[_Row | None], device) -> Iterator[tuple[int, list[int]]]:
        live = [r for r in rows if r is not None]
        width = max(r.end for r in live) + 1
        last = [r.tokens[-1] if r is not None else self.pad_id for r in rows]
        # a free slot writes and reads at the first position after the prefixes, which its next prefill overwrites
        prefix = torch.tensor([r.prefix if r is not None else 0 for r in rows], device=device)
        starts = torch.tensor([r.start if r is not None else cache.shared for r in rows], device=device)
        ends = torch.tensor([r.end if r is not None else cache.shared for r in rows], device=device)
        pos = torch.arange(width, device=device)
        allowed = (pos[None, :] < prefix[:, None]) | ((pos[None, :] >= starts[:, None]) & (pos[None, :] <= ends[:, None]))
        cache.positions, cache.width = ends, width
        logits = self._forward(torch.tensor(last, device=device)[:, None], allowed[:, None, None],
                               (prefix + ends - starts)[:, None], cache)
        cache.positions = None
        for r in live:
            r.end += 1
        yield from self._choose(rows, [s for s, r in enumerate(rows) if r is not None], logits)

    def _forward(self, ids: torch.Tensor, allowed: torch.Tensor, position_ids: torch.Tensor,
                 cache: SlotCache) -> torch.Tensor:
        mask = allowed
        if not self.bool_mask:  # eager attention adds the mask to the scores
            mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=allowed.device)
            mask.masked_fill_(~allowed, torch.finfo(self.model.dtype).min)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1].float()

    def _choose(self, rows: list[_Row | None], slots: list[int],
                logits: torch.Tensor) -> Iterator[tuple[int, list[int]]]:
        """Pick each listed slot's next token from its logits row (rows of `logits` follow `slots`)."""
        if len(slots) != logits.shape[0]:  # decode: logits cover every slot, pick the live ones
            logits = logits[torch.tensor(slots, device=logits.device)]
        if not self.do_sample:
            chosen = logits.argmax(-1).tolist()
        else:
            for warper in self.warpers:
                logits = warper(None, logits)
            probs = torch.softmax(logits, dim=-1)
            chosen = [int(torch.multinomial(probs[j], 1, generator=rows[s].generator))
                      for j, s in enumerate(slots)]
        for s, token in zip(slots, chosen):
            row = rows[s]
            if token in self.eos:
                rows[s] = None
                yield row.index, row.tokens
                continue
            row.tokens.append(token)
            if len(row.tokens) >= self.max_new_tokens:
                rows[s] = None
                yield row.index, row.tokens


def _prefix_lengths(prompts: Sequence[Sequence[int]], groups: Sequence[int]) -> dict[int, int]:
    """Each group's common prefix length; every prompt keeps at least one own token (its logits give the first
    answer token)."""
    firsts: dict[int, Sequence[int]] = {}
    lengths: dict[int, int] = {}
    for p, g in zip(prompts, groups):
        if g not in firsts:
            firsts[g], lengths[g] = p, len(p) - 1
            continue
        first, n = firsts[g], min(lengths[g], len(p) - 1)
        lengths[g] = next((k for k in range(n) if p[k] != first[k]), n)
    return lengths


def _prefill_chunks(own: Sequence[int]) -> list[tuple[int, int]]:
    """Split prompts of `own` token counts (longest first) into prefill forwards: [a, b) ranges that minimise the
    padded tokens (each forward is as wide as its longest prompt) plus `PREFILL_OVERHEAD` a forward."""
    best, cut = [0] + [float("inf")] * len(own), [0] * (len(own) + 1)
    for b in range(1, len(own) + 1):
        for a in range(b):
            cost = best[a] + (b - a) * own[a] + PREFILL_OVERHEAD
            if cost < best[b]:
                best[b], cut[b] = cost, a
    ranges, b = [], len(own)
    while b:
        ranges.append((cut[b], b))
        b = cut[b]
    return ranges[::-1]
