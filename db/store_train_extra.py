"""Trainer store functions beyond db/store_training.py: skipping labels of too-stale pairs.

A label whose pair was sampled more than `max_staleness_train` versions before the trainer's
current version is not trained on. It is marked with `consumed_step = STALE_STEP` and
`consumed_version` = the version the trainer held, so it is not fetched again and stays countable;
`rollback_to` releases it like any consumed label (after a rollback it may be fresh enough again).
"""
from __future__ import annotations

from typing import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from odpo.db.models import Label

STALE_STEP = -1


def skip_stale_labels(session: Session, *, label_ids: Sequence[int], version: int) -> int:
    """Mark still-unconsumed labels as skipped-for-staleness at `version`; returns how many."""
    if not label_ids:
        return 0
    stmt = (update(Label).where(Label.id.in_(list(label_ids)), Label.consumed_version.is_(None))
            .values(consumed_version=version, consumed_step=STALE_STEP))
    return session.execute(stmt).rowcount or 0


def count_stale_skipped(session: Session) -> int:
    """Labels never trained on because their pair was too stale (current, not rolled back)."""
    return session.scalar(select(func.count(Label.id)).where(Label.consumed_step == STALE_STEP)) or 0
