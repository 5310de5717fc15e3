"""Zero-shot accuracy cost on CPU: ScoringLM (each context prefilled once) against lm-eval's HFLM, same documents.

    python bench/bench_zero_shot.py [--tasks boolq,rte,...] [--limit 16] [--threads 2] [--skip-hflm]

For each task, both scorers run on the same fixed sample; the script prints wall seconds, the token positions
each ran through the model (padding included: the compute both did, free of the noise of a shared CPU), the
tokens per second, the largest log-likelihood difference and whether every acc / acc_norm verdict agrees. The
per-document cost of ScoringLM sizes the suites' samples (docs/eval.md: "Task accuracy").
"""

from __future__ import annotations

import argparse
import time

import torch

from safeunits.data.zero_shot import TASKS
from safeunits.eval import scoring_lm
from safeunits.eval.zero_shot import run_zero_shot, task_accuracy
from safeunits.models.loading import load_model

SEVEN = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def hflm(model, tokenizer, *, batch_size: int, progress: bool):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def timed(model, tok, task: str, limit: int, batch_size: int, scorer) -> tuple[float, int, object]:
    """Seconds, token positions through the model, scores of one task with the given LM class."""
    positions = [0]

    def count(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions[0] += ids.numel()

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    original, scoring_lm.ScoringLM = scoring_lm.ScoringLM, scorer
    try:
        t0 = time.perf_counter()
        scores, _ = run_zero_shot(model, tok, [task], limit=limit, batch_size=batch_size, progress=False)
        return time.perf_counter() - t0, positions[0], scores[task]
    finally:
        scoring_lm.ScoringLM = original
        handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default=SEVEN)
    ap.add_argument("--limit", type=int, default=16, help="documents per task (the fixed sample)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-hflm", action="store_true", help="time ScoringLM only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    print(f"torch threads {torch.get_num_threads()}; {args.limit} documents a task; batch {args.batch_size}")
    print("| task | acc | acc_norm | ScoringLM s | s/doc | positions | tok/s | HFLM s | positions | tok/s | positions ratio "
          "| max |dll| | verdicts agree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        s_ours, p_ours, ours = timed(model, tok, task, args.limit, args.batch_size, scoring_lm.ScoringLM)
        acc = task_accuracy(ours)
        norm = f"{100 * acc.acc_norm.rate:.1f}" if acc.acc_norm else "-"
        row = f"| {task} | {100 * acc.acc.rate:.1f} | {norm} | {s_ours:.1f} | {s_ours / len(ours.items):.2f} | {p_ours} | {p_ours / s_ours:.0f}"
        if args.skip_hflm:
            print(row + " | | | | | | |", flush=True)
            continue
        s_hf, p_hf, hf = timed(model, tok, task, args.limit, args.batch_size, hflm)
        diff = max(abs(a - b) for x, y in zip(ours.items, hf.items) for a, b in zip(x.lls, y.lls))
        agree = all(x.acc == y.acc and x.acc_norm == y.acc_norm for x, y in zip(ours.items, hf.items))
        print(f"{row} | {s_hf:.1f} | {p_hf} | {p_hf / s_hf:.0f} | {p_hf / p_ours:.2f} | {diff:.1e} | {agree} |",
              flush=True)
    print(f"split sizes: {', '.join(f'{t} {TASKS[t].rows}' for t in args.tasks.split(','))}")


if __name__ == "__main__":
    main()
