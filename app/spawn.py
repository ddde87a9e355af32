"""How `odpo up` starts a child process: its environment, its share of the CPU threads, its
priority, and the kernel's promise to stop it when the supervisor dies."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Sequence


class _UsesTorch(Protocol):
    uses_torch: bool


def threads_per_child(children: Sequence[_UsesTorch]) -> Optional[int]:
    """Split the CPU cores between the children that run models, unless the user set
    OMP_NUM_THREADS. Each torch process otherwise starts one thread per core, and on a small
    machine serve and train then spin against each other: measured 3-30x slower decode steps on
    2 cores, versus one thread each."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    heavy = sum(1 for c in children if c.uses_torch)
    if not heavy:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // heavy)


def child_env(threads: Optional[int] = None, *, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Children import this very checkout, log unbuffered and line by line; `extra` is what they
    must not see in argv (the database URL: `ps` shows every process's arguments to every user)."""
    env = dict(os.environ)
    env.update(extra or {})
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def preexec_hook(nice: int, *, parent: int) -> Optional[Callable[[], None]]:
    """What a child runs between fork and exec: die with the supervisor, lower its priority.

    It runs in the forked copy of a multi-threaded process (a restart happens while the output
    readers run), so it only makes system calls through functions resolved beforehand: no
    imports, no logging, no locks."""
    from odpo.trainer.priority import lower_process_priority

    die_with_parent = _die_with_parent_hook(parent)
    if not nice:
        return die_with_parent

    def hook() -> None:
        if die_with_parent is not None:
            die_with_parent()
        lower_process_priority(nice)

    return hook


def _die_with_parent_hook(parent: int) -> Optional[Callable[[], None]]:
    """Linux: the child gets SIGTERM when the supervisor dies, even by SIGKILL, and stops cleanly
    (serve closes, the judge hands back its claims, train commits its step). If the supervisor
    died before the child could ask for that, the child stops at once."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    getppid, kill, getpid = os.getppid, os.kill, os.getpid

    def die_with_parent() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if getppid() != parent:
            kill(getpid(), signal.SIGKILL)

    return die_with_parent
