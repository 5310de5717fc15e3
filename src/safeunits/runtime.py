"""Process-wide settings every command shares: how many CPU threads torch uses, and whether model repositories
may run their own code. Light on purpose (no torch import until threads are set): the CLI imports it to start.
"""

from __future__ import annotations

import math
import os
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
