"""Typed-prompt requests (`sample_requests`) and sampler-worker heartbeats.

The web app holds no model; a labeler's typed prompt becomes a request row that any sampler worker
(`odpo sample`, one or many, on any host) can claim. Claims are optimistic like pair claims: read
candidates, then `UPDATE ... WHERE id = ? AND state = <seen> AND claimed_at = <seen>`; a worker
whose update matched no row lost the race and skips that request. The worker marks its requests
done in the same transaction that stores their pairs, so a request is never both served and
pending. A worker that dies holding claims leaves them `claimed`; after `stale_after_s` another
worker may take them over (the same conditional update).

Workers publish their state in `control` rows keyed `sampler.worker:<name>`, rewritten every
second or so with the time they were written; readers treat a row older than a few heartbeats as
a worker that is gone.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from odpo.db.models import Control, SampleRequest, utcnow

WORKER_PREFIX = "sampler.worker:"


@dataclass(frozen=True)
class ClaimedRequest:
    id: int
    prompt_id: int
    labeler: str


def add_sample_request(session: Session, *, prompt_id: int, labeler: str) -> int:
    """Queue a typed prompt for the next free sampler worker; returns the request id."""
    row = SampleRequest(prompt_id=prompt_id, labeler=labeler, state="pending")
    session.add(row)
    session.flush()
    return row.id


def claim_sample_requests(session: Session, *, worker: str, limit: int,
                          stale_after_s: float = 300.0) -> list[ClaimedRequest]:
    """Take up to `limit` requests, oldest first: pending ones, and claims older than
    `stale_after_s` (their worker died). Each is one conditional UPDATE whose row count says
    whether this worker won it."""
    if limit < 1:
        return []
    now = utcnow()
    stale = now - dt.timedelta(seconds=stale_after_s)
    takeable = or_(SampleRequest.state == "pending",
                   and_(SampleRequest.state == "claimed", SampleRequest.claimed_at < stale))
    rows = session.execute(select(SampleRequest.id, SampleRequest.prompt_id, SampleRequest.labeler,
                                  SampleRequest.state, SampleRequest.claimed_at)
                           .where(takeable).order_by(SampleRequest.id).limit(limit)).all()
    won = []
    for row in rows:
        seen = (SampleRequest.claimed_at.is_(None) if row.claimed_at is None
                else SampleRequest.claimed_at == row.claimed_at)
        result = session.execute(update(SampleRequest)
                                 .where(SampleRequest.id == row.id, SampleRequest.state == row.state, seen)
                                 .values(state="claimed", worker=worker, claimed_at=now))
        if result.rowcount == 1:
            won.append(ClaimedRequest(id=row.id, prompt_id=row.prompt_id, labeler=row.labeler))
    return won


def finish_sample_requests(session: Session, *, ids: Sequence[int], worker: str) -> int:
    """Mark this worker's claims done (in the transaction that stores their pairs). Returns how
    many were still this worker's: a claim taken over meanwhile stays with its new worker."""
    if not ids:
        return 0
    result = session.execute(update(SampleRequest)
                             .where(SampleRequest.id.in_(list(ids)), SampleRequest.state == "claimed",
                                    SampleRequest.worker == worker)
                             .values(state="done"))
    return result.rowcount


def release_sample_requests(session: Session, *, worker: str, ids: Optional[Sequence[int]] = None) -> int:
    """Give this worker's claims back (a batch that gave way to a reload, a worker stopping)."""
    stmt = update(SampleRequest).where(SampleRequest.state == "claimed", SampleRequest.worker == worker)
    if ids is not None:
        if not ids:
            return 0
        stmt = stmt.where(SampleRequest.id.in_(list(ids)))
    return session.execute(stmt.values(state="pending", worker=None, claimed_at=None)).rowcount


def count_sample_requests(session: Session, *, state: str = "pending") -> int:
    return session.scalar(select(func.count(SampleRequest.id)).where(SampleRequest.state == state)) or 0


def open_sample_requests(session: Session, *, labeler: str) -> int:
    """A labeler's typed prompts not sampled yet (pending or being sampled): what their cap counts."""
    waiting = SampleRequest.state.in_(("pending", "claimed"))
    return session.scalar(select(func.count(SampleRequest.id)).where(SampleRequest.labeler == labeler, waiting)) or 0


def sampler_workers(session: Session, *, max_age_s: float) -> list[dict[str, Any]]:
    """The workers whose heartbeat is younger than `max_age_s`, oldest name first; each is its
    published state plus `name` and `age_s`."""
    now = utcnow()
    rows = session.execute(select(Control.key, Control.value, Control.updated_at)
                           .where(Control.key.startswith(WORKER_PREFIX, autoescape=True)).order_by(Control.key))
    live = []
    for key, value, updated_at in rows:
        age = (now - updated_at).total_seconds() if updated_at else float("inf")
        if age <= max_age_s and (value or {}).get("phase") != "stopped":
            live.append({**dict(value or {}), "name": key[len(WORKER_PREFIX):], "age_s": round(age, 1)})
    return live
