"""Masked training under FSDP2: overhead of the sharded masks vs unmasked FSDP2, 2 CPU processes (gloo).

Launches itself with `accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2` (what docs/train.md
documents); inside, each round trains a fresh model unmasked and then masked (interleaved, so machine load
hits both alike), with the engine's FSDP2 path (DTensor shards, masks cut like the parameters). The figure is
each configuration's total tokens / total loop seconds (start-up excluded) and the ratio masked/unmasked.

    python bench/bench_fsdp_masks.py                      # random 6M Llama, batch 4 per process, 6 steps x 3 rounds
    python bench/bench_fsdp_masks.py --model tiny --steps 2 --rounds 1     # smoke run

Masks: bench_train.py's worst case, half the rows of every 2-D block weight frozen (random).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "small"), default="small")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch per process")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    return ap.parse_args()


def launch() -> None:
    """Start this script under the real launcher, 2 processes with one thread each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", "2", "--main_process_port", port, __file__, *sys.argv[1:]]
    sys.exit(subprocess.run(cmd, env=env).returncode)


def worker(args: argparse.Namespace) -> None:
    """Both configurations, interleaved; rank 0 prints the result."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]
    from bench_train import SMALL, random_block_masks
    from tiny import tiny_model, tiny_tokenizer

    from safeunits.data.registry import load_dataset
    from safeunits.distributed import is_main_process
    from safeunits.train.engine import TrainConfig, train
    from safeunits.train.recipes import fits

    size = SMALL if args.model == "small" else {}
    tokenizer = tiny_tokenizer()
    cfg = TrainConfig(lr=1e-5, max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                      shuffle=False, mixed_precision="no", max_grad_norm=1.0, weight_decay=0.01)
    records = [r for r in load_dataset("self-instruct:seed") if fits(tokenizer, r, cfg)][:args.steps * args.batch_size * 2]
    totals = {"fsdp2": [0, 0.0], "fsdp2_masked": [0, 0.0]}
    frozen_share = 0.0
    for _ in range(args.rounds):
        for name in totals:
            model = tiny_model(**size)  # same seed: the same weights in every process and round
            masks = random_block_masks(model) if name == "fsdp2_masked" else None
            res = train(model, tokenizer, records, cfg, frozen=masks, progress=False)
            totals[name][0] += res.tokens
            totals[name][1] += res.wall_s
            if masks is not None:
                frozen_share = 1 - res.mask["trainable_share"]
    if not is_main_process():
        return
    tps = {k: t / s for k, (t, s) in totals.items()}
    out = {"model": args.model, "processes": 2, "batch_size_per_process": args.batch_size,
           "max_length": args.max_length, "steps": args.steps, "rounds": args.rounds,
           "threads_per_process": torch.get_num_threads(), "tokens_per_s": tps,
           "masked_overhead": tps["fsdp2"] / tps["fsdp2_masked"] - 1, "masked_frozen_share": frozen_share}
    print(json.dumps(out, indent=2))
    if args.out:
        from safeunits.io import write_json

        write_json(args.out, out)


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        worker(_args())
    else:
        _args()  # --help and argument errors before anything starts
        launch()
