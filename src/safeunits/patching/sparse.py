"""Sparse patch artifacts: per-tensor flat indices + values in safetensors, with a JSON manifest.

A merged SafePatching patch touches a few per cent of the weights, so it is stored sparse: for each
parameter tensor the flat indices it changes (int32 when the tensor is small enough, else int64) and
the values to *add* there. The architecture description (model type + every tensor's shape, see
``models.signature``) travels with the patch so it can refuse a wrong checkpoint before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safeunits.errors import UserFileNotFoundError, UserValueError
from safeunits.io import open_safetensors, read_json, safetensors_errors, save_safetensors, write_json
from safeunits.models.signature import ArchitectureMismatchError, check_fits

PATCH_FILE = "patch.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "safeunits.sparse-patch/1"
_IDX, _VAL = "::indices", "::values"


PatchMismatchError = ArchitectureMismatchError  # the name patch code has always raised and caught


@dataclass
class SparseTensorDelta:
    """Additive change to one tensor: `tensor.view(-1)[indices] += values`."""

    indices: torch.Tensor  # int32/int64, sorted, unique
    values: torch.Tensor  # float32 (added exactly, then rounded once to the tensor's dtype: patching.apply)
    shape: tuple[int, ...]

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class SparsePatch:
    """A set of additive sparse deltas keyed by parameter name, plus a manifest describing its origin."""

    deltas: dict[str, SparseTensorDelta]
    signature: dict[str, Any]  # models.signature.architecture_description of the backbone
    manifest: dict[str, Any] = field(default_factory=dict)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, dense: dict[str, torch.Tensor], signature: dict[str, Any], manifest: dict[str, Any] | None = None
    ) -> "SparsePatch":
        """Keep the non-zero entries of dense deltas (e.g. M ⊙ δ already masked and scaled)."""
        deltas = {}
        for name, t in dense.items():
            flat = t.detach().reshape(-1)
            idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
            deltas[name] = SparseTensorDelta(_index_dtype(idx, flat.numel()), flat[idx].to(torch.float32).clone(), tuple(t.shape))
        return cls(deltas, signature, dict(manifest or {}))

    # --- algebra ------------------------------------------------------------------------------
    def scaled(self, factor: float) -> "SparsePatch":
        """The same patch times a scalar (factor -1 gives the negation, for undoing)."""
        return SparsePatch({n: SparseTensorDelta(d.indices, d.values * factor, d.shape) for n, d in self.deltas.items()},
                           self.signature, {**self.manifest, "scaled_by": factor})

    def __add__(self, other: "SparsePatch") -> "SparsePatch":
        """Compose two patches of the same architecture (values summed where both touch a weight)."""
        check_fits(self.signature, other.signature, what="patch", on="the patch it is added to")
        out = dict(self.deltas)
        for name, d in other.deltas.items():
            if name not in out:
                out[name] = d
                continue
            mine = out[name]
            idx = torch.cat([mine.indices.long(), d.indices.long()])
            val = torch.cat([mine.values, d.values])
            uniq, inv = torch.unique(idx, return_inverse=True)
            summed = torch.zeros(uniq.numel(), dtype=torch.float32).index_add_(0, inv, val)
            out[name] = SparseTensorDelta(_index_dtype(uniq, mine.numel), summed, mine.shape)
        return SparsePatch(out, self.signature, {"composed_of": [self.manifest, other.manifest]})

    def to_dense(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        d = self.deltas[name]
        flat = torch.zeros(d.numel, dtype=dtype)
        flat[d.indices.long()] = d.values.to(dtype)
        return flat.view(d.shape)

    # --- statistics ---------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return sum(d.nnz for d in self.deltas.values())

    def kept_fraction(self) -> float:
        """Share of all backbone parameters that the patch touches."""
        total = sum(_numel(s) for s in self.signature["shapes"].values()) or 1
        return self.nnz / total

    # --- persistence ----------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write `patch.safetensors` + `manifest.json` into `out_dir` (each file atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, d in self.deltas.items():
            tensors[name + _IDX] = d.indices
            tensors[name + _VAL] = d.values
        meta = {"format": FORMAT, "signature": json.dumps(self.signature, sort_keys=True),
                "shapes": json.dumps({n: list(d.shape) for n, d in self.deltas.items()})}
        save_safetensors(out / PATCH_FILE, tensors, meta)
        write_json(out / MANIFEST_FILE, {"format": FORMAT, **self.manifest, "nnz": self.nnz,
                                         "kept_fraction": self.kept_fraction(),
                                         "tensors": {n: d.nnz for n, d in self.deltas.items()}})
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparsePatch":
        """Read a patch folder (or its `patch.safetensors`)."""
        path = Path(path)
        file = path / PATCH_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserFileNotFoundError(f"{file} does not exist (expected a patch folder written by `safeunits patch merge`)")
        with open_safetensors(file) as fh, safetensors_errors(file):
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise UserValueError(f"{file} is not a safeunits sparse patch (format {meta.get('format')!r})",
                                     hint="pass a folder written by `safeunits patch merge`")
            shapes = json.loads(meta["shapes"])
            deltas = {n: SparseTensorDelta(fh.get_tensor(n + _IDX), fh.get_tensor(n + _VAL), tuple(s))
                      for n, s in shapes.items()}
            signature = json.loads(meta["signature"])
        manifest_path = file.parent / MANIFEST_FILE
        manifest = read_json(manifest_path) if manifest_path.is_file() else {}
        for name, d in deltas.items():
            if not torch.isfinite(d.values).all():
                raise ValueError(f"{file}: patch values for {name} contain NaN or inf")
        return cls(deltas, signature, manifest)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _index_dtype(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """int32 indices when the tensor allows it: halves the file size of the index half of the patch."""
    return idx.to(torch.int32) if numel < 2**31 else idx.to(torch.int64)

