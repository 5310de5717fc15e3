"""Did a change move any result of the demo? Run the test suite's tiny-model demo-quick on two commits and compare.

    python tools/demo_identity.py BASE_COMMIT [--data-dir ../shared/data]

A refactor must keep behaviour: this runs the demo as `tests/test_demo.py` composes it (every budget cut to
seconds, a tiny random model) once with BASE_COMMIT's code (a temporary git worktree) and once with the working
tree, each in its own process, then compares every result file: JSON/JSONL with wall times left out and the run
folder's path masked, safetensors tensor by tensor, anything else byte for byte. Reports, Markdown, figures and
the runner's bookkeeping (done.json, started.json: keys move when a step kind is renamed) are not results.
Last line: `compared N result files: K identical; differ: [...]`; exit status 1 when a result differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMES = {"train_seconds", "eval_seconds", "generation_s", "total_s", "tokens_per_s", "wall_s", "seconds", "accuracy_s",
         "finished", "started"}
NOT_RESULTS = ("done.json", "started.json", ".md", ".doc.json", "report.html", "experiment.yaml", ".png", ".safeunits.json")

RUN = """
import copy, sys
from pathlib import Path
from safeunits.experiments import runner, steps
from safeunits.experiments.config import load_experiment
from safeunits.models import loading
from safeunits.train.recipes import run as recipes
from test_demo import TINY_STEPS, tiny_suite
from tiny import tiny_model, tiny_tokenizer

out, data_dir = Path(sys.argv[1]), sys.argv[2]
model, tokenizer = tiny_model(initializer_range=0.2, max_position_embeddings=4096), tiny_tokenizer()
real = loading.load_model

def loader(shared):
    def load(name, **kw):
        if (out / "run") in Path(name).parents:
            return real(name, **kw)
        return (model if shared else copy.deepcopy(model)), tokenizer
    return load

steps.load_model, recipes.load_model = loader(True), loader(False)
experiment = load_experiment("demo-quick", {"suite": tiny_suite(out / "tiny.yaml"), "data_dir": data_dir,
                                            "steps": TINY_STEPS})
runner.run_experiment(experiment, out / "run", progress=False)
"""


def run_demo(tree: Path, out: Path, data_dir: str) -> Path:
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{tree / 'tests'}", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", RUN, str(out), data_dir], cwd=tree, env=env, check=True)
    return out / "run"


def _masked(x, root: str):
    if isinstance(x, dict):
        return {k: _masked(v, root) for k, v in x.items() if k not in TIMES}
    if isinstance(x, list):
        return [_masked(v, root) for v in x]
    return x.replace(root, "RUN") if isinstance(x, str) else x


def content(path: Path, root: Path):
    """What a result file says, without wall times or the run folder's own path."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {k: v.numpy().tobytes() for k, v in load_file(path).items()}
    if path.suffix in (".json", ".jsonl"):
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        return [_masked(json.loads(line), str(root)) for line in lines if line.strip()]
    if path.suffix in (".yaml", ".txt"):
        return path.read_text().replace(str(root), "RUN")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def result_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not str(p).endswith(NOT_RESULTS)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the commit to compare the working tree with")
    ap.add_argument("--data-dir", default=os.environ.get("SAFEUNITS_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base_tree), args.base], check=True)
        try:
            a = run_demo(base_tree, Path(tmp) / "a", args.data_dir).resolve()
            b = run_demo(ROOT, Path(tmp) / "b", args.data_dir).resolve()
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
        fa, fb = result_files(a), result_files(b)
        diff = [n for n in sorted(fa & fb) if content(a / n, a) != content(b / n, b)]
        print(f"only in {args.base}: {sorted(fa - fb)}; only in the working tree: {sorted(fb - fa)}")
        print(f"compared {len(fa & fb)} result files: {len(fa & fb) - len(diff)} identical; differ: {diff}")
    return 1 if diff or fa != fb else 0


if __name__ == "__main__":
    sys.exit(main())
