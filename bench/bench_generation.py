"""Batched generation vs one prompt at a time on the default model: tokens/s ratio and identical greedy text.

    python bench/bench_generation.py [--n 16] [--max-new-tokens 64] [--batch-size 16]

Both arms run in the same process on the same prompts (AdvBench, first N), so the ratio is fair under the
same machine load; new tokens are counted by re-tokenising the answers.
"""

from __future__ import annotations

import argparse
import time

import torch

from safeunits.data.registry import load_dataset
from safeunits.eval.generation import generate
from safeunits.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=16, help="prompts (AdvBench first N)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 avoids spin-wait thrash on a loaded machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    prompts = [r.prompt for r in load_dataset("advbench", limit=args.n)]

    def count(texts: list[str]) -> int:
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

    generate(model, tok, prompts[:2], max_new_tokens=4, progress=False)  # warm-up
    t0 = time.perf_counter()
    single = [generate(model, tok, [p], max_new_tokens=args.max_new_tokens, batch_size=1, progress=False)[0]
              for p in prompts]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
    t_batched = time.perf_counter() - t0
    n_tok = count(batched)
    same = sum(a == b for a, b in zip(batched, single))
    print(f"model={args.model} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} "
          f"batch_size={args.batch_size} threads={torch.get_num_threads()}")
    print(f"one-at-a-time: {t_single:7.1f} s  {count(single) / t_single:7.1f} tok/s")
    print(f"batched      : {t_batched:7.1f} s  {n_tok / t_batched:7.1f} tok/s")
    print(f"speed-up (tokens/s ratio): {(n_tok / t_batched) / (count(single) / t_single):.2f}x; "
          f"identical greedy outputs: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
