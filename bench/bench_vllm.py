"""The quick suite through `--backend vllm` vs the transformers backend on one GPU: same headline, speed ratio.

    python bench/bench_vllm.py [--model smollm2-135m-instruct] [--suite quick] [--dtype bfloat16] [--out DIR]

Needs a CUDA GPU and `pip install 'safeunits[vllm]'`. Not run yet: no GPU was lent while it was written (the
vLLM backend's tests use a stand-in `vllm` module). Each backend evaluates the same model into its own empty run
folder in one process (vLLM's engine start counted in its time, as a user pays it); then the headline numbers,
the generation time and every answer string are compared. Greedy answers can differ where two logits nearly
tie (different kernels, bf16); the headline should agree within those rows. Last line:
`speedup=<transformers generation s / vllm generation s> identical=<k>/<n> headline_equal=<bool>`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from safeunits.eval.report import compare_table
from safeunits.eval.runner import evaluate
from safeunits.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=Path("/tmp/safeunits_vllm_bench"))
    args = ap.parse_args()
    model, tok = load_model(args.model, dtype=args.dtype, device="cuda")
    results, seconds = {}, {}
    for backend in ("transformers", "vllm"):
        out = args.out / backend
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        results[backend] = evaluate(model, tok, args.suite, out_dir=out, progress=False, model_name=args.model,
                                    backend=backend)
        seconds[backend] = time.perf_counter() - t0
    compare_table(results)
    same = total = 0
    for path in sorted((args.out / "transformers").glob("*/*.jsonl")):
        if path.parent.name == "judgements":
            continue
        other = args.out / "vllm" / path.relative_to(args.out / "transformers")
        a = {r["index"]: r["response"] for r in map(json.loads, path.read_text().splitlines())}
        b = {r["index"]: r["response"] for r in map(json.loads, other.read_text().splitlines())}
        same += sum(a[i] == b.get(i) for i in a)
        total += len(a)
    for backend, result in results.items():
        t = result.timing
        print(f"{backend:12s}: wall {seconds[backend]:7.1f} s  generation {t.generation_s:7.1f} s  "
              f"{t.tokens_per_s or 0:8.1f} tok/s")
    heads = {b: r.headline.as_dict() for b, r in results.items()}
    print(f"headline transformers: {heads['transformers']}\nheadline vllm        : {heads['vllm']}")
    ratio = results["transformers"].timing.generation_s / results["vllm"].timing.generation_s
    print(f"speedup={ratio:.2f} identical={same}/{total} headline_equal={heads['transformers'] == heads['vllm']}")


if __name__ == "__main__":
    main()
