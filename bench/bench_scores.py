"""Cost of unit scoring against its floor, measured in the same run (run by hand; numbers go to BENCHMARKS.md).

- fluctuation / wanda scoring vs a plain no-grad forward over the same batches (target <= 1.15x);
- snip scoring vs a plain forward + backward per example (target <= 1.2x);
- peak memory (RSS high-water mark of a fresh subprocess, resource.getrusage) of each mode.

    python bench/bench_scores.py --model smollm2-135m-instruct --n 32 --max-length 256 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time


def _setup(model_name: str, n: int, max_length: int):
    from safeunits.data.registry import load_dataset
    from safeunits.models.loading import load_model

    model, tok = load_model(model_name)
    records = load_dataset("advbench-refusals", limit=n)
    return model, tok, records


def _timed(mode: str, model_name: str, n: int, max_length: int, batch_size: int, repeats: int, q) -> None:
    """Run one mode in a fresh process; report best wall time and the process's peak RSS."""
    import torch

    from safeunits.models.chat import collate
    from safeunits.units.scores import ScoreConfig, compute_scores, encode_records

    model, tok, records = _setup(model_name, n, max_length)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = ScoreConfig(method=mode if mode in ("fluctuation", "wanda", "snip") else "fluctuation",
                      batch_size=batch_size, max_length=max_length)
    pairs = encode_records(tok, records, cfg)
    pad = tok.pad_token_id
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if mode == "forward":
            with torch.no_grad():
                for i in range(0, len(pairs), batch_size):
                    b = collate(pairs[i:i + batch_size], pad)
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        elif mode == "forward_backward":
            for p in pairs:
                b = collate([p], pad)
                model.zero_grad(set_to_none=True)
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            compute_scores(model, tok, records, cfg, progress=False)
        best = min(best, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_tokens = sum(len(p.input_ids) for p in pairs)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    q.put({"mode": mode, "seconds": best, "tokens": n_tokens, "peak_rss_mb": peak / 1024,
           "rss_after_load_mb": base_rss / 1024, "model_mb": model_mb})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=32, help="examples (advbench-refusals)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="forward,fluctuation,wanda,forward_backward,snip")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for mode in args.modes.split(","):
        q = ctx.Queue()
        p = ctx.Process(target=_timed, args=(mode, args.model, args.n, args.max_length, args.batch_size, args.repeats, q))
        p.start()
        results[mode] = q.get()
        p.join()
        r = results[mode]
        print(f"{mode:>17}: {r['seconds']:.2f} s  ({r['tokens'] / r['seconds']:.0f} tok/s)  peak RSS {r['peak_rss_mb']:.0f} MiB "
              f"(after load {r['rss_after_load_mb']:.0f} MiB, model {r['model_mb']:.0f} MiB)", flush=True)
    ratios = {}
    for mode, base in (("fluctuation", "forward"), ("wanda", "forward"), ("snip", "forward_backward")):
        if mode in results and base in results:
            ratios[f"{mode}/{base}"] = results[mode]["seconds"] / results[base]["seconds"]
            print(f"{mode} / {base}: {ratios[f'{mode}/{base}']:.3f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
