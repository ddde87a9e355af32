"""Control and status: cross-process switches, hot-reload records, and the counts `odpo status` shows."""
from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import func, select, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from odpo.db.models import PAIR_STATUSES, Adapter, Control, Eval, Label, LabelUse, Pair, Reload, TrainStep, utcnow
from odpo.db.store.adapters import STALE_STEP, count_unconsumed, run_head
from odpo.db.store.prompts import count_prompts

# Control-row keys other processes publish (defined here so the web app reads them without
# importing the trainer, which would load torch into `odpo serve`).
JUDGE_STATE_PREFIX = "judge."  # one row per judge worker (trainer/judges/worker.py)
TRAIN_PROGRESS_KEY = "train.progress"  # what a round / offline job is at (trainer/training/modes.py)
TRAIN_FAULT_KEY = "train.fault"  # a trainer paused on a transient fault: {what, line, retry_at, at}, {} after


def up_state_key(run: str) -> str:
    """The control row `odpo up` reports its children in (one per run, as the dashboard shows one run)."""
    return f"up.{run}"[:100]


def status_counts(session: Session, *, run: str = "default") -> dict[str, Any]:
    """Everything `odpo status` shows for one run, as plain data (the CLI renders text or JSON)."""
    total, held = count_prompts(session)
    pairs = dict(session.execute(select(Pair.status, func.count(Pair.id)).group_by(Pair.status)).all())
    label_rows = session.execute(select(Label.source, func.count(Label.id)).where(Label.undone.is_(False))
                                 .group_by(Label.source)).all()
    choice_rows = session.execute(select(Label.choice, func.count(Label.id)).where(Label.undone.is_(False))
                                  .group_by(Label.choice)).all()
    unconsumed = count_unconsumed(session, run=run)  # per run: each run trains every label once
    versions = session.scalars(select(Adapter.version).where(Adapter.run == run, Adapter.rolled_back.is_(False))
                               .order_by(Adapter.version)).all()
    last = session.scalar(select(TrainStep).where(TrainStep.run == run).order_by(TrainStep.id.desc()).limit(1))
    trained = session.scalar(select(func.count()).select_from(LabelUse)
                             .where(LabelUse.run == run, LabelUse.step != STALE_STEP)) or 0
    return {
        "run": run,
        "head": run_head(session, run=run),
        "prompts": total,
        "held_out": held,
        "pairs": {s: int(pairs.get(s, 0)) for s in PAIR_STATUSES},
        "labels": {str(k): int(v) for k, v in label_rows},
        "choices": {str(k): int(v) for k, v in choice_rows},
        "unconsumed_trainable": int(unconsumed),
        "trained_labels": int(trained),  # labels in this run's live versions
        "adapter_versions": list(versions),
        "latest_version": versions[-1] if versions else 0,
        "last_step": None if last is None else {
            "step": last.step, "version": last.version, "loss": last.loss,
            "reward_accuracy": last.reward_accuracy, "at": last.created_at.isoformat(timespec="seconds")},
        "evals": session.scalar(select(func.count(Eval.id))) or 0,
        "reloads": session.scalar(select(func.count(Reload.id))) or 0,
    }


def set_control(session: Session, *, key: str, value: dict[str, Any]) -> None:
    """Insert or replace one control row in one statement.

    Read-then-insert let two processes starting together (two `odpo up` with one --db, each
    trainer publishing its config) both see no row and both insert: an IntegrityError on
    control.key. SQLite and PostgreSQL upsert natively; elsewhere a savepoint catches the lost
    race and updates instead."""
    row = {"key": key, "value": dict(value), "updated_at": utcnow()}
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
        stmt = insert(Control).values(**row)
        session.execute(stmt.on_conflict_do_update(
            index_elements=[Control.key], set_={"value": stmt.excluded.value, "updated_at": stmt.excluded.updated_at}))
        return
    try:
        with session.begin_nested():
            session.execute(sa_insert(Control).values(**row))
    except IntegrityError:
        session.execute(update(Control).where(Control.key == key).values(value=row["value"],
                                                                         updated_at=row["updated_at"]))


def get_control(session: Session, *, key: str) -> Optional[dict[str, Any]]:
    value = session.scalar(select(Control.value).where(Control.key == key))
    return None if value is None else dict(value)


def controls_with_prefix(session: Session, *, prefix: str) -> dict[str, dict[str, Any]]:
    """Every control row whose key starts with `prefix` (e.g. one per judge worker), by key."""
    rows = session.execute(select(Control.key, Control.value).where(Control.key.startswith(prefix, autoescape=True))
                           .order_by(Control.key))
    return {key: dict(value or {}) for key, value in rows}


def record_reload(session: Session, *, version: int, swap_ms: float, commit_to_serving_ms: float,
                  retired_pairs: int) -> Reload:
    row = Reload(version=version, swap_ms=swap_ms, commit_to_serving_ms=commit_to_serving_ms,
                 retired_pairs=retired_pairs)
    session.add(row)
    session.flush()
    return row
