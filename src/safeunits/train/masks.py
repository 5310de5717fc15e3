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
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class MaskError(ValueError):
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
class MaskedUpdate:
    """Enforces "may change" masks during training: zero masked gradients, restore frozen entries after a step."""

    model: nn.Module
    may_change: dict[str, torch.Tensor] | None
    _partial: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list, init=False)
    _disabled: list[nn.Parameter] = field(default_factory=list, init=False)
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
        for param in {id(p): p for p in params.values()}.values():
            keep = seen[id(param)]
            n_keep = int(keep.sum())
            trainable += n_keep
            if n_keep == 0:
                full += 1
                if param.requires_grad:
                    param.requires_grad_(False)
                    self._disabled.append(param)
            elif n_keep < keep.numel():
                frozen = ~keep
                self._partial.append((param, keep, frozen, param.detach().masked_select(frozen)))
                partial += 1
        self.stats = MaskStats(total, trainable, full, partial)
        if trainable == 0:
            raise MaskError("the masks freeze every weight of the model: nothing would train")

    def refresh(self) -> None:
        """Re-read the frozen values (after a checkpoint was loaded into the model)."""
        self._partial = [(p, keep, frozen, p.detach().masked_select(frozen)) for p, keep, frozen, _ in self._partial]

    def mask_gradients(self) -> None:
        """Zero the gradient of every frozen entry, so clipping and Adam moments never see it."""
        for param, _, frozen, _ in self._partial:
            if param.grad is not None:
                param.grad.masked_fill_(frozen, 0.0)

    def hook_gradients(self) -> list[RemovableHandle]:
        """Zero frozen gradient entries as autograd produces them: `mask_gradients` for loops this code does not own.

        Parameters that do not require grad get no hook (they receive no gradient); remove the returned handles
        to uninstall."""
        return [param.register_hook(functools.partial(torch.Tensor.masked_fill, mask=frozen, value=0.0))
                for param, _, frozen, _ in self._partial if param.requires_grad]

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved values back into frozen entries (undoes weight decay and any optimizer drift)."""
        for param, _, frozen, saved in self._partial:
            param.data.masked_scatter_(frozen, saved)

    def release(self) -> None:
        """Give fully frozen parameters their `requires_grad` back after training."""
        for param in self._disabled:
            param.requires_grad_(True)
        self._disabled = []


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
