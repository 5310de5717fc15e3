"""Frozen units inside a Hugging Face Trainer: `FreezeUnitsCallback` vs the same plain Trainer run.

Same model (reloaded from the same weights for every run), same data, same seed (so the same batches), same
TrainingArguments (AdamW, weight decay, clip 1.0); configurations interleaved over `--rounds` so machine load
hits both alike. Prints each configuration's tokens/s and the masked/plain time ratio (target: <= 1.10), and
checks that the masked runs left every frozen weight bit-identical.

    python bench/bench_trainer_callback.py                           # SmolLM2-135M-Instruct, 3 steps x 2 rounds
    python bench/bench_trainer_callback.py --unit-map runs/demo/units/unit_map.safetensors --freeze scu+cu

Without `--unit-map` the map is built from random scores by the units package (the class shares, and so the
mask bookkeeping, are those of a real map; which units are frozen does not change the cost).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import Trainer, TrainingArguments

from safeunits.data.registry import load_dataset
from safeunits.models.adapters import get_adapter
from safeunits.models.chat import collate, encode_pair
from safeunits.models.loading import load_model
from safeunits.train.engine import TrainConfig
from safeunits.train.freeze import FreezeUnitsCallback
from safeunits.train.masks import unit_masks
from safeunits.train.recipes import fits
from safeunits.units.classes import build_unit_map
from safeunits.units.scores import UnitScores
from safeunits.units.unit_map import UnitMap


def random_unit_map(model) -> UnitMap:
    """A unit map of `model` classified from random safety/utility scores (seeded)."""
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(0)
    shape = {k: (adapter.n_layers, adapter.n_units(k)) for k in ("mlp", "head")}

    def scores() -> UnitScores:
        return UnitScores({k: torch.rand(s, generator=gen, dtype=torch.float64) for k, s in shape.items()},
                          method="random", n_examples=0, n_tokens=0)

    return build_unit_map(model, scores(), scores(), fingerprint=False)


class TimedFreezeUnitsCallback(FreezeUnitsCallback):
    """The callback, timing its one-off set-up (mask building, saving the frozen values) at train start."""

    setup_s = 0.0

    def on_train_begin(self, *args, **kwargs) -> None:
        t0 = time.perf_counter()
        super().on_train_begin(*args, **kwargs)
        self.setup_s = time.perf_counter() - t0


def run(args: argparse.Namespace, pairs, unit_map: UnitMap | None) -> tuple[float, float, int, bool | None]:
    """One Trainer run from freshly loaded weights: (seconds in trainer.train(), of which one-off set-up, tokens,
    frozen weights kept (None without freezing))."""
    model, tok = load_model(args.model)
    frozen = unit_masks(model, unit_map, args.freeze) if unit_map is not None else {}
    params = dict(model.named_parameters())
    before = {k: params[k].detach()[m].clone() for k, m in frozen.items()}
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                                  learning_rate=1e-5, weight_decay=0.01, max_grad_norm=1.0, use_cpu=True,
                                  report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                  remove_unused_columns=False, seed=0)
        callbacks = [TimedFreezeUnitsCallback(unit_map, args.freeze)] if unit_map is not None else []
        trainer = Trainer(model=model, args=targs, train_dataset=pairs, callbacks=callbacks,
                          data_collator=lambda batch: collate(batch, tok.pad_token_id))
        tokens = sum(len(p.input_ids) for p in pairs[: args.steps * args.batch_size])
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    kept = all(torch.equal(params[k].detach()[m], before[k]) for k, m in frozen.items()) if frozen else None
    return seconds, callbacks[0].setup_s if callbacks else 0.0, tokens, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--unit-map", default=None, help="a saved unit map of the model (default: random scores)")
    parser.add_argument("--freeze", default="scu+cu:top0.06", help="unit selection to freeze")
    parser.add_argument("--data", default="self-instruct:seed")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    model, tok = load_model(args.model)
    unit_map = UnitMap.load(args.unit_map) if args.unit_map else random_unit_map(model)
    cfg = TrainConfig(max_length=args.max_length)
    records = [r for r in load_dataset(args.data) if fits(tok, r, cfg)][: args.steps * args.batch_size]
    pairs = [encode_pair(tok, r.prompt, r.response, max_length=args.max_length) for r in records]
    masks = unit_masks(model, unit_map, args.freeze)
    frozen_share = sum(int(m.sum()) for m in masks.values()) / sum(p.numel() for p in model.parameters())
    del model

    totals = {"plain": [0.0, 0], "frozen units": [0.0, 0]}
    kept_all, setup_s = True, 0.0
    for _ in range(args.rounds):
        for name, umap in (("plain", None), ("frozen units", unit_map)):
            seconds, setup, tokens, kept = run(args, pairs, umap)
            totals[name][0] += seconds
            totals[name][1] += tokens
            setup_s += setup
            kept_all = kept_all and kept is not False
    plain_s, masked_s = totals["plain"][0], totals["frozen units"][0]
    report = {
        "model": args.model, "freeze": args.freeze, "frozen_share": round(frozen_share, 4),
        "steps": args.steps, "rounds": args.rounds, "batch_size": args.batch_size, "max_length": args.max_length,
        "threads": torch.get_num_threads(),
        "tokens_per_s": {k: round(tokens / seconds, 1) for k, (seconds, tokens) in totals.items()},
        "seconds": {k: round(seconds, 2) for k, (seconds, _) in totals.items()},
        "frozen_setup_seconds": round(setup_s, 2),
        "ratio_frozen_over_plain": round(masked_s / plain_s, 4),
        "ratio_without_one_off_setup": round((masked_s - setup_s) / plain_s, 4),
        "frozen_weights_bit_identical": kept_all,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
