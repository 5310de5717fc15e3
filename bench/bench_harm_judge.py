"""Cost of the `harm` judge against its floor, measured in the same run (run by hand; numbers go to BENCHMARKS.md).

Target (issue: harm, not refusal): judging 1,000 responses in <= 2 min on 2 cores, so judging stays a small share of
an evaluation. The pairs are evaluation-shaped: requests from the harm sources' sample with their responses cut to
`--response-words` words (our evaluations generate 64 tokens). The floor is one plain forward pass of the same
truncated backbone over the same token batches; the ratio shows what the feature pooling and classifier add.

    python bench/bench_harm_judge.py --n 1000 --threads 2
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--response-words", type=int, default=48)
    args = parser.parse_args()

    import torch

    from safeunits.eval.harm_judge import HarmJudgeConfig, load_harm_judge, sampled_rows

    torch.set_num_threads(args.threads)
    rows = [r for part in sampled_rows(HarmJudgeConfig(), ["gptfuzz", "pku"]).values() for r in part][:args.n]
    requests = [r.request for r in rows]
    responses = [" ".join(r.response.split()[:args.response_words]) for r in rows]
    judge = load_harm_judge()
    judge.harmful_many(requests[:8], responses[:8])  # warm-up
    start = time.perf_counter()
    verdicts = judge.harmful_many(requests, responses)
    judged = time.perf_counter() - start

    enc = judge.encoder
    start = time.perf_counter()
    tokens = 0
    for _, pairs, _ in enc.forward_batches(requests, responses, hidden_states=False):  # the same passes, no pooling
        tokens += sum(len(ids) for ids, _ in pairs)
    floor = time.perf_counter() - start
    print(f"pairs={len(rows)} tokens={tokens} threads={args.threads} harmful={sum(verdicts)}")
    print(f"harm judge: {judged:.1f} s ({len(rows) / judged:.1f} pairs/s, {tokens / judged:.0f} tok/s)")
    print(f"floor (forward of the same blocks): {floor:.1f} s; ratio={judged / floor:.2f} "
          f"seconds_per_1000={1000 * judged / len(rows):.1f}")


if __name__ == "__main__":
    main()
