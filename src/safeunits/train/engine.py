"""The one training engine of the toolkit: alignment SFT, fine-tuning attacks, SafePatching's ascent/descent, NPO.

Built on Hugging Face Accelerate (device placement, mixed precision, DDP and FSDP2 through `accelerate launch` or
`torchrun`, `save_state`/`load_state` checkpoints; `safeunits.distributed` checks that every launched process
takes part). The loss is taken on response tokens only (chat template applied,
`models.chat.encode_pair`), token-weighted across gradient-accumulation micro-batches so `batch_size=4,
grad_accum=2` optimises the same objective as `batch_size=8`. Unit masks (`train.masks`) keep frozen weights
bit-identical. The data order is a pure function of (seed, epoch), so a run resumed from a checkpoint
replays exactly the batches an uninterrupted run would have seen.

`train()` reads top-down: encode the data and plan the steps (`_Plan`), set up the optimizer and the
objective (`_setup`; objectives live in `train.objectives`), resume (`_resume`), loop (`_loop`: per step
`_accumulate_gradients` then `_apply_update`), save the final checkpoint (`_Checkpoints`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from safeunits.config import Config
from safeunits.data.records import Record
from safeunits.distributed import (DistributedSetupError, Parallelism, check_mask_support, fsdp2_shard,
                                   make_accelerator, requested_parallelism)
from safeunits.io import read_json, write_json
from safeunits.models.chat import EncodedPair, collate, encode_pair
from safeunits.train.masks import FrozenPart, MaskedUpdate, MaskStats, update_masks
from safeunits.train.objectives import LossInputs, TrainingObjective, get_objective, objective_names

log = logging.getLogger(__name__)


class TrainConfig(Config):
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
    objective: str = Field("descent", description="Registered training objective (train.objectives): " + "; ".join(
        f"{name}: {get_objective(name).description}" for name in objective_names()) + ".")
    npo_beta: float = Field(0.1, gt=0, description="NPO inverse temperature beta (Zhang et al. 2024).")
    stop_nll_above: float | None = Field(None, description="Ascent bound: stop before a step whose training batch "
                                         "already has response NLL above this value.")
    stop_loss_below: float | None = Field(None, description="Descent target: stop after the step at which the mean "
                                          "loss of the last `loss_window` steps reaches this value (compare runs "
                                          "at equal final loss; `max_steps`/`epochs` cap the run).")
    loss_window: int = Field(25, ge=1, description="Steps averaged for `stop_loss_below` (one batch's loss is noisy).")
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

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, name: str) -> str:
        get_objective(name)
        return name

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.stop_nll_above is not None and not get_objective(self.objective).raises_nll:
            bounded = [n for n in objective_names() if get_objective(n).raises_nll]
            raise ValueError(f"stop_nll_above bounds objectives that raise the response NLL ({', '.join(bounded)}); "
                             f"it makes no sense with objective={self.objective!r}")
        if self.stop_loss_below is not None and get_objective(self.objective).raises_nll:
            raise ValueError(f"stop_loss_below is a target for objectives that lower the loss; objective="
                             f"{self.objective!r} raises the NLL (bound it with stop_nll_above)")
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
    stopped_reason: str  # "completed" | "nll_above" | "loss_below"
    nlls: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    examples: int = 0
    resumed_from: int = 0
    mask: dict | None = None
    checkpoint: str | None = None


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

    _check_records(records)
    frozen_parts = update_masks(model, frozen, trainable)
    parallelism = requested_parallelism()
    check_mask_support(parallelism, frozen_parts is not None)
    set_seed(config.seed)
    accelerator = _accelerator(config.mixed_precision)
    pairs = _encode(tokenizer, records, config)
    plan = _Plan.make(len(pairs), config, accelerator.num_processes, accelerator.process_index)
    self_sharded = _self_sharded(parallelism, accelerator, config)
    run = _setup(model, tokenizer, pairs, config, plan, frozen_parts, accelerator, self_sharded)
    state = {"step": 0, "losses": [], "nlls": [], "tokens": 0, "config": config.fingerprint(),
             "data": _data_fingerprint(pairs)}
    try:
        state = _resume(run, state)
        resumed_from = state["step"]
        end = _loop(run, plan, state, progress=progress, callback=callback)
    finally:
        run.masker.release()
        model.eval()
    checkpoint = run.checkpoints.save_final(state, run.ref_logps)
    accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)
    accelerator.free_memory()
    losses = state["losses"]
    return TrainResult(
        steps=state["step"], final_loss=losses[-1] if losses else float("nan"), losses=losses,
        tokens_per_s=end.tokens / end.wall_s if end.wall_s > 0 else 0.0, stopped_reason=end.stopped,
        nlls=state["nlls"], tokens=state["tokens"], wall_s=end.wall_s, examples=len(pairs),
        resumed_from=resumed_from, checkpoint=checkpoint,
        mask=run.masker.stats.as_dict() if isinstance(run.masker.stats, MaskStats) else None,
    )


# --- data and plan ----------------------------------------------------------------------------------


def _check_records(records: list[Record]) -> None:
    if not records:
        raise ValueError("no training records")
    missing = [i for i, r in enumerate(records) if not r.response]
    if missing:
        raise ValueError(f"{len(missing)} records have no response to train on (first at index {missing[0]})")


def _encode(tokenizer: PreTrainedTokenizerBase, records: list[Record], config: TrainConfig) -> list[EncodedPair]:
    """Chat-template and tokenise every example once, with the loss on `config.loss_on` tokens."""
    pairs = [encode_pair(tokenizer, r.prompt, r.response, system_prompt=config.system_prompt,
                         max_length=config.max_length, loss_on=config.loss_on) for r in records]
    if not any(p.n_loss_tokens for p in pairs):
        raise ValueError("no example has a loss token left after truncation; raise max_length")
    return pairs


def _data_fingerprint(pairs: list[EncodedPair]) -> str:
    """Hash of the tokenised data, so a checkpoint is only resumed on the data it was trained on."""
    return hashlib.blake2b(json.dumps([p.input_ids for p in pairs]).encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class _Plan:
    """Which examples each optimizer step sees: a pure function of (seed, epoch, step), so resume replays them."""

    n_examples: int
    config: TrainConfig
    world: int
    rank: int
    per_step: int  # examples per optimizer step across all processes
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, n_examples: int, config: TrainConfig, world: int, rank: int) -> "_Plan":
        per_step = config.batch_size * config.grad_accum * world
        steps_per_epoch = n_examples // per_step if world > 1 else math.ceil(n_examples / per_step)
        if steps_per_epoch == 0:
            raise ValueError(f"{n_examples} examples are fewer than one step across {world} processes ({per_step})")
        total_steps = config.max_steps or max(1, round(config.epochs * steps_per_epoch))
        return cls(n_examples, config, world, rank, per_step, steps_per_epoch, total_steps)

    def step_indices(self, step: int) -> list[int]:
        """Example indices of optimizer step `step` (all processes): a seeded permutation per epoch."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self.config.shuffle:
            gen = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
            order = torch.randperm(self.n_examples, generator=gen).tolist()
        else:
            order = list(range(self.n_examples))
        return order[pos * self.per_step:(pos + 1) * self.per_step]

    def denominator(self, step: int, pairs: list[EncodedPair], per_sequence: bool) -> float:
        """What one process divides its loss sum by: the step's total count (all processes) over the world size.

        Data parallelism averages the processes' gradients, so this makes the update the gradient of the whole
        step's token- (or sequence-) weighted mean: the same as one process running the global batch.
        """
        idx = self.step_indices(step)
        total = len(idx) if per_sequence else sum(pairs[i].n_loss_tokens for i in idx)
        return total / self.world

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's share of each gradient-accumulation micro-batch of step `step` (empty ones dropped)."""
        idx, size = self.step_indices(step), self.config.batch_size * self.world
        micro = [idx[i * size:(i + 1) * size][self.rank::self.world] for i in range(self.config.grad_accum)]
        return [m for m in micro if m]


# --- one optimizer step -----------------------------------------------------------------------------


@dataclass
class _Run:
    """What the steps of one run share: the objective, the prepared model/optimizer/scheduler, masks, checkpoints."""

    config: TrainConfig
    objective: TrainingObjective
    pairs: list[EncodedPair]
    pad_id: int
    accelerator: Any
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped under `accelerate launch`), or FSDP2-sharded
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    masker: MaskedUpdate
    ref_logps: torch.Tensor | None  # per example, under the initial weights (objectives that need a reference)
    checkpoints: "_Checkpoints"
    sync_each_micro_batch: bool = False  # no `no_sync` (a model sharded by the engine has no DDP-style context)


def _setup(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[EncodedPair], config: TrainConfig,
           plan: _Plan, frozen_parts: dict[str, FrozenPart] | None, accelerator, self_sharded: bool) -> _Run:
    """Masks, the objective's reference, AdamW over the trainable weights, the LR schedule, then Accelerate.

    Under FSDP2 the parameters are replaced by DTensor shards, so the optimizer is built over the sharded ones
    and the masks are cut like them (`MaskedUpdate.shard`): by us before the optimizer when Accelerate cannot
    shard (`self_sharded`, CPU processes), after `prepare` when its FSDP2 plugin did.
    """
    objective = get_objective(config.objective)(config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    masker = MaskedUpdate(model, frozen_parts)
    ref_logps = _reference_logps(model, pairs, pad_id, config, accelerator) if objective.needs_reference else None
    if self_sharded:
        masker.shard(fsdp2_shard(model.to(accelerator.device), plan.world))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  betas=config.adam_betas, eps=config.adam_eps, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.scheduler, optimizer,
                              num_warmup_steps=round(config.warmup_ratio * plan.total_steps),
                              num_training_steps=plan.total_steps)
    if self_sharded:
        wrapped = model
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        if accelerator.is_fsdp2:
            masker.shard(accelerator.unwrap_model(wrapped))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return _Run(config, objective, pairs, pad_id, accelerator, wrapped, params, optimizer, scheduler, masker, ref_logps,
                _Checkpoints(config, accelerator), sync_each_micro_batch=self_sharded)


def _self_sharded(parallelism: Parallelism, accelerator, config: TrainConfig) -> bool:
    """Whether the engine shards with FSDP2 itself: asked for by the launcher, but Accelerate runs plain processes.

    Accelerate's FSDP plugins need GPUs; on CPU processes it would silently run DDP instead. FSDP1 cannot be
    done here, so it is refused rather than replaced.
    """
    from accelerate.utils import DistributedType

    if parallelism not in ("fsdp1", "fsdp2") or accelerator.distributed_type == DistributedType.FSDP:
        return False
    if parallelism == "fsdp1":
        raise DistributedSetupError("FSDP1 was requested but Accelerate cannot run it on these processes (CPU); "
                                    "use `--fsdp_version 2` (sharded by this engine with fully_shard) or DDP")
    if config.checkpoint_dir is not None:
        raise DistributedSetupError("checkpoints are not supported when the engine shards with FSDP2 itself (CPU "
                                    "processes); drop checkpoint_dir or use DDP")
    return True


@dataclass
class _StepStats:
    loss: float  # the objective, summed over the step's micro-batches
    nll: float  # response NLL per loss token (what `stop_nll_above` bounds)
    tokens: int  # tokens processed by all processes (prompt + response)


def _accumulate_gradients(run: _Run, plan: _Plan, step: int) -> _StepStats:
    """Forward and backward every micro-batch of one step; gradients add up and DDP syncs only on the last one.

    Each micro-batch's loss is divided by the step's total count (tokens or sequences, over all processes:
    `_Plan.denominator`), so the summed gradient is the one of a single batch holding all micro-batches. The
    returned loss and NLL are the step's, reduced over the processes, so every process takes the same decision.
    """
    pairs, accelerator = run.pairs, run.accelerator
    micro = plan.micro_batches(step)
    denom = plan.denominator(step, pairs, run.objective.per_sequence)
    n_resp = sum(pairs[i].n_loss_tokens for i in plan.step_indices(step))
    loss_sum, nll_sum, n_tok = 0.0, 0.0, 0
    for j, m in enumerate(micro):
        batch = collate([pairs[i] for i in m], run.pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = j == len(micro) - 1 or run.sync_each_micro_batch
        with contextlib.nullcontext() if last else accelerator.no_sync(run.model):
            tok_nll, seq_logp = _token_nll(run.model, batch)
            batch_nll = tok_nll.sum()
            ref = run.ref_logps[m].to(seq_logp.device) if run.ref_logps is not None else None
            loss = run.objective.loss(LossInputs(tok_nll, batch_nll, seq_logp, ref, denom))
            if not torch.isfinite(loss):
                raise TrainingDivergedError(run.checkpoints.diverged(step, "loss"))
            accelerator.backward(loss)
        loss_sum += float(loss.detach())
        nll_sum += float(batch_nll.detach())
        n_tok += int(batch["attention_mask"].sum())
    if plan.world > 1:
        totals = torch.tensor([loss_sum, nll_sum, float(n_tok)], dtype=torch.float64, device=accelerator.device)
        loss_sum, nll_sum, n_tok = accelerator.reduce(totals, reduction="sum").tolist()
        loss_sum, n_tok = loss_sum / plan.world, int(n_tok)
    return _StepStats(loss_sum, nll_sum / max(n_resp, 1), n_tok)


def _apply_update(run: _Run, step: int) -> None:
    """Mask frozen gradients, clip (a NaN/Inf norm stops the run), step AdamW and the schedule, restore frozen weights."""
    run.masker.mask_gradients()
    if run.config.max_grad_norm is not None:
        norm = run.accelerator.clip_grad_norm_(run.params, run.config.max_grad_norm)
        if not torch.isfinite(torch.as_tensor(norm)):
            raise TrainingDivergedError(run.checkpoints.diverged(step, "gradient norm"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.masker.restore()


# --- the loop ---------------------------------------------------------------------------------------


@dataclass
class _LoopEnd:
    stopped: str  # TrainResult.stopped_reason
    tokens: int  # tokens all processes ran in this session (not counting steps before a resume)
    wall_s: float


def _loop(run: _Run, plan: _Plan, state: dict, *, progress: bool, callback: CallbackFn | None) -> _LoopEnd:
    """Optimizer steps until `plan.total_steps`, the NLL bound or the loss target; updates `state` and checkpoints."""
    config, accelerator = run.config, run.accelerator
    stopped = "completed"
    t0, tokens_run = time.perf_counter(), 0
    bar = tqdm(total=plan.total_steps, initial=state["step"], desc=f"train ({config.objective})",
               disable=not progress or not accelerator.is_local_main_process, unit="step")
    try:
        while state["step"] < plan.total_steps:
            step = state["step"]
            stats = _accumulate_gradients(run, plan, step)
            if config.stop_nll_above is not None and stats.nll > config.stop_nll_above:
                run.optimizer.zero_grad(set_to_none=True)
                stopped = "nll_above"
                break
            _apply_update(run, step)
            state["step"] = step + 1
            state["losses"].append(stats.loss)
            state["nlls"].append(stats.nll)
            state["tokens"] += stats.tokens
            tokens_run += stats.tokens
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", nll=f"{stats.nll:.3f}",
                            tok_s=f"{tokens_run / (time.perf_counter() - t0):.0f}")
            if run.checkpoints.due(state["step"]):
                run.checkpoints.save(state, run.ref_logps)
            if callback is not None:
                callback(state["step"], stats.loss)
            if _reached_loss_target(config, state["losses"]):
                stopped = "loss_below"
                break
    finally:
        bar.close()
    return _LoopEnd(stopped, tokens_run, time.perf_counter() - t0)


# --- pieces -----------------------------------------------------------------------------------------


def _reached_loss_target(config: TrainConfig, losses: list[float]) -> bool:
    """Whether the mean loss of the last `loss_window` steps is at `stop_loss_below` (a full window only)."""
    window = losses[-config.loss_window:]
    return (config.stop_loss_below is not None and len(window) == config.loss_window
            and sum(window) / len(window) <= config.stop_loss_below)


def _accelerator(mixed_precision: str):
    """An Accelerator with the requested precision; "auto" = bf16 where a GPU supports it, else none.

    Accelerate keeps one process-wide state; in a single process a new precision resets it (tests and
    notebooks run several configs), under `accelerate launch` the launcher's setting must match. Every process
    the launcher started must take part (`safeunits.distributed.make_accelerator`).
    """
    from accelerate.state import AcceleratorState

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    try:
        return make_accelerator(mixed_precision=mixed_precision)
    except ValueError:
        if AcceleratorState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=False)
        return make_accelerator(mixed_precision=mixed_precision)


def _token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (0 where no loss) and per-sequence response log-prob, from one forward pass."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    return nll, -nll.sum(dim=1)


@torch.no_grad()
def _reference_logps(model, pairs: list[EncodedPair], pad_id: int, config: TrainConfig, accelerator) -> torch.Tensor:
    """The frozen reference (NPO's π_ref): each example's response log-prob under the initial weights, computed once."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(pairs))
    for start in range(0, len(pairs), config.batch_size):
        batch = collate(pairs[start:start + config.batch_size], pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            _, logp = _token_nll(model.to(accelerator.device), batch)
        out[start:start + len(logp)] = logp.float().cpu()
    model.train(was_training)
    return out


# --- checkpoints ------------------------------------------------------------------------------------

STATE_FILE = "trainer_state.json"
REFERENCE_FILE = "npo_ref_logps.pt"  # the name from when NPO was the only objective with a reference


def _resume(run: _Run, state: dict) -> dict:
    """Continue from the newest checkpoint in `checkpoint_dir`, if any (made with the same config and data)."""
    latest = run.checkpoints.latest()
    if latest is None:
        return state
    saved = read_json(latest / STATE_FILE)
    for key, what in (("config", "training config"), ("data", "training data")):
        if saved[key] != state[key]:
            raise ValueError(f"checkpoint {latest} was made with a different {what}; use another "
                             f"checkpoint_dir or delete it to start over")
    run.accelerator.load_state(str(latest))
    if run.ref_logps is not None:
        run.ref_logps = torch.load(latest / REFERENCE_FILE, weights_only=True)
    run.masker.refresh()
    log.info("resumed from %s (step %d)", latest, saved["step"])
    return saved


class _Checkpoints:
    """`checkpoint_dir/step-N` folders: saved every `checkpoint_every` steps and at the end, newest `keep` kept."""

    def __init__(self, config: TrainConfig, accelerator) -> None:
        self.root = Path(config.checkpoint_dir) if config.checkpoint_dir else None
        self.every, self.keep, self.accelerator = config.checkpoint_every, config.keep_checkpoints, accelerator

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root) if self.root is not None else None

    def due(self, step: int) -> bool:
        return self.root is not None and bool(self.every) and step % self.every == 0

    def save(self, state: dict, ref_logps: torch.Tensor | None) -> None:
        """Accelerate state (weights as safetensors, optimizer, scheduler, RNG) + step counter, renamed in when complete."""
        accelerator, root = self.accelerator, self.root
        target = root / f"step-{state['step']}"
        tmp = root / f".tmp-step-{state['step']}"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every process's files (RNG states) are in before the folder is renamed
        if accelerator.is_main_process:
            if ref_logps is not None:
                torch.save(ref_logps, tmp / REFERENCE_FILE)
            write_json(tmp / STATE_FILE, state)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
            for old in checkpoint_dirs(root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def save_final(self, state: dict, ref_logps: torch.Tensor | None) -> str | None:
        """Save the end state unless the newest checkpoint already is it; its folder (None without checkpoint_dir).

        Every process takes part (saving is collective); only the main one writes files.
        """
        if self.root is None:
            return None
        last = self.latest()
        if last is None or read_json(last / STATE_FILE)["step"] != state["step"]:
            self.save(state, ref_logps)
        return str(self.latest())

    def diverged(self, step: int, what: str) -> str:
        """The error message for a NaN/Inf at `step`, pointing at the last good checkpoint."""
        last = self.latest()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (set checkpoint_dir)"
        return (f"{what} became NaN/Inf at step {step + 1}; training stopped before updating the weights with it; "
                f"{where}. Lower lr, enable clipping, or check the data.")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (a folder counts once trainer_state.json is in it)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoint_dirs(root)
    return found[-1] if found else None
