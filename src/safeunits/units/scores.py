"""Per-unit importance scores on a dataset, in one streaming pass (SPEC §2.1).

- ``fluctuation`` (FLAP; the SSAH default): I_j = Var_n(X_{n,j}) * ‖W_{:,j}‖², X the input of the
  output projection (MLP down projection / attention output projection) over the selected tokens.
- ``wanda`` (structured): ‖X_{:,j}‖₂ * ‖W_{:,j}‖₂.
- ``snip`` (structured): Σ over the unit's weights of |W ⊙ ∂L/∂W|, L the LM loss of one example on its
  response tokens, accumulated example by example (|∇| per example, not |Σ∇|, as Wei et al.).

A head's score is the mean (or sum, ``head_reduce``) of its ``head_dim`` channel scores for the
activation scores; for snip it is the sum over all its weights by definition.

Tokens: the activation statistics use the positions of the **response tokens** (``labels != -100``
from :func:`safeunits.models.chat.encode_pair`) by default, or every non-padding token with
``tokens="all"``. Statistics are running sums in float64 merged batch by batch (Chan/Welford), so
memory does not depend on the number of examples. A model loaded in bfloat16 gives bf16 activations and
gradients; they are widened before any arithmetic (moments and snip sums in float64), so only the forward pass
itself runs in bf16. Under Accelerate each process scores its shard
of the records and the sufficient statistics are summed with ``accelerator.reduce`` (two rounds for
the variance: counts and sums first, then the centred second moments around the global mean). Launched
with several processes (`torchrun`, `accelerate launch`) and no accelerator given, ``compute_scores`` makes
one (``safeunits.distributed.make_accelerator``), so every process really takes its shard; a launcher whose
process count Accelerate does not see is an error, never N processes each scoring everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config
from safeunits.data.records import Record
from safeunits.distributed import check_world, launcher_world_size, make_accelerator
from safeunits.errors import UserValueError
from safeunits.models.adapters import UNIT_KINDS, ArchAdapter, get_adapter
from safeunits.models.chat import collate, encode_pair

log = logging.getLogger(__name__)

ScoreMethod = Literal["fluctuation", "wanda", "snip"]
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor across processes


class ScoreConfig(Config):
    """How unit scores are computed on one dataset."""

    method: ScoreMethod = Field("fluctuation", description="fluctuation (FLAP, SSAH default), wanda or snip")
    tokens: Literal["response", "all"] = Field("response", description="tokens whose activations/loss count")
    head_reduce: Literal["mean", "sum"] = Field("mean", description="how a head combines its channels' activation scores")
    batch_size: int = Field(8, ge=1, description="examples per forward pass (snip always runs one example at a time)")
    max_length: int = Field(256, ge=8, description="tokens per example; the response end is truncated")
    system_prompt: str | None = Field(None, description="system prompt inside the chat template, if any")


@dataclass
class UnitScores:
    """Scores per kind as float64 [layers, units], with what they were computed on."""

    scores: dict[str, torch.Tensor]
    method: str
    n_examples: int
    n_tokens: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class RunningMoments:
    """Count, mean and centred second moment (M2) per channel, merged batch by batch (Chan et al.)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add rows of `x` [tokens, dim]."""
        nb = x.shape[0]
        if nb == 0:
            return
        xd = x.double()
        mean_b = xd.mean(0)
        centred = xd - mean_b
        m2_b = (centred * centred).sum(0)
        self.sumsq += (xd * xd).sum(0)
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2_b + delta * delta * (self.n * nb / n)
        self.n = n

    def reduce(self, reduce_sum: Reduce) -> None:
        """Combine the statistics of all processes in place (exact: counts/sums, then M2 about the global mean)."""
        n_local = torch.tensor([float(self.n)], dtype=torch.float64, device=self.mean.device)
        n = reduce_sum(n_local.clone())
        total = reduce_sum(self.mean * self.n)
        mean = total / n.clamp_min(1)
        m2 = reduce_sum(self.m2 + self.n * (self.mean - mean) ** 2)
        self.sumsq = reduce_sum(self.sumsq)
        self.n, self.mean, self.m2 = int(n.item()), mean, m2

    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1)


def encode_records(tokenizer: PreTrainedTokenizerBase, records: list[Record], config: ScoreConfig) -> list:
    """Response-only tokenisation of (prompt, response) records; records without a response are an error."""
    pairs, too_long = [], 0
    for i, r in enumerate(records):
        if r.response is None:
            raise UserValueError(f"record {i} ({r.source or 'unknown source'}) has no response; scores need prompt+response pairs")
        try:
            pairs.append(encode_pair(tokenizer, r.prompt, r.response, system_prompt=config.system_prompt,
                                     max_length=config.max_length, loss_on="all" if config.tokens == "all" else "response"))
        except ValueError:  # the prompt alone fills max_length: no response token would be left to score
            too_long += 1
    if too_long:
        log.warning("skipped %d of %d examples whose prompt is longer than max_length=%d", too_long, len(records), config.max_length)
    if not pairs:
        raise UserValueError(f"every prompt is longer than max_length={config.max_length}; raise --max-length")
    return pairs


def _token_mask(batch: dict[str, torch.Tensor], tokens: str) -> torch.Tensor:
    return batch["attention_mask"].bool() if tokens == "all" else batch["labels"] != -100


def _head_scores(channel: torch.Tensor, head_dim: int, how: str) -> torch.Tensor:
    per = channel.view(-1, head_dim)
    return per.mean(1) if how == "mean" else per.sum(1)


def _shard(records: list, accelerator: Any) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return records
    return records[accelerator.process_index::accelerator.num_processes]


def compute_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    config: ScoreConfig | None = None,
    *,
    accelerator: Any = None,
    progress: bool = True,
    desc: str = "scoring",
) -> UnitScores:
    """Score every MLP channel and attention head of `model` on (prompt, response) `records`.

    Under a multi-process launcher each process scores its shard and the statistics are summed, so every
    process returns the scores of all records.
    """
    config = config or ScoreConfig()
    if not records:
        raise ValueError("no records to score on")
    if launcher_world_size() > 1:
        accelerator = accelerator or make_accelerator()
        check_world(accelerator.num_processes)
    if accelerator is not None and hasattr(accelerator, "unwrap_model"):
        model = accelerator.unwrap_model(model)  # hooks and weight slices address the bare model, not the DDP wrapper
    adapter = get_adapter(model)
    pairs = _shard(encode_records(tokenizer, records, config), accelerator)
    start = time.perf_counter()
    if config.method == "snip":
        result = _snip(model, adapter, pairs, tokenizer, config, accelerator, progress, desc)
    else:
        result = _activation_scores(model, adapter, pairs, tokenizer, config, accelerator, progress, desc)
    result.seconds = time.perf_counter() - start
    return result


def _reducer(accelerator: Any) -> Reduce | None:
    if accelerator is None or accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t, reduction="sum")


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def _activation_scores(model, adapter: ArchAdapter, pairs, tokenizer, config: ScoreConfig, accelerator, progress, desc) -> UnitScores:
    device = _device(model)
    stats = {kind: [RunningMoments(adapter.out_weight(l, kind).shape[1], device) for l in range(adapter.n_layers)]
             for kind in UNIT_KINDS}
    current: dict[str, torch.Tensor] = {}

    def make_hook(kind: str, layer: int):
        def hook(module, args):
            x = args[0]
            # some families (OPT) flatten [batch, seq] before the down projection: index on flat tokens
            sel = x.reshape(-1, x.shape[-1])[current["mask"].reshape(-1)]  # [tokens, channels]
            stats[kind][layer].update(sel)
        return hook

    hooks = [adapter.out_module(l, kind).register_forward_pre_hook(make_hook(kind, l))
             for kind in UNIT_KINDS for l in range(adapter.n_layers)]
    n_tokens = 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(pairs), config.batch_size), desc=f"{desc} ({config.method})", disable=not progress):
                batch = {k: v.to(device) for k, v in collate(pairs[i:i + config.batch_size], pad).items()}
                current["mask"] = _token_mask(batch, config.tokens)
                n_tokens += int(current["mask"].sum())
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    reduce_sum = _reducer(accelerator)
    scores = {}
    for kind in UNIT_KINDS:
        rows = []
        for l in range(adapter.n_layers):
            st = stats[kind][l]
            if reduce_sum is not None:
                st.reduce(reduce_sum)
            w2 = adapter.out_column_sq_norms(l, kind).to(device)
            if config.method == "fluctuation":
                channel = st.variance() * w2
            else:  # wanda
                channel = st.sumsq.sqrt() * w2.sqrt()
            rows.append(channel if kind == "mlp" else _head_scores(channel, adapter.head_dim, config.head_reduce))
        scores[kind] = torch.stack(rows).cpu()
    if reduce_sum is not None:
        n_tokens = int(reduce_sum(torch.tensor([float(n_tokens)], dtype=torch.float64, device=device)).item())
        n_examples = int(reduce_sum(torch.tensor([float(len(pairs))], dtype=torch.float64, device=device)).item())
    else:
        n_examples = len(pairs)
    _check_finite(scores)
    return UnitScores(scores, config.method, n_examples, n_tokens)


def _snip(model, adapter: ArchAdapter, pairs, tokenizer, config: ScoreConfig, accelerator, progress, desc) -> UnitScores:
    device = _device(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    slices = {kind: [adapter.unit_slices(l, kind) for l in range(adapter.n_layers)] for kind in UNIT_KINDS}
    needed = {s.name for kind in UNIT_KINDS for layer in slices[kind] for s in layer}
    acc = {kind: torch.zeros(adapter.n_layers, adapter.n_units(kind), dtype=torch.float64, device=device) for kind in UNIT_KINDS}
    # gradients only for unit weights: the same per-unit numbers, without the embedding/head gradients
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in needed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    n_tokens = 0
    try:
        for pair in tqdm(pairs, desc=f"{desc} (snip)", disable=not progress):
            if pair.n_loss_tokens == 0:
                continue
            batch = {k: v.to(device) for k, v in collate([pair], pad).items()}
            labels = batch["labels"] if config.tokens == "response" else batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
            n_tokens += int((labels != -100).sum())
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} while computing snip scores")
            loss.backward()
            with torch.no_grad():
                saliency: dict[str, torch.Tensor] = {}
                for kind in UNIT_KINDS:
                    for l, layer_slices in enumerate(slices[kind]):
                        for s in layer_slices:
                            key = f"{s.name}/{s.dim}"
                            if key not in saliency:
                                p = params[s.name]
                                # float32 product: exact for bf16/fp16 weights and gradients (8/11-bit mantissas);
                                # float64 sums: a bf16 sum over thousands of weights would lose whole digits
                                sal = (p.detach().float() * p.grad.float()).abs_()
                                dims = [d for d in range(sal.dim()) if d != s.dim]
                                saliency[key] = sal.sum(dim=dims, dtype=torch.float64) if dims else sal.double()
                            acc[kind][l] += saliency[key][s.index.to(device)].sum(1)
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        model.train(was_training)
    reduce_sum = _reducer(accelerator)
    n_examples = len(pairs)
    if reduce_sum is not None:
        acc = {k: reduce_sum(v) for k, v in acc.items()}
        n_tokens = int(reduce_sum(torch.tensor([float(n_tokens)], dtype=torch.float64, device=device)).item())
        n_examples = int(reduce_sum(torch.tensor([float(n_examples)], dtype=torch.float64, device=device)).item())
    scores = {k: v.cpu() for k, v in acc.items()}
    _check_finite(scores)
    return UnitScores(scores, "snip", n_examples, n_tokens)


def _check_finite(scores: dict[str, torch.Tensor]) -> None:
    for kind, s in scores.items():
        if not torch.isfinite(s).all():
            raise FloatingPointError(f"{kind} scores contain NaN/inf (non-finite activations or weights in the model)")
