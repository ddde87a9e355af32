"""Read-mostly store functions for the web UI: dashboard series, per-labeler stats, admin helpers.

Aggregations that differ between SQL dialects (hour truncation, medians) are done in Python over
bounded row sets, so the same code runs on SQLite and PostgreSQL.
"""
from __future__ import annotations

import datetime as dt
import statistics
from collections import Counter, defaultdict
from typing import Any, Optional, Sequence

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from odpo.db.models import Adapter, Assignment, Eval, Label, Pair, TrainStep, utcnow
from odpo.db.store_pairs import ClaimedPair, claimed_view


def train_series(session: Session, *, run: str = "default", limit: int = 5000) -> list[dict[str, Any]]:
    """The last `limit` training steps, oldest first: loss, reward accuracy/margin, version lag."""
    rows = session.scalars(select(TrainStep).where(TrainStep.run == run)
                           .order_by(TrainStep.id.desc()).limit(limit)).all()
    return [{"step": r.step, "version": r.version, "loss": r.loss, "reward_accuracy": r.reward_accuracy,
             "reward_margin": r.reward_margin, "version_lag": r.version_lag, "seconds": r.seconds,
             "committed": r.committed, "at": r.created_at} for r in reversed(rows)]


def eval_series(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(Eval).order_by(Eval.version_a, Eval.id)).all()
    return [{"version": r.version_a, "vs": r.version_b, "judge": r.judge, "win_rate": r.win_rate,
             "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n, "at": r.created_at} for r in rows]


def labels_per_hour(session: Session, *, since: dt.datetime) -> list[dict[str, Any]]:
    """Label counts per hour and source since `since` (undone labels excluded)."""
    rows = session.execute(select(Label.answered_at, Label.source)
                           .where(Label.answered_at >= since, Label.undone.is_(False))).all()
    counts = Counter((at.replace(minute=0, second=0, microsecond=0), source) for at, source in rows)
    return [{"hour": hour, "source": source, "labels": n} for (hour, source), n in sorted(counts.items())]


def labeler_stats(session: Session, *, recent: int = 5000) -> list[dict[str, Any]]:
    """Per human labeler: label count, and median seconds from shown to answered over the most
    recent `recent` labels (bounded so the dashboard stays cheap on a big database)."""
    base = and_(Label.source == "human", Label.undone.is_(False))
    counts = session.execute(select(Label.labeler, func.count(Label.id), func.max(Label.answered_at))
                             .where(base).group_by(Label.labeler)).all()
    timing = session.execute(select(Label.labeler, Label.shown_at, Label.answered_at)
                             .where(base, Label.shown_at.is_not(None))
                             .order_by(Label.id.desc()).limit(recent)).all()
    seconds: dict[str, list[float]] = defaultdict(list)
    for name, shown, answered in timing:
        seconds[name].append(max(0.0, (answered - shown).total_seconds()))
    out = [{"labeler": name, "labels": int(n), "median_seconds": _median(seconds.get(name)), "last_at": last}
           for name, n, last in counts]
    return sorted(out, key=lambda r: -r["labels"])


def _median(values: Optional[list[float]]) -> Optional[float]:
    return round(statistics.median(values), 2) if values else None




def adapter_versions(session: Session, *, run: str = "default") -> list[dict[str, Any]]:
    rows = session.scalars(select(Adapter).where(Adapter.run == run).order_by(Adapter.version)).all()
    return [{"version": r.version, "parent": r.parent, "step": r.step, "rolled_back": r.rolled_back,
             "at": r.created_at} for r in rows]


def last_train_step(session: Session, *, run: str = "default") -> Optional[dict[str, Any]]:
    row = session.scalar(select(TrainStep).where(TrainStep.run == run).order_by(TrainStep.id.desc()).limit(1))
    if row is None:
        return None
    return {"step": row.step, "version": row.version, "loss": row.loss, "at": row.created_at,
            "age_s": max(0.0, (utcnow() - row.created_at).total_seconds())}




def typed_pair_waiting(session: Session, *, labeler: str) -> bool:
    """Whether a pair sampled for a prompt this labeler typed is queued and not yet shown."""
    stmt = select(Pair.id).where(Pair.status == "queued", Pair.requested_by == labeler).limit(1)
    return session.scalar(stmt) is not None


def judge_labels_for_pair(session: Session, *, pair_id: int) -> list[dict[str, Any]]:
    rows = session.scalars(select(Label).where(Label.pair_id == pair_id, Label.source.like("judge%"),
                                               Label.undone.is_(False)).order_by(Label.id)).all()
    return [{"judge": r.source, "choice": r.choice, "confidence": r.judge_confidence} for r in rows]


def count_labels(session: Session, *, labeler: str) -> int:
    stmt = select(func.count(Label.id)).where(Label.labeler == labeler, Label.undone.is_(False))
    return session.scalar(stmt) or 0




def oldest_open_claim(session: Session, *, labeler: str, exclude: Sequence[int] = ()) -> Optional[ClaimedPair]:
    """This labeler's open, unexpired claim shown longest ago, skipping `exclude` (the pairs already
    in the page's two slots): after a reload or an undo, claims come back before new ones."""
    stmt = select(Assignment).where(Assignment.labeler == labeler, Assignment.state == "open",
                                    Assignment.expires_at >= utcnow())
    if exclude:
        stmt = stmt.where(Assignment.id.not_in([int(i) for i in exclude]))
    asg = session.scalar(stmt.order_by(Assignment.shown_at, Assignment.id).limit(1))
    return None if asg is None else claimed_view(session, asg)


def mark_shown(session: Session, *, assignment_id: int, labeler: str, timeout_s: float) -> bool:
    """A prefetched pair is now on screen: restart its clock (shown_at drives seconds-per-label,
    expires_at the closed-tab timeout). False when the claim is gone (expired or answered)."""
    now = utcnow()
    stmt = (update(Assignment)
            .where(Assignment.id == assignment_id, Assignment.labeler == labeler, Assignment.state == "open",
                   Assignment.expires_at >= now)
            .values(shown_at=now, expires_at=now + dt.timedelta(seconds=timeout_s)))
    return (session.execute(stmt).rowcount or 0) == 1


def open_claim_ids(session: Session, *, labeler: str, ids: Sequence[int]) -> set[int]:
    """Which of these assignment ids are still open and unexpired for this labeler."""
    if not ids:
        return set()
    stmt = select(Assignment.id).where(Assignment.id.in_([int(i) for i in ids]), Assignment.labeler == labeler,
                                       Assignment.state == "open", Assignment.expires_at >= utcnow())
    return set(session.scalars(stmt))


def open_claim(session: Session, *, assignment_id: int, labeler: str) -> Optional[ClaimedPair]:
    """One of this labeler's claims as shown, if it is still open."""
    asg = session.get(Assignment, assignment_id)
    if asg is None or asg.labeler != labeler or asg.state != "open":
        return None
    return claimed_view(session, asg)
