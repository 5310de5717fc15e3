"""Training engine speed: engine vs a minimal hand-written PyTorch loop, and masked vs unmasked engine.

Same model, same data, same batches (no shuffle), same optimizer (AdamW + linear schedule, clip 1.0), one
process. Configurations are interleaved over `--rounds` so machine load (shared CPU) hits all of them
alike; the reported figure is each configuration's total tokens / total seconds, and ratios against the
hand-written loop measured in the same run.

    python bench/bench_train.py                     # SmolLM2-135M, batch 8, max_length 128, 3 steps x 2 rounds
    python bench/bench_train.py --model small --max-length 256 --steps 10 --rounds 3   # random 6M Llama
    python bench/bench_train.py --model tiny        # seconds, for a smoke run

Masks: every 2-D weight of every transformer block is partially frozen (half of its MLP channels / heads'
rows and columns, random), the worst case for the mask bookkeeping; `--unit-map MAP --freeze scu+cu` uses
real unit masks instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import get_scheduler

from safeunits.data.registry import load_dataset
from safeunits.models.chat import collate, encode_pair
from safeunits.train.engine import TrainConfig, train
from safeunits.train.recipes import fits


# a random Llama of ~6M parameters on the byte tokenizer: real matmul work per step, seconds per run
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=512)


def hand_loop(model, tokenizer, records, cfg: TrainConfig) -> tuple[int, float]:
    """The baseline: the shortest correct response-only SFT loop one would write by hand."""
    pairs = [encode_pair(tokenizer, r.prompt, r.response, max_length=cfg.max_length) for r in records]
    batches = [collate(pairs[i:i + cfg.batch_size], tokenizer.pad_token_id) for i in range(0, len(pairs), cfg.batch_size)]
    batches = batches[:cfg.max_steps]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=len(batches))
    model.train()
    tokens, t0 = 0, time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    model.eval()
    return tokens, time.perf_counter() - t0


def random_block_masks(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Half the rows of every 2-D block weight frozen (random), the heaviest partial-mask case."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if ".layers." in name and p.dim() == 2:
            rows = torch.rand(p.shape[0], generator=gen) < 0.5
            masks[name] = rows[:, None].expand_as(p).clone()
    return masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model name/folder, or 'tiny' / 'small'")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--unit-map", default=None)
    ap.add_argument("--freeze", default="scu+cu")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args()

    if args.model in ("tiny", "small"):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import tiny_model, tiny_tokenizer

        size = {} if args.model == "tiny" else SMALL

        def load():
            return tiny_model(**size), tiny_tokenizer()
    else:
        from safeunits.models.loading import load_model

        def load():
            return load_model(args.model)

    cfg = TrainConfig(lr=1e-5, max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                      shuffle=False, mixed_precision="no", max_grad_norm=1.0)
    _, tokenizer = load()
    records = [r for r in load_dataset("self-instruct:seed") if fits(tokenizer, r, cfg)][: args.steps * args.batch_size]
    totals = {"hand_loop": [0, 0.0], "engine": [0, 0.0], "engine_masked": [0, 0.0]}
    for _ in range(args.rounds):
        model, tok = load()
        tokens, seconds = hand_loop(model, tok, records, cfg)
        totals["hand_loop"][0] += tokens
        totals["hand_loop"][1] += seconds
        model, tok = load()
        res = train(model, tok, records, cfg, progress=False)
        totals["engine"][0] += res.tokens
        totals["engine"][1] += res.wall_s
        model, tok = load()
        if args.unit_map:
            from safeunits.train.masks import unit_masks

            masks = unit_masks(model, args.unit_map, args.freeze)
        else:
            masks = random_block_masks(model)
        res = train(model, tok, records, cfg, frozen=masks, progress=False)
        totals["engine_masked"][0] += res.tokens
        totals["engine_masked"][1] += res.wall_s
        frozen_share = 1 - res.mask["trainable_share"]
    tps = {k: t / s for k, (t, s) in totals.items()}
    out = {"model": args.model, "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
           "rounds": args.rounds, "threads": torch.get_num_threads(), "tokens_per_s": tps,
           "engine_vs_hand_loop": tps["engine"] / tps["hand_loop"],
           "masked_overhead": tps["engine"] / tps["engine_masked"] - 1, "masked_frozen_share": frozen_share}
    print(json.dumps(out, indent=2))
    if args.out:
        from safeunits.io import write_json

        write_json(args.out, out)


if __name__ == "__main__":
    main()
