"""Process-wide settings every command shares: how many CPU threads torch uses, whether model repositories may
run their own code, and how much is logged. Light on purpose (no torch import until threads are set): the CLI
imports it to start.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

TRUST_REMOTE_CODE_ENV = "SAFEUNITS_TRUST_REMOTE_CODE"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2 quota: "<quota> <period>" or "max <period>"


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, cut to the cgroup's CPU quota (containers, CI runners).

    Why not os.cpu_count(): on a shared or containerised machine it counts CPUs the process cannot run on, and
    torch's thread pool then oversubscribes the cores it has (measured 6x slower generation on a loaded 2-core box)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_threads() -> int:
    """`$OMP_NUM_THREADS` when set (the usual knob of torch and BLAS), else `available_cpus()`."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return available_cpus()


def set_threads(threads: int | None = None) -> int:
    """Make torch use `threads` CPU threads (None: `default_threads()`); returns the number set."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


# --- logging -----------------------------------------------------------------------------------------------

class _Formatter(logging.Formatter):
    """Progress messages (INFO) as plain lines; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        elif record.levelno < logging.INFO:
            text = f"{record.name}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Handler(logging.StreamHandler):
    """The CLI's stderr handler on the `safeunits` logger (one at a time; other loggers are left alone).

    It writes to whatever `sys.stderr` is at the time of the message, not the stream of its creation (which a
    test runner may have closed since)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def set_verbosity(level: int) -> None:
    """Show safeunits' log messages on stderr from `level` on (INFO: progress; WARNING: quiet)."""
    logger = logging.getLogger("safeunits")
    handler = _Handler()
    handler.setFormatter(_Formatter())
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _Handler)] + [handler]
    logger.setLevel(level)
    if level >= logging.WARNING:  # quiet: the libraries' bars too (transformers' "Loading weights", Hub downloads)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub when it loads later
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # also the Hub's bars
        elif "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


@dataclass(frozen=True)
class RunContext:
    """What any step of work needs besides its own settings: the data folder datasets load from and whether to
    show progress. Training takes this; evaluation (`EvalContext`) adds a suite and a backend on top."""

    data_dir: Path | None = None
    progress: bool = True

