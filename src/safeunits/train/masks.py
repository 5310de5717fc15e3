"""Unit masks for training: which weights may change, enforced on gradients and after every optimizer step.

A mask dict maps a parameter name (as in `model.named_parameters()`) to a bool tensor of the parameter's
shape. Two modes, exactly one per run:

- `frozen`: True marks weights that must stay bit-identical (SSAH: freeze SCU (+ CU) while fine-tuning);
- `trainable`: True marks the only weights that may change (SSAH's alignment budget: train RU only);
  parameters absent from a `trainable` dict are frozen entirely.

Why both gradient masking and restoring: masking the gradient keeps Adam's moments of frozen entries at
exactly zero, but AdamW's decoupled weight decay still shrinks every entry (`p -= lr * wd * p`) and a
mixed-precision or fused optimizer may touch them too. So after each step the frozen entries are written back
from a saved copy of their values, which makes bit-identity hold by construction whatever the optimizer does.
Parameters frozen entirely are taken out of the optimizer (`requires_grad=False`), costing nothing.

Under FSDP2 a parameter is a DTensor whose process holds one shard: `MaskedUpdate.shard` cuts every mask and
saved value the way the parameter is cut (`distribute_tensor` with the parameter's mesh and placements, no
communication), and the gradient masking and restoring act on the local shards, so the guarantee is the same.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from safeunits.errors import UserValueError


class MaskError(UserValueError):
    """A mask does not fit the model (unknown parameter, wrong shape, wrong dtype) or both modes were given."""


@dataclass
class MaskStats:
    """How many weights a mask set leaves trainable, for logs and run reports."""

    total: int
    trainable: int
    fully_frozen_tensors: int
    partially_frozen_tensors: int

    @property
    def trainable_share(self) -> float:
        return self.trainable / max(self.total, 1)

    def as_dict(self) -> dict[str, float | int]:
        return {"total_params": self.total, "trainable_params": self.trainable,
                "trainable_share": self.trainable_share, "fully_frozen_tensors": self.fully_frozen_tensors,
                "partially_frozen_tensors": self.partially_frozen_tensors}


def update_masks(
    model: nn.Module,
    frozen: dict[str, torch.Tensor] | None = None,
    trainable: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor] | None:
    """Turn `frozen` or `trainable` masks into one "may change" mask per parameter (None: everything trains).

    Validates names, shapes and dtypes against the model so a unit map of another model fails loudly.
    """
    if frozen is not None and trainable is not None:
        raise MaskError("pass either `frozen` or `trainable` masks, not both")
    masks = frozen if frozen is not None else trainable
    if masks is None:
        return None
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights keep both names
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise MaskError(f"mask names not in the model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                        f"(model parameters look like {list(params)[:3]})")
    out: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        mask = masks.get(name)
        if mask is not None:
            if mask.dtype != torch.bool:
                raise MaskError(f"mask for {name} has dtype {mask.dtype}; expected torch.bool")
            if tuple(mask.shape) != tuple(param.shape):
                raise MaskError(f"mask for {name} has shape {tuple(mask.shape)}; parameter is {tuple(param.shape)}")
            mask = mask.to(param.device)
        if frozen is not None:
            out[name] = torch.ones_like(param, dtype=torch.bool) if mask is None else ~mask
        else:
            out[name] = torch.zeros_like(param, dtype=torch.bool) if mask is None else mask.clone()
    return out


@dataclass
class _Partial:
    """A partly frozen parameter: its mask, and the frozen entries' values -- all as this process's shard."""

    name: str
    param: nn.Parameter
    frozen: torch.Tensor  # True = must not change (local shard under FSDP2)
    saved: torch.Tensor  # the frozen entries' values, in masked_select order


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this process updates in place: a DTensor's local shard (a view), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@dataclass
class MaskedUpdate:
    """Enforces "may change" masks during training: zero masked gradients, restore frozen entries after a step."""

    model: nn.Module
    may_change: dict[str, torch.Tensor] | None
    _partial: list[_Partial] = field(default_factory=list, init=False)
    _disabled: dict[str, nn.Parameter] = field(default_factory=dict, init=False)  # name -> fully frozen parameter
    stats: MaskStats | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        total = sum(p.numel() for p in {id(p): p for p in params.values()}.values())
        if self.may_change is None:
            self.stats = MaskStats(total, total, 0, 0)
            return
        trainable, full, partial = 0, 0, 0
        seen: dict[int, torch.Tensor] = {}
        for name, param in params.items():
            keep = self.may_change[name]
            if id(param) in seen:  # tied weights (embeddings / lm_head): one tensor, the stricter mask wins
                keep = keep & seen[id(param)]
            seen[id(param)] = keep
        names = {id(p): n for n, p in reversed(list(params.items()))}  # the first name of each tensor
        for param in {id(p): p for p in params.values()}.values():
            keep = seen[id(param)]
            n_keep = int(keep.sum())
            trainable += n_keep
            if n_keep == 0:
                full += 1
                if param.requires_grad:
                    param.requires_grad_(False)
                    self._disabled[names[id(param)]] = param
            elif n_keep < keep.numel():
                frozen = ~keep
                self._partial.append(_Partial(names[id(param)], param, frozen, param.detach().masked_select(frozen)))
                partial += 1
        self.stats = MaskStats(total, trainable, full, partial)
        if trainable == 0:
            raise MaskError("the masks freeze every weight of the model: nothing would train")

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-read the frozen values (after a checkpoint was loaded into the model)."""
        for entry in self._partial:
            entry.saved = _local(entry.param.detach()).masked_select(entry.frozen)

    @torch.no_grad()
    def shard(self, model: nn.Module) -> None:
        """Follow the model's parameters after FSDP2 made them DTensors: masks and saved values become local shards.

        Call it in every process right after sharding; the full-size masks are cut locally (no communication).
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = dict(model.named_parameters(remove_duplicate=False))
        for entry in self._partial:
            param = params[entry.name]
            if isinstance(param, DTensor):
                full = distribute_tensor(entry.frozen.to(param.device), param.device_mesh, param.placements,
                                         src_data_rank=None)
                entry.frozen = full.to_local()
            entry.param = param
        self._disabled = {name: params[name] for name in self._disabled}
        self.refresh()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient of every frozen entry, so clipping and Adam moments never see it."""
        for entry in self._partial:
            if entry.param.grad is not None:
                _local(entry.param.grad).masked_fill_(entry.frozen, 0.0)

    def hook_gradients(self) -> list[RemovableHandle]:
        """Zero frozen gradient entries as autograd produces them: `mask_gradients` for loops this code does not own.

        Parameters that do not require grad get no hook (they receive no gradient); remove the returned handles
        to uninstall."""
        return [entry.param.register_hook(functools.partial(torch.Tensor.masked_fill, mask=entry.frozen, value=0.0))
                for entry in self._partial if entry.param.requires_grad]

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved values back into frozen entries (undoes weight decay and any optimizer drift)."""
        for entry in self._partial:
            _local(entry.param.data).masked_scatter_(entry.frozen, entry.saved)

    def release(self) -> None:
        """Give fully frozen parameters their `requires_grad` back after training."""
        for param in self._disabled.values():
            param.requires_grad_(True)
        self._disabled = {}


def unit_masks(model: nn.Module, unit_map: str | object, spec: str) -> dict[str, torch.Tensor]:
    """Parameter masks (True = belongs to a selected unit) for a unit-map selection such as `scu+cu:top0.06`.

    `unit_map` is a path to a saved unit map or a loaded `UnitMap`; the selection grammar is the units
    package's (`select_units`). The returned dict can be passed as `frozen=` or `trainable=` to `train`.
    A map computed for another architecture is refused (`UnitMap.check_model`).
    """
    from safeunits.units.selection import select_units, unit_parameter_masks
    from safeunits.units.unit_map import UnitMap

    umap = UnitMap.load(unit_map) if isinstance(unit_map, (str, bytes)) or hasattr(unit_map, "__fspath__") else unit_map
    umap.check_model(model)
    return unit_parameter_masks(model, select_units(umap, spec))
