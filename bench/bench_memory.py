"""Peak memory of every step in bfloat16, measured on two models, fitted per parameter and per token, and
extrapolated to an 8B Llama-3 shape (docs/scale.md).

    python bench/bench_memory.py [--big-layers 16 --big-hidden 1536 --big-mlp 4096] [--seq 256 --batches 1 4]
                                 [--gen-new 64] [--steps load,scores,...] [--json out.json]

Models: the default model (smollm2-135m-instruct) in bf16, and a randomly initialised Llama built from a config
(no download; vocabulary 128256 like Llama-3, the default model's tokenizer, whose ids all fit) in bf16.
Each (model, step, batch) runs in a fresh spawned process. CPU: the peak anonymous RSS (sampled every 2 ms) and
VmHWM from /proc/self/status, both reset after the model is loaded (/proc/self/clear_refs), so a step's peak is
measured above the loaded model (the fit uses the anonymous peak; VmHWM adds mapped file pages). GPU (when present): torch.cuda.max_memory_allocated above the loaded model. Steps:
load, scores (fluctuation), snip (SafePatching saliency), train_full / train_masked (one AdamW step; masked =
10 % of each layer's units frozen), derive (1-step ascent patch + saliency + δ, written), merge (controllable,
a=b=5 %), apply (streamed onto the checkpoint), generate (greedy, `--gen-new` tokens).
Fit per step and model: peak(T) = c + s·T over the two batch sizes (T tokens); c / P = bytes per parameter.
Per-token slopes are fitted across the two models as s = k_layer·L·(H + I) + k_vocab·V and extrapolated.

Direct measurement of the 8B shape (no extrapolation; a GPU of ~100+ GiB such as an H200, since the steps that do
not fit 80 GB must still run to be measured):

    python bench/bench_memory.py --direct-8b --tokenizer DIR [--seq 256 --batches 2 8] [--derive-no-save]
                                 [--direct-config num_hidden_layers=2,hidden_size=256,...] [--deadline-s 360]

builds a randomly initialised Llama-3-8B-shaped model (LLAMA3_8B; `--direct-config` overrides fields, e.g. a
2-layer narrow copy to check the code path on CPU) directly on `--device` in bf16 (no checkpoint written or
read), and runs every step in ONE process on that model: each step's peak is separated by
torch.cuda.reset_peak_memory_stats (CPU: /proc/self/clear_refs + the anonymous-RSS sampler) after the
previous step's gradients and caches are freed; the host's anonymous RSS above the mark is recorded too.
`--tokenizer` is any tokenizer folder whose ids fit in the vocabulary (the default model's by default).
merge and apply are host steps on files (two dense float32 patches of 8B = 128 GB on disk): not run directly.
`--derive-no-save` keeps derive's δ and saliency in memory and skips writing them; `--deadline-s` skips the
runs that would start after that many seconds. `--json` is rewritten after every run. On a lent GPU machine
without network: bench/mem8b_device.sh. Check the code path on CPU (seconds, a 2-layer narrow copy):

    python bench/bench_memory.py --direct-8b --device cpu --seq 64 --batches 1 2 --gen-new 8 --derive-no-save \\
        --direct-config num_hidden_layers=2,hidden_size=256,intermediate_size=896,num_attention_heads=4,num_key_value_heads=1
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from _child import run_in_child  # bench/_child.py (scripts run from bench/)

GIB = 1024 ** 3
DEFAULT = "smollm2-135m-instruct"
LLAMA3_8B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192)
TOKEN_STEPS = ("scores", "snip", "train_full", "train_masked", "derive", "generate")
STEPS = ("load", "scores", "snip", "train_full", "train_masked", "derive", "merge", "apply", "generate")
WORDS = ("the model answers every question with care and cites the sources it used while explaining each step "
         "of the method in plain words so that a reader can follow along").split()


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


class PeakMeter:
    """Peak memory above a mark: GPU allocator peak on CUDA; on CPU the RSS high-water mark (VmHWM) and the peak
    anonymous RSS sampled every 2 ms (VmHWM also counts memory-mapped safetensors pages: page cache, which the
    kernel can drop, so the anonymous peak is what a step really needs)."""

    def __init__(self, device: str) -> None:
        import threading

        self.cuda = device.startswith("cuda")
        self.anon_peak = 0
        threading.Thread(target=self._sample, daemon=True).start()  # host RSS, also on CUDA (host_peak)

    def _sample(self) -> None:
        while True:
            self.anon_peak = max(self.anon_peak, _status_bytes("RssAnon"))
            time.sleep(0.002)

    def anon(self) -> int:
        """Peak anonymous RSS since the last reset (the GPU peak on CUDA)."""
        return self.peak() if self.cuda else max(self.anon_peak, _status_bytes("RssAnon"))

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _status_bytes("VmRSS")

    def reset(self) -> int:
        """Restart the high-water mark at the current usage; returns that usage."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            if not self.cuda:
                raise
        self.anon_peak = _status_bytes("RssAnon")
        return self.current()

    def host_peak(self) -> int:
        """Peak anonymous host RSS since the last reset (on CPU and on CUDA)."""
        return max(self.anon_peak, _status_bytes("RssAnon"))

    def reserved_peak(self) -> int:
        """The CUDA caching allocator's peak reservation since the last reset (0 on CPU)."""
        return torch.cuda.max_memory_reserved() if self.cuda else 0

    def current_anon(self) -> int:
        return self.current() if self.cuda else _status_bytes("RssAnon")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_bytes("VmHWM")


def _records(n: int, seq: int):
    from safeunits.data.records import Record

    response = " ".join(WORDS[i % len(WORDS)] for i in range(2 * seq))  # longer than seq: max_length cuts it
    return [Record(f"Question {i}: explain the method.", response) for i in range(n)]


def _run_step(step: str, model, tok, spec: dict) -> None:
    """The work of one step (model and tokenizer already loaded, except for merge and apply)."""
    from safeunits.patching.apply import apply_patch_to_checkpoint
    from safeunits.patching.merge import MergeConfig, controllable_merge
    from safeunits.patching.patches import DensePatch, PatchConfig, derive_patch
    from safeunits.patching.saliency import SaliencyConfig, snip_saliency
    from safeunits.patching.sparse import SparsePatch
    from safeunits.train.engine import TrainConfig, train
    from safeunits.units.scores import ScoreConfig, compute_scores
    from safeunits.units.selection import UnitSelection, unit_parameter_masks

    batch, seq = spec.get("batch", 1), spec["seq"]
    records = _records(batch, seq)
    if step == "scores":
        compute_scores(model, tok, records, ScoreConfig(batch_size=batch, max_length=seq), progress=False)
    elif step == "snip":
        snip_saliency(model, tok, records, SaliencyConfig(batch_size=batch, max_length=seq), progress=False)
    elif step in ("train_full", "train_masked"):
        frozen = None
        if step == "train_masked":
            cfg = model.config
            units = UnitSelection(mlp={l: list(range(cfg.intermediate_size // 10)) for l in range(cfg.num_hidden_layers)},
                                  heads={l: list(range(max(1, cfg.num_attention_heads // 10)))
                                         for l in range(cfg.num_hidden_layers)})
            frozen = unit_parameter_masks(model, units)
        train(model, tok, records, TrainConfig(max_steps=1, batch_size=batch, max_length=seq, lr=1e-5, seed=0),
              frozen=frozen, progress=False)
    elif step == "derive":
        import safeunits.patching.patches as patches

        config = PatchConfig(objective="ascent", train={"max_steps": 1, "batch_size": batch, "max_length": seq,
                                                        "stop_nll_above": None},
                             saliency=SaliencyConfig(batch_size=batch, max_length=seq))
        save = patches.save_dense_patch
        if spec.get("derive_no_save"):  # δ and saliency computed and held, not written (8B: 64 GB of files)
            patches.save_dense_patch = lambda out_dir, delta, saliency, manifest: None
        try:
            derive_patch(model, tok, records, config, spec["out"], progress=False)
        finally:
            patches.save_dense_patch = save
    elif step == "merge":
        controllable_merge(DensePatch(spec["se"]), DensePatch(spec["osm"]), MergeConfig(a=5, b=5),
                           progress=False).save(spec["out"])
    elif step == "apply":
        apply_patch_to_checkpoint(spec["model"], SparsePatch.load(spec["patch"]), spec["out"], progress=False)
    elif step == "generate":
        prompt = tok([records[0].response] * batch, return_tensors="pt", truncation=True, max_length=seq)
        with torch.no_grad():
            model.generate(**{k: v.to(spec["device"]) for k, v in prompt.items()}, max_new_tokens=spec["gen_new"],
                           min_new_tokens=spec["gen_new"], do_sample=False, pad_token_id=tok.pad_token_id)


def _child(step: str, spec: dict, queue) -> None:
    """One step in a fresh process; puts {load_bytes, model_bytes, step_bytes, seconds} on the queue."""
    from safeunits.models.loading import load_model

    meter = PeakMeter(spec["device"])
    base, base_anon = meter.reset(), meter.current_anon()
    model = tok = None
    if step not in ("merge", "apply"):
        model, tok = load_model(spec["model"], dtype="bfloat16", device=spec["device"])
        with torch.no_grad():  # own the weights: a bf16 checkpoint may stay memory-mapped (file pages, not anon)
            for p in model.parameters():
                p.data = p.data.clone()
        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)  # glibc: the float32 -> bf16 conversion's freed buffers leave the heap
    load_peak = meter.peak() - base
    loaded = meter.reset()
    loaded_anon = meter.current_anon()
    t0 = time.perf_counter()
    _run_step(step, model, tok, spec)
    if meter.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    queue.put({"load_bytes": load_peak, "model_bytes": loaded_anon - base_anon, "step_bytes": meter.anon() - loaded_anon,
               "step_hwm_bytes": meter.peak() - loaded, "seconds": seconds})


def measure(step: str, spec: dict) -> dict:
    return run_in_child(_child, step, spec)


def shape(config) -> dict:
    """Parameter count (built on the meta device: no memory) and the dimensions the fit uses."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return {"params": n, "L": config.num_hidden_layers, "H": config.hidden_size, "I": config.intermediate_size,
            "V": config.vocab_size}


def build_big(folder: Path, layers: int, hidden: int, mlp: int) -> dict:
    """A random bf16 Llama from a config with the default model's tokenizer, saved as a checkpoint folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from safeunits.models.loading import load_model, save_model

    _, tok = load_model(DEFAULT)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=mlp,
                         num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                         vocab_size=LLAMA3_8B["vocab_size"], tie_word_embeddings=False, max_position_embeddings=4096,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    save_model(model, tok, folder)
    return shape(config)


def bench_model(name: str, source: str, shp: dict, args, root: Path) -> dict:
    """Every step on one model; token steps at each batch size; patches from derive feed merge and apply."""
    spec = {"model": source, "device": args.device, "seq": args.seq, "gen_new": args.gen_new}
    rows: dict = {"shape": shp, "steps": {}}
    for step in args.steps:
        runs = []
        for i, batch in enumerate(args.batches if step in TOKEN_STEPS else [1]):
            extra: dict = {"batch": batch}
            if step == "derive":
                extra["out"] = str(root / f"{name}-patch{i}")
            elif step == "merge":
                extra.update(se=str(root / f"{name}-patch0"), osm=str(root / f"{name}-patch1"), out=str(root / f"{name}-merged"))
            elif step == "apply":
                extra.update(patch=str(root / f"{name}-merged"), out=str(root / f"{name}-applied"))
            r = measure(step, {**spec, **extra})
            tokens = batch * (args.seq + args.gen_new) if step == "generate" else batch * args.seq
            runs.append({"batch": batch, "tokens": tokens, **r})
            print(f"{name:>8} {step:>13} batch {batch}: model {r['model_bytes'] / GIB:6.2f} GiB, step peak above model "
                  f"{r['step_bytes'] / GIB:6.2f} GiB (VmHWM {r['step_hwm_bytes'] / GIB:6.2f}), load peak "
                  f"{r['load_bytes'] / GIB:6.2f} GiB, {r['seconds']:.1f} s",
                  flush=True)
        rows["steps"][step] = runs
    return rows


def _parse_overrides(text: str) -> dict:
    """"key=int,key=int" -> {key: int} (fields of LLAMA3_8B to change)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in LLAMA3_8B:
            sys.exit(f"--direct-config: unknown field {key!r}; choose from {', '.join(LLAMA3_8B)}")
        out[key] = int(value)
    return out


def _free(model) -> None:
    """Drop what a step left behind (gradients, the allocator's cache, freed host heap) before the next mark."""
    if model is not None:
        model.zero_grad(set_to_none=True)
        model.eval()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    ctypes.CDLL(None).malloc_trim(0)


def bench_direct(args, root: Path) -> dict:
    """Every step on one randomly initialised model of the Llama-3-8B shape, built on the device, in one process.

    Steps share the model (their weight changes do not matter: memory and time do not depend on the values);
    `out` holds everything so far and is written to `--json` after each run, so a run cut short keeps its data.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from safeunits.models.loading import prepare_tokenizer, resolve_model

    t_start = time.perf_counter()
    device = args.device
    meter = PeakMeter(device)
    out: dict = {"mode": "direct", "device": device, "torch": torch.__version__, "steps": {}, "skipped": []}
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        out["gpu"] = {"name": torch.cuda.get_device_name(), "total_bytes": total, "free_bytes_at_start": free}
    import transformers

    out["transformers"] = transformers.__version__

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=str))

    tok = AutoTokenizer.from_pretrained(args.tokenizer or str(resolve_model(DEFAULT)))
    prepare_tokenizer(tok)
    fields = {**LLAMA3_8B, **_parse_overrides(args.direct_config)}
    config = LlamaConfig(**fields, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    if len(tok) > config.vocab_size:
        sys.exit(f"the tokenizer has {len(tok)} ids, more than the vocabulary {config.vocab_size}")
    shp = shape(config)
    out["shape"], out["config"] = shp, fields
    print(f"direct: {shp['params'] / 1e9:.3f} B params ({shp['params'] * 2 / GIB:.2f} GiB in bf16) on {device}",
          flush=True)

    meter.reset()
    base, base_host = meter.current_anon(), meter.host_peak()  # on CPU both are the anonymous RSS
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    if meter.cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    build_peak, build_reserved = meter.anon() - base, meter.reserved_peak()
    _free(model)
    model_bytes = meter.current_anon() - base
    out["steps"]["load"] = [{"batch": 0, "tokens": 0, "model_bytes": model_bytes, "step_bytes": build_peak - model_bytes,
                             "peak_bytes": build_peak, "reserved_peak_bytes": build_reserved,
                             "host_step_bytes": meter.host_peak() - base_host, "seconds": build_s,
                             "note": "random init on the device (no checkpoint read)"}]
    print(f"  {'load':>13}: model {model_bytes / GIB:6.2f} GiB, build peak {build_peak / GIB:6.2f} GiB, "
          f"{build_s:.1f} s", flush=True)
    save()
    spec = {"device": device, "seq": args.seq, "gen_new": args.gen_new, "derive_no_save": args.derive_no_save}
    for step in args.steps:
        if step == "load":
            continue
        if step in ("merge", "apply"):
            out["skipped"].append({"step": step, "why": "host step on patch/checkpoint files: not run in --direct-8b"})
            print(f"  {step:>13}: skipped (host step on files)", flush=True)
            continue
        for i, batch in enumerate(args.batches if step in TOKEN_STEPS else [1]):
            elapsed = time.perf_counter() - t_start
            if args.deadline_s and elapsed > args.deadline_s:
                out["skipped"].append({"step": step, "batch": batch, "why": f"deadline ({elapsed:.0f} s elapsed)"})
                print(f"  {step:>13} batch {batch}: skipped (deadline, {elapsed:.0f} s)", flush=True)
                save()
                continue
            extra = {"batch": batch, "out": str(root / f"direct-patch{i}")}
            meter.reset()  # the model was freed after the build and after every run
            loaded, host0 = meter.current_anon(), meter.host_peak()
            t0 = time.perf_counter()
            try:
                _run_step(step, model, tok, {**spec, **extra})
                error = None
            except Exception as err:  # an OOM or a failure in one step: record it, go on with the next
                error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
            if meter.cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            peak, reserved, host = meter.anon(), meter.reserved_peak(), meter.host_peak()
            _free(model)
            tokens = batch * (args.seq + args.gen_new) if step == "generate" else batch * args.seq
            run = {"batch": batch, "tokens": tokens, "model_bytes": loaded - base, "step_bytes": peak - loaded,
                   "peak_bytes": peak - base, "reserved_peak_bytes": reserved, "host_step_bytes": host - host0,
                   "left_bytes": meter.current_anon() - loaded, "seconds": seconds}
            if error:
                run["error"] = error
            out["steps"].setdefault(step, []).append(run)
            print(f"  {step:>13} batch {batch} ({tokens} tokens): model {run['model_bytes'] / GIB:6.2f} GiB, step "
                  f"peak above model {run['step_bytes'] / GIB:6.2f} GiB, total {run['peak_bytes'] / GIB:6.2f} GiB "
                  f"(reserved {reserved / GIB:6.2f}), host +{run['host_step_bytes'] / GIB:5.2f} GiB, {seconds:.1f} s"
                  + (f"  FAILED {error}" if error else ""), flush=True)
            save()
    out["wall_s"] = time.perf_counter() - t_start
    save()
    return out


def fit(results: dict) -> dict:
    """Per step: bytes per parameter (incl. the loaded model where the step holds one) and per-token slopes."""
    out = {}
    for step in STEPS:
        per_model = {}
        for name, res in results.items():
            runs = res["steps"].get(step)
            if not runs:
                continue
            P = res["shape"]["params"]
            total = [r["step_bytes"] + r["model_bytes"] for r in runs]
            if len(runs) > 1:
                slope = (total[-1] - total[0]) / (runs[-1]["tokens"] - runs[0]["tokens"])
                intercept = total[0] - slope * runs[0]["tokens"]
            else:
                slope, intercept = 0.0, total[0]
            per_model[name] = {"bytes_per_param": intercept / P, "bytes_per_token": slope}
        out[step] = per_model
    return out


def token_coefficients(results: dict, fits: dict, step: str) -> tuple[float, float]:
    """Solve s = k_layer·L·(H + I) + k_vocab·V on the two models (least squares, coefficients kept >= 0)."""
    rows, ys = [], []
    for name, res in results.items():
        if name in fits[step]:
            s = res["shape"]
            rows.append([s["L"] * (s["H"] + s["I"]), s["V"]])
            ys.append(fits[step][name]["bytes_per_token"])
    if not rows or all(y == 0 for y in ys):
        return 0.0, 0.0
    a, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    k = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
    if (k < 0).any():  # noise: fall back to one coefficient on the larger feature
        col = int(k.argmax())
        k = torch.zeros(2, dtype=torch.float64)
        k[col] = float((a[:, col] @ y) / (a[:, col] @ a[:, col]))
    return float(k[0].clamp_min(0)), float(k[1].clamp_min(0))


def extrapolate(results: dict, fits: dict, target: dict, tokens: int, ref: str) -> dict:
    """Peak GiB of each step for `target` with `tokens` tokens, from the `ref` model's bytes/param."""
    out = {}
    for step, per_model in fits.items():
        if ref not in per_model:
            continue
        k_layer, k_vocab = token_coefficients(results, fits, step)
        per_token = k_layer * target["L"] * (target["H"] + target["I"]) + k_vocab * target["V"]
        weights = per_model[ref]["bytes_per_param"] * target["params"]
        out[step] = {"bytes_per_param": per_model[ref]["bytes_per_param"], "weights_gib": weights / GIB,
                     "per_token_kib": per_token / 1024, "tokens": tokens if step in TOKEN_STEPS else 0,
                     "total_gib": (weights + (per_token * tokens if step in TOKEN_STEPS else 0)) / GIB}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-layers", type=int, default=16)
    ap.add_argument("--big-hidden", type=int, default=1536)
    ap.add_argument("--big-mlp", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256, help="tokens per example")
    ap.add_argument("--batches", type=int, nargs=2, default=[1, 4], help="two batch sizes (the token fit)")
    ap.add_argument("--gen-new", type=int, default=64, help="new tokens per generated sequence")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--models", default="default,big")
    ap.add_argument("--extrapolate-tokens", type=int, default=2048, help="tokens per step in the 8B extrapolation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--direct-8b", action="store_true",
                    help="measure the Llama-3-8B shape directly (random weights built on --device, one process)")
    ap.add_argument("--direct-config", default="", help="overrides of LLAMA3_8B for --direct-8b, key=int,...")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for --direct-8b (default: the default model's)")
    ap.add_argument("--derive-no-save", action="store_true", help="--direct-8b: derive holds δ/saliency, writes nothing")
    ap.add_argument("--deadline-s", type=float, default=0.0, help="--direct-8b: start no run after this many seconds")
    args = ap.parse_args()
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        sys.exit(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    if args.direct_8b:
        with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
            out = bench_direct(args, Path(tmp))
        print(f"\ndirect ({out['shape']['params'] / 1e9:.2f} B params, {out['device']}), total = model + step peak:")
        print("| step | tokens | total GiB | reserved GiB | host above mark GiB | seconds |")
        print("|---|---|---|---|---|---|")
        for step, runs in out["steps"].items():
            for r in runs:
                print(f"| {step} | {r['tokens']} | {r['peak_bytes'] / GIB:.2f} | {r['reserved_peak_bytes'] / GIB:.2f} | "
                      f"{r['host_step_bytes'] / GIB:.2f} | {r['seconds']:.2f} |" + (" FAILED" if "error" in r else ""))
        return
    from transformers import AutoConfig, LlamaConfig

    from safeunits.models.loading import resolve_model

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        root = Path(tmp)
        for name in args.models.split(","):
            if name == "default":
                source = str(resolve_model(DEFAULT))
                shp = shape(AutoConfig.from_pretrained(source))
            else:
                source = str(root / "big")
                shp = build_big(root / "big", args.big_layers, args.big_hidden, args.big_mlp)
            print(f"{name}: {shp['params'] / 1e6:.1f} M params ({shp['params'] * 2 / GIB:.2f} GiB in bf16)", flush=True)
            results[name] = bench_model(name, source, shp, args, root)
    fits = fit(results)
    target = shape(LlamaConfig(**LLAMA3_8B))
    ref = "big" if "big" in results else next(iter(results))
    table = extrapolate(results, fits, target, args.extrapolate_tokens, ref)
    print(f"\nLlama-3-8B shape: {target['params'] / 1e9:.2f} B params; {args.extrapolate_tokens} tokens per step "
          f"(seq {args.seq}); bytes/param from '{ref}'")
    print("| step | bytes/param | weights-proportional GiB | per token KiB | total GiB |")
    print("|---|---|---|---|---|")
    for step, row in table.items():
        print(f"| {step} | {row['bytes_per_param']:.2f} | {row['weights_gib']:.1f} | {row['per_token_kib']:.1f} | "
              f"{row['total_gib']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "args": {k: v for k, v in vars(args).items()
                                                                         if k not in ("json",)},
                                         "results": results, "fits": fits, "target": target, "llama3_8b": table},
                                        indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
