"""Background threads and processes lower their own priority, and only their own."""
from __future__ import annotations

import os
import sys
import threading

import pytest

from odpo.trainer.priority import lower_process_priority, lower_thread_priority

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


@linux_only
def test_a_thread_lowers_its_own_priority_not_the_process():
    seen: dict[str, int] = {}

    def background() -> None:
        tid = threading.get_native_id()
        seen["before"] = os.getpriority(os.PRIO_PROCESS, tid)
        seen["ok"] = lower_thread_priority(3)
        seen["after"] = os.getpriority(os.PRIO_PROCESS, tid)

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    th = threading.Thread(target=background)
    th.start()
    th.join()
    assert seen["ok"] and seen["after"] == min(19, seen["before"] + 3)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_no_increment_changes_nothing():
    assert lower_thread_priority(0) is False and lower_process_priority(0) is False


@linux_only
def test_a_child_process_lowers_its_priority():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the nice value after lowering it, then leave without cleanup
        os.close(read)
        lower_process_priority(4)
        os.write(write, str(os.nice(0)).encode())
        os._exit(0)
    os.close(write)
    got = int(os.read(read, 16).decode())
    os.waitpid(pid, 0)
    os.close(read)
    assert got == min(19, os.nice(0) + 4)
