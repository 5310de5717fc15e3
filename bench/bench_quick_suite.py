"""Wall time of the `quick` suite on the default model (target: under 5 minutes on 2 CPU cores).

    python bench/bench_quick_suite.py [--out /tmp/quick_bench] [--suite quick] [--rerun]

Starts from an empty run directory (no resumed rows) and prints the three-axis table and the time split. With
`--rerun`, then evaluates into the complete folder twice: without its `nll/` scores (what a rerun did before they
were kept: generations resumed, utility NLL scored again) and with them, and prints the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from safeunits.eval.report import compare_table, headline_document
from safeunits.eval.runner import evaluate
from safeunits.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--out", type=Path, default=Path("/tmp/safeunits_quick_bench"))
    ap.add_argument("--rerun", action="store_true", help="also time reruns into the complete folder (NLL kept or not)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 avoids spin-wait thrash on a loaded machine)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.out.exists():
        shutil.rmtree(args.out)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    t_load = time.perf_counter() - t0
    result = evaluate(model, tok, args.suite, out_dir=args.out, progress=False, model_name=args.model)
    total = time.perf_counter() - t0
    t = result.timing
    compare_table({args.model: result})
    print(headline_document({args.model: result}).markdown())
    print(f"suite={args.suite} wall={total:.1f} s (load {t_load:.1f} s, evaluate {t.total_s:.1f} s, "
          f"generation {t.generation_s:.1f} s, {t.generated_tokens} tokens, {t.tokens_per_s:.0f} tok/s)")
    if args.rerun:
        seconds = {}
        for label in ("NLL scored again", "NLL kept"):
            if label == "NLL scored again":
                shutil.rmtree(args.out / "nll")
            t0 = time.perf_counter()
            again = evaluate(model, tok, args.suite, out_dir=args.out, progress=False, model_name=args.model)
            seconds[label] = time.perf_counter() - t0
            assert again.headline.as_dict() == result.headline.as_dict(), "a rerun changed the headline"
        print(f"rerun into the complete folder: NLL scored again {seconds['NLL scored again']:.1f} s, NLL kept "
              f"{seconds['NLL kept']:.1f} s ({seconds['NLL scored again'] / seconds['NLL kept']:.1f}x)")


if __name__ == "__main__":
    main()
