"""Unit scores against slow, obviously-correct references (all activations collected, then numpy)."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from tiny import FAMILY_CONFIGS, tiny_model, tiny_tokenizer

from safeunits.data.records import Record
from safeunits.models.adapters import get_adapter
from safeunits.models.chat import encode_pair
from safeunits.units.scores import RunningMoments, ScoreConfig, compute_scores
from safeunits.units.selection import UnitSelection, unit_parameter_masks

RECORDS = [
    Record("How do I bake bread?", "Mix flour, water, yeast and salt; knead; rest; bake at 230C."),
    Record("Name a prime.", "Seven."),
    Record("Tell me a story about a cat who learns to fly.", "Once upon a time a cat named Tom built wings from leaves."),
    Record("What is 2+2?", "Four, because two plus two makes four."),
    Record("Translate 'hello' to French.", "Bonjour."),
]


def _reference_activations(model, tokenizer, records, tokens="response", max_length=256):
    """Per example (batch of one), every output projection input at the selected token positions."""
    a = get_adapter(model)
    acts = {k: [[] for _ in range(a.n_layers)] for k in ("mlp", "head")}
    for r in records:
        pair = encode_pair(tokenizer, r.prompt, r.response, max_length=max_length)
        ids = torch.tensor([pair.input_ids])
        keep = np.array(pair.labels) != -100 if tokens == "response" else np.ones(len(pair.labels), bool)
        seen = {}
        hooks = [a.out_module(l, k).register_forward_pre_hook(
            lambda m, args, key=(k, l): seen.__setitem__(key, args[0][0].detach().numpy().astype(np.float64)))
            for k in ("mlp", "head") for l in range(a.n_layers)]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        for (k, l), x in seen.items():
            acts[k][l].append(x[keep])
    return a, {k: [np.concatenate(v) for v in layers] for k, layers in acts.items()}


def _reference_activation_scores(model, tokenizer, records, method, tokens="response", head_reduce="mean"):
    a, acts = _reference_activations(model, tokenizer, records, tokens)
    out = {}
    for kind in ("mlp", "head"):
        rows = []
        for l in range(a.n_layers):
            w = a.out_weight(l, kind).detach().numpy().astype(np.float64)  # (out, in)
            x = acts[kind][l]
            col = (w ** 2).sum(0)
            if method == "fluctuation":
                ch = x.var(axis=0) * col
            else:
                ch = np.sqrt((x ** 2).sum(0)) * np.sqrt(col)
            if kind == "head":
                ch = ch.reshape(a.n_heads, a.head_dim)
                ch = ch.mean(1) if head_reduce == "mean" else ch.sum(1)
            rows.append(ch)
        out[kind] = np.stack(rows)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("method", ["fluctuation", "wanda"])
def test_activation_scores_match_reference(family, method):
    model, tok = tiny_model(family), tiny_tokenizer()
    got = compute_scores(model, tok, RECORDS, ScoreConfig(method=method, batch_size=2), progress=False)
    ref = _reference_activation_scores(model, tok, RECORDS, method)
    for kind in ("mlp", "head"):
        np.testing.assert_allclose(got.scores[kind].numpy(), ref[kind], rtol=1e-5, atol=0)
    n_resp = sum(encode_pair(tok, r.prompt, r.response).n_loss_tokens for r in RECORDS)
    assert got.n_tokens == n_resp and got.n_examples == len(RECORDS)


def test_all_tokens_and_sum_reduce():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    cfg = ScoreConfig(tokens="all", head_reduce="sum", batch_size=3)
    got = compute_scores(model, tok, RECORDS, cfg, progress=False)
    ref = _reference_activation_scores(model, tok, RECORDS, "fluctuation", tokens="all", head_reduce="sum")
    for kind in ("mlp", "head"):
        np.testing.assert_allclose(got.scores[kind].numpy(), ref[kind], rtol=1e-5)
    # response-only differs from all tokens: the option is real
    resp = compute_scores(model, tok, RECORDS, ScoreConfig(head_reduce="sum"), progress=False)
    assert not np.allclose(resp.scores["mlp"].numpy(), got.scores["mlp"].numpy())


def test_batch_size_does_not_change_scores():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    a = compute_scores(model, tok, RECORDS, ScoreConfig(batch_size=1), progress=False)
    b = compute_scores(model, tok, RECORDS, ScoreConfig(batch_size=5), progress=False)
    for kind in ("mlp", "head"):
        np.testing.assert_allclose(a.scores[kind].numpy(), b.scores[kind].numpy(), rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
def test_snip_matches_reference(family):
    """Reference: full autograd gradient per example, then |W*G| summed over each unit's mask."""
    model, tok = tiny_model(family), tiny_tokenizer()
    records = RECORDS[:3]
    got = compute_scores(model, tok, records, ScoreConfig(method="snip"), progress=False)
    a = get_adapter(model)
    params = dict(model.named_parameters())
    names = list(params)
    sal = {n: np.zeros(tuple(params[n].shape)) for n in names}
    for r in records:
        pair = encode_pair(tok, r.prompt, r.response)
        ids, labels = torch.tensor([pair.input_ids]), torch.tensor([pair.labels])
        loss = model(input_ids=ids, labels=labels).loss
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                sal[n] += np.abs(params[n].detach().numpy().astype(np.float64) * g.numpy().astype(np.float64))
    for kind, key in (("mlp", "mlp"), ("head", "heads")):
        ref = np.zeros((a.n_layers, a.n_units(kind)))
        for l in range(a.n_layers):
            for u in range(a.n_units(kind)):
                masks = unit_parameter_masks(model, UnitSelection(**{key: {l: [u]}}))
                ref[l, u] = sum(sal[n][m.numpy()].sum() for n, m in masks.items())
        np.testing.assert_allclose(got.scores[kind].numpy(), ref, rtol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_running_moments_merge_and_cross_process_reduce():
    """Two fake processes, each with its shard, reduce to exactly the single-process statistics."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    single = compute_scores(model, tok, RECORDS, ScoreConfig(batch_size=1), progress=False)  # same activations

    class FakeAccelerator:
        slots: list = [None, None]
        barrier = threading.Barrier(2)

        def __init__(self, rank):
            self.process_index, self.num_processes = rank, 2

        def reduce(self, t, reduction="sum"):
            FakeAccelerator.slots[self.process_index] = t.clone()
            FakeAccelerator.barrier.wait()
            total = FakeAccelerator.slots[0] + FakeAccelerator.slots[1]
            FakeAccelerator.barrier.wait()
            return total

    results = [None, None]

    def run(rank):
        results[rank] = compute_scores(copy.deepcopy(model), tok, RECORDS, ScoreConfig(batch_size=1),
                                       accelerator=FakeAccelerator(rank), progress=False)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.n_tokens == single.n_tokens and r.n_examples == len(RECORDS)
        for kind in ("mlp", "head"):
            np.testing.assert_allclose(r.scores[kind].numpy(), single.scores[kind].numpy(), rtol=1e-9)


def test_running_moments_against_numpy():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(1000, 7)).astype(np.float32)
    rm = RunningMoments(7)
    for i in range(0, 1000, 37):
        rm.update(torch.from_numpy(data[i:i + 37]))
    np.testing.assert_allclose(rm.variance().numpy(), data.astype(np.float64).var(0), rtol=1e-10)
    np.testing.assert_allclose(rm.sumsq.numpy(), (data.astype(np.float64) ** 2).sum(0), rtol=1e-10)


def test_bad_input_errors():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="no response"):
        compute_scores(model, tok, [Record("x")], progress=False)
    with pytest.raises(ValueError, match="no records"):
        compute_scores(model, tok, [], progress=False)
    with torch.no_grad():
        get_adapter(model).mlp_out(0).weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        compute_scores(model, tok, RECORDS[:2], progress=False)


def test_every_family_scores():
    tok = tiny_tokenizer()
    for family in FAMILY_CONFIGS:
        s = compute_scores(tiny_model(family), tok, RECORDS[:2], progress=False)
        assert s.scores["mlp"].shape == (2, 48) and s.scores["head"].shape == (2, 4)
        assert (s.scores["mlp"] > 0).all()


def test_real_accelerator_single_process():
    from accelerate import Accelerator

    model, tok = tiny_model("llama"), tiny_tokenizer()
    acc = Accelerator(cpu=True)
    wrapped = acc.prepare(copy.deepcopy(model))
    got = compute_scores(wrapped, tok, RECORDS, ScoreConfig(batch_size=2), accelerator=acc, progress=False)
    ref = compute_scores(model, tok, RECORDS, ScoreConfig(batch_size=2), progress=False)
    for kind in ("mlp", "head"):
        np.testing.assert_allclose(got.scores[kind].numpy(), ref.scores[kind].numpy(), rtol=1e-6)
