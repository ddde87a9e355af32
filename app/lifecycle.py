"""How odpo's long-running processes (serve, sample) stop: SIGTERM as Ctrl-C, a second SIGTERM
ignored while stopping, and an exit that skips the interpreter's slow teardown."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any


def wait_until_interrupted() -> None:
    forever = threading.Event()
    while not forever.wait(1.0):
        pass


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_as_interrupt() -> Any:
    """`odpo up` and service managers stop us with SIGTERM: treat it like Ctrl-C so the sampler
    stops between decode steps and the web server closes its socket."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def ignore_sigterm_while_stopping(previous: Any) -> None:
    """A second SIGTERM (a service manager repeating itself) must not cut the clean-up short with
    a traceback; `odpo up` follows up with SIGKILL if we ever overrun its grace period."""
    if previous is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def exit_now(code: int = 0) -> None:
    """End the serve process at once, after its orderly shutdown (web server closed, sampler
    stopped, database closed), skipping the interpreter's own teardown.

    Measured with the default model on a loaded 2-core machine: run_serve returns 0.5-1 s after
    SIGTERM, then Python's finalisation (garbage-collecting ~700k objects of torch, transformers
    and gradio) took another 5-8 s, which is most of what made serve overrun `odpo up`'s grace.
    Nothing is lost by skipping it: atexit handlers still run and the streams are flushed."""
    import atexit
    import os
    import sys

    logging.shutdown()
    run_exit_functions = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_functions is not None:
        run_exit_functions()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to say anyway
            pass
    os._exit(code)
