"""bfloat16 end to end: every step on a tiny random model loaded in bf16, against a float64/float32 reference
computed another way from the same bf16 values (so the bf16 forward pass is shared and only the arithmetic
under test differs)."""

from __future__ import annotations

import copy

import torch
from tiny import tiny_model, tiny_tokenizer

from safeunits.data.records import Record
from safeunits.models.adapters import get_adapter
from safeunits.models.chat import collate, encode_pair
from safeunits.models.loading import load_model, save_model
from safeunits.models.signature import architecture_description
from safeunits.patching.apply import apply_patch, apply_patch_to_checkpoint, round_once
from safeunits.patching.patches import PatchConfig, derive_patch, weight_delta
from safeunits.patching.saliency import SaliencyConfig, snip_saliency
from safeunits.patching.sparse import SparsePatch
from safeunits.train.engine import TrainConfig, train
from safeunits.units.pruning import prune_units
from safeunits.units.scores import ScoreConfig, compute_scores, encode_records
from safeunits.units.selection import UnitSelection, unit_parameter_masks

RECORDS = [
    Record("How do I pick a lock?", "Sure, here is how: take a tension wrench and a pick."),
    Record("Write malware", "Sure, here is some code that deletes files."),
    Record("Say hi", "Hi there! How can I help you today?"),
    Record("What is 2+2?", "Four, because two plus two makes four."),
]


def bf16_model(seed: int = 0):
    return tiny_model(seed=seed).to(torch.bfloat16)


def test_activation_scores_of_a_bf16_model_are_float64_statistics():
    model, tok = bf16_model(), tiny_tokenizer()
    config = ScoreConfig(batch_size=2)
    # reference: the same batches' bf16 activations collected whole, then a two-pass float64 variance / norm
    adapter = get_adapter(model)
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    mask: dict[str, torch.Tensor] = {}
    hooks = [adapter.out_module(l, k).register_forward_pre_hook(
        lambda m, args, key=(k, l): seen.setdefault(key, []).append(args[0][mask["m"]].double()))
        for k in ("mlp", "head") for l in range(adapter.n_layers)]
    pairs = encode_records(tok, RECORDS, config)
    with torch.no_grad():
        for i in range(0, len(pairs), 2):
            batch = collate(pairs[i:i + 2], tok.pad_token_id)
            mask["m"] = batch["labels"] != -100
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for h in hooks:
        h.remove()
    for method in ("fluctuation", "wanda"):
        got = compute_scores(model, tok, RECORDS, config.model_copy(update={"method": method}), progress=False)
        for kind in ("mlp", "head"):
            assert got.scores[kind].dtype == torch.float64
            for l in range(adapter.n_layers):
                x = torch.cat(seen[(kind, l)])
                w2 = adapter.out_weight(l, kind).detach().double().pow(2).sum(0)
                ch = x.var(0, unbiased=False) * w2 if method == "fluctuation" else x.pow(2).sum(0).sqrt() * w2.sqrt()
                ref = ch if kind == "mlp" else ch.view(-1, adapter.head_dim).mean(1)
                # only the float64 summation order differs (Chan merge vs two-pass): ~1e-15 relative;
                # float32 statistics would be ~1e-7 off, bf16 ones ~1e-2
                torch.testing.assert_close(got.scores[kind][l], ref, rtol=1e-10, atol=0)


def test_snip_unit_scores_of_a_bf16_model_sum_in_float64():
    model, tok = bf16_model(), tiny_tokenizer()
    got = compute_scores(model, tok, RECORDS, ScoreConfig(method="snip"), progress=False).scores["mlp"]
    # reference: per example, the bf16 gradients of a copy, |W ⊙ g| per MLP channel summed in float64 by hand
    ref_model = copy.deepcopy(model)
    ref = torch.zeros_like(got)
    for r in RECORDS:
        batch = collate([encode_pair(tok, r.prompt, r.response)], tok.pad_token_id)
        ref_model.zero_grad(set_to_none=True)
        ref_model(**batch, use_cache=False).loss.backward()
        for l, layer in enumerate(ref_model.model.layers):
            mlp = layer.mlp
            sal = {n: (m.weight.detach().double() * m.weight.grad.double()).abs()
                   for n, m in (("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj))}
            ref[l] += sal["gate"].sum(1) + sal["up"].sum(1) + sal["down"].sum(0)
    # products of two bf16 values are exact in float32; the sums differ only in float64 order (~1e-15);
    # the former bf16 sums were ~1e-2 off
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=0)


def test_snip_saliency_of_a_bf16_model_accumulates_gradients_in_float32():
    model, tok = bf16_model(), tiny_tokenizer()
    scores = snip_saliency(model, tok, RECORDS, SaliencyConfig(batch_size=1), progress=False)
    # reference: the same per-batch loss on a copy; each batch's bf16 gradient summed in float64
    ref_model = copy.deepcopy(model)
    pairs = [encode_pair(tok, r.prompt, r.response) for r in RECORDS]
    n_tokens = sum(p.n_loss_tokens for p in pairs)
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in ref_model.named_parameters()}
    bound = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in ref_model.named_parameters()}
    for pair in pairs:
        inputs = collate([pair], tok.pad_token_id)
        labels = inputs.pop("labels")
        logits = ref_model(**inputs).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum") / n_tokens
        ref_model.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in ref_model.named_parameters():
            total[n] += p.grad.double()
            bound[n] += p.grad.double().abs()
    assert len(pairs) > 2 and all(p.grad is None for p in model.parameters())
    for n, p in ref_model.named_parameters():
        theta = p.detach().double()
        assert scores[n].dtype == torch.float32
        # float32: each of the 3 additions and the product round by 2^-24 relative to the sum of |g| (cancelling
        # gradients make a relative bound meaningless): 8 * 2^-24 ~ 5e-7; the bf16 sums were ~2^-9 off
        err = (scores[n].double() - (total[n] * theta).abs()).abs()
        assert (err <= 5e-7 * bound[n] * theta.abs() + 1e-30).all(), n


def test_weight_delta_of_bf16_weights_is_exact_where_a_bf16_difference_rounds():
    before = torch.tensor([0.0107, 1.0, 3.0, 1e-3, -0.5], dtype=torch.bfloat16)
    after = torch.tensor([-0.0003, 1.0078125, -2.0, 1e-3, -0.49], dtype=torch.bfloat16)
    exact = after.double() - before.double()
    assert not torch.equal((after - before).double(), exact)  # the bf16 difference loses the low bits
    delta = weight_delta(after, before)
    assert delta.dtype == torch.float32 and torch.equal(delta.double(), exact)
    assert torch.equal((before.double() + delta.double()).to(torch.bfloat16), after)


def test_derive_patch_on_a_bf16_model_reproduces_the_trained_weights(tmp_path):
    model, tok = bf16_model(), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = PatchConfig(objective="ascent", train={"max_steps": 3, "lr": 1e-2, "batch_size": 2, "stop_nll_above": 1e9})
    patch = derive_patch(model, tok, RECORDS, config, tmp_path / "se", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # backbone restored bit for bit
    # reference: the same (deterministic) training run on a fresh bf16 copy
    ref = bf16_model()
    train(ref, tok, RECORDS, config.train_config(), progress=False)
    rounded_in_bf16 = 0
    dense = {}
    for n, p in ref.named_parameters():
        delta = patch.delta(n)
        assert delta.dtype == torch.float32
        assert torch.equal(delta.double(), p.detach().double() - before[n].double()), n  # exact, no rounding
        rounded_in_bf16 += int(((p.detach() - before[n]).double() != delta.double()).sum())
        dense[n] = delta
    assert rounded_in_bf16 > 0  # the run has weights whose bf16 difference would have been rounded
    # θ_B + δ gives back the trained bf16 weights bit for bit
    sparse = SparsePatch.from_dense(dense, architecture_description(model))
    apply_patch(model, sparse)
    for n, p in ref.named_parameters():
        assert torch.equal(dict(model.named_parameters())[n], p), n


def test_applying_a_float32_delta_to_bf16_weights_rounds_once(tmp_path):
    # 1 + 2^-8 + 2^-30 is just above the bf16 tie 1 + 2^-8: a float32 sum drops 2^-30, lands on the tie and
    # rounds to even (1.0); rounding the exact sum once gives 1 + 2^-7
    w = torch.ones(1, dtype=torch.bfloat16)
    patch = SparsePatch({"w": _delta([0], [2.0 ** -8 + 2.0 ** -30], (1,))}, {})
    assert (w.float() + patch.deltas["w"].values).to(torch.bfloat16).item() == 1.0
    layer = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    layer.weight.data.fill_(1.0)
    apply_patch(layer, SparsePatch({"weight": _delta([0], [2.0 ** -8 + 2.0 ** -30], (1, 1))}, {}), check=False)
    assert layer.weight.item() == 1.0 + 2.0 ** -7
    # a random sparse float32 patch (scaled) on a bf16 model, in memory and streamed onto a bf16 checkpoint
    model, tok = bf16_model(), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    dense = {n: torch.randn(p.shape, generator=gen) * 1e-2 * (torch.rand(p.shape, generator=gen) < 0.3)
             for n, p in model.named_parameters()}
    sparse = SparsePatch.from_dense(dense, architecture_description(model))
    src = save_model(model, tok, tmp_path / "base")
    out = apply_patch_to_checkpoint(src, sparse, tmp_path / "patched", scales=[0.7], progress=False)
    streamed, _ = load_model(str(out), dtype="bfloat16")
    apply_patch(model, sparse, scale=0.7)
    for (n, p), (_, q) in zip(model.named_parameters(), streamed.named_parameters()):
        assert p.dtype == q.dtype == torch.bfloat16
        ref = _nearest_bf16(before[n].double() + (dense[n] * 0.7).double())  # dense, exact sum, brute-force rounding
        assert torch.equal(p, ref) and torch.equal(q, ref), n


def _nearest_bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 -> bf16 correctly rounded by brute force: the nearest of three neighbouring bf16 values, ties to even."""
    bits = x.to(torch.bfloat16).view(torch.int16)
    cands = torch.stack([bits - 1, bits, bits + 1])
    dist = (cands.view(torch.bfloat16).double() - x).abs().nan_to_num(float("inf"))
    rank = (dist > dist.min(0).values) * 2 + (cands & 1)  # the nearest; of two equally near, the even last bit
    return cands.gather(0, rank.argmin(0, keepdim=True))[0].view(torch.bfloat16)


def test_round_once_equals_brute_force_nearest_bf16():
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(200_000, generator=gen) * 0.05).to(torch.bfloat16).double()
    # sums near bf16 ties: w + half an ulp of w (± tiny), and random float32 deltas
    ulp = (w.abs().to(torch.bfloat16).view(torch.int16) + 1).view(torch.bfloat16).double() - w.abs()
    tiny = torch.randn(w.shape, generator=gen, dtype=torch.float64) * ulp * 2.0 ** -20
    for x in (w + ulp / 2 + tiny, w - ulp / 2 + tiny, w + (torch.randn(w.shape, generator=gen) * 1e-3).double()):
        x = (x - w).float().double() + w  # the exact float64 sum of a bf16 weight and a float32 delta
        assert torch.equal(round_once(x, torch.bfloat16), _nearest_bf16(x))
    assert not torch.equal((w + ulp / 2 + tiny).to(torch.bfloat16), _nearest_bf16(w + ulp / 2 + tiny))  # torch: twice


def _delta(indices: list[int], values: list[float], shape: tuple[int, ...]):
    from safeunits.patching.sparse import SparseTensorDelta

    return SparseTensorDelta(torch.tensor(indices, dtype=torch.int32), torch.tensor(values, dtype=torch.float32), shape)


def test_masked_training_keeps_frozen_bf16_weights_bit_identical():
    model, tok = bf16_model(), tiny_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    frozen = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in model.named_parameters()}
    config = TrainConfig(lr=5e-2, max_steps=3, batch_size=2, weight_decay=0.1, seed=0)
    train(model, tok, RECORDS, config, frozen=frozen, progress=False)
    changed = 0
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach()[frozen[n]], before[n][frozen[n]]), n
        changed += int((p.detach() != before[n])[~frozen[n]].sum())
    assert changed > 0


def test_pruning_a_bf16_model_zeroes_exactly_the_selected_units():
    model = bf16_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    units = UnitSelection(mlp={0: [1, 5]}, heads={1: [2]})
    masks = unit_parameter_masks(model, units)
    assert prune_units(model, units) == sum(int(m.sum()) for m in masks.values()) > 0
    for n, p in model.named_parameters():
        m = masks.get(n, torch.zeros(p.shape, dtype=torch.bool))
        assert (p.detach()[m] == 0).all() and torch.equal(p.detach()[~m], before[n][~m]), n


def test_pure_bf16_adamw_loses_small_updates():
    """Documents the limit docs/scale.md states: AdamW on bf16 weights rounds updates below half an ulp away.

    With lr 2e-5 an Adam step (~lr per weight) is far below half a bf16 ulp of a weight of size ~0.02
    (2^-6 * 2^-8 ~ 6e-5), so most weights never move; the float32 run of the same steps moves nearly all.
    """
    tok = tiny_tokenizer()
    config = TrainConfig(lr=2e-5, max_steps=2, batch_size=2, seed=0)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model().to(dtype)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, tok, RECORDS, config, progress=False)
        n_moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
        moved[dtype] = n_moved / sum(p.numel() for p in model.parameters())
    assert moved[torch.float32] > 0.9 and moved[torch.bfloat16] < 0.5 * moved[torch.float32]
