"""Transient or fatal: one decision, used by every odpo process.

Real machines have ordinary faults: a database restarted or failed over, a full disk, a vLLM server
or a judge endpoint that goes away for a while. Those are *transient*: the process waits (capped
exponential backoff: 1 s doubling to 30 s, jittered), says so in one line, and goes on when the
fault clears, losing nothing (the ledger's writes are single conditional transactions). Bad
configuration (a wrong URL scheme, bad credentials, a schema newer than the code, a missing model)
is *fatal*: one line, and the process stops, because waiting will not fix it.

Here because db is the bottom layer: the trainer, the sampler, the judge and the web app all import
it. Exceptions from layers above opt in by class attribute (`transient = True`, e.g. the vLLM
backend's server-down error) so this module never imports them.
"""
from __future__ import annotations

import errno
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# sqlstates / messages of a database that is (re)starting or unreachable, and of a conflict a
# retry resolves; checked on the driver's exception text (psycopg and sqlite3 alike)
_DB_TRANSIENT = (
    "connection refused", "could not connect", "connection reset", "server closed the connection",
    "terminating connection", "the database system is starting up", "the database system is shutting down",
    "the database system is in recovery mode", "connection timed out", "no route to host",
    "consuming input failed", "ssl syscall error", "connection is closed", "lost connection",
    "could not serialize access", "deadlock detected", "lock timeout", "database is locked",
    "canceling statement due to lock timeout", "cannot execute", "connection already closed",
    "database or disk is full", "disk i/o error", "is the server running", "connection is bad",
)
_DB_FATAL = ("password authentication failed", "role \"", "does not exist", "no pg_hba.conf entry",
             "permission denied", "invalid dsn", "database schema is newer")
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_TEXT = ("no space left on device", "disk quota exceeded", "database or disk is full")
_NETWORK_TYPES = ("TimeoutException", "ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError",
                  "ReadError", "WriteError", "PoolTimeout")


@dataclass(frozen=True)
class Fault:
    """What went wrong, for people: `what` is database, disk, server or judge; `line` is one line."""

    transient: bool
    what: str
    line: str


def classify(exc: BaseException) -> Fault:
    """Transient (wait and retry) or fatal (stop with the line), from the exception alone."""
    for link in _chain(exc):
        fault = _one(link)
        if fault is not None:
            return fault
    return Fault(False, "error", _first_line(exc))


def is_transient(exc: BaseException) -> bool:
    return classify(exc).transient


def _one(exc: BaseException) -> Optional[Fault]:
    text = str(exc).lower()
    if getattr(exc, "transient", None) is not None:
        return Fault(bool(exc.transient), getattr(exc, "fault_what", "server"), _first_line(exc))
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS or any(t in text for t in _DISK_TEXT):
        return Fault(True, "disk", "disk full: " + _first_line(exc))
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"OperationalError", "InterfaceError", "DisconnectionError"} or "DBAPIError" in names:
        if any(t in text for t in _DB_FATAL):  # a bad password stays bad, whatever else the text says
            return Fault(False, "database", _first_line(exc))
        if any(t in text for t in _DB_TRANSIENT) or getattr(exc, "connection_invalidated", False):
            return Fault(True, "database", "database unreachable: " + _first_line(exc))
    if names & set(_NETWORK_TYPES) or isinstance(exc, (ConnectionError, TimeoutError)):
        return Fault(True, "server", _first_line(exc))
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, what it wraps (SQLAlchemy's .orig) and what caused it, outermost first."""
    out, seen = [], set()
    stack: list[Optional[BaseException]] = [exc]
    while stack:
        link = stack.pop(0)
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        out.append(link)
        stack += [getattr(link, "orig", None), link.__cause__, link.__context__]
    return out


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: first_s, doubling, at most max_s; `reset` after a
    success. Jitter (0.5x..1x) keeps several processes from retrying in lockstep."""

    first_s: float = 1.0
    max_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next_delay(self) -> float:
        self.failures += 1
        cap = min(self.max_s, self.first_s * 2 ** (self.failures - 1))
        return cap * (0.5 + 0.5 * self.rng.random())

    def reset(self) -> None:
        self.failures = 0


def wait_after(exc: BaseException, *, what: str, log: Any, backoff: Backoff, fixed_s: float) -> tuple[float, str]:
    """How long a loop waits after `exc` and the error to show: a transient fault waits out the
    backoff with one log line; anything else is a bug, logged with its traceback, retried after
    `fixed_s` (a long-running thread must not die of one bad unit of work)."""
    fault = classify(exc)
    if not fault.transient:
        log.error("%s failed; retrying in %.0fs", what, fixed_s, exc_info=exc)
        return fixed_s, f"{type(exc).__name__}: {exc}"
    delay = backoff.next_delay()
    log.warning("%s paused: %s; retrying in %.0f s", what, fault.line, delay)
    return delay, f"{fault.line}; retrying in {delay:.0f} s"


def retry_transient(fn: Callable[[], Any], *, what: str, log: Any, backoff: Optional[Backoff] = None,
                    report: Optional[Callable[[Fault, float], None]] = None,
                    should_stop: Callable[[], bool] = lambda: False,
                    sleep: Callable[[float], Any] = time.sleep) -> Any:
    """fn(), retried while it fails transiently: one log line per wait, with the reason and when it
    retries; `report(fault, delay)` tells the process's state (a heartbeat). A fatal error, or a
    stop request, is raised/returned at once (None when stopped)."""
    backoff = backoff or Backoff()
    while True:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - classified: fatal ones are raised as they came
            fault = classify(exc)
            if not fault.transient or should_stop():
                raise
            delay = backoff.next_delay()
            log.warning("%s paused: %s; retrying in %.0f s", what, fault.line, delay)
            if report is not None:
                report(fault, delay)
            sleep(delay)
            if should_stop():
                return None
            continue
        if backoff.failures:
            log.warning("%s resumed", what)
        backoff.reset()
        return result
