"""Sign-in rules that are not the password check: back-off after failures, and sessions that end.

LoginThrottle: after `free` failed sign-ins for one name, or from one client address, each further
attempt must wait twice as long as the last (1 s, 2 s, 4 s, ... up to `max_wait_s`), so guessing a
password online costs days instead of seconds, while a person who mistyped twice is never slowed.
A success clears the name's count (not the address's: one right password must not reset the
counter of an address that guesses many names).

SessionBook: when each sign-in session began; a session older than `max_age_s` is over, and the
web app forgets its token, so a borrowed or stolen cookie stops working (default 12 h).

Both are plain, thread-safe bookkeeping with an injectable clock, used by the web app's sign-in
guard (app/ui/sessions.py), and kept in memory: a restarted serve starts fresh, which only ever
signs people out.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from odpo.trainer.options import DEFAULT_SESSION_HOURS


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


@dataclass
class LoginThrottle:
    free: int = 3
    max_wait_s: float = 900.0
    clock: Callable[[], float] = time.monotonic
    _by_key: dict[str, _Failures] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_s(self, name: str, address: str) -> float:
        """Seconds until `name` from `address` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            return max(self._wait(self._by_key.get(k), now) for k in self._keys(name, address))

    def failed(self, name: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            for key in self._keys(name, address):
                entry = self._by_key.setdefault(key, _Failures())
                entry.count, entry.last = entry.count + 1, now

    def succeeded(self, name: str, address: str) -> None:
        with self._lock:
            self._by_key.pop(f"name:{_norm(name)}", None)

    def _wait(self, entry: Optional[_Failures], now: float) -> float:
        if entry is None or entry.count < self.free:
            return 0.0
        delay = min(self.max_wait_s, 2.0 ** (entry.count - self.free))
        return max(0.0, entry.last + delay - now)

    @staticmethod
    def _keys(name: str, address: str) -> tuple[str, str]:
        return f"name:{_norm(name)}", f"addr:{address}"


@dataclass
class SessionBook:
    max_age_s: float = DEFAULT_SESSION_HOURS * 3600
    clock: Callable[[], float] = time.time
    _started: dict[str, tuple[str, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self, token: str, user: str) -> None:
        with self._lock:
            self._started[token] = (user, self.clock())

    def expired(self, token: str) -> bool:
        """True for a token that is over its age, or that this book never saw begin."""
        with self._lock:
            entry = self._started.get(token)
            if entry is None:
                return True
            if self.clock() - entry[1] >= self.max_age_s:
                del self._started[token]
                return True
            return False

    def __len__(self) -> int:
        return len(self._started)


def _norm(name: str) -> str:
    return (name or "").strip().casefold()
