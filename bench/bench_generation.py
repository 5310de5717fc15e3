"""Generation engines against the model's forward ceiling, on the quick suite's prompts, in one process.

    python bench/bench_generation.py [--max-new-tokens 64] [--threads N] [--slots N] [--limit N]

Measures, on the same prompts (the quick suite: AdvBench first 32 without and with the safety system prompt,
XSTest safe first 48) and under the same machine load:
  ceiling     a plain no-grad forward over the same prompts + answers, batches of 16, logits at every position
              (a decoded token costs one position of such a forward: the rate decoding could reach at best)
  batched     the old path: three `generate(engine="batched")` calls, `model.generate` on length-sorted,
              left-padded batches of 16
  continuous  the new path, as the suite now runs it: ONE `generate_many` call over the three jobs, KV-cache slots
              refilled as rows finish, each job's chat-template prefix run once
The new run sits between the old path's first call and its other two (old, new, old, old), so that a change of
machine load hits both; process CPU times are printed beside the wall times. Every answer string is compared. A differing row is traced:
the first differing token's context is run alone (no padding) and the logits of the two engines' tokens are
printed; a gap of a few 1e-5..1e-3 is a near-tie that float reduction order decides. Last line: `speedup=<continuous/batched> ceiling_share=<continuous/forward>
identical=<k>/<n>` (tok/s ratios; new tokens counted by re-tokenising the answers).
"""

from __future__ import annotations

import argparse
import time

import torch

from safeunits.data.registry import load_dataset
from safeunits.eval.generation import GenerationJob, generate, generate_many
from safeunits.models.chat import SAFETY_SYSTEM_PROMPT, prompt_text
from safeunits.models.loading import load_model


def quick_suite_calls(limit: int | None = None) -> list[tuple[list[str], str | None]]:
    """The quick suite's generations: (prompts, system prompt) per file; `limit`: at most that many prompts each."""
    advbench = [r.prompt for r in load_dataset("advbench", limit=min(32, limit or 32))]
    xstest = [r.prompt for r in load_dataset("xstest:safe", limit=min(48, limit or 48))]
    return [(advbench, None), (advbench, SAFETY_SYSTEM_PROMPT), (xstest, None)]


def bench_parser(description: str) -> argparse.ArgumentParser:
    """The options every generation bench takes: model, new tokens, threads, a smoke-run limit."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 avoids spin-wait thrash on a loaded machine)")
    ap.add_argument("--limit", type=int, default=None, help="at most N prompts a set (a smoke run; not the measure)")
    return ap


def bench_setup(args: argparse.Namespace):
    """Threads set, the model loaded, the quick suite's generations: (model, tokenizer, calls)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    return model, tok, quick_suite_calls(args.limit)


def new_tokens(tok, texts: list[str]) -> int:
    """Tokens of generated answers, counted by re-tokenising them (the same count for every engine)."""
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=None, help="continuous engine's rows per step (default: from memory)")
    args = ap.parse_args()
    model, tok, calls = bench_setup(args)
    n = args.max_new_tokens

    def count(texts: list[str]) -> int:
        return new_tokens(tok, texts)

    answers: dict[str, list[list[str]]] = {"batched": [], "continuous": []}
    wall = dict.fromkeys(answers, 0.0)
    cpu = dict.fromkeys(answers, 0.0)

    def timed(name: str, run) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        answers[name] += run()
        wall[name] += time.perf_counter() - t0
        cpu[name] += time.process_time() - c0

    def old_call(k: int) -> None:
        prompts, system = calls[k]
        timed("batched", lambda: [generate(model, tok, prompts, system_prompt=system, max_new_tokens=n,
                                           progress=False, engine="batched", batch_size=16)])

    generate(model, tok, calls[0][0][:4], max_new_tokens=4, progress=False, engine="batched")  # warm-up
    generate(model, tok, calls[0][0][:4], max_new_tokens=4, progress=False)
    old_call(0)
    jobs = [GenerationJob(prompts, system_prompt=system) for prompts, system in calls]
    timed("continuous", lambda: generate_many(model, tok, jobs, max_new_tokens=n, progress=False,
                                              batch_size=args.slots))
    old_call(1)
    old_call(2)
    old, new = (sum(answers[name], []) for name in ("batched", "continuous"))
    t_old, t_new = wall["batched"], wall["continuous"]
    contexts = [prompt_text(tok, p, s) for prompts, s in calls for p in prompts]
    c0 = time.process_time()
    t_fwd, n_fwd = forward_ceiling(model, tok, [c + a for c, a in zip(contexts, old)])
    c_fwd = time.process_time() - c0

    r_old, r_new, r_fwd = count(old) / t_old, count(new) / t_new, n_fwd / t_fwd
    print(f"model={args.model} prompts={len(old)} max_new_tokens={n} threads={torch.get_num_threads()}")
    print(f"ceiling (forward, batch 16): {t_fwd:7.1f} s {r_fwd:7.1f} tok/s")
    print(f"batched (old, batch 16)    : {t_old:7.1f} s {r_old:7.1f} tok/s")
    print(f"continuous (new, one run)  : {t_new:7.1f} s {r_new:7.1f} tok/s")
    print(f"by process CPU time (less sensitive to other jobs on the cores): forward {n_fwd / c_fwd:.1f}, batched "
          f"{count(old) / cpu['batched']:.1f}, continuous {count(new) / cpu['continuous']:.1f} tok/s; speedup "
          f"{cpu['batched'] / cpu['continuous'] * count(new) / count(old):.2f}")
    same = 0
    for i, (a, b) in enumerate(zip(old, new)):
        if a == b:
            same += 1
        else:
            print(trace_difference(model, tok, contexts[i], a, b, i))
    print(f"speedup={r_new / r_old:.2f} ceiling_share={r_new / r_fwd:.2f} identical={same}/{len(old)}")


@torch.no_grad()
def forward_ceiling(model, tok, texts: list[str], batch_size: int = 16) -> tuple[float, int]:
    """Seconds and tokens of a plain forward over `texts` (length-sorted batches, logits at every position)."""
    ids = sorted((tok(t, add_special_tokens=False)["input_ids"] for t in texts), key=len, reverse=True)
    t0, total = time.perf_counter(), 0
    for s in range(0, len(ids), batch_size):
        batch = tok.pad({"input_ids": ids[s:s + batch_size]}, return_tensors="pt", padding_side="left")
        model(**batch)
        total += int(batch["attention_mask"].sum())
    return time.perf_counter() - t0, total


@torch.no_grad()
def trace_difference(model, tok, context: str, old: str, new: str, row: int) -> str:
    """Where two answers part: the logits of both engines' next token after their common prefix, run unpadded."""
    a = tok(old, add_special_tokens=False)["input_ids"]
    b = tok(new, add_special_tokens=False)["input_ids"]
    k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    ids = tok(context, add_special_tokens=False)["input_ids"] + a[:k]
    logits = model(torch.tensor([ids])).logits[0, -1].float()
    top2 = logits.topk(2)
    pick = {"old": a[k] if k < len(a) else None, "new": b[k] if k < len(b) else None}
    shown = {name: (f"{tok.decode([t])!r} {float(logits[t]):.5f}" if t is not None else "end (EOS)")
             for name, t in pick.items()}
    gap = (abs(float(logits[pick["old"]] - logits[pick["new"]])) if None not in pick.values()
           else float(top2.values[0] - top2.values[1]))
    return (f"row {row} differs at answer token {k}: old {shown['old']} vs new {shown['new']}; "
            f"logit gap {gap:.2e} (top-2 gap unpadded {float(top2.values[0] - top2.values[1]):.2e})")


if __name__ == "__main__":
    main()
