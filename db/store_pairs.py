"""Store functions for the labeling queue: pairs in, claims out, labels and undo.

Claims are optimistic: a labeler reads a candidate, then `UPDATE ... WHERE claims = <seen>` takes
it; a concurrent claimer's update matches no row and moves on. This is race-free on SQLite and
PostgreSQL alike without table locks.
"""
from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import and_, case, exists, func, select, update
from sqlalchemy.orm import Session

from odpo.db.errors import OdpoError
from odpo.db.models import CHOICES, Assignment, Label, Pair, Prompt, Sample, utcnow


class StoreError(OdpoError, ValueError):
    """A request the store refuses (unknown pair, label already consumed, ...): message for users."""


@dataclass(frozen=True)
class NewSample:
    text: str
    tokens: int
    finish_reason: str
    params: dict[str, Any]
    gen_seconds: float


@dataclass(frozen=True)
class ClaimedPair:
    """What a labeler is shown: left/right already randomised and recorded."""

    pair_id: int
    assignment_id: int
    prompt: str
    left: str
    right: str
    shown_left: str  # "a" when sample A is on the left
    version: int
    shown_at: dt.datetime


def add_pair(session: Session, *, prompt_id: int, version: int, a: NewSample, b: NewSample,
             labels_wanted: int = 1, purpose: str = "train", requested_by: Optional[str] = None) -> Pair:
    """Store two samples of one prompt from policy `version` and queue them as a pair."""
    rows = [Sample(prompt_id=prompt_id, adapter_version=version, text=s.text, tokens=s.tokens,
                   finish_reason=s.finish_reason, params=s.params, gen_seconds=s.gen_seconds) for s in (a, b)]
    session.add_all(rows)
    session.flush()
    pair = Pair(prompt_id=prompt_id, sample_a_id=rows[0].id, sample_b_id=rows[1].id, created_version=version,
                labels_wanted=labels_wanted, purpose=purpose, requested_by=requested_by)
    session.add(pair)
    session.flush()
    return pair


def count_pairs(session: Session, *, status: str = "queued", purpose: str = "train") -> int:
    stmt = select(func.count(Pair.id)).where(Pair.status == status, Pair.purpose == purpose)
    return session.scalar(stmt) or 0


def retire_stale_pairs(session: Session, *, current_version: int, max_staleness: int) -> int:
    """Retire queued pairs more than `max_staleness` versions behind, so labelers see the current
    policy. Pairs already on someone's screen are left alone."""
    stmt = (update(Pair).where(Pair.status == "queued", Pair.claims == 0, Pair.purpose == "train",
                               Pair.created_version < current_version - max_staleness)
            .values(status="retired"))
    return session.execute(stmt).rowcount or 0


def retire_queue(session: Session) -> int:
    """Admin action: drop every unclaimed queued pair (e.g. after a rollback)."""
    stmt = update(Pair).where(Pair.status == "queued", Pair.claims == 0).values(status="retired")
    return session.execute(stmt).rowcount or 0


def retire_pairs_newer_than(session: Session, *, version: int) -> int:
    """After a rollback to `version`, retire unclaimed queued pairs sampled from the newer,
    rolled-back versions: labeling them would train the restored policy on another policy's
    samples. Typed pairs stay: a labeler asked for them explicitly."""
    stmt = (update(Pair).where(Pair.status == "queued", Pair.claims == 0, Pair.purpose == "train",
                               Pair.created_version > version)
            .values(status="retired"))
    return session.execute(stmt).rowcount or 0


def release_expired(session: Session, *, now: Optional[dt.datetime] = None) -> int:
    """Give back pairs shown to a labeler who never answered (closed tab) once the claim expires."""
    now = now or utcnow()
    expired = list(session.scalars(select(Assignment).where(Assignment.state == "open",
                                                            Assignment.expires_at < now)))
    for asg in expired:
        asg.state = "expired"
        session.execute(update(Pair).where(Pair.id == asg.pair_id, Pair.status.in_(("queued", "shown")))
                        .values(claims=Pair.claims - 1, status="queued"))
    session.flush()
    return len(expired)

def release_assignment(session: Session, *, assignment_id: int, labeler: str) -> bool:
    """Hand an open claim back to the queue now instead of waiting for it to expire (a judge that
    abstained, a labeler who switched name): the pair is queued again for everyone else, while the
    assignment row (state "expired") keeps this labeler from re-claiming it."""
    asg = session.get(Assignment, assignment_id)
    if asg is None or asg.labeler != labeler or asg.state != "open":
        return False
    asg.state = "expired"
    session.execute(update(Pair).where(Pair.id == asg.pair_id, Pair.status.in_(("queued", "shown")))
                    .values(claims=Pair.claims - 1, status="queued"))
    session.flush()
    return True


def open_assignment(session: Session, *, labeler: str) -> Optional[ClaimedPair]:
    """The pair this labeler was shown and has not answered (a page reload shows it again)."""
    asg = session.scalar(select(Assignment).where(Assignment.labeler == labeler, Assignment.state == "open",
                                                  Assignment.expires_at >= utcnow())
                         .order_by(Assignment.id.desc()).limit(1))
    return claimed_view(session, asg) if asg else None


def claim_next_pair(session: Session, *, labeler: str, timeout_s: float = 600.0,
                    purpose: Optional[str] = None, rng: Optional[random.Random] = None,
                    candidates: int = 8) -> Optional[ClaimedPair]:
    """Take the oldest queued pair this labeler has not seen, randomise left/right, record it.

    Typed prompts requested by this labeler come first. Returns None when nothing is available.
    """
    rng = rng or random.Random()
    seen = exists().where(and_(Assignment.pair_id == Pair.id, Assignment.labeler == labeler))
    stmt = select(Pair.id, Pair.claims, Pair.labels_wanted).where(Pair.status == "queued", ~seen)
    stmt = stmt.where((Pair.purpose == "train") | (Pair.requested_by == labeler))
    if purpose:
        stmt = stmt.where(Pair.purpose == purpose)
    mine_first = case((Pair.requested_by == labeler, 0), else_=1)  # NULL-safe on every backend
    stmt = stmt.order_by(mine_first, Pair.id).limit(candidates)
    for _ in range(4):  # re-read when every candidate was taken by someone else meanwhile
        rows = session.execute(stmt).all()
        if not rows:
            return None
        for pair_id, claims, wanted in rows:
            new_status = "shown" if claims + 1 >= wanted else "queued"
            taken = session.execute(update(Pair).where(Pair.id == pair_id, Pair.claims == claims,
                                                       Pair.status == "queued")
                                    .values(claims=claims + 1, status=new_status)).rowcount
            if taken == 1:
                now = utcnow()
                asg = Assignment(pair_id=pair_id, labeler=labeler, shown_left=rng.choice("ab"), shown_at=now,
                                 expires_at=now + dt.timedelta(seconds=timeout_s))
                session.add(asg)
                session.flush()
                return claimed_view(session, asg)
    return None


def claimed_view(session: Session, asg: Assignment) -> ClaimedPair:
    pair = session.get(Pair, asg.pair_id)
    prompt = session.get(Prompt, pair.prompt_id)
    a, b = session.get(Sample, pair.sample_a_id), session.get(Sample, pair.sample_b_id)
    left, right = (a.text, b.text) if asg.shown_left == "a" else (b.text, a.text)
    return ClaimedPair(pair_id=pair.id, assignment_id=asg.id, prompt=prompt.text, left=left, right=right,
                       shown_left=asg.shown_left, version=pair.created_version, shown_at=asg.shown_at)


def record_label(session: Session, *, assignment_id: int, labeler: str, choice: str,
                 reason: Optional[str] = None, source: str = "human",
                 confidence: Optional[float] = None) -> Label:
    """Answer an assignment. `choice` is absolute (a/b/tie/both_bad/skip): the UI maps left/right
    through `shown_left` before calling, and the mapping is stored with the label."""
    if choice not in CHOICES:
        raise StoreError(f"unknown choice {choice!r}; expected one of {', '.join(CHOICES)}")
    asg = session.get(Assignment, assignment_id)
    if asg is None or asg.labeler != labeler:
        raise StoreError("this pair is not assigned to you (it may have expired); load the next pair")
    if asg.state != "open":
        raise StoreError("this pair was already answered or has expired")
    asg.state = "answered"
    label = Label(pair_id=asg.pair_id, choice=choice, shown_left=asg.shown_left, labeler=labeler, source=source,
                  judge_confidence=confidence, reason=(reason or None), shown_at=asg.shown_at,
                  answered_at=utcnow())
    session.add(label)
    _refresh_pair_status(session, asg.pair_id)
    session.flush()
    return label


def add_direct_label(session: Session, *, pair_id: int, labeler: str, choice: str, source: str,
                     confidence: Optional[float] = None) -> Label:
    """A label that needs no screen (judge shadow-labels); skips the queue bookkeeping."""
    if choice not in CHOICES:
        raise StoreError(f"unknown choice {choice!r}")
    label = Label(pair_id=pair_id, choice=choice, shown_left=None, labeler=labeler, source=source,
                  judge_confidence=confidence, answered_at=utcnow())
    session.add(label)
    session.flush()
    return label


def _refresh_pair_status(session: Session, pair_id: int) -> None:
    pair = session.get(Pair, pair_id)
    answered = session.scalar(select(func.count(Label.id)).where(Label.pair_id == pair_id,
                                                                 Label.undone.is_(False))) or 0
    if answered >= pair.labels_wanted:
        pair.status = "labeled"


def undo_label(session: Session, *, label_id: int, labeler: str,
               timeout_s: float = 600.0) -> ClaimedPair:
    """Take back a vote that training has not consumed; the pair is shown to the labeler again."""
    label = session.get(Label, label_id)
    if label is None or label.labeler != labeler or label.undone:
        raise StoreError("nothing to undo")
    if label.consumed_version is not None:
        raise StoreError(f"too late to undo: this vote is already trained into v{label.consumed_version}")
    taken_back = session.execute(  # re-checked in the UPDATE itself: a commit may have consumed it meanwhile
        update(Label).where(Label.id == label_id, Label.undone.is_(False), Label.consumed_version.is_(None))
        .values(undone=True).execution_options(synchronize_session=False)).rowcount
    if taken_back != 1:
        raise StoreError("too late to undo: this vote was just trained into a new version")
    session.refresh(label)
    asg = session.scalar(select(Assignment).where(Assignment.pair_id == label.pair_id,
                                                  Assignment.labeler == labeler))
    if asg is None:
        raise StoreError("nothing to undo")
    now = utcnow()
    asg.state, asg.shown_at, asg.expires_at = "open", now, now + dt.timedelta(seconds=timeout_s)
    session.get(Pair, label.pair_id).status = "shown"
    session.flush()
    return claimed_view(session, asg)


def last_undoable_label(session: Session, *, labeler: str) -> Optional[Label]:
    return session.scalar(select(Label).where(Label.labeler == labeler, Label.undone.is_(False),
                                              Label.consumed_version.is_(None))
                          .order_by(Label.id.desc()).limit(1))
