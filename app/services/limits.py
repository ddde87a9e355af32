"""Per-labeler rate limits: one labeler cannot flood the web app, the sampler or the database.

A token bucket per (labeler, action): `burst` requests at once, then `rate` per second. A person
labeling by hand never meets them (a vote a second is fast; the page polls for pairs once a
second); a script in a loop does, and gets one line saying how long to wait, while every other
labeler's requests go on. In memory, per serve process (the web app is one process).

Measured why they are needed: one labeler sent 200 "ask your own prompt" calls in 7.9 s through
the HTTP API; all were accepted, and workers serve typed prompts first, so training pairs stopped.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from odpo.db.errors import OdpoError


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second
    burst: int


# action -> its limit. ask: typed prompts cost a sampler batch each, so they are scarce; next and
# vote are short database transactions, limited only against a runaway loop (a script labeling with
# a judge votes a few times a second; the page polls for pairs once a second).
DEFAULT_LIMITS = {"ask": Limit(rate=1 / 10, burst=3), "next": Limit(rate=50.0, burst=200),
                  "vote": Limit(rate=20.0, burst=100)}
WHAT = {"ask": "typed prompts", "next": "requests for pairs", "vote": "votes"}


class RateLimited(OdpoError):
    """Too many requests of one kind from one labeler; the message says how long to wait."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimits:
    limits: dict[str, Limit] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    clock: Callable[[], float] = time.monotonic
    max_keys: int = 10_000  # buckets kept; full ones are forgotten first when there are more
    _buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, action: str, who: str) -> None:
        """Spend one token of `who`'s `action` bucket, or raise RateLimited."""
        limit = self.limits[action]
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get((action, who))
            if bucket is None:
                self._forget_full(now)
                bucket = self._buckets[(action, who)] = _Bucket(tokens=float(limit.burst), at=now)
            bucket.tokens = min(float(limit.burst), bucket.tokens + (now - bucket.at) * limit.rate)
            bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = (1.0 - bucket.tokens) / limit.rate
        raise RateLimited(f"slow down: too many {WHAT.get(action, action)}; try again in {math.ceil(wait)} s", wait)

    def _forget_full(self, now: float) -> None:
        if len(self._buckets) < self.max_keys:
            return
        for key, bucket in list(self._buckets.items()):
            limit = self.limits[key[0]]
            if bucket.tokens + (now - bucket.at) * limit.rate >= limit.burst:
                del self._buckets[key]
