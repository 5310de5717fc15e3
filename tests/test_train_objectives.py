"""Training objectives registry: unknown names fail clearly; a registered objective trains by name with its needs met."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from safeunits.models.chat import collate, encode_pair
from safeunits.train import objectives
from safeunits.train.engine import TrainConfig, train
from safeunits.train.objectives import (LossInputs, TrainingObjective, UnknownObjectiveError, get_objective,
                                        objective_names, register_objective)
from test_train_engine import RECORDS, _cfg
from tiny import tiny_model, tiny_tokenizer


def test_builtin_objectives_and_unknown_name():
    assert objective_names()[:3] == ["descent", "ascent", "npo"]
    assert get_objective("npo").needs_reference and get_objective("npo").per_sequence
    with pytest.raises(UnknownObjectiveError, match="'dpo'.*descent, ascent, npo"):
        get_objective("dpo")
    with pytest.raises(ValidationError, match="unknown training objective 'dpo'; choose one of: descent, ascent, npo"):
        TrainConfig(objective="dpo")
    with pytest.raises(ValidationError, match="stop_nll_above.*ascent, npo"):
        TrainConfig(objective="descent", stop_nll_above=3.0)


@pytest.fixture()
def registry(monkeypatch):
    """A private copy of the registry, so test objectives do not leak into other tests."""
    monkeypatch.setattr(objectives, "_OBJECTIVES", objectives._OBJECTIVES.copy())


def test_registered_objective_trains_by_name_with_its_needs_met(registry):
    """A per-sequence objective that needs the reference: summed response NLL averaged over sequences.

    Reference computed another way: HF's own label loss per example times its loss-token count.
    """
    seen: list[LossInputs] = []

    @register_objective
    class SequenceNLL(TrainingObjective):
        name = "test_sequence_nll"
        description = "summed response NLL per sequence"
        needs_reference = True
        per_sequence = True

        def loss(self, inputs: LossInputs) -> torch.Tensor:
            seen.append(inputs)
            return -inputs.seq_logp.sum() / inputs.denom

    with pytest.raises(ValueError, match="already registered"):
        register_objective(SequenceNLL)
    model, tok = tiny_model(), tiny_tokenizer()
    expected = []
    for r in RECORDS[:4]:
        pair = encode_pair(tok, r.prompt, r.response, max_length=96)
        with torch.no_grad():
            expected.append(model(**collate([pair], tok.pad_token_id)).loss.item() * pair.n_loss_tokens)
    res = train(model, tok, RECORDS[:4], _cfg(objective="test_sequence_nll", batch_size=2, grad_accum=2, max_steps=1,
                                             shuffle=False), progress=False)
    assert res.losses[0] == pytest.approx(sum(expected) / 4, rel=1e-5)
    first = seen[:2]  # the two micro-batches of step 1: denominators count sequences of the whole step
    assert [s.denom for s in first] == [4, 4]
    for s in first:  # at step 1 the weights are the reference
        torch.testing.assert_close(s.ref_logp, s.seq_logp.detach(), rtol=1e-5, atol=1e-4)
    assert res.nlls[0] == pytest.approx(sum(expected) / sum(encode_pair(tok, r.prompt, r.response, max_length=96)
                                                             .n_loss_tokens for r in RECORDS[:4]), rel=1e-5)
