"""Test helpers for code that runs in threads: wait for a condition, run workers side by side."""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable


def wait_until(predicate: Callable[[], object], timeout: float, *, poll: float = 0.01) -> None:
    """Poll `predicate` until it is truthy; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(poll)


def run_in_threads(work: Callable[[str], None], names: Iterable[str], *, timeout: float) -> list[BaseException]:
    """work(name) in one thread per name, all joined; returns what they raised (empty: all fine)."""
    errors: list[BaseException] = []

    def guarded(name: str) -> None:
        try:
            work(name)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test to assert on
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(name,)) for name in names]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    return errors
