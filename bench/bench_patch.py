"""Benchmark SafePatching's merge and streamed apply against dense baselines measured in the same run.

    python bench/bench_patch.py [--layers 8 --hidden 512] [--skip-mergekit]

1. controllable merge (two dense patch folders -> sparse patch) and streamed apply onto a checkpoint:
   wall time and peak RSS, each in a fresh subprocess, as a ratio of the dense model's size; baseline:
   the dense way (load the model, add a dense delta in memory, save_pretrained).
2. sparse patch file size vs the kept fraction.
3. task arithmetic on two dense deltas vs mergekit's `task_arithmetic` on the same tiny checkpoints
   (same result to float tolerance, time ratio), when mergekit is installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _child import run_in_child  # bench/_child.py (scripts run from bench/)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _status(key: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith(key))


def _child(task: str, args: dict, queue) -> None:
    """Run one operation in a fresh process: peak anonymous RSS (sampled every 5 ms; memory-mapped safetensors
    pages are page cache, not counted) and peak total RSS (VmHWM, includes those mapped pages), and time."""
    import threading
    import safeunits.patching.apply as ap  # noqa: F401  (imports before the baseline)
    from safeunits.models.loading import load_model
    from safeunits.patching.merge import MergeConfig, controllable_merge
    from safeunits.patching.patches import DensePatch
    from safeunits.patching.sparse import SparsePatch
    from safeunits.io import load_safetensors

    base_rss = _status("RssAnon")
    peak_anon = [base_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if task == "merge":
        patch = controllable_merge(DensePatch(args["se"]), DensePatch(args["osm"]),
                                   MergeConfig(a=args["a"], b=args["a"]), progress=False)
        patch.save(args["out"])
    elif task == "apply_stream":
        ap.apply_patch_to_checkpoint(args["model"], SparsePatch.load(args["patch"]), args["out"], progress=False)
    elif task == "apply_dense":
        model, tok = load_model(args["model"])
        delta = load_safetensors(Path(args["se"]) / "delta.safetensors")
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(delta[n])
        from safeunits.models.loading import save_model

        save_model(model, tok, args["out"])
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    queue.put({"seconds": seconds, "peak_mb": peak_anon[0], "base_mb": base_rss, "hwm_mb": _status("VmHWM")})


def run_child(task: str, **args) -> dict:
    return run_in_child(_child, task, args)


def make_model(root: Path, layers: int, hidden: int):
    from tiny import tiny_model, tiny_tokenizer
    from safeunits.models.loading import model_fingerprint, save_model
    from safeunits.models.signature import architecture_description
    from safeunits.patching.patches import save_dense_patch

    model = tiny_model(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    tok = tiny_tokenizer()
    save_model(model, tok, root / "base")
    sig, fp = architecture_description(model), model_fingerprint(model)
    for i, name in enumerate(("se", "osm")):
        gen = torch.Generator().manual_seed(i)
        params = dict(model.named_parameters())
        delta = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in params.items()}
        sal = {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}
        save_dense_patch(root / name, delta, sal, {"signature": sig, "backbone_fingerprint": fp})
        del delta, sal
    return model


def bench_mergekit(root: Path, model) -> dict:
    """θ_B + 1.0·δ_SE + 0.5·δ_OSM: safeunits task arithmetic (sparse patch, streamed) vs mergekit task_arithmetic."""
    from tiny import tiny_tokenizer
    from safeunits.io import load_safetensors
    from safeunits.models.loading import load_model, save_model
    from safeunits.patching.apply import apply_patch_to_checkpoint
    from safeunits.patching.methods import task_arithmetic
    from safeunits.patching.patches import DensePatch

    if shutil.which("mergekit-yaml") is None:
        return {"skipped": "mergekit not installed"}
    for name in ("se", "osm"):  # mergekit needs full checkpoints θ_B + δ
        delta = load_safetensors(root / name / "delta.safetensors")
        m, _ = load_model(str(root / "base"))
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(delta[n])
        save_model(m, tiny_tokenizer(), root / f"{name}_model")
    t0 = time.perf_counter()
    patch = task_arithmetic([DensePatch(root / "se"), DensePatch(root / "osm")], [1.0, 0.5], progress=False)
    apply_patch_to_checkpoint(root / "base", patch, root / "ta_ours", progress=False)
    ours_s = time.perf_counter() - t0
    cfg = {"merge_method": "task_arithmetic", "base_model": str(root / "base"), "dtype": "float32",
           "parameters": {"normalize": False},
           "models": [{"model": str(root / "se_model"), "parameters": {"weight": 1.0}},
                      {"model": str(root / "osm_model"), "parameters": {"weight": 0.5}}]}
    (root / "mk.yml").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run(["mergekit-yaml", str(root / "mk.yml"), str(root / "ta_mk"), "--allow-crimes"],
                          capture_output=True, text=True)
    mk_s = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"skipped": f"mergekit failed: {proc.stderr[-400:]}"}
    ours = load_safetensors(next((root / "ta_ours").glob("*.safetensors")))
    theirs = {}
    for f in (root / "ta_mk").glob("*.safetensors"):
        theirs.update(load_safetensors(f))
    diffs = [float((ours[k] - theirs[k]).abs().max()) for k in ours if k in theirs]
    return {"tensors_compared": len(diffs), "tensors_total": len(ours), "max_abs_diff": max(diffs),
            "ours_s": ours_s, "mergekit_s": mk_s, "mergekit_over_ours": mk_s / ours_s,
            "note": "mergekit time includes its process start-up (CLI), ours includes building the sparse patch"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--skip-mergekit", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_patch_"))
    try:
        model = make_model(root, args.layers, args.hidden)
        n_params = sum(p.numel() for p in model.parameters())
        model_mb = n_params * 4 / 2**20
        largest_mb = max(p.numel() for p in model.parameters()) * 4 / 2**20
        print(f"model: {n_params / 1e6:.1f} M params, {model_mb:.0f} MB float32, largest tensor {largest_mb:.1f} MB")
        rows = {}
        for a in (1.0, 5.0, 20.0):
            r = run_child("merge", se=str(root / "se"), osm=str(root / "osm"), a=a, out=str(root / f"merged_{a:g}"))
            size = (root / f"merged_{a:g}" / "patch.safetensors").stat().st_size / 2**20
            kept = json.loads((root / f"merged_{a:g}" / "manifest.json").read_text())["kept_fraction"]
            rows[f"merge a=b={a:g}%"] = {**r, "file_mb": size, "kept_fraction": kept,
                                         "file_over_dense": size / model_mb}
        stream = run_child("apply_stream", model=str(root / "base"), patch=str(root / "merged_5"), out=str(root / "out_s"))
        dense = run_child("apply_dense", model=str(root / "base"), se=str(root / "se"), out=str(root / "out_d"))
        rows["apply streamed (5% patch)"] = stream
        rows["apply dense baseline (load, add, save)"] = dense
        print("\n| operation | wall s | peak anon RSS above imports (MB) | x model size | total RSS peak incl. mmap (MB) "
              "| file MB | kept | file / dense |")
        print("|---|---|---|---|---|---|---|---|")
        for k, r in rows.items():
            extra = r["peak_mb"] - r["base_mb"]
            print(f"| {k} | {r['seconds']:.2f} | {extra:.0f} | {extra / model_mb:.2f} | {r['hwm_mb']:.0f} | "
                  f"{r.get('file_mb', float('nan')):.1f} | {100 * r.get('kept_fraction', float('nan')):.2f}% | "
                  f"{r.get('file_over_dense', float('nan')):.3f} |")
        print(f"\nstreamed apply vs dense apply: time x{stream['seconds'] / dense['seconds']:.2f}, "
              f"peak x{(stream['peak_mb'] - stream['base_mb']) / (dense['peak_mb'] - dense['base_mb']):.2f}; "
              f"target peak <= 1.3 x model + one tensor = {1.3 * model_mb + largest_mb:.0f} MB")
        if not args.skip_mergekit:
            print("\nmergekit task_arithmetic:", json.dumps(bench_mergekit(root, model), indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
