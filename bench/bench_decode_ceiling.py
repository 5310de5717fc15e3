"""Where greedy decoding's time goes on this machine, and the fastest any engine could decode at float32.

    python bench/bench_decode_ceiling.py [--threads N] [--limit N] [--max-new-tokens 64]

Three measurements, one process:
  profile    the continuous engine (`generate_many`) on the quick suite's prompts (bench_generation's), under
             torch.profiler: new tokens, tok/s, and the self CPU time of matrix products (`aten::mm`/`addmm`),
             attention (`*scaled_dot_product*`) and everything else
  attention  one decode step's attention at the profile's largest shape (rows x key/value heads x packed query
             heads, cached positions): SDPA (the kernel transformers calls) against the bytes it reads and the
             machine's plain read rate (`x.sum()` over 400 MB)
  bound      the decode rate if matrix products kept their measured speed and attention ran at the read rate
             with no other cost: no engine change can go past it at float32 on this machine
Last line: `tok_s=<engine> bound_tok_s=<bound> headroom=<bound/engine> mm_share=<..> attention_share=<..>`.
Compare `bound_tok_s` with 4x the `batched` rate of bench_generation.py measured on the same cores.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from bench_generation import bench_parser, bench_setup, new_tokens

from safeunits.eval.continuous import MAX_SLOTS, _kv_shape
from safeunits.eval.generation import GenerationJob, generate_many


def read_rate(n: int = 100_000_000, repeats: int = 5) -> float:
    """Bytes per second of a plain read of `n` float32 values."""
    x = torch.randn(n)
    x.sum()
    t0 = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    return repeats * n * 4 / (time.perf_counter() - t0)


def attention_seconds(rows: int, kv_heads: int, group: int, positions: int, head_dim: int,
                      repeats: int = 30) -> float:
    """Seconds of one decode step's SDPA (queries packed per key/value head, as transformers does for one token)."""
    cache = torch.randn(2, rows, kv_heads, positions + 64, head_dim)
    k, v = cache[0, :, :, :positions], cache[1, :, :, :positions]  # slices of a longer cache, as the slot cache
    q = torch.randn(rows, kv_heads, group, head_dim)
    mask = torch.rand(rows, 1, 1, positions) > 0.2

    def step():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim ** -0.5)

    step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    args = bench_parser(__doc__.splitlines()[0]).parse_args()
    model, tok, calls = bench_setup(args)
    jobs = [GenerationJob(prompts, system_prompt=system) for prompts, system in calls]
    generate_many(model, tok, [GenerationJob(calls[0][0][:4])], max_new_tokens=4, progress=False)  # warm-up

    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        answers = generate_many(model, tok, jobs, max_new_tokens=args.max_new_tokens, progress=False)
    wall = time.perf_counter() - t0
    new = new_tokens(tok, [a for job in answers for a in job])
    total = mm = attn = 0.0
    for event in prof.key_averages():
        total += event.self_cpu_time_total
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            mm += event.self_cpu_time_total
        elif "scaled_dot_product" in event.key:
            attn += event.self_cpu_time_total
    mm_share, attn_share = mm / total, attn / total
    rate = new / wall

    _, kv_heads, head_dim = _kv_shape(model)
    group = model.config.num_attention_heads // kv_heads
    rows = min(sum(len(p) for p, _ in calls), MAX_SLOTS)
    positions = 200  # a slot's cached positions midway through an answer (prefix + own tokens + half an answer)
    measured = attention_seconds(rows, kv_heads, group, positions, head_dim)
    read = read_rate()
    at_read_rate = 2 * rows * kv_heads * positions * head_dim * 4 / read
    # the engine's time if matrix products stay as measured and attention runs at the read rate, nothing else
    bound = rate / (mm_share + attn_share * at_read_rate / measured)
    print(f"model={args.model} prompts={sum(len(p) for p, _ in calls)} max_new_tokens={args.max_new_tokens} "
          f"threads={torch.get_num_threads()}")
    print(f"engine under profiler: {wall:.1f} s, {new} new tokens, {rate:.1f} tok/s; self CPU: matrix products "
          f"{100 * mm_share:.1f} %, attention {100 * attn_share:.1f} %, other {100 * (1 - mm_share - attn_share):.1f} %"
          )
    print(f"attention, one decode step a layer ({rows} rows, {kv_heads}x{group} heads, {positions} positions): "
          f"{1e3 * measured:.2f} ms; at the read rate ({read / 1e9:.1f} GB/s) {1e3 * at_read_rate:.2f} ms")
    print(f"tok_s={rate:.1f} bound_tok_s={bound:.1f} headroom={bound / rate:.2f} mm_share={mm_share:.3f} "
          f"attention_share={attn_share:.3f}")


if __name__ == "__main__":
    main()
