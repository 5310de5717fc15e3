"""Apply sparse patches: in memory (with an exact undo), or streamed onto a checkpoint folder on disk.

Streaming writes each output safetensors shard tensor by tensor (the format is a JSON header followed
by raw bytes, and patching never changes a tensor's dtype or shape, so the header is known up front):
peak memory is one tensor plus the patch, whatever the model size. Every check (architecture, shapes,
finite values) runs before the first byte is written, and the output folder appears only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from safeunits.errors import UserFileNotFoundError, UserValueError
from safeunits.io import open_safetensors
from safeunits.models.loading import resolve_model
from safeunits.models.signature import ArchitectureMismatchError, check_fits
from safeunits.outdir import build_into
from safeunits.patching.sparse import SparsePatch

Undo = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (indices, original values)

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _patch_flat(flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float = 1.0) -> None:
    """flat[idx] = cast(flat[idx] + scale * values), rounded once to the storage dtype.

    `scale * values` is taken in float32, as `merge.combine_parts` scales, so a sweep applies the bits a merge
    saves. The sum is exact in float64 and then rounded once (`round_once`): a float32 sum rounded again to
    bf16 can land on a bf16 tie and round the wrong way (1 + 2^-8 + 2^-30 -> 1 instead of 1 + 2^-7). For
    float32 weights the result equals the float32 sum bit for bit (53 bits to 24 after an exact sum is innocuous).
    """
    idx = indices.long()
    vals = values if scale == 1.0 else values * scale
    flat[idx] = round_once(flat[idx].double() + vals.double(), flat.dtype)


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `x` rounded to nearest (ties to even) in `dtype` with a single rounding.

    torch casts float64 to bf16/fp16 through float32, which rounds twice. Rounding to *odd* in float32 first
    (truncate, set the last bit when inexact) and then to nearest is exact-once, because float32 keeps at least
    two more bits than bf16 (8) or fp16 (11).
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    bits = x.float().view(torch.int32)
    bits = torch.where(bits.view(torch.float32).double().abs() > x.abs(), bits - 1, bits)  # truncate toward zero
    bits = torch.where(bits.view(torch.float32).double() != x, bits | 1, bits)  # inexact: odd last bit
    return bits.view(torch.float32).to(dtype)


def apply_patch(model: PreTrainedModel, patch: SparsePatch, *, scale: float = 1.0, check: bool = True) -> Undo:
    """Add `scale * patch` to the model's weights in place; return what `undo_patch` needs to restore them exactly."""
    params = dict(model.named_parameters())
    if check:
        check_fits(patch.signature, model, what="patch", names=patch.deltas)
    undo: Undo = {}
    with torch.no_grad():
        for name, d in patch.deltas.items():
            if name not in params:
                raise ArchitectureMismatchError(f"patch tensor {name} is not a parameter of this model")
            flat = params[name].data.view(-1)
            undo[name] = (d.indices, flat[d.indices.long()].clone())
            _patch_flat(flat, d.indices, d.values, scale)
    return undo


def undo_patch(model: PreTrainedModel, undo: Undo) -> None:
    """Put back the original values saved by `apply_patch`: bit-identical restore."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (idx, original) in undo.items():
            params[name].data.view(-1)[idx.long()] = original


# --- streaming onto a checkpoint folder ------------------------------------------------------------


def _read_header(path: Path) -> tuple[dict, int]:
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


def checkpoint_description(folder: Path) -> dict:
    """Architecture description of a checkpoint folder, read from config.json and shard headers only (no weights)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserFileNotFoundError(f"{folder} is not a model folder (no config.json)")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise UserFileNotFoundError(f"{folder} has no .safetensors weights (pickled checkpoints are not loaded)")
    shapes = {}
    for shard in shards:
        with open_safetensors(shard):  # a corrupt or truncated shard is refused before anything is written
            header, _ = _read_header(shard)
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return {"model_type": json.loads(config_path.read_text()).get("model_type"), "shapes": shapes}


def apply_patch_to_checkpoint(
    source: str | os.PathLike,
    patches: list[SparsePatch] | SparsePatch,
    out_dir: str | os.PathLike,
    *,
    scales: list[float] | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Stream one or more patches (applied in order, each times its scale) onto a checkpoint; write a new folder.

    `source` is a model folder or a registered model name. Every patch is checked against the checkpoint's
    architecture before anything is written; the output folder is renamed into place only when complete.
    """
    patches = [patches] if isinstance(patches, SparsePatch) else list(patches)
    scales = scales or [1.0] * len(patches)
    if len(scales) != len(patches):
        raise ValueError(f"{len(scales)} scales for {len(patches)} patches")
    folder = Path(resolve_model(str(source)))
    if not folder.is_dir():
        raise UserFileNotFoundError(f"checkpoint {source!r} is not a local model folder",
                                    hint="patch apply streams a local model folder or a registered name")
    out = Path(out_dir)
    if out.resolve() == folder.resolve():
        raise UserValueError("the output folder must differ from the source checkpoint (the source is read while writing)")
    description = checkpoint_description(folder)
    for i, p in enumerate(patches):
        check_fits(p.signature, description, what=f"patch {i}" if len(patches) > 1 else "patch",
                   on=f"checkpoint {folder}", names=p.deltas)
        for name, d in p.deltas.items():
            if not torch.isfinite(d.values).all():
                raise ValueError(f"patch {i}: values for {name} are not finite")
    shards = sorted(folder.glob("*.safetensors"))

    def _write(tmp: Path) -> None:
        for item in folder.iterdir():
            if item.suffix != ".safetensors" and item.is_file():
                shutil.copy2(item, tmp / item.name)
        total = sum(len(_read_header(s)[0]) - ("__metadata__" in _read_header(s)[0]) for s in shards)
        bar = tqdm(total=total, desc="apply patch", unit="tensor", disable=not progress)
        for shard in shards:
            _stream_shard(shard, tmp / shard.name, patches, scales, bar)
        bar.close()

    return build_into(out, _write, force=force)


def _stream_shard(src: Path, dst: Path, patches: list[SparsePatch], scales: list[float], bar: tqdm) -> None:
    """Copy one safetensors shard tensor by tensor, patching those the patches touch; same header, same layout."""
    header, data_start = _read_header(src)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    raw_header = json.dumps(header, separators=(",", ":")).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    with src.open("rb") as fin, dst.open("wb") as fout, safe_open(str(src), framework="pt") as st:
        fout.write(struct.pack("<Q", len(raw_header)))
        fout.write(raw_header)
        written = 0
        for name in names:
            begin, end = header[name]["data_offsets"]
            if begin > written:  # keep any alignment gap the source file has
                fin.seek(data_start + written)
                _copy_bytes(fin, fout, begin - written)
            written = end
            touched = [(p.deltas[name], s) for p, s in zip(patches, scales) if name in p.deltas]
            if not touched:
                fin.seek(data_start + begin)
                _copy_bytes(fin, fout, end - begin)
            else:
                dtype = header[name]["dtype"]
                if dtype not in _ST_DTYPES:
                    raise ArchitectureMismatchError(f"cannot patch {name}: dtype {dtype} is not a float type")
                tensor = st.get_tensor(name).contiguous()
                flat = tensor.view(-1)
                for d, s in touched:
                    _patch_flat(flat, d.indices, d.values, s)
                buf = tensor.view(torch.uint8).numpy().tobytes()
                if len(buf) != end - begin:
                    raise RuntimeError(f"{name}: wrote {len(buf)} bytes, header says {end - begin}")
                fout.write(buf)
                del tensor, flat, buf
            bar.update(1)


def _copy_bytes(fin, fout, n: int, chunk: int = 1 << 24) -> None:
    while n > 0:
        block = fin.read(min(chunk, n))
        if not block:
            raise IOError("unexpected end of safetensors file")
        fout.write(block)
        n -= len(block)
