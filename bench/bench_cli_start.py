"""Start-up time of the CLI: `safeunits --help`, `--version` and a mistyped command (target: <= 1 s on 2 idle
cores), against what the eager command table cost before (importing every command module, i.e. torch and
transformers), in the same run so the ratio holds on a loaded machine.

    python bench/bench_cli_start.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND_MODULES = ["safeunits.commands.models", "safeunits.commands.data", "safeunits.commands.eval", "safeunits.commands.train",
                   "safeunits.commands.patch", "safeunits.commands.units", "safeunits.commands.experiments"]
CASES = {
    "safeunits --help": ["-m", "safeunits", "--help"],
    "safeunits --version": ["-m", "safeunits", "--version"],
    "safeunits evall (mistyped: exit 2)": ["-m", "safeunits", "evall"],
    "before: every command module imported (the old eager table)": ["-c", "import " + ", ".join(COMMAND_MODULES)],
}


def wall(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (after one warm-up run)")
    runs = parser.parse_args().runs
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{runs} runs each, {len(os.sched_getaffinity(0))} CPUs, load {load:.1f} (the cores may be shared)")
    medians = {}
    for name, args in CASES.items():
        wall(args)  # warm the file cache
        times = [wall(args) for _ in range(runs)]
        medians[name] = statistics.median(times)
        print(f"{name}: median {medians[name]:.2f} s (min {min(times):.2f}, max {max(times):.2f})")
    before = medians[list(CASES)[-1]]
    print(f"--help vs the old eager start: {medians['safeunits --help']:.2f} s vs {before:.2f} s "
          f"({before / medians['safeunits --help']:.1f}x faster)")


if __name__ == "__main__":
    main()
