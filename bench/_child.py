"""Run one measurement in a fresh spawned process (clean memory peaks, no state carried between measurements)."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
from collections.abc import Callable
from typing import Any


def run_in_child(target: Callable[..., None], *args: Any) -> Any:
    """Call `target(*args, queue)` in a spawned process and return what it put on the queue; a child that dies
    (an exception, the OOM killer) before putting anything raises here instead of leaving the caller waiting."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        try:
            out = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive() and queue.empty():
                proc.join()
                raise RuntimeError(f"{target.__name__}{args[:1]} died in its subprocess (exit {proc.exitcode}) "
                                   "before reporting a result") from None
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"{target.__name__}{args[:1]} failed in its subprocess (exit {proc.exitcode})")
    return out
