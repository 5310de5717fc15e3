"""Unit masks for training: which weights may change, enforced on gradients and after every optimizer step.

Callers give masks as a dict from parameter name (as in `model.named_parameters()`) to a bool tensor of the
parameter's shape. Two modes, exactly one per run:

- `frozen`: True marks weights that must stay bit-identical (SSAH: freeze SCU (+ CU) while fine-tuning);
- `trainable`: True marks the only weights that may change (SSAH's alignment budget: train RU only);
  parameters absent from a `trainable` dict are frozen entirely.

`update_masks` turns them into one compact "frozen part" per parameter. A unit's weights are whole rows or whole
columns of a matrix (an MLP channel: a row of gate/up_proj, a column of down_proj; a head: rows of q/k/v, columns
of o_proj), so a frozen part is normally `FrozenLines(dim, index)`: gradients are zeroed with `index_fill`, and the
saved values are only the frozen rows/columns (`index_select`), written back with `index_copy_`. Any other
pattern falls back to `FrozenEntries` (a dense bool mask, `masked_fill` / `masked_scatter_`); both give the same
bits.

Why both gradient masking and restoring: masking the gradient keeps Adam's moments of frozen entries at
exactly zero, but AdamW's decoupled weight decay still shrinks every entry (`p -= lr * wd * p`) and a
mixed-precision or fused optimizer may touch them too. So after each step the frozen entries are written back
from a saved copy of their values, which makes bit-identity hold by construction whatever the optimizer does.
Parameters frozen entirely are taken out of the optimizer (`requires_grad=False`), costing nothing.

Under FSDP2 a parameter is a DTensor whose process holds one shard: `MaskedUpdate.shard` cuts every frozen part
the way the parameter is cut (`distribute_tensor` with the parameter's mesh and placements, no communication:
row indices are mapped to the local shard's rows, a dense mask is cut like the weight), and the gradient masking
and restoring act on the local shards, so the guarantee is the same.
"""

from __future__ import annotations

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


@dataclass(frozen=True, eq=False)
class FrozenLines:
    """Whole slices of a parameter along `dim` (rows: 0, columns: 1) that must not change: a unit's shape.

    Costs one index per frozen row/column instead of one byte per weight, and the gradient zeroing and the restore
    touch only the frozen slices.
    """

    dim: int
    index: torch.Tensor  # sorted, unique int64 positions along `dim`, on the parameter's device

    def count(self, shape: torch.Size) -> int:
        """How many entries of a tensor of `shape` are frozen."""
        return len(self.index) * (shape.numel() // shape[self.dim])

    def dense(self, shape: torch.Size) -> torch.Tensor:
        """The same frozen set as a bool mask (to merge with a dense part)."""
        return torch.zeros(shape, dtype=torch.bool, device=self.index.device).index_fill_(self.dim, self.index, True)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The frozen values of `tensor` (to save, then `put_` back)."""
        return tensor.index_select(self.dim, self.index)

    def put_(self, tensor: torch.Tensor, values: torch.Tensor) -> None:
        """Write values from `take` back into `tensor`, in place."""
        tensor.index_copy_(self.dim, self.index, values)

    def zero_(self, grad: torch.Tensor) -> None:
        """Zero the frozen entries of a gradient in place."""
        grad.index_fill_(self.dim, self.index, 0.0)

    def zeroed(self, grad: torch.Tensor) -> torch.Tensor:
        """A copy of `grad` with the frozen entries zeroed (a tensor hook must not modify its argument)."""
        return grad.index_fill(self.dim, self.index, 0.0)

    def local(self, param: torch.Tensor) -> FrozenLines:
        """The part of this process's shard of a DTensor `param`: frozen global positions mapped to local ones.

        A probe holding each position along `dim` is distributed like the parameter (other dims' shardings
        replaced by replication: they do not move positions along `dim`), so the mapping is exact for even,
        uneven and multi-dimensional meshes.
        """
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        n = param.shape[self.dim]
        view = [1] * param.dim()
        view[self.dim] = n
        probe = torch.arange(n, device=param.device).view(view)
        placements = [p if isinstance(p, Shard) and p.dim % param.dim() == self.dim else Replicate()
                      for p in param.placements]
        positions = distribute_tensor(probe, param.device_mesh, placements, src_data_rank=None).to_local().flatten()
        return FrozenLines(self.dim, torch.isin(positions, self.index.to(param.device)).nonzero().flatten())


@dataclass(frozen=True, eq=False)
class FrozenEntries:
    """Any other set of frozen entries: a bool mask of the parameter's shape (True = must not change)."""

    mask: torch.Tensor

    def count(self, shape: torch.Size) -> int:
        return int(self.mask.sum())

    def dense(self, shape: torch.Size) -> torch.Tensor:
        return self.mask

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.masked_select(self.mask)

    def put_(self, tensor: torch.Tensor, values: torch.Tensor) -> None:
        tensor.masked_scatter_(self.mask, values)

    def zero_(self, grad: torch.Tensor) -> None:
        grad.masked_fill_(self.mask, 0.0)

    def zeroed(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self.mask, 0.0)

    def local(self, param: torch.Tensor) -> FrozenEntries:
        """The mask cut like the DTensor `param` (locally, no communication)."""
        from torch.distributed.tensor import distribute_tensor

        return FrozenEntries(distribute_tensor(self.mask.to(param.device), param.device_mesh, param.placements,
                                               src_data_rank=None).to_local())


FrozenPart = FrozenLines | FrozenEntries


def frozen_part(mask: torch.Tensor) -> FrozenPart | None:
    """The compact form of a bool "frozen" mask: whole rows/columns/... as `FrozenLines`, else `FrozenEntries`.

    None when nothing is frozen. A mask is `FrozenLines(dim, ...)` exactly when its frozen entries fill whole
    slices along `dim` (the count of whole slices times the slice size equals the count of frozen entries).
    """
    n = int(mask.sum())
    if n == 0:
        return None
    for dim in range(mask.dim()):
        others = tuple(d for d in range(mask.dim()) if d != dim)
        whole = mask.all(dim=others) if others else mask
        index = whole.nonzero().flatten()
        lines = FrozenLines(dim, index)
        if lines.count(mask.shape) == n:
            return lines
    return FrozenEntries(mask)


def _all_frozen(param: torch.Tensor) -> FrozenPart:
    """Every entry of `param` frozen (a parameter left out of `trainable` masks)."""
    if param.dim() == 0:
        return FrozenEntries(torch.ones_like(param, dtype=torch.bool))
    return FrozenLines(0, torch.arange(param.shape[0], device=param.device))


def _union(a: FrozenPart, b: FrozenPart, shape: torch.Size) -> FrozenPart:
    """Entries frozen in either part (tied weights under two names: the stricter mask wins)."""
    if isinstance(a, FrozenLines) and isinstance(b, FrozenLines) and a.dim == b.dim:
        return FrozenLines(a.dim, torch.unique(torch.cat([a.index, b.index])))
    merged = frozen_part(a.dense(shape) | b.dense(shape))
    assert merged is not None  # both parts freeze something
    return merged


def update_masks(
    model: nn.Module,
    frozen: dict[str, torch.Tensor] | None = None,
    trainable: dict[str, torch.Tensor] | None = None,
) -> dict[str, FrozenPart] | None:
    """Turn `frozen` or `trainable` bool masks into the frozen part of each parameter (None: everything trains).

    Parameters absent from the result train entirely. Validates names, shapes and dtypes against the model so a
    unit map of another model fails loudly.
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
    out: dict[str, FrozenPart] = {}
    for name, param in params.items():
        mask = masks.get(name)
        if mask is not None:
            if mask.dtype != torch.bool:
                raise MaskError(f"mask for {name} has dtype {mask.dtype}; expected torch.bool")
            if tuple(mask.shape) != tuple(param.shape):
                raise MaskError(f"mask for {name} has shape {tuple(mask.shape)}; parameter is {tuple(param.shape)}")
            mask = mask.to(param.device)
        if frozen is not None:
            part = None if mask is None else frozen_part(mask)
        else:
            part = _all_frozen(param) if mask is None else frozen_part(~mask)
        if part is not None:
            out[name] = part
    return out


@dataclass
class _Partial:
    """A partly frozen parameter: its frozen part and the frozen entries' values -- as this process's shard."""

    name: str
    param: nn.Parameter
    part: FrozenPart  # of the local shard under FSDP2
    saved: torch.Tensor  # the frozen entries' values (`part.take`)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this process updates in place: a DTensor's local shard (a view), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@dataclass
class MaskedUpdate:
    """Enforces frozen parts during training: zero their gradients, restore their values after a step.

    `frozen` is `update_masks`'s result (None: nothing frozen).
    """

    model: nn.Module
    frozen: dict[str, FrozenPart] | None
    _partial: list[_Partial] = field(default_factory=list, init=False)
    _disabled: dict[str, nn.Parameter] = field(default_factory=dict, init=False)  # name -> fully frozen parameter
    stats: MaskStats | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        total = sum(p.numel() for p in {id(p): p for p in params.values()}.values())
        if self.frozen is None:
            self.stats = MaskStats(total, total, 0, 0)
            return
        merged: dict[int, FrozenPart] = {}
        for name, param in params.items():
            part = self.frozen.get(name)
            if part is not None:  # tied weights (embeddings / lm_head): one tensor, the stricter mask wins
                seen = merged.get(id(param))
                merged[id(param)] = part if seen is None else _union(seen, part, param.shape)
        names = {id(p): n for n, p in reversed(list(params.items()))}  # the first name of each tensor
        trainable, full = total, 0
        for param in {id(p): p for p in params.values()}.values():
            part = merged.get(id(param))
            if part is None:
                continue
            n_frozen = part.count(param.shape)
            trainable -= n_frozen
            if n_frozen == param.numel():
                full += 1
                if param.requires_grad:
                    param.requires_grad_(False)
                    self._disabled[names[id(param)]] = param
            else:
                self._partial.append(_Partial(names[id(param)], param, part, part.take(param.detach())))
        self.stats = MaskStats(total, trainable, full, len(self._partial))
        if trainable == 0:
            raise MaskError("the masks freeze every weight of the model: nothing would train")

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-read the frozen values (after a checkpoint was loaded into the model)."""
        for entry in self._partial:
            entry.saved = entry.part.take(_local(entry.param.detach()))

    @torch.no_grad()
    def shard(self, model: nn.Module) -> None:
        """Follow the model's parameters after FSDP2 made them DTensors: frozen parts and saved values become local.

        Call it in every process right after sharding; the parts are cut locally (no communication).
        """
        from torch.distributed.tensor import DTensor

        params = dict(model.named_parameters(remove_duplicate=False))
        for entry in self._partial:
            param = params[entry.name]
            if isinstance(param, DTensor):
                entry.part = entry.part.local(param)
            entry.param = param
        self._disabled = {name: params[name] for name in self._disabled}
        self.refresh()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient of every frozen entry in place, so clipping and Adam moments never see it."""
        for entry in self._partial:
            if entry.param.grad is not None:
                entry.part.zero_(_local(entry.param.grad))

    def hook_gradients(self) -> list[RemovableHandle]:
        """Zero frozen gradient entries as autograd produces them: `mask_gradients` for loops this code does not own.

        Parameters that do not require grad get no hook (they receive no gradient); remove the returned handles
        to uninstall."""
        return [entry.param.register_hook(entry.part.zeroed) for entry in self._partial if entry.param.requires_grad]

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved values back into frozen entries (undoes weight decay and any optimizer drift)."""
        for entry in self._partial:
            entry.part.put_(_local(entry.param.data), entry.saved)

    def release(self) -> None:
        """Give fully frozen parameters their `requires_grad` back after training."""
        for param in self._disabled.values():
            param.requires_grad_(True)
        self._disabled = {}


def unit_masks(model: nn.Module, unit_map: str | object, spec: str) -> dict[str, torch.Tensor]:
    """Parameter masks (True = belongs to a selected unit) for a unit-map selection such as `scu+cu:top0.06`.

    `unit_map` is a path to a saved unit map or a loaded `UnitMap`; the selection grammar is the units
    package's (`resolve_target`: also `random:scu+cu@1`, a random set of the same size, as a control). The
    returned dict can be passed as `frozen=` or `trainable=` to `train`.
    A map computed for another architecture is refused (`UnitMap.check_model`).
    """
    from safeunits.units.selection import resolve_target, unit_parameter_masks
    from safeunits.units.unit_map import UnitMap

    umap = UnitMap.load(unit_map) if isinstance(unit_map, (str, bytes)) or hasattr(unit_map, "__fspath__") else unit_map
    umap.check_model(model)
    return unit_parameter_masks(model, resolve_target(umap, spec))
