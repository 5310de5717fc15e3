"""The one training engine of the toolkit: alignment SFT, fine-tuning attacks, SafePatching's ascent/descent, NPO.

Built on Hugging Face Accelerate (device placement, mixed precision, DDP through `accelerate launch`,
`save_state`/`load_state` checkpoints). The loss is taken on response tokens only (chat template applied,
`models.chat.encode_pair`), token-weighted across gradient-accumulation micro-batches so `batch_size=4,
grad_accum=2` optimises the same objective as `batch_size=8`. Unit masks (`train.masks`) keep frozen weights
bit-identical. The data order is a pure function of (seed, epoch), so a run resumed from a checkpoint
replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from safeunits.data.records import Record
from safeunits.io import read_json, write_json
from safeunits.models.chat import EncodedPair, collate, encode_pair
from safeunits.train.masks import MaskedUpdate, MaskStats, update_masks

log = logging.getLogger(__name__)

Objective = Literal["descent", "ascent", "npo"]


class TrainConfig(BaseModel):
    """Hyper-parameters of one training run; every field is a documented, overridable default."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW.")
    epochs: float = Field(1, gt=0, description="Passes over the data (fractional allowed); ignored when max_steps is set.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides epochs (the data cycles).")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (never applied to frozen weights).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Share of steps with linear warm-up.")
    scheduler: str = Field("linear", description="transformers.get_scheduler name: linear, cosine, constant, ...")
    max_length: int = Field(256, ge=8, description="Token cap per example; the response end is cut, never the prompt.")
    seed: int = Field(0, description="Seeds the data order (per epoch) and torch's RNG.")
    objective: Objective = Field("descent", description="descent: minimise response NLL (SFT); ascent: maximise it "
                                 "(unlearning, SafePatching's safety patch); npo: Negative Preference Optimization.")
    npo_beta: float = Field(0.1, gt=0, description="NPO inverse temperature beta (Zhang et al. 2024).")
    stop_nll_above: float | None = Field(None, description="Ascent bound: stop before a step whose training batch "
                                         "already has response NLL above this value.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on a GPU that supports it, else full precision (CPU).")
    checkpoint_dir: Path | None = Field(None, description="Where checkpoints go; a run resumes from the latest one here.")
    checkpoint_every: int = Field(0, ge=0, description="Save a checkpoint every N optimizer steps (0: only at the end "
                                  "when checkpoint_dir is set).")
    keep_checkpoints: int = Field(1, ge=1, description="How many most recent checkpoints to keep.")
    system_prompt: str | None = Field(None, description="System prompt put into every training example's chat template.")
    loss_on: Literal["response", "all"] = Field("response", description="Tokens that carry the loss.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (None: no clipping).")
    shuffle: bool = Field(True, description="Shuffle the examples each epoch (seeded).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.stop_nll_above is not None and self.objective == "descent":
            raise ValueError("stop_nll_above bounds gradient ascent/NPO; it makes no sense with objective='descent'")
        return self

    def fingerprint(self) -> str:
        """Hash of everything that determines the trajectory (not where checkpoints go) for safe resumes."""
        keep = self.model_dump(mode="json", exclude={"checkpoint_dir", "checkpoint_every", "keep_checkpoints"})
        return hashlib.blake2b(json.dumps(keep, sort_keys=True).encode(), digest_size=8).hexdigest()


@dataclass
class TrainResult:
    """What a run did: steps, losses (the objective minimised, per step), response NLLs, speed, why it stopped."""

    steps: int
    final_loss: float
    losses: list[float]
    tokens_per_s: float
    stopped_reason: str  # "completed" | "nll_above"
    nlls: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    examples: int = 0
    resumed_from: int = 0
    mask: dict | None = None
    checkpoint: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN/Inf; the weights are those of the last good step."""


CallbackFn = Callable[[int, float], None]


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    config: TrainConfig,
    *,
    frozen: dict[str, torch.Tensor] | None = None,
    trainable: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    callback: CallbackFn | None = None,
) -> TrainResult:
    """Train `model` in place on the responses of `records`; frozen weights stay bit-identical.

    `frozen` masks (True = keep) or `trainable` masks (True = only these change) come from
    `train.masks.unit_masks`. With `config.checkpoint_dir` set, the run resumes from the latest checkpoint
    there (same config and data required). `callback(step, loss)` runs after every optimizer step.
    """
    from accelerate.utils import set_seed

    if not records:
        raise ValueError("no training records")
    missing = [i for i, r in enumerate(records) if not r.response]
    if missing:
        raise ValueError(f"{len(missing)} records have no response to train on (first at index {missing[0]})")
    may_change = update_masks(model, frozen, trainable)
    set_seed(config.seed)
    accelerator = _accelerator(config.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    pairs = [encode_pair(tokenizer, r.prompt, r.response, system_prompt=config.system_prompt,
                         max_length=config.max_length, loss_on=config.loss_on) for r in records]
    if not any(p.n_loss_tokens for p in pairs):
        raise ValueError("no example has a loss token left after truncation; raise max_length")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_step = config.batch_size * config.grad_accum * world
    steps_per_epoch = len(pairs) // per_step if world > 1 else math.ceil(len(pairs) / per_step)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(pairs)} examples are fewer than one step across {world} processes ({per_step})")
    total_steps = config.max_steps or max(1, round(config.epochs * steps_per_epoch))
    data_fp = hashlib.blake2b(json.dumps([p.input_ids for p in pairs]).encode(), digest_size=8).hexdigest()

    model.train()
    masker = MaskedUpdate(model, may_change)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.scheduler, optimizer, num_warmup_steps=round(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    ref_logps = _reference_logps(model, pairs, pad_id, config, accelerator) if config.objective == "npo" else None
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state = {"step": 0, "losses": [], "nlls": [], "tokens": 0, "config": config.fingerprint(), "data": data_fp}
    ckpt_root = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    resumed_from = 0
    if ckpt_root is not None:
        latest = latest_checkpoint(ckpt_root)
        if latest is not None:
            saved = read_json(latest / "trainer_state.json")
            for key, what in (("config", "training config"), ("data", "training data")):
                if saved[key] != state[key]:
                    raise ValueError(f"checkpoint {latest} was made with a different {what}; use another "
                                     f"checkpoint_dir or delete it to start over")
            accelerator.load_state(str(latest))
            state = saved
            resumed_from = state["step"]
            if ref_logps is not None:
                ref_logps = torch.load(latest / "npo_ref_logps.pt", weights_only=True)
            masker.refresh()
            log.info("resumed from %s (step %d)", latest, resumed_from)

    stopped = "completed"
    t0, tokens_run = time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train ({config.objective})",
               disable=not progress or not accelerator.is_local_main_process, unit="step")
    try:
        while state["step"] < total_steps:
            step = state["step"]
            idx = _step_indices(len(pairs), step, steps_per_epoch, per_step, config)
            micro = [idx[i * config.batch_size * world:(i + 1) * config.batch_size * world][rank::world]
                     for i in range(config.grad_accum)]
            micro = [m for m in micro if m]
            denom = (sum(pairs[i].n_loss_tokens for m in micro for i in m) if config.objective != "npo"
                     else sum(len(m) for m in micro))
            loss_sum, nll_sum, n_tok = 0.0, 0.0, 0
            for j, m in enumerate(micro):
                batch = collate([pairs[i] for i in m], pad_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = accelerator.no_sync(wrapped) if j < len(micro) - 1 else _nullcontext()
                with sync:
                    tok_nll, seq_logp = _token_nll(wrapped, batch, accelerator)
                    batch_nll = tok_nll.sum()
                    if config.objective == "descent":
                        loss = batch_nll / max(denom, 1)
                    elif config.objective == "ascent":
                        loss = -batch_nll / max(denom, 1)
                    else:
                        ratio = seq_logp - ref_logps[m].to(seq_logp.device)
                        loss = (-(2.0 / config.npo_beta) * F.logsigmoid(-config.npo_beta * ratio)).sum() / denom
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(_diverged(step, "loss", ckpt_root))
                    accelerator.backward(loss)
                loss_sum += float(loss.detach())
                nll_sum += float(batch_nll.detach())
                n_tok += int(batch["attention_mask"].sum())
            n_resp = sum(pairs[i].n_loss_tokens for m in micro for i in m)
            step_nll = nll_sum / max(n_resp, 1)
            if config.stop_nll_above is not None and step_nll > config.stop_nll_above:
                optimizer.zero_grad(set_to_none=True)
                stopped = "nll_above"
                break
            masker.mask_gradients()
            if config.max_grad_norm is not None:
                norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                if not torch.isfinite(torch.as_tensor(norm)):
                    raise TrainingDivergedError(_diverged(step, "gradient norm", ckpt_root))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            masker.restore()
            state["step"] = step + 1
            state["losses"].append(loss_sum)
            state["nlls"].append(step_nll)
            state["tokens"] += n_tok
            tokens_run += n_tok
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", nll=f"{step_nll:.3f}", tok_s=f"{tokens_run * world / elapsed:.0f}")
            if ckpt_root is not None and config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                _save_checkpoint(accelerator, ckpt_root, state, ref_logps, config.keep_checkpoints)
            if callback is not None:
                callback(state["step"], loss_sum)
    finally:
        bar.close()
        masker.release()
        model.eval()
    wall = time.perf_counter() - t0
    checkpoint = None
    if ckpt_root is not None and accelerator.is_main_process:
        last = latest_checkpoint(ckpt_root)
        if last is None or read_json(last / "trainer_state.json")["step"] != state["step"]:
            _save_checkpoint(accelerator, ckpt_root, state, ref_logps, config.keep_checkpoints)
        checkpoint = str(latest_checkpoint(ckpt_root))
    accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    accelerator.free_memory()
    losses = state["losses"]
    return TrainResult(
        steps=state["step"], final_loss=losses[-1] if losses else float("nan"), losses=losses,
        tokens_per_s=tokens_run * world / wall if wall > 0 else 0.0, stopped_reason=stopped, nlls=state["nlls"],
        tokens=state["tokens"] * world, wall_s=wall, examples=len(pairs), resumed_from=resumed_from,
        mask=masker.stats.as_dict() if isinstance(masker.stats, MaskStats) else None, checkpoint=checkpoint,
    )


# --- pieces ---------------------------------------------------------------------------------------


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _accelerator(mixed_precision: str):
    """An Accelerator with the requested precision; "auto" = bf16 where a GPU supports it, else none.

    Accelerate keeps one process-wide state; in a single process a new precision resets it (tests and
    notebooks run several configs), under `accelerate launch` the launcher's setting must match.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    try:
        return Accelerator(mixed_precision=mixed_precision)
    except ValueError:
        if AcceleratorState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=mixed_precision)


def _step_indices(n: int, step: int, steps_per_epoch: int, per_step: int, config: TrainConfig) -> list[int]:
    """Example indices of optimizer step `step`: a seeded permutation per epoch, so resume replays the order."""
    epoch, pos = divmod(step, steps_per_epoch)
    if config.shuffle:
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    return order[pos * per_step:(pos + 1) * per_step]


def _token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (0 where no loss) and per-sequence response log-prob, from one forward pass."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    return nll, -nll.sum(dim=1)


@torch.no_grad()
def _reference_logps(model, pairs: list[EncodedPair], pad_id: int, config: TrainConfig, accelerator) -> torch.Tensor:
    """NPO's reference: each example's response log-prob under the initial weights, computed once."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(pairs))
    for start in range(0, len(pairs), config.batch_size):
        batch = collate(pairs[start:start + config.batch_size], pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            _, logp = _token_nll(model.to(accelerator.device), batch, accelerator)
        out[start:start + len(logp)] = logp.float().cpu()
    model.train(was_training)
    return out


def _diverged(step: int, what: str, ckpt_root: Path | None) -> str:
    last = latest_checkpoint(ckpt_root) if ckpt_root is not None else None
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (set checkpoint_dir)"
    return (f"{what} became NaN/Inf at step {step + 1}; training stopped before updating the weights with it; "
            f"{where}. Lower lr, enable clipping, or check the data.")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (a folder counts once trainer_state.json is in it)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def _save_checkpoint(accelerator, root: Path, state: dict, ref_logps: torch.Tensor | None, keep: int) -> None:
    """Accelerate state (weights as safetensors, optimizer, scheduler, RNG) + step counter, renamed in when complete."""
    target = root / f"step-{state['step']}"
    tmp = root / f".tmp-step-{state['step']}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        if ref_logps is not None:
            torch.save(ref_logps, tmp / "npo_ref_logps.pt")
        write_json(tmp / "trainer_state.json", state)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
