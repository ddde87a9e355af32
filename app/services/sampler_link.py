"""The web app's view of the sampler workers (`odpo sample`), through the database alone.

`odpo serve` holds no model. It implements the SamplerHandle the pages use (request_typed,
state) over two kinds of rows: a typed prompt becomes a `sample_requests` row that any worker
claims, and the page's "what are we waiting for" comes from the workers' heartbeat rows
(`sampler.worker:<name>`). With several workers the state is summed (pairs/min, typed pending) or
taken from the freshest worker (phase, errors), and each worker is listed for the dashboard.
"""
from __future__ import annotations

import logging
from typing import Any

from odpo.app.services.status import NO_WORKER, SAMPLING
from odpo.db import store
from odpo.db.engine import Database

log = logging.getLogger(__name__)

# A worker beats every second; one silent for this long is gone (killed, host down).
WORKER_TIMEOUT_S = 15.0


class WorkerLink:
    """SamplerHandle for a serve process without a model."""

    def __init__(self, db: Database, *, run: str = "default", timeout_s: float = WORKER_TIMEOUT_S) -> None:
        self.db, self.run, self.timeout_s = db, run, timeout_s

    def request_typed(self, *, prompt_id: int, labeler: str) -> None:
        """Queue the prompt for whichever worker is free next (also when none runs yet: the
        first worker to start serves it)."""
        with self.db.sessions.begin() as s:
            store.add_sample_request(s, prompt_id=prompt_id, labeler=labeler)

    def workers(self) -> list[dict[str, Any]]:
        with self.db.sessions() as s:
            return [w for w in store.sampler_workers(s, max_age_s=self.timeout_s) if w.get("run", self.run) == self.run]

    def state(self) -> dict[str, Any]:
        """One state in the shape an in-process Sampler reports, summed over live workers."""
        workers = self.workers()
        with self.db.sessions() as s:
            pending = store.count_sample_requests(s, state="pending")
        if not workers:
            return {"phase": NO_WORKER, "generating": False, "typed_pending": pending, "workers": []}
        sampling = [w for w in workers if w.get("phase") == SAMPLING]
        lead = max(sampling or workers, key=lambda w: (w.get("serving_version") or 0, -w["age_s"]))
        rates = [w["pairs_per_minute"] for w in sampling if w.get("pairs_per_minute")]
        return {
            "phase": SAMPLING if sampling else lead.get("phase"),
            "serving_version": lead.get("serving_version"),
            "queue": lead.get("queue"),
            "queue_size": lead.get("queue_size"),
            "generating": any(w.get("generating") for w in sampling),
            "pairs_per_minute": sum(rates) if rates else None,
            "pairs_made": sum(int(w.get("pairs_made") or 0) for w in sampling) if sampling else 0,
            "last_error": next((w.get("last_error") for w in sampling if w.get("last_error")), None)
            if sampling else lead.get("last_error"),
            "swap_ms": lead.get("swap_ms"),
            "commit_to_serving_ms": lead.get("commit_to_serving_ms"),
            "no_prompts": bool(sampling) and all(w.get("no_prompts") for w in sampling),
            "typed_pending": pending,
            "workers": [_summary(w) for w in workers],
        }

    def close(self, timeout: float = 0.0) -> None:
        """Nothing to stop: the workers are their own processes."""


def _summary(worker: dict[str, Any]) -> dict[str, Any]:
    """What the dashboard lists per worker (and per vLLM server it uses)."""
    keys = ("name", "host", "pid", "backend", "phase", "serving_version", "pairs_per_minute", "pairs_made",
            "last_error", "age_s", "servers")
    return {k: worker.get(k) for k in keys}
