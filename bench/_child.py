"""Run one measurement in a fresh spawned process (clean memory peaks, no state carried between measurements)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any


def run_in_child(target: Callable[..., None], *args: Any) -> Any:
    """Call `target(*args, queue)` in a spawned process and return what it put on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"{target.__name__}{args[:1]} failed in its subprocess (exit {proc.exitcode})")
    return out
