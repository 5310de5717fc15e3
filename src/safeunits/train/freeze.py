"""Frozen safety units inside any training loop: Hugging Face `Trainer`, TRL's `SFTTrainer`, plain PyTorch/Accelerate.

Our own engine (`train.engine`) enforces unit masks itself. Users who fine-tune with the trainer they already use
get the same guarantee from `freeze_units(model, unit_map, "scu+cu:top0.06")`: it builds the masks with
`train.masks` (the selection grammar is `units.selection.select_units`) and

- zeroes the frozen entries of every gradient as autograd produces it (a tensor hook per partially frozen
  parameter), so gradient clipping and Adam's moments never see them;
- writes the frozen entries' saved values back after every `optimizer.step()` (a step post-hook on the torch
  optimizer), which undoes AdamW's decoupled weight decay and any other drift: frozen weights stay bit-identical.

Why an optimizer post-hook rather than a Trainer event: `Trainer` calls `optimizer.step()` and then
`on_optimizer_step` directly after it, before the LR scheduler and `zero_grad` (transformers 5.x
`Trainer._run_epoch`); `on_step_end` comes later, after `zero_grad`. A hook on the optimizer itself fires at the
same point as `on_optimizer_step` for `Trainer`, and also for every other caller of `step()` (a subclass that
overrides the training step, a plain loop), so one mechanism serves both.

The masks are `train.masks.MaskedUpdate`'s, the engine's: frozen units are row/column indices (`index_fill` on
gradients, `index_copy_` of only the frozen rows/columns' saved values), dense bool masks only for irregular masks.

Limits: build the handle after the model is on its device; DDP and single-device runs are exact, sharded
parameters (FSDP, DeepSpeed ZeRO) are not supported (see docs/train.md).
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from safeunits.train.masks import MaskedUpdate, MaskStats, unit_masks, update_masks
from safeunits.units.selection import select_units
from safeunits.units.unit_map import UnitMap


class FreezeError(RuntimeError):
    """The frozen-units handle cannot do what was asked (no torch optimizer inside, used after `remove()`)."""


class FrozenUnits:
    """Installed gradient masks (and optimizer hooks) that keep selected units bit-identical; `remove()` uninstalls.

    Usable as a context manager: `with freeze_units(...) as frozen: <training loop>`.
    """

    def __init__(self, model: nn.Module, frozen: dict[str, torch.Tensor]) -> None:
        self._masker = MaskedUpdate(model, update_masks(model, frozen=frozen))
        self._grad_hooks: list[RemovableHandle] = self._masker.hook_gradients()
        self._step_hooks: list[RemovableHandle] = []
        self._removed = False

    @property
    def stats(self) -> MaskStats:
        """How many weights remain trainable (`stats.trainable_share`), for logs."""
        return cast(MaskStats, self._masker.stats)  # always set by MaskedUpdate.__post_init__

    def attach(self, optimizer: torch.optim.Optimizer) -> FrozenUnits:
        """Restore the frozen entries after every `step()` of `optimizer` (Accelerate/Trainer wrappers are unwrapped)."""
        if self._removed:
            raise FreezeError("this FrozenUnits handle was removed; call freeze_units again")
        inner = optimizer
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):  # AcceleratedOptimizer & co.
            inner = inner.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            raise FreezeError(f"{type(optimizer).__name__} is not a torch optimizer and wraps none; call "
                              f"handle.restore() yourself after each optimizer step instead of attach()")
        self._step_hooks.append(inner.register_step_post_hook(lambda *_: self._masker.restore()))
        return self

    def restore(self) -> None:
        """Write the saved values back into the frozen entries (for optimizers `attach` cannot hook)."""
        self._masker.restore()

    def remove(self) -> None:
        """Uninstall every hook and give fully frozen parameters their `requires_grad` back; idempotent."""
        for handle in self._grad_hooks + self._step_hooks:
            handle.remove()
        self._grad_hooks, self._step_hooks = [], []
        self._masker.release()
        self._removed = True

    def __enter__(self) -> FrozenUnits:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()


def freeze_units(model: nn.Module, unit_map: str | os.PathLike | UnitMap, spec: str, *,
                 optimizer: torch.optim.Optimizer | None = None) -> FrozenUnits:
    """Keep the units named by `spec` (e.g. "scu+cu:top0.06") of `model` bit-identical through training.

    Call it after the model is on its device and, for the restore, pass the optimizer (or `attach` it later);
    without an optimizer only the gradients are masked, and weight decay would still move frozen entries.
    """
    handle = FrozenUnits(model, unit_masks(model, unit_map, spec))
    return handle.attach(optimizer) if optimizer is not None else handle


class FreezeUnitsCallback(TrainerCallback):
    """`Trainer` (and TRL `SFTTrainer`) callback: freeze units at train start, uninstall at train end.

    The unit map is loaded and the selection checked when the callback is made, before any training.
    """

    def __init__(self, unit_map: str | os.PathLike | UnitMap, spec: str) -> None:
        self.unit_map = unit_map if isinstance(unit_map, UnitMap) else UnitMap.load(unit_map)
        self.spec = spec
        select_units(self.unit_map, spec)  # a typo fails here, not after the Trainer has set up
        self.handle: FrozenUnits | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                       **kwargs) -> None:
        if model is None or optimizer is None:
            raise FreezeError("FreezeUnitsCallback needs the Trainer's model and optimizer at train start")
        if self.handle is not None:  # a second trainer.train() call
            self.handle.remove()
        self.handle = freeze_units(model, self.unit_map, self.spec, optimizer=optimizer)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.handle is not None:
            self.handle.remove()
