"""SNIP saliency |θ ⊙ ∂L/∂θ| per weight, and top-k masks found without concatenating the model.

The gradient of the mean response NLL over all harmful examples is accumulated in the parameters'
`.grad` buffers and turned into |θ ⊙ g| *in place*, so memory stays at one model plus one gradient.
Low-precision (bf16/fp16) parameters would accumulate their gradient in their own dtype, losing ~3 digits
per batch: their gradients are moved into float32 sums after each backward pass instead (the float32 sum
becomes the score buffer, so the peak is the bf16 model + one bf16 gradient + the float32 scores).
Global top-k thresholds are found by bisection on the float bit patterns (non-negative float32 values
order like their int32 views): 31 counting passes over the tensors, each tensor read where it lives,
instead of a concatenated copy of every score.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config
from safeunits.data.records import Record
from safeunits.models.chat import collate, encode_pair

Scope = Literal["per_tensor", "global"]


class SaliencyConfig(Config):
    """How the SNIP scores are taken."""

    batch_size: int = Field(4, ge=1, description="examples per forward/backward pass")
    max_length: int = Field(256, ge=8, description="tokens per example (prompt + response; the response end is cut)")
    system_prompt: str | None = Field(None, description="system prompt used when formatting the harmful prompts")
    exclude: list[str] = Field(default_factory=list,
                               description="regexes of parameter names never scored (and so never patched)")
    max_examples: int | None = Field(None, ge=1, description="score on the first N records only (None: all)")


def patchable_parameters(model: PreTrainedModel, exclude: Iterable[str] = ()) -> dict[str, torch.nn.Parameter]:
    """Parameters a patch may touch: unique (tied weights once), floating point, not excluded by a regex."""
    patterns = [re.compile(p) for p in exclude]
    return {n: p for n, p in model.named_parameters() if p.is_floating_point() and not any(r.search(n) for r in patterns)}


def snip_saliency(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    config: SaliencyConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """|θ ⊙ ∇_θ L| for every patchable weight, L = mean response-token NLL of the records' responses.

    Returns float32 tensors that reuse the gradient buffers (the model's `.grad` is cleared); the
    model's weights are not changed. Gradients are summed over batches in float32 whatever the weights' dtype.
    """
    config = config or SaliencyConfig()
    if not records or any(r.response is None for r in records):
        raise ValueError("saliency needs records with responses (the harmful responses of D_h)")
    records = records[:config.max_examples] if config.max_examples else records
    params = patchable_parameters(model, config.exclude)
    was_training = model.training
    model.eval()
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
        p.grad = None
    pairs = [encode_pair(tokenizer, r.prompt, r.response, config.system_prompt, config.max_length) for r in records]
    n_tokens = sum(p.n_loss_tokens for p in pairs)
    if n_tokens == 0:
        raise ValueError("no response tokens to score (responses empty or cut by max_length)")
    device = next(model.parameters()).device
    batches = [pairs[i:i + config.batch_size] for i in range(0, len(pairs), config.batch_size)]
    sums: dict[str, torch.Tensor] = {}  # float32 gradient sums of low-precision parameters
    try:
        for batch in tqdm(batches, desc="SNIP saliency", disable=not progress):
            inputs = {k: v.to(device) for k, v in collate(batch, tokenizer.pad_token_id).items()}
            labels = inputs.pop("labels")
            logits = model(**inputs).logits[:, :-1].float()
            target = labels[:, 1:]
            # token-weighted mean over the whole set: each batch contributes its token sum / all tokens
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum") / n_tokens
            if not torch.isfinite(loss):
                raise FloatingPointError("the harmful-response loss is NaN/inf: the model's weights are broken")
            loss.backward()
            _widen_gradients(params, sums)
        scores = {}
        with torch.no_grad():
            for n, p in params.items():
                g = sums.pop(n, None)
                if g is None:
                    g = p.grad if p.grad is not None else torch.zeros_like(p)
                scores[n] = g.mul_(p.detach()).abs_().float()
                p.grad = None
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    return scores


@torch.no_grad()
def _widen_gradients(params: Mapping[str, torch.nn.Parameter], sums: dict[str, torch.Tensor]) -> None:
    """Move the gradients of bf16/fp16 parameters into float32 sums and free them (float32 ones keep `.grad`)."""
    for n, p in params.items():
        if p.grad is None or p.dtype not in (torch.bfloat16, torch.float16):
            continue
        if n in sums:
            sums[n].add_(p.grad)
        else:
            sums[n] = p.grad.float()
        p.grad = None


# --- top-k masks ------------------------------------------------------------------------------------

TensorSource = Callable[[str], torch.Tensor]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.float32)
    if torch.isnan(t).any() or (t < 0).any():
        raise ValueError("saliency scores must be non-negative and not NaN")
    return t.contiguous().view(torch.int32)


def global_threshold(names: list[str], get: TensorSource, fraction: float) -> float:
    """The score t such that the `fraction` largest scores over all tensors are >= t (exact; ties kept).

    Bisection on the int32 bit patterns of the non-negative float32 scores; `get(name)` may load each
    tensor lazily (e.g. from a memory-mapped safetensors file), so nothing is concatenated.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    total = sum(get(n).numel() for n in names)
    k = max(1, round(fraction * total))
    lo, hi = 0, 0x7F800000  # count(bits >= lo) >= k always; find the largest such lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        count = sum(int((_bits(get(n)) >= mid).sum()) for n in names)
        if count >= k:
            lo = mid
        else:
            hi = mid - 1
    return torch.tensor([lo], dtype=torch.int32).view(torch.float32).item()


def topk_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the `fraction` largest entries of one tensor (exactly k = round(fraction * n), at least 1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = scores.reshape(-1).float()
    k = max(1, round(fraction * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view(scores.shape)


def topk_masks(scores: Mapping[str, torch.Tensor] | tuple[list[str], TensorSource], fraction: float,
               scope: Scope = "per_tensor") -> dict[str, torch.Tensor]:
    """Masks of the top `fraction` weights, within each tensor (`per_tensor`) or over all of them (`global`)."""
    if isinstance(scores, tuple):
        names, get = scores
    else:
        names, get = list(scores), scores.__getitem__
    if scope == "per_tensor":
        return {n: topk_mask(get(n), fraction) for n in names}
    if scope == "global":
        t = global_threshold(names, get, fraction)
        return {n: get(n).float() >= t for n in names}
    raise ValueError(f"unknown scope {scope!r}; use 'per_tensor' or 'global'")
