"""freeze_units / FreezeUnitsCallback: frozen units stay bit-identical inside a Hugging Face Trainer and a plain loop."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import Trainer, TrainingArguments

from safeunits.data.records import Record
from safeunits.models.chat import collate, encode_pair
from safeunits.train.freeze import FreezeError, FreezeUnitsCallback, freeze_units
from safeunits.train.masks import unit_masks
from tiny import tiny_model, tiny_tokenizer, tiny_unit_map

RECORDS = [Record(prompt=f"Question number {i}: what is {i} plus {i}?", response=f"It is {2 * i}. " * (1 + i % 3))
           for i in range(12)]
SPEC = "scu+cu"


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _frozen_masks(model) -> dict[str, torch.Tensor]:
    """Every parameter's frozen entries (False everywhere for parameters the selection does not touch)."""
    masks = unit_masks(model, tiny_unit_map(tiny_model()), SPEC)
    return {k: masks.get(k, torch.zeros_like(p, dtype=torch.bool)) for k, p in model.named_parameters()}


def _assert_frozen_kept_rest_changed(model, before: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor]) -> None:
    assert sum(int(m.sum()) for m in frozen.values()) > 0
    for name, p in model.named_parameters():
        m = frozen[name]
        assert torch.equal(p.detach()[m], before[name][m]), f"frozen entries of {name} moved"
        assert (p.detach()[~m] != before[name][~m]).all(), f"some trainable entries of {name} did not change"


def _trainer(model, tmp_path, callbacks) -> Trainer:
    tok = tiny_tokenizer()
    pairs = [encode_pair(tok, r.prompt, r.response) for r in RECORDS]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=6, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, seed=0)
    return Trainer(model=model, args=args, train_dataset=pairs, callbacks=callbacks,
                   data_collator=lambda batch: collate(batch, tok.pad_token_id))


def test_trainer_callback_keeps_frozen_units_bit_identical_with_weight_decay(tmp_path):
    model = tiny_model()
    frozen, before = _frozen_masks(model), _snapshot(model)
    callback = FreezeUnitsCallback(tiny_unit_map(tiny_model()), SPEC)
    _trainer(model, tmp_path, [callback]).train()
    _assert_frozen_kept_rest_changed(model, before, frozen)
    assert callback.handle is not None and 0 < callback.handle.stats.trainable_share < 1
    # the same run without the callback moves the frozen entries: the check above is not vacuous
    control = tiny_model()
    _trainer(control, tmp_path / "control", []).train()
    assert any(not torch.equal(p.detach()[frozen[k]], before[k][frozen[k]]) for k, p in control.named_parameters()
               if frozen[k].any())


def test_callback_refuses_bad_selection_before_training():
    with pytest.raises(ValueError, match="bad unit selection term"):
        FreezeUnitsCallback(tiny_unit_map(tiny_model()), "scu+nonsense")


def test_plain_accelerate_loop_with_handle_then_remove():
    model, tok = tiny_model(), tiny_tokenizer()
    frozen, before = _frozen_masks(model), _snapshot(model)
    batch = collate([encode_pair(tok, r.prompt, r.response) for r in RECORDS], tok.pad_token_id)
    accelerator = Accelerator(cpu=True)
    model.train()
    wrapped, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))

    def step() -> None:
        accelerator.backward(wrapped(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()

    with freeze_units(model, tiny_unit_map(tiny_model()), SPEC, optimizer=optimizer) as handle:
        for _ in range(4):
            step()
    _assert_frozen_kept_rest_changed(model, before, frozen)
    step()  # removed: nothing holds the frozen entries any more
    assert any(not torch.equal(p.detach()[frozen[k]], before[k][frozen[k]]) for k, p in model.named_parameters()
               if frozen[k].any())
    with pytest.raises(FreezeError, match="removed"):
        handle.attach(optimizer)


def test_freeze_errors():
    model = tiny_model()
    other = tiny_unit_map(tiny_model(intermediate_size=64))
    with pytest.raises(ValueError, match="does not fit|architecture hash"):
        freeze_units(model, other, SPEC)
    handle = freeze_units(model, tiny_unit_map(tiny_model()), SPEC)
    with pytest.raises(FreezeError, match="not a torch optimizer"):
        handle.attach(object())  # type: ignore[arg-type]
    handle.remove()
