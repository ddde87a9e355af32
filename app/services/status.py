"""What `odpo status` reports: prompts, pairs by status, labels by source, versions, last step.

A service so the CLI stays a formatter; the dashboard reads the same counts through AdminService.
"""
from __future__ import annotations

from typing import Any

from odpo.app.config import CommonConfig
from odpo.db import store


def read_status(cfg: CommonConfig, *, run: str) -> dict[str, Any]:
    """The counts of one run, in one read transaction."""
    db = cfg.open_db()
    try:
        with db.sessions() as s:
            return store.status_counts(s, run=run)
    finally:
        db.close()
