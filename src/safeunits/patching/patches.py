"""Dense patches δ = θ_trained − θ_B: the safety patch (gradient ascent) and the over-safety patch (descent).

A patch folder holds `delta.safetensors` (δ per parameter), `saliency.safetensors` (SNIP scores on the
patched model θ_B + δ, SafePatching's choice) and `manifest.json` (backbone fingerprint, data,
hyper-parameters, steps run, why training stopped). The backbone is restored bit-for-bit afterwards.

δ is stored in float32 whatever the model's dtype (`weight_delta`). For a bf16 model, a difference taken in
bf16 is rounded to 8 significant bits (a weight crossing zero, 0.0107 -> -0.0003, loses its low bits), and a
bf16 δ could not be merged with α, β or added back without a second rounding. In float32 the difference of
two bf16 values is exact whenever their magnitudes are within 2^15 of each other (or one is zero) -- every
weight an optimizer step moves by less than 2^15 times its size -- so θ_B + δ gives back the trained bf16
weights bit for bit (`apply.apply_patch` adds in float64 and rounds once). The file costs 4 bytes per
parameter, twice the bf16 model; merged patches are sparse (`patching.sparse`). The backbone copy kept
during training lives on the CPU, so a GPU holds only what training needs (docs/scale.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config
from safeunits.data.records import Record
from safeunits.errors import UserFileNotFoundError
from safeunits.io import open_safetensors, read_json, save_safetensors, write_json
from safeunits.models.signature import architecture_description, model_fingerprint
from safeunits.patching.saliency import SaliencyConfig, patchable_parameters, snip_saliency
from safeunits.train.objectives import get_objective

DELTA_FILE, SALIENCY_FILE, MANIFEST_FILE = "delta.safetensors", "saliency.safetensors", "manifest.json"

# Defaults chosen for SmolLM2-135M on CPU (see docs/patching.md); every field is overridable.
DEFAULT_TRAIN: dict[str, Any] = dict(lr=2e-5, epochs=1, max_steps=40, batch_size=4, grad_accum=1, weight_decay=0.0,
                                     warmup_ratio=0.0, scheduler="constant", max_length=256, seed=0)
# bounded ascent: stop as soon as the harmful responses' NLL passes the bound, or after the step budget
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {"ascent": dict(stop_nll_above=6.0)}
# Why `saliency_on="backbone"` is refused (issue 24, B1): on θ_B both patches see the same weights, the same D_h and
# the same response NLL L (ascent maximises L, descent minimises it, and |θ ⊙ ∇(−L)| = |θ ⊙ ∇L|), so their SNIP maps
# are identical and both difference sets top-a \ top-b, top-b \ top-a are empty at a = b: the merge changes nothing.
BACKBONE_SALIENCY_REFUSED = (
    "saliency_on='backbone' scores both patches with the same signal: on the backbone the safety and over-safety "
    "patches share weights, data and loss (|θ ⊙ ∇(−L)| = |θ ⊙ ∇L|), so the two SNIP maps are identical and the merge "
    "keeps no weight at a = b. SafePatching scores each patch on its own patched model: use 'patched'")
PATCH_KINDS = {"ascent": "safety (SE)", "descent": "over-safety (OSM)", "npo": "NPO"}  # manifest "kind" per objective


class PatchConfig(Config):
    """How one patch is derived from the backbone."""

    objective: str = Field(..., description="a registered training objective (train.objectives): 'ascent' gives "
                                            "δ_SE (unlearn harmful answers), 'descent' δ_OSM, 'npo' the NPO baseline")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields overriding DEFAULT_TRAIN "
                                                                    "and OBJECTIVE_DEFAULTS[objective]")
    saliency_on: Literal["patched", "backbone"] = Field(
        "patched", description="SNIP on θ_B + δ, each patch on its own trained weights (SafePatching's choice); "
                               "'backbone' is refused (it gives both patches the same scores)")
    saliency: SaliencyConfig = Field(default_factory=SaliencyConfig)

    @field_validator("saliency_on")
    @classmethod
    def _own_signal(cls, on: str) -> str:
        if on == "backbone":
            raise ValueError(BACKBONE_SALIENCY_REFUSED)
        return on

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, name: str) -> str:
        get_objective(name)
        return name

    def train_config(self):
        from safeunits.train.engine import TrainConfig

        return TrainConfig(**{**DEFAULT_TRAIN, **OBJECTIVE_DEFAULTS.get(self.objective, {}), **self.train,
                              "objective": self.objective})


class DensePatch:
    """A patch folder read lazily: tensors come from memory-mapped safetensors one at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        for f in (DELTA_FILE, MANIFEST_FILE):
            if not (self.folder / f).is_file():
                raise UserFileNotFoundError(f"{self.folder / f} missing: not a patch folder written by `safeunits patch derive`")
        self.manifest: dict[str, Any] = read_json(self.folder / MANIFEST_FILE)
        self._delta = open_safetensors(self.folder / DELTA_FILE)
        sal = self.folder / SALIENCY_FILE
        self._saliency = open_safetensors(sal) if sal.is_file() else None

    @property
    def names(self) -> list[str]:
        return list(self._delta.keys())

    @property
    def signature(self) -> dict[str, Any]:
        return self.manifest["signature"]

    def delta(self, name: str) -> torch.Tensor:
        return self._delta.get_tensor(name)

    def saliency(self, name: str) -> torch.Tensor:
        if self._saliency is None:
            raise FileNotFoundError(f"{self.folder / SALIENCY_FILE} missing: derive the patch with saliency")
        return self._saliency.get_tensor(name)


def derive_patch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    config: PatchConfig,
    out_dir: str | Path,
    *,
    data_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> DensePatch:
    """Train a copy of the weights with `config.objective` on D_h, save δ + SNIP saliency + manifest, restore θ_B."""
    from safeunits.train.engine import train

    if not records or any(not r.response for r in records):
        raise ValueError("patches are derived from harmful prompts WITH harmful responses; build them with "
                         "`safeunits patch harmful-data`")
    tconf = config.train_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = patchable_parameters(model, config.saliency.exclude)
    fingerprint = model_fingerprint(model)
    signature = architecture_description(model)
    backbone = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    sal_config = config.saliency.model_copy(update={"system_prompt": config.saliency.system_prompt or tconf.system_prompt})
    try:
        started = time.time()
        result = train(model, tokenizer, records, tconf, progress=progress)
        seconds = time.time() - started
        with torch.no_grad():
            delta = {n: weight_delta(p.detach().cpu(), backbone[n]) for n, p in params.items()}
        for n, d in delta.items():
            if not torch.isfinite(d).all():
                raise FloatingPointError(f"{config.objective} produced non-finite weights in {n}: lower the lr "
                                         "or the ascent bound")
        saliency = snip_saliency(model, tokenizer, records, sal_config, progress=progress)  # on θ_B + δ
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(backbone[n])
        model.zero_grad(set_to_none=True)
        model.eval()
    manifest = {
        "kind": PATCH_KINDS.get(config.objective, config.objective),
        "objective": config.objective,
        "backbone_fingerprint": fingerprint,
        "model_type": signature["model_type"],
        "data": data_info or {"n_records": len(records)},
        "config": config.model_dump(mode="json"),
        "train_config": tconf.model_dump(mode="json"),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "losses": list(result.losses),
        "stopped_reason": result.stopped_reason,
        "train_seconds": seconds,
        "delta_norm": float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values()))),
        "signature": signature,
    }
    return save_dense_patch(out, delta, saliency, manifest)


def weight_delta(trained: torch.Tensor, backbone: torch.Tensor) -> torch.Tensor:
    """θ_trained − θ_B in float32, from the stored values (a float32 subtraction rounds the exact difference once)."""
    return trained.float() - backbone.float()


def save_dense_patch(out_dir: str | Path, delta: dict[str, torch.Tensor], saliency: dict[str, torch.Tensor] | None,
                     manifest: dict[str, Any]) -> DensePatch:
    """Write a patch folder (each file atomically); `manifest` must carry `signature` and `backbone_fingerprint`."""
    for key in ("signature", "backbone_fingerprint"):
        if key not in manifest:
            raise ValueError(f"a patch manifest needs {key!r}")
    out = Path(out_dir)
    save_safetensors(out / DELTA_FILE, delta, {"format": "safeunits.dense-patch/1"})
    if saliency is not None:
        if set(saliency) != set(delta):
            raise ValueError("saliency and delta must cover the same tensors")
        save_safetensors(out / SALIENCY_FILE, saliency, {"on": str(manifest.get("config", {}).get("saliency_on"))})
    write_json(out / MANIFEST_FILE, manifest)
    return DensePatch(out)
