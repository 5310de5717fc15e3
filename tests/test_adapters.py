"""Architecture adapters: the declared unit slices must act on the model the way a unit is defined.

Checks are functional, not a restatement of the layout: zeroing a unit's *input-side* weights must
silence exactly that channel / head at the output projection's input, observed with a hook.
"""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILY_CONFIGS, VOCAB, tiny_model

from safeunits.models.adapters import get_adapter
from safeunits.units.selection import UnitSelection, unit_parameter_masks

FAMILIES = sorted(FAMILY_CONFIGS)


def _out_inputs(model, adapter, kind: str, ids: torch.Tensor) -> list[torch.Tensor]:
    """The input X of every layer's output projection (down proj or attention out proj)."""
    seen: list[torch.Tensor] = []
    hooks = [adapter.out_module(l, kind).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
             for l in range(adapter.n_layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _zero_input_side(model, adapter, layer: int, kind: str, unit: int, shared_kv: str = "none") -> None:
    """Zero only the weights that feed the unit (everything except the output projection)."""
    params = dict(model.named_parameters())
    out_name = [n for n, p in model.named_parameters() if p is adapter.out_module(layer, kind).weight][0]
    with torch.no_grad():
        for s in adapter.unit_slices(layer, kind, shared_kv):
            if s.name != out_name:
                params[s.name].index_fill_(s.dim, s.index[unit], 0.0)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB - 3, (2, 7), generator=torch.Generator().manual_seed(1))


def test_geometry_and_param_counts(family):
    model = tiny_model(family)
    a = get_adapter(model)
    assert (a.n_layers, a.n_heads, a.head_dim, a.n_channels) == (2, 4, 8, 48)
    hidden = 32
    bias = family in ("gpt2", "gpt_neox", "opt")
    gated = family in ("llama", "mistral", "qwen2", "gemma", "phi3")
    assert a.unit_params("mlp") == hidden * (3 if gated else 2) + (1 if bias else 0)
    mha = a.n_kv_heads == a.n_heads
    qkv_parts = 3 if mha else 1
    expected_head = 8 * hidden * (1 + qkv_parts) + (8 * qkv_parts if (bias or family == "qwen2") else 0)
    assert a.unit_params("head") == expected_head


def test_mlp_channel_input_side_silences_exactly_that_channel(family):
    model = tiny_model(family)
    a = get_adapter(model)
    ids = _ids()
    before = _out_inputs(model, a, "mlp", ids)
    _zero_input_side(model, a, 1, "mlp", 5)
    after = _out_inputs(model, a, "mlp", ids)
    assert torch.equal(before[0], after[0])  # earlier layer untouched
    others = [j for j in range(a.n_channels) if j != 5]
    assert torch.equal(after[1][..., 5], torch.zeros_like(after[1][..., 5]))
    assert torch.allclose(after[1][..., others], before[1][..., others], atol=0, rtol=0)
    assert before[1][..., 5].abs().sum() > 0


def test_head_input_side_touches_exactly_that_head(family):
    model = tiny_model(family)
    a = get_adapter(model)
    ids = _ids()
    d = a.head_dim
    before = _out_inputs(model, a, "head", ids)
    # with shared K/V given to the group, zeroing V silences the whole group; without, only q changes this head
    _zero_input_side(model, a, 1, "head", 2, shared_kv="group")
    after = _out_inputs(model, a, "head", ids)
    group = a.n_heads // a.n_kv_heads
    silenced = [h for h in range(a.n_heads) if h // group == 2 // group]
    for h in range(a.n_heads):
        cols = slice(h * d, (h + 1) * d)
        if h in silenced:
            assert after[1][..., cols].abs().max() < 1e-6, (family, h)
        else:
            assert torch.equal(after[1][..., cols], before[1][..., cols]), (family, h)


def test_head_query_rows_change_only_that_head(family):
    model = tiny_model(family)
    a = get_adapter(model)
    ids = _ids()
    d = a.head_dim
    before = _out_inputs(model, a, "head", ids)
    params = dict(model.named_parameters())
    # first input-side slice of a head is its query rows (or fused qkv rows starting with q)
    q_slice = [s for s in a.head_slices(1) if s.name != [n for n, p in model.named_parameters()
                                                          if p is a.attn_out(1).weight][0]][0]
    q_rows = q_slice.index[1, :d]  # the head's query rows come first in every layout
    with torch.no_grad():
        params[q_slice.name].index_fill_(q_slice.dim, q_rows, 0.0)
    after = _out_inputs(model, a, "head", ids)
    for h in range(a.n_heads):
        cols = slice(h * d, (h + 1) * d)
        same = torch.equal(after[1][..., cols], before[1][..., cols])
        assert same == (h != 1), (family, h)


def test_units_partition_their_weights(family):
    """Every unit's weights are disjoint (shared K/V excluded by default) and masks count unit_params."""
    model = tiny_model(family)
    a = get_adapter(model)
    all_units = UnitSelection(mlp={l: list(range(a.n_channels)) for l in range(2)},
                              heads={l: list(range(a.n_heads)) for l in range(2)})
    masks = unit_parameter_masks(model, all_units)
    total = sum(int(m.sum()) for m in masks.values())
    assert total == 2 * (a.n_channels * a.unit_params("mlp") + a.n_heads * a.unit_params("head"))
    one = unit_parameter_masks(model, UnitSelection(mlp={1: [3]}, heads={0: [2]}))
    assert sum(int(m.sum()) for m in one.values()) == a.unit_params("mlp") + a.unit_params("head")
    for name, m in one.items():
        assert m.shape == dict(model.named_parameters())[name].shape


def test_masked_pruning_equals_zeroing_activations(family):
    """Zeroing all weights of a head and a channel == zeroing their activations at the output projection."""
    model = tiny_model(family)
    a = get_adapter(model)
    ids = _ids()
    d = a.head_dim
    sel = UnitSelection(mlp={0: [7]}, heads={1: [3]})

    def kill(kind, cols, layer):
        def hook(m, args):
            x = args[0].clone()
            x[..., cols] = 0
            return (x,)
        return a.out_module(layer, kind).register_forward_pre_hook(hook)

    hooks = [kill("mlp", [7], 0), kill("head", list(range(3 * d, 4 * d)), 1)]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in unit_parameter_masks(model, sel).items():
            params[name][m] = 0.0
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_names_supported():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("bloom", vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(NotImplementedError, match="supported model types: .*gpt2.*llama"):
        get_adapter(model)


def test_mask_index_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        unit_parameter_masks(model, UnitSelection(heads={0: [9]}))
    with pytest.raises(ValueError, match="layer 5"):
        unit_parameter_masks(model, UnitSelection(mlp={5: [0]}))
