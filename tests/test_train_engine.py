"""Training engine: response-only loss, accumulation, bit-identical masks, resume, NaN stop, ascent, NPO."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from safeunits.data.records import Record
from safeunits.models.chat import collate, encode_pair
from safeunits.train.engine import TrainConfig, TrainingDivergedError, latest_checkpoint, train
from safeunits.train.masks import MaskError
from tiny import tiny_model, tiny_tokenizer

RECORDS = [Record(prompt=f"Question number {i}: what is {i} plus {i}?", response=f"It is {2 * i}. " * (1 + i % 3))
           for i in range(12)]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-2, epochs=1, batch_size=4, max_length=96, seed=0, mixed_precision="no")
    return TrainConfig(**{**base, **kw})


def test_first_loss_is_response_only_mean_nll():
    """The step loss equals HF's own label loss on response-only labels (a different code path)."""
    model, tok = tiny_model(), tiny_tokenizer()
    batch = collate([encode_pair(tok, r.prompt, r.response, max_length=96) for r in RECORDS[:4]], tok.pad_token_id)
    with torch.no_grad():
        ref = model(**batch).loss.item()
    res = train(model, tok, RECORDS[:4], _cfg(max_steps=1, shuffle=False), progress=False)
    assert res.losses[0] == pytest.approx(ref, rel=1e-5)
    assert res.nlls[0] == pytest.approx(ref, rel=1e-5)


def test_grad_accum_matches_big_batch():
    a, b, tok = tiny_model(), tiny_model(), tiny_tokenizer()
    ra = train(a, tok, RECORDS, _cfg(batch_size=8, grad_accum=1, epochs=2), progress=False)
    rb = train(b, tok, RECORDS, _cfg(batch_size=4, grad_accum=2, epochs=2), progress=False)
    assert ra.steps == rb.steps == 4
    assert ra.losses == pytest.approx(rb.losses, rel=1e-4)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-5)


def test_descent_lowers_loss_and_is_deterministic():
    tok = tiny_tokenizer()
    m1, m2 = tiny_model(), tiny_model()
    r1 = train(m1, tok, RECORDS, _cfg(epochs=4), progress=False)
    r2 = train(m2, tok, RECORDS, _cfg(epochs=4), progress=False)
    assert r1.losses[-1] < r1.losses[0]
    assert r1.losses == r2.losses
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m1.state_dict().items())
    assert r1.tokens > 0 and r1.tokens_per_s > 0 and r1.stopped_reason == "completed"


def _random_masks(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """Partial masks on every 2-D weight (incl. the tied embedding under its lm_head alias) + one tensor fully."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.dim() == 2:
            masks[name] = torch.rand(p.shape, generator=gen) < 0.3
    masks["model.norm.weight"] = torch.ones_like(model.model.norm.weight, dtype=torch.bool)
    return masks


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_frozen_weights_bit_identical_and_the_rest_change(weight_decay):
    model, tok = tiny_model(), tiny_tokenizer()
    masks = _random_masks(model)
    before = dict(model.named_parameters(remove_duplicate=False))
    before = {k: v.detach().clone() for k, v in before.items()}
    res = train(model, tok, RECORDS, _cfg(epochs=2, weight_decay=weight_decay), frozen=masks, progress=False)
    assert res.mask["partially_frozen_tensors"] > 0 and res.mask["fully_frozen_tensors"] == 1
    tied = model.model.embed_tokens.weight
    frozen_tied = masks["lm_head.weight"] | masks.get("model.embed_tokens.weight", torch.zeros_like(tied, dtype=torch.bool))
    for name, p in model.named_parameters(remove_duplicate=False):
        m = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        if p is tied:
            m = frozen_tied
        assert torch.equal(p.detach()[m], before[name][m]), f"frozen entries of {name} moved"
        assert (p.detach()[~m] != before[name][~m]).all(), f"some trainable entries of {name} did not change"
    assert all(p.requires_grad for p in model.parameters())


def test_trainable_mode_changes_only_selected_weights():
    model, tok = tiny_model(), tiny_tokenizer()
    w = model.model.layers[0].mlp.down_proj.weight
    sel = torch.zeros_like(w, dtype=torch.bool)
    sel[:, :5] = True  # five MLP channels of layer 0 (columns of down_proj)
    before = _weights(model)
    train(model, tok, RECORDS, _cfg(epochs=2, weight_decay=0.1), trainable={"model.layers.0.mlp.down_proj.weight": sel},
          progress=False)
    after = model.state_dict()
    for k, v in before.items():
        if k == "model.layers.0.mlp.down_proj.weight":
            assert torch.equal(after[k][~sel], v[~sel]) and (after[k][sel] != v[sel]).all()
        else:
            assert torch.equal(after[k], v), k


def test_mask_errors():
    model, tok = tiny_model(), tiny_tokenizer()
    with pytest.raises(MaskError, match="not in the model"):
        train(model, tok, RECORDS, _cfg(), frozen={"nope.weight": torch.ones(2, dtype=torch.bool)}, progress=False)
    with pytest.raises(MaskError, match="shape"):
        train(model, tok, RECORDS, _cfg(), frozen={"model.norm.weight": torch.ones(3, dtype=torch.bool)}, progress=False)
    with pytest.raises(MaskError, match="either"):
        train(model, tok, RECORDS, _cfg(), frozen={}, trainable={}, progress=False)
    with pytest.raises(MaskError, match="every weight"):
        train(model, tok, RECORDS, _cfg(), trainable={}, progress=False)
    with pytest.raises(ValueError, match="no response"):
        train(model, tok, [Record(prompt="hi")], _cfg(), progress=False)


def test_resume_after_interrupt_equals_uninterrupted(tmp_path):
    tok = tiny_tokenizer()
    full = tiny_model()
    ref = train(full, tok, RECORDS, _cfg(epochs=3, weight_decay=0.1, warmup_ratio=0.2), progress=False)

    def interrupt(step: int, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    cfg = _cfg(epochs=3, weight_decay=0.1, warmup_ratio=0.2, checkpoint_dir=tmp_path, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), tok, RECORDS, cfg, progress=False, callback=interrupt)
    assert latest_checkpoint(tmp_path).name == "step-4"
    resumed = tiny_model()
    res = train(resumed, tok, RECORDS, cfg, progress=False)
    assert res.resumed_from == 4 and res.steps == ref.steps == 9
    assert res.losses == ref.losses
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())
    with pytest.raises(ValueError, match="different training config"):
        train(tiny_model(), tok, RECORDS, cfg.model_copy(update={"lr": 1e-3}), progress=False)


CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads({threads})
    from tiny import tiny_model, tiny_tokenizer
    from test_train_engine import RECORDS, _cfg
    from safeunits.train.engine import train
    def kill(step, loss):
        if step == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    train(tiny_model(), tiny_tokenizer(), RECORDS, _cfg(epochs=3, checkpoint_dir={ckpt!r}, checkpoint_every=1),
          progress=False, callback=kill)
""")


def test_resume_after_sigkill_in_another_process(tmp_path):
    """A real kill -9 mid-run: the restarted run ends with the weights of an uninterrupted one."""
    tests = str(Path(__file__).parent)
    code = CHILD.format(tests=tests, threads=torch.get_num_threads(), ckpt=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(tmp_path).name == "step-5"
    tok = tiny_tokenizer()
    full, resumed = tiny_model(), tiny_model()
    ref = train(full, tok, RECORDS, _cfg(epochs=3), progress=False)
    res = train(resumed, tok, RECORDS, _cfg(epochs=3, checkpoint_dir=tmp_path, checkpoint_every=1), progress=False)
    assert res.resumed_from == 5 and res.losses == ref.losses
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()

    def poison(step: int, loss: float) -> None:
        if step == 2:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(TrainingDivergedError, match=r"step 3.*step-2"):
        train(model, tok, RECORDS, _cfg(epochs=3, checkpoint_dir=tmp_path, checkpoint_every=1), progress=False,
              callback=poison)
    last = latest_checkpoint(tmp_path)
    assert last.name == "step-2"
    from safetensors.torch import load_file
    saved = load_file(str(next(last.glob("model*.safetensors"))))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_ascent_raises_nll_and_stops_at_bound():
    model, tok = tiny_model(), tiny_tokenizer()
    res = train(model, tok, RECORDS, _cfg(objective="ascent", lr=5e-2, max_steps=200, stop_nll_above=8.0),
                progress=False)
    assert res.stopped_reason == "nll_above" and res.steps < 200
    assert res.nlls[-1] > res.nlls[0]
    assert res.losses[0] == pytest.approx(-res.nlls[0])
    with pytest.raises(ValueError, match="ascent"):
        TrainConfig(stop_nll_above=3.0)


def test_descent_stops_at_first_step_whose_windowed_loss_reaches_target():
    """The stopped run is the exact prefix of the uncapped one, cut at the first full window at or below target."""
    model, tok = tiny_model(), tiny_tokenizer()
    ref = train(model, tok, RECORDS, _cfg(lr=2e-2, max_steps=30), progress=False)
    window = 3
    means = [sum(ref.losses[i - window:i]) / window for i in range(window, 31)]
    target = (means[0] + min(means)) / 2  # reached strictly inside the run
    stop_at = window + next(i for i, m in enumerate(means) if m <= target)
    res = train(tiny_model(), tok, RECORDS, _cfg(lr=2e-2, max_steps=30, stop_loss_below=target, loss_window=window),
                progress=False)
    assert res.stopped_reason == "loss_below" and res.steps == stop_at < 30
    assert res.losses == pytest.approx(ref.losses[:stop_at], rel=1e-6)
    with pytest.raises(ValueError, match="stop_loss_below.*ascent"):
        TrainConfig(objective="ascent", stop_loss_below=1.0)


def test_npo_first_loss_and_direction():
    """At the start theta == reference, so every example's NPO loss is (2/beta) * log 2."""
    model, tok = tiny_model(), tiny_tokenizer()
    res = train(model, tok, RECORDS, _cfg(objective="npo", npo_beta=0.5, epochs=3, lr=2e-2), progress=False)
    assert res.losses[0] == pytest.approx(2 / 0.5 * math.log(2), rel=1e-5)
    assert res.losses[-1] < res.losses[0]  # pushes the responses' likelihood below the reference
    assert res.nlls[-1] > res.nlls[0]
