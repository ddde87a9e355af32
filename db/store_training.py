"""Store functions the trainer uses: unconsumed labels in order, atomic version commits, rollback.

The commit point of a new adapter version is ONE transaction that inserts the `adapters` row and
marks the labels it consumed; a crash before it replays those labels, a crash after it never
trains them again (DESIGN.md, "Trainer semantics").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased

from odpo.db.models import TRAINABLE_CHOICES, Adapter, Label, Pair, Prompt, Sample, TrainStep
from odpo.db.store_pairs import StoreError


class LabelsRetracted(StoreError):
    """A vote in the batch was undone after the trainer read it: the version must not be committed."""


@dataclass(frozen=True)
class TrainingLabel:
    label_id: int
    pair_id: int
    prompt: str
    chosen: str
    rejected: str
    pair_version: int
    source: str


def source_filter(sources: str):
    """`human`, `judge` or `all`: which label sources the trainer learns from."""
    if sources == "human":
        return Label.source == "human"
    if sources == "judge":
        return Label.source.like("judge%")
    if sources == "all":
        return Label.source.is_not(None)
    raise StoreError(f"unknown label sources {sources!r}; expected human, judge or all")


def unconsumed_labels(session: Session, *, limit: int, sources: str = "all",
                      choices: Sequence[str] = TRAINABLE_CHOICES) -> list[TrainingLabel]:
    """Trainable labels not yet in any committed version, oldest first.

    When a person and a judge both labeled a pair, only the person's label is used (human
    overrides judge); the judge's label stays stored for agreement statistics.
    """
    human = aliased(Label)
    # A person's skip is no opinion: a judge's label on a skipped pair is still trained on.
    human_exists = select(human.id).where(human.pair_id == Label.pair_id, human.source == "human",
                                          human.undone.is_(False), human.choice != "skip").exists()
    sa, sb = aliased(Sample), aliased(Sample)
    stmt = (
        select(Label.id, Label.pair_id, Label.choice, Label.source, Prompt.text, sa.text, sb.text,
               Pair.created_version)
        .join(Pair, Pair.id == Label.pair_id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(sa, sa.id == Pair.sample_a_id)
        .join(sb, sb.id == Pair.sample_b_id)
        .where(Label.consumed_version.is_(None), Label.undone.is_(False), Label.choice.in_(list(choices)),
               source_filter(sources))
        .where((Label.source == "human") | ~human_exists)
        .order_by(Label.id)
        .limit(limit)
    )
    out = []
    for lid, pid, choice, source, prompt, a_text, b_text, version in session.execute(stmt):
        chosen, rejected = (a_text, b_text) if choice == "a" else (b_text, a_text)
        out.append(TrainingLabel(label_id=lid, pair_id=pid, prompt=prompt, chosen=chosen, rejected=rejected,
                                 pair_version=version, source=source))
    return out


def count_unconsumed(session: Session, *, sources: str = "all") -> int:
    stmt = select(func.count(Label.id)).where(Label.consumed_version.is_(None), Label.undone.is_(False),
                                              Label.choice.in_(TRAINABLE_CHOICES), source_filter(sources))
    return session.scalar(stmt) or 0


def latest_adapter(session: Session, *, run: str = "default") -> Optional[Adapter]:
    """The newest committed, not rolled-back version: what the sampler should serve."""
    stmt = (select(Adapter).where(Adapter.run == run, Adapter.rolled_back.is_(False))
            .order_by(Adapter.version.desc()).limit(1))
    return session.scalar(stmt)


def get_adapter(session: Session, *, version: int, run: str = "default") -> Optional[Adapter]:
    return session.scalar(select(Adapter).where(Adapter.run == run, Adapter.version == version))


def next_version_number(session: Session, *, run: str = "default") -> int:
    """Version numbers are never reused, even after a rollback, so a directory name is unique."""
    top = session.scalar(select(func.max(Adapter.version)).where(Adapter.run == run))
    return (top or 0) + 1


def record_train_step(session: Session, *, run: str, step: int, version: int, label_ids: Sequence[int],
                      metrics: dict[str, Any]) -> TrainStep:
    row = TrainStep(run=run, step=step, version=version, label_ids=list(label_ids), metrics=dict(metrics),
                    loss=float(metrics["loss"]), reward_accuracy=float(metrics.get("reward_accuracy", 0.0)),
                    reward_margin=float(metrics.get("reward_margin", 0.0)), kl=float(metrics.get("kl", 0.0)),
                    grad_norm=float(metrics.get("grad_norm", 0.0)), seconds=float(metrics.get("seconds", 0.0)),
                    version_lag=float(metrics.get("version_lag", 0.0)))
    session.add(row)
    session.flush()
    return row


def commit_adapter_version(session: Session, *, run: str, version: int, path: str, parent: Optional[int],
                           step: int, label_steps: dict[int, int], metrics: dict[str, Any],
                           step_ids: Sequence[int] = ()) -> Adapter:
    """Insert the adapter row and mark its labels consumed, in the caller's single transaction.

    `label_steps` maps label id -> the step that trained it. Fails (and the caller's transaction
    rolls back) if any label was consumed meanwhile: a label is never trained into two versions;
    and with LabelsRetracted if one was undone meanwhile: a taken-back vote is never committed.
    Both checks are the WHERE clause of one UPDATE, so they hold against concurrent writers.
    """
    adapter = Adapter(run=run, version=version, path=path, parent=parent, step=step, metrics=dict(metrics))
    session.add(adapter)
    session.flush()
    by_step: dict[int, list[int]] = {}
    for label_id, st in label_steps.items():
        by_step.setdefault(st, []).append(label_id)
    for st, ids in by_step.items():
        n = session.execute(update(Label).where(Label.id.in_(ids), Label.consumed_version.is_(None),
                                                Label.undone.is_(False))
                            .values(consumed_version=version, consumed_step=st)).rowcount
        if n != len(ids):
            undone = session.scalar(select(func.count(Label.id)).where(Label.id.in_(ids), Label.undone.is_(True)))
            if undone:
                raise LabelsRetracted(f"{undone} vote(s) of this version were undone while it trained")
            raise StoreError(f"{len(ids) - n} label(s) were already consumed; refusing a double commit")
    if step_ids:
        session.execute(update(TrainStep).where(TrainStep.id.in_(list(step_ids))).values(committed=True))
    session.flush()
    return adapter


def rollback_to(session: Session, *, version: int, run: str = "default") -> int:
    """Serve and train from `version` again: newer versions are marked rolled back and their labels
    become unconsumed, so the next version (a new number, parent=`version`) retrains them.
    Returns the number of labels released. Version 0 means the base model.

    Only a version on the live line can be the target. A version rolled back earlier gave its labels
    back, and they have been (or will be) trained into another version since: reviving it would
    train them twice, so it is refused, and rolled-back versions stay rolled back for good.
    """
    if version != 0:
        row = get_adapter(session, version=version, run=run)
        if row is None:
            raise StoreError(f"no adapter version v{version} to roll back to")
        if row.rolled_back:
            raise StoreError(f"v{version} was itself rolled back earlier and its labels went back to training; "
                             "pick the base or a version that is not marked rolled back")
    session.execute(update(Adapter).where(Adapter.run == run, Adapter.version > version,
                                          Adapter.rolled_back.is_(False))
                    .values(rolled_back=True))
    released = session.execute(update(Label).where(Label.consumed_version > version)
                               .values(consumed_version=None, consumed_step=None)).rowcount or 0
    session.flush()
    return released
