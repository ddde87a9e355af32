"""Read-mostly store functions: counts for `odpo status` and the UI, and cross-process switches."""
from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from odpo.db.models import Adapter, Control, Eval, Label, Pair, Reload, TrainStep, utcnow
from odpo.db.store_prompts import count_prompts


def status_counts(session: Session, *, run: str = "default") -> dict[str, Any]:
    """Everything `odpo status` shows, as plain data (the CLI renders text or JSON)."""
    total, held = count_prompts(session)
    pairs = dict(session.execute(select(Pair.status, func.count(Pair.id)).group_by(Pair.status)).all())
    label_rows = session.execute(select(Label.source, func.count(Label.id)).where(Label.undone.is_(False))
                                 .group_by(Label.source)).all()
    choice_rows = session.execute(select(Label.choice, func.count(Label.id)).where(Label.undone.is_(False))
                                  .group_by(Label.choice)).all()
    unconsumed = session.scalar(select(func.count(Label.id)).where(
        Label.undone.is_(False), Label.consumed_version.is_(None), Label.choice.in_(("a", "b")))) or 0
    versions = session.scalars(select(Adapter.version).where(Adapter.run == run, Adapter.rolled_back.is_(False))
                               .order_by(Adapter.version)).all()
    last = session.scalar(select(TrainStep).where(TrainStep.run == run).order_by(TrainStep.id.desc()).limit(1))
    return {
        "prompts": total,
        "held_out": held,
        "pairs": {s: int(pairs.get(s, 0)) for s in ("queued", "shown", "labeled", "retired")},
        "labels": {str(k): int(v) for k, v in label_rows},
        "choices": {str(k): int(v) for k, v in choice_rows},
        "unconsumed_trainable": int(unconsumed),
        "adapter_versions": list(versions),
        "latest_version": versions[-1] if versions else 0,
        "last_step": None if last is None else {
            "step": last.step, "version": last.version, "loss": last.loss,
            "reward_accuracy": last.reward_accuracy, "at": last.created_at.isoformat(timespec="seconds")},
        "evals": session.scalar(select(func.count(Eval.id))) or 0,
        "reloads": session.scalar(select(func.count(Reload.id))) or 0,
    }


def set_control(session: Session, *, key: str, value: dict[str, Any]) -> None:
    row = session.get(Control, key)
    if row is None:
        session.add(Control(key=key, value=dict(value), updated_at=utcnow()))
    else:
        row.value, row.updated_at = dict(value), utcnow()
    session.flush()


def get_control(session: Session, *, key: str) -> Optional[dict[str, Any]]:
    row = session.get(Control, key)
    return None if row is None else dict(row.value)


def record_reload(session: Session, *, version: int, swap_ms: float, commit_to_serving_ms: float,
                  retired_pairs: int) -> Reload:
    row = Reload(version=version, swap_ms=swap_ms, commit_to_serving_ms=commit_to_serving_ms,
                 retired_pairs=retired_pairs)
    session.add(row)
    session.flush()
    return row
