"""Simulated labelers for the chaos soak: they vote, double-submit and undo over the HTTP API while
processes die under them. Connection errors while `serve` is down are expected and only counted.

A double submit sends the same vote twice at once from two clients; the ledger must accept exactly
one of them (the other is refused as already answered), which the invariants check afterwards.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from odpo.bench.labeler_sim import ApiClient

SIDES = ("left", "right", "left", "right", "tie")
THINK_S = (0.3, 1.5)


@dataclass
class CrowdStats:
    votes: int = 0
    double_submits: int = 0
    double_accepted: int = 0
    double_refused: int = 0
    double_both_accepted: int = 0
    undos: int = 0
    errors: int = 0
    last_errors: list = field(default_factory=list)

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_errors = [*self.last_errors[-4:], f"{type(exc).__name__}: {str(exc)[:160]}"]


class ChaosLabelers:
    """n labeler threads, each with its own name and two HTTP clients (for double submits)."""

    def __init__(self, url: str, *, n: int, seed: int) -> None:
        self.url, self.n, self.seed = url, n, seed
        self.stop_event = threading.Event()
        self.stats = [CrowdStats() for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"chaos-labeler-{i}", daemon=True)
                        for i in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(120.0)

    def totals(self) -> dict[str, Any]:
        keys = ("votes", "double_submits", "double_accepted", "double_refused", "double_both_accepted", "undos",
                "errors")
        out: dict[str, Any] = {k: sum(getattr(s, k) for s in self.stats) for k in keys}
        out["last_errors"] = [e for s in self.stats for e in s.last_errors][-5:]
        return out

    def _run(self, i: int) -> None:
        rng, stats, name = random.Random(self.seed * 1000 + i), self.stats[i], f"chaos-{i}"
        first, second = ApiClient(self.url, timeout_s=30.0), ApiClient(self.url, timeout_s=30.0)
        try:
            while not self.stop_event.wait(rng.uniform(*THINK_S)):
                try:
                    self._one_round(rng, stats, name, first, second)
                except Exception as exc:  # noqa: BLE001 - serve may be dead right now: count and go on
                    stats.error(exc)
                    self.stop_event.wait(2.0)
        finally:
            first.close()
            second.close()

    def _one_round(self, rng: random.Random, stats: CrowdStats, name: str, first: ApiClient,
                   second: ApiClient) -> None:
        pair = first.predict(name, api_name="/next_pair")["pair"]
        if not pair:
            return
        roll = rng.random()
        if roll < 0.2:
            self._double_submit(stats, name, pair, rng.choice(SIDES), first, second)
            return
        first.predict(pair["assignment_id"], rng.choice(SIDES), name, "", api_name="/vote")
        stats.votes += 1
        if roll > 0.85:
            first.predict(name, api_name="/undo")
            stats.undos += 1

    def _double_submit(self, stats: CrowdStats, name: str, pair: dict, side: str, first: ApiClient,
                       second: ApiClient) -> None:
        """The same vote from two clients at once: exactly one may count."""
        outcomes: list[Optional[BaseException]] = [None, None]
        barrier = threading.Barrier(2)

        def send(slot: int, client: ApiClient) -> None:
            try:
                barrier.wait(5.0)
                client.predict(pair["assignment_id"], side, name, "", api_name="/vote")
            except Exception as exc:  # noqa: BLE001 - a refusal is the expected outcome for one of them
                outcomes[slot] = exc

        threads = [threading.Thread(target=send, args=(k, c)) for k, c in enumerate((first, second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60.0)
        stats.double_submits += 1
        accepted = sum(1 for o in outcomes if o is None)
        stats.double_accepted += accepted
        stats.double_refused += 2 - accepted
        stats.double_both_accepted += accepted == 2
        stats.votes += accepted
