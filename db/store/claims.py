"""Claims (`assignments` rows): a queued pair shown to one labeler, until answered or expired.

Claims are optimistic: a labeler reads a candidate, then `UPDATE ... WHERE claims = <seen>` takes
it; a concurrent claimer's update matches no row and moves on. This is race-free on SQLite and
PostgreSQL alike without table locks. Answering a claim makes a label: see labels.py.

A claim is held by one client of its labeler (`client`: a page's session, an API client). Showing
an open claim to another client of the same name (a reloaded page, a restarted script) moves it
there with one conditional UPDATE, after which the old client's vote on it is refused: one name in
two clients never holds one claim twice. A client None (judges, scripts on the store) skips this.
"""
from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Optional, Sequence

from sqlalchemy import and_, case, exists, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from odpo.db.models import Assignment, Pair, Prompt, Sample, utcnow
from odpo.db.vocabulary import CLAIM_TIMEOUT_S


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


def claim_next_pair(session: Session, *, labeler: str, timeout_s: float = CLAIM_TIMEOUT_S,
                    purpose: Optional[str] = None, rng: Optional[random.Random] = None,
                    candidates: int = 8, client: Optional[str] = None,
                    evals: bool = False) -> Optional[ClaimedPair]:
    """Take the oldest queued pair this labeler has not seen, randomise left/right, record it.

    Typed prompts requested by this labeler come first. Returns None when nothing is available.
    With `evals` (people, through LabelService) eval pairs are claimed like training pairs, in the
    same order and with the same random sides; judges leave them to people.
    """
    rng = rng or random.Random()
    seen = exists().where(and_(Assignment.pair_id == Pair.id, Assignment.labeler == labeler))
    stmt = select(Pair.id, Pair.claims, Pair.labels_wanted).where(Pair.status == "queued", ~seen)
    shared = ("train", "eval") if evals else ("train",)
    stmt = stmt.where(Pair.purpose.in_(shared) | (Pair.requested_by == labeler))
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
                asg = Assignment(pair_id=pair_id, labeler=labeler, client=client, shown_left=rng.choice("ab"),
                                 shown_at=now, expires_at=now + dt.timedelta(seconds=timeout_s))
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


def open_assignment(session: Session, *, labeler: str) -> Optional[ClaimedPair]:
    """The pair this labeler was shown and has not answered, newest first (any client)."""
    asg = session.scalar(select(Assignment).where(Assignment.labeler == labeler, Assignment.state == "open",
                                                  Assignment.expires_at >= utcnow())
                         .order_by(Assignment.id.desc()).limit(1))
    return claimed_view(session, asg) if asg else None


def oldest_open_claim(session: Session, *, labeler: str, exclude: Sequence[int] = (),
                      client: Optional[str] = None, take_over: bool = False,
                      candidates: int = 8) -> Optional[ClaimedPair]:
    """This labeler's open, unexpired claim shown longest ago, skipping `exclude` (the pairs already
    in the page's two slots): after a reload or an undo, claims come back before new ones.

    With a `client`, only its own claims and unheld ones (client NULL, adopted) count; with
    `take_over` also those of the labeler's other clients, which move to this one (a reloaded
    page gets its pairs back; the old page can no longer vote on them). Taking over is one
    conditional UPDATE per claim: of two clients taking one claim at once, exactly one gets it.
    """
    stmt = select(Assignment).where(Assignment.labeler == labeler, Assignment.state == "open",
                                    Assignment.expires_at >= utcnow())
    if exclude:
        stmt = stmt.where(Assignment.id.not_in([int(i) for i in exclude]))
    if client is not None and not take_over:
        stmt = stmt.where(or_(Assignment.client == client, Assignment.client.is_(None)))
    stmt = stmt.order_by(Assignment.shown_at, Assignment.id).limit(candidates)
    for asg in session.scalars(stmt.execution_options(populate_existing=True)).all():
        if client is None or asg.client == client or _move_claim(session, asg, client=client):
            return claimed_view(session, asg)
    return None


def _move_claim(session: Session, asg: Assignment, *, client: str) -> bool:
    """Hand an open claim from the client that held it to `client`; False when it changed meanwhile
    (answered, released, or moved by someone else first)."""
    moved = session.execute(update(Assignment)
                            .where(Assignment.id == asg.id, Assignment.state == "open",
                                   Assignment.client.is_not_distinct_from(asg.client))
                            .values(client=client).execution_options(synchronize_session=False)).rowcount
    if moved == 1:
        set_committed_value(asg, "client", client)  # the row says so already: nothing to flush
    return moved == 1


def held_by(client: Optional[str]) -> tuple:
    """The WHERE terms that restrict a claim to one client (none when `client` is None)."""
    return () if client is None else (Assignment.client == client,)


def open_claim(session: Session, *, assignment_id: int, labeler: str,
               client: Optional[str] = None) -> Optional[ClaimedPair]:
    """One of this labeler's claims as shown, if it is still open (and held by `client`)."""
    asg = session.get(Assignment, assignment_id)
    if asg is None or asg.labeler != labeler or asg.state != "open":
        return None
    if client is not None and asg.client != client:
        return None
    return claimed_view(session, asg)


def open_claim_ids(session: Session, *, labeler: str, ids: Sequence[int],
                   client: Optional[str] = None) -> set[int]:
    """Which of these assignment ids are still open and unexpired for this labeler (and client)."""
    if not ids:
        return set()
    stmt = select(Assignment.id).where(Assignment.id.in_([int(i) for i in ids]), Assignment.labeler == labeler,
                                       Assignment.state == "open", Assignment.expires_at >= utcnow(),
                                       *held_by(client))
    return set(session.scalars(stmt))


def mark_shown(session: Session, *, assignment_id: int, labeler: str, timeout_s: float,
               client: Optional[str] = None) -> bool:
    """A prefetched pair is now on screen: restart its clock (shown_at drives seconds-per-label,
    expires_at the closed-tab timeout). False when the claim is gone (expired, answered, moved)."""
    now = utcnow()
    stmt = (update(Assignment)
            .where(Assignment.id == assignment_id, Assignment.labeler == labeler, Assignment.state == "open",
                   Assignment.expires_at >= now, *held_by(client))
            .values(shown_at=now, expires_at=now + dt.timedelta(seconds=timeout_s)))
    return (session.execute(stmt).rowcount or 0) == 1


def release_assignment(session: Session, *, assignment_id: int, labeler: str,
                       client: Optional[str] = None) -> bool:
    """Hand an open claim back to the queue now instead of waiting for it to expire (a judge that
    abstained, a labeler who switched name): the pair is queued again for everyone else, while the
    assignment row (state "expired") keeps this labeler from re-claiming it. One conditional
    UPDATE: a claim answered (or moved to another client) meanwhile is left alone."""
    asg = session.get(Assignment, assignment_id)
    if asg is None:
        return False
    released = session.execute(update(Assignment)
                               .where(Assignment.id == assignment_id, Assignment.labeler == labeler,
                                      Assignment.state == "open", *held_by(client))
                               .values(state="expired").execution_options(synchronize_session=False)).rowcount
    if released != 1:
        return False
    set_committed_value(asg, "state", "expired")
    _give_back(session, asg.pair_id)
    return True


def _give_back(session: Session, pair_id: int) -> None:
    session.execute(update(Pair).where(Pair.id == pair_id, Pair.status.in_(("queued", "shown")))
                    .values(claims=Pair.claims - 1, status="queued"))


def release_expired(session: Session, *, now: Optional[dt.datetime] = None) -> int:
    """Give back pairs shown to a labeler who never answered (closed tab) once the claim expires."""
    now = now or utcnow()
    expired = session.execute(select(Assignment.id, Assignment.pair_id).where(Assignment.state == "open",
                                                                              Assignment.expires_at < now)).all()
    released = 0
    for asg_id, pair_id in expired:  # each one conditional: a vote that got there first keeps its pair
        gone = session.execute(update(Assignment).where(Assignment.id == asg_id, Assignment.state == "open",
                                                        Assignment.expires_at < now)
                               .values(state="expired").execution_options(synchronize_session=False)).rowcount
        if gone == 1:
            _give_back(session, pair_id)
            released += 1
    session.flush()
    return released
