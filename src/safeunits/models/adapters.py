"""Architecture adapters: which weights make an MLP channel and an attention head, per model family.

A **unit** (SPEC §2) is a structured slice of a transformer block:

- MLP channel ``j`` of layer ``l``: input column ``j`` of the down projection together with row ``j``
  (and bias entry ``j``) of every projection that feeds it (up, gate, or the fused ``gate_up``).
- attention head ``h``: the ``head_dim`` input columns of the attention output projection that
  read head ``h``, together with the matching rows (and bias entries) of the query projection,
  and of the key/value projections **when heads are not shared** (plain multi-head attention).

Grouped-query / multi-query attention (``num_key_value_heads < num_attention_heads``): a K/V row
is read by every query head of its group, so it belongs to no single head. By default such rows
belong to **no unit**: they are not counted in a head's parameters, not zeroed by pruning and not
covered by unit masks. Zeroing a head's output-projection columns already removes the head's
contribution entirely, so pruning stays exact. Callers that want the shared rows treated as part
of the group (e.g. to freeze them whenever any head of the group is frozen) pass
``shared_kv="group"`` to :meth:`ArchAdapter.head_slices` / ``units.selection.unit_parameter_masks``.

Output-projection biases are added after the heads/channels are summed, so they belong to no unit.

Adding a family is one :class:`FamilySpec` entry passed to :func:`register_family`. Fused layouts
are declared, not coded: ``qkv="concat"`` for ``[Q | K | V]`` stacked along the output dimension
(Phi-3 ``qkv_proj``, GPT-2 ``c_attn``), ``qkv="per_head"`` for GPT-NeoX's ``query_key_value`` where
each head's ``[q_h | k_h | v_h]`` rows are contiguous, and ``mlp_in_fused=2`` for Phi-3's
``gate_up_proj`` (``[gate | up]``). GPT-2's ``Conv1D`` stores weights transposed (``in x out``);
the adapter detects it per module, so slices always address the right dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn
from transformers import PreTrainedModel

from safeunits.errors import UnsupportedArchitectureError
from safeunits.registry import Registry

UnitKind = Literal["mlp", "head"]  # an MLP channel or an attention head: the one vocabulary of unit kinds
UNIT_KINDS: tuple[UnitKind, ...] = get_args(UnitKind)  # in storage and display order
SharedKV = Literal["none", "group"]


@dataclass(frozen=True)
class FamilySpec:
    """Declarative description of one model family; module paths are relative to a decoder block."""

    model_types: tuple[str, ...]  # config.model_type values served by this entry
    layers: str  # path of the ModuleList of decoder blocks, from the model root
    mlp_out: str  # down projection (its input columns are the channels)
    mlp_in: tuple[str, ...]  # projections whose output rows feed the channels (up, gate, ...)
    attn_out: str  # attention output projection (its input column groups are the heads)
    q: str  # query projection, or the fused QKV projection when `qkv` is not "separate"
    k: str | None = None
    v: str | None = None
    qkv: Literal["separate", "concat", "per_head"] = "separate"
    mlp_in_fused: int = 1  # >1: each mlp_in module stacks this many [part_0 | part_1 | ...] blocks of channels


_FAMILIES: Registry[FamilySpec] = Registry("model type", error=UnsupportedArchitectureError)


def register_family(spec: FamilySpec) -> None:
    """Make every `model_type` of `spec` supported (replacing a previous entry of the same type)."""
    for model_type in spec.model_types:
        _FAMILIES.add(model_type, spec, replace=True)


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


_LLAMA_LIKE = FamilySpec(
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite"),
    layers="model.layers",
    mlp_out="mlp.down_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    attn_out="self_attn.o_proj",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
)
register_family(_LLAMA_LIKE)
register_family(FamilySpec(
    model_types=("phi3",), layers="model.layers", mlp_out="mlp.down_proj", mlp_in=("mlp.gate_up_proj",),
    attn_out="self_attn.o_proj", q="self_attn.qkv_proj", qkv="concat", mlp_in_fused=2,
))
register_family(FamilySpec(
    model_types=("gpt2",), layers="transformer.h", mlp_out="mlp.c_proj", mlp_in=("mlp.c_fc",),
    attn_out="attn.c_proj", q="attn.c_attn", qkv="concat",
))
register_family(FamilySpec(
    model_types=("gpt_neox",), layers="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h", mlp_in=("mlp.dense_h_to_4h",),
    attn_out="attention.dense", q="attention.query_key_value", qkv="per_head",
))
register_family(FamilySpec(
    model_types=("opt",), layers="model.decoder.layers", mlp_out="fc2", mlp_in=("fc1",),
    attn_out="self_attn.out_proj", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
))


@dataclass(frozen=True)
class ParamSlice:
    """Unit ``i`` owns ``param[..., index[i], ...]`` along dimension ``dim`` of the named parameter."""

    name: str  # full parameter name in model.named_parameters()
    dim: int
    index: torch.Tensor  # LongTensor [n_units, k]


def _is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D keeps its weight as (in_features, out_features)."""
    return type(module).__name__ == "Conv1D"


def _get(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"module {path!r} not found: the family entry does not match this model ({err})") from err


class ArchAdapter:
    """Unit geometry of one loaded model: hook points, weight slices and parameter counts per unit."""

    def __init__(self, model: PreTrainedModel, spec: FamilySpec):
        self.model = model
        self.spec = spec
        self.model_type: str = model.config.model_type
        self.layers: nn.ModuleList = _get(model, spec.layers)  # type: ignore[assignment]
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        cfg = model.config
        self.n_layers = len(self.layers)
        self.n_heads: int = _first_attr(cfg, ("num_attention_heads", "n_head"))
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        attn_in = self._in_features(self.attn_out(0))
        if attn_in % self.n_heads:
            raise ValueError(f"attention output projection input {attn_in} is not divisible by {self.n_heads} heads")
        self.head_dim = attn_in // self.n_heads
        self.n_channels = self._in_features(self.mlp_out(0))
        for l in range(self.n_layers):
            if self._in_features(self.mlp_out(l)) != self.n_channels or self._in_features(self.attn_out(l)) != attn_in:
                raise ValueError("layers of different widths are not supported (unit maps are [layers, units] arrays)")
        self._check_layout()

    # --- modules ---------------------------------------------------------------------------
    def block(self, layer: int) -> nn.Module:
        return self.layers[layer]

    def mlp_out(self, layer: int) -> nn.Module:
        """The down projection; its input is the activation X whose columns are the MLP channels."""
        return _get(self.layers[layer], self.spec.mlp_out)

    def attn_out(self, layer: int) -> nn.Module:
        """The attention output projection; its input is the concatenation of the heads' outputs."""
        return _get(self.layers[layer], self.spec.attn_out)

    def out_module(self, layer: int, kind: UnitKind) -> nn.Module:
        return self.mlp_out(layer) if kind == "mlp" else self.attn_out(layer)

    def n_units(self, kind: UnitKind) -> int:
        return self.n_channels if kind == "mlp" else self.n_heads

    def _in_features(self, module: nn.Module) -> int:
        w = module.weight
        return w.shape[0] if _is_transposed(module) else w.shape[1]

    def _out_dim(self, module: nn.Module) -> int:
        return 1 if _is_transposed(module) else 0

    def _pname(self, p: nn.Parameter) -> str:
        return self._names[id(p)]

    # --- weights -------------------------------------------------------------------------
    def out_weight(self, layer: int, kind: UnitKind) -> torch.Tensor:
        """The output projection's weight as (out_features, in_features), whatever its storage layout."""
        module = self.out_module(layer, kind)
        return module.weight.t() if _is_transposed(module) else module.weight

    def out_column_sq_norms(self, layer: int, kind: UnitKind) -> torch.Tensor:
        """‖W_{:,j}‖² for every input channel j of the output projection (float64)."""
        return self.out_weight(layer, kind).detach().double().pow(2).sum(0)

    # --- unit slices ----------------------------------------------------------------------
    def mlp_slices(self, layer: int) -> list[ParamSlice]:
        """Weight slices making up each MLP channel of `layer` (index rows = channels)."""
        c = self.n_channels
        j = torch.arange(c).unsqueeze(1)  # [C, 1]
        out = self.mlp_out(layer)
        slices = [ParamSlice(self._pname(out.weight), 1 - self._out_dim(out), j)]
        for path in self.spec.mlp_in:
            module = _get(self.layers[layer], path)
            parts = self.spec.mlp_in_fused
            idx = torch.cat([j + p * c for p in range(parts)], dim=1)  # [C, parts]
            slices.append(ParamSlice(self._pname(module.weight), self._out_dim(module), idx))
            if getattr(module, "bias", None) is not None:
                slices.append(ParamSlice(self._pname(module.bias), 0, idx))
        return slices

    def head_slices(self, layer: int, shared_kv: SharedKV = "none") -> list[ParamSlice]:
        """Weight slices making up each attention head of `layer` (index rows = heads).

        K/V rows are included when every head has its own (multi-head attention). Under grouped K/V
        they are shared and excluded, unless `shared_kv="group"`, which gives every head of a group
        its group's K/V rows (a row then appears under several heads).
        """
        h, d = self.n_heads, self.head_dim
        heads = torch.arange(h)
        own = (heads.unsqueeze(1) * d + torch.arange(d)).long()  # [H, d] rows/cols of head h
        kv_head = heads // (h // self.n_kv_heads) if self.n_kv_heads else heads
        kv_rows = (kv_head.unsqueeze(1) * d + torch.arange(d)).long()  # [H, d] K/V rows of head h's group
        include_kv = self.n_kv_heads == h or shared_kv == "group"
        out = self.attn_out(layer)
        slices = [ParamSlice(self._pname(out.weight), 1 - self._out_dim(out), own)]

        def add(module: nn.Module, idx: torch.Tensor) -> None:
            slices.append(ParamSlice(self._pname(module.weight), self._out_dim(module), idx))
            if getattr(module, "bias", None) is not None:
                slices.append(ParamSlice(self._pname(module.bias), 0, idx))

        block = self.layers[layer]
        layout = self.spec.qkv
        if layout == "separate":
            add(_get(block, self.spec.q), own)
            if include_kv:
                add(_get(block, self.spec.k), kv_rows)
                add(_get(block, self.spec.v), kv_rows)
        elif layout == "concat":  # rows [Q (h*d) | K (kv*d) | V (kv*d)]
            q_size, kv_size = h * d, self.n_kv_heads * d
            parts = [own] + ([kv_rows + q_size, kv_rows + q_size + kv_size] if include_kv else [])
            add(_get(block, self.spec.q), torch.cat(parts, dim=1))
        elif layout == "per_head":  # GPT-NeoX: rows [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], d rows each
            base = heads.unsqueeze(1) * 3 * d + torch.arange(d)
            parts = [base, base + d, base + 2 * d] if include_kv else [base]
            add(_get(block, self.spec.q), torch.cat(parts, dim=1).long())
        else:  # pragma: no cover - guarded by the Literal
            raise ValueError(f"unknown qkv layout {layout!r}")
        return slices

    def unit_slices(self, layer: int, kind: UnitKind, shared_kv: SharedKV = "none") -> list[ParamSlice]:
        return self.mlp_slices(layer) if kind == "mlp" else self.head_slices(layer, shared_kv)

    def unit_params(self, kind: UnitKind) -> int:
        """Parameters owned by one unit of this kind (the same in every layer; shared K/V rows excluded)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        total = 0
        for s in self.unit_slices(0, kind):
            p = params[s.name]
            total += s.index.shape[1] * (p.numel() // p.shape[s.dim])
        return total

    def _check_layout(self) -> None:
        """Fail early when the declared layout does not add up to the actual weight shapes."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for kind in UNIT_KINDS:
            for s in self.unit_slices(0, kind, "group"):
                size = params[s.name].shape[s.dim]
                if int(s.index.max()) >= size:
                    raise ValueError(f"{self.model_type}: unit layout overruns {s.name} (dim {s.dim} has {size})")
        if self.spec.qkv == "concat":
            fused = _get(self.layers[0], self.spec.q)
            rows = fused.weight.shape[self._out_dim(fused)]
            if rows != (self.n_heads + 2 * self.n_kv_heads) * self.head_dim:
                raise ValueError(f"{self.model_type}: fused QKV has {rows} rows, expected (H + 2 KV) x head_dim")

    def describe(self) -> dict:
        """Geometry summary for artifacts and error messages."""
        return {
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "n_channels": self.n_channels,
            "mlp_unit_params": self.unit_params("mlp"),
            "head_unit_params": self.unit_params("head"),
            "shared_kv": "excluded from units" if self.n_kv_heads < self.n_heads else "none (multi-head attention)",
        }


def _first_attr(cfg: object, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    raise ValueError(f"config has none of {names}")


def get_adapter(model: PreTrainedModel) -> ArchAdapter:
    """The adapter for `model`'s family; unsupported families get an error naming the supported ones."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported for unit attribution; supported model types: "
            f"{', '.join(supported_model_types())}. Add one with safeunits.models.adapters.register_family(FamilySpec(...))."
        )
    return ArchAdapter(model, _FAMILIES.get(model_type))
