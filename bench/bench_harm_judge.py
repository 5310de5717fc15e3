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
    ids = [enc._ids(q, r)[0] for q, r in zip(requests, responses)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    body = enc._body
    start = time.perf_counter()
    with torch.inference_mode():
        kept = body.layers
        body.layers = kept[:max(enc.config.layers)]
        try:
            for b in range(0, len(order), enc.config.batch_size):
                idx = order[b:b + enc.config.batch_size]
                width = max(len(ids[i]) for i in idx)
                x = torch.zeros((len(idx), width), dtype=torch.long)
                m = torch.zeros((len(idx), width), dtype=torch.long)
                for j, i in enumerate(idx):
                    x[j, :len(ids[i])] = torch.tensor(ids[i])
                    m[j, :len(ids[i])] = 1
                body(input_ids=x, attention_mask=m)
        finally:
            body.layers = kept
    floor = time.perf_counter() - start
    tokens = sum(len(t) for t in ids)
    print(f"pairs={len(rows)} tokens={tokens} threads={args.threads} harmful={sum(verdicts)}")
    print(f"harm judge: {judged:.1f} s ({len(rows) / judged:.1f} pairs/s, {tokens / judged:.0f} tok/s)")
    print(f"floor (forward of the same blocks): {floor:.1f} s; ratio={judged / floor:.2f} "
          f"seconds_per_1000={1000 * judged / len(rows):.1f}")


if __name__ == "__main__":
    main()
