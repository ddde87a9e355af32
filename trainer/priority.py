"""Background work yields the CPU to people: a lower scheduling priority (a higher nice value).

On a small machine the sampler and the trainer keep every core busy, and a labeler's vote then
waits its turn behind them: on 2 cores the labelers bench measured the wait for the next pair at
p50 123 ms / p95 178 ms with everything at nice 0, and 38 ms / 74 ms with the sampler thread and
the trainer at nice 10 (same labels per hour, same steps trained). Nice only matters when the CPU
is contended, so an idle app loses nothing.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

from odpo.trainer.options import BACKGROUND_NICE

log = logging.getLogger(__name__)


def lower_thread_priority(increment: int = BACKGROUND_NICE) -> bool:
    """Raise the calling thread's nice value by `increment` (Linux: a thread id is a valid target
    of setpriority). Returns False where that is not possible, and logs why; never raises."""
    if increment <= 0:
        return False
    if not sys.platform.startswith("linux"):
        log.debug("thread priorities are per-process here; the sampler keeps nice 0")
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError as exc:
        log.warning("could not lower the priority of thread %d: %s", tid, exc)
        return False
    return True


def lower_process_priority(increment: int = BACKGROUND_NICE) -> bool:
    """os.nice for a child process about to exec (safe in a preexec hook: no logging there)."""
    if increment <= 0 or not hasattr(os, "nice"):
        return False
    try:
        os.nice(increment)
    except OSError:
        return False
    return True
