"""Adapters and train steps: the training ledger of which labels went into which version of which run.

A run has a head (`runs.head`, 0 = the base): the version its next commit must name as parent.
The commit point of a new adapter version is ONE transaction that moves the head from the parent
to the new version with a conditional UPDATE (row count checked), inserts the `adapters` row and
writes the labels it consumed into the ledger (`label_uses`, one row per label and run). A crash
before it replays those labels; a crash after it never trains them again in that run; a rollback
committed while the version trained moved the head, so the commit is refused (HeadMoved) instead of
silently undoing the rollback. Rollbacks move the head the same way and release only their own
run's uses. Another run trains every label again: consumption is per run.

A label whose pair was sampled more than `max_staleness_train` versions before the trainer's
current version is not trained on. It gets a ledger row with `step = STALE_STEP` at the version the
trainer held, so that run does not fetch it again and it stays countable; `rollback_to` releases it
like any use (after a rollback it may be fresh enough again).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sqlalchemy import delete, func, insert, select, true, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from odpo.db.errors import StoreError
from odpo.db.models import (
    TRAINABLE_CHOICES,
    Adapter,
    Label,
    LabelUse,
    Pair,
    Prompt,
    Run,
    Sample,
    TrainStep,
    utcnow,
)
from odpo.db.store.labels import source_filter
from odpo.db.store.prompts import conversation


class LabelsRetracted(StoreError):
    """A vote in the batch was undone after the trainer read it: the version must not be committed."""


class HeadMoved(StoreError):
    """The run's head is no longer the version a commit or rollback started from (a rollback or
    another trainer got there first). Nothing was written: resync with the head and replay."""


@dataclass(frozen=True)
class TrainingLabel:
    label_id: int
    pair_id: int
    prompt: str | list[dict[str, str]]  # the text, or for a conversation all its messages (Prompt.conditioning)
    chosen: str
    rejected: str
    pair_version: int
    source: str


STALE_STEP = -1


def _unused_in(run: str):
    """Labels with no ledger row for `run` (correlated with Label)."""
    return ~select(LabelUse.label_id).where(LabelUse.label_id == Label.id, LabelUse.run == run).exists()


def unconsumed_labels(session: Session, *, limit: int, run: str = "default", sources: str = "all",
                      choices: Sequence[str] = TRAINABLE_CHOICES,
                      exclude_labelers: Optional[Sequence[str]] = None) -> list[TrainingLabel]:
    """Trainable labels not yet used by `run` (trained or skipped), oldest first.

    When a person and a judge both labeled a pair, only the person's label is used (human
    overrides judge); the judge's label stays stored for agreement statistics. Human labels of
    `exclude_labelers` are left out (and stay unused, see `not_excluded`).
    """
    human = aliased(Label)
    # A person's skip is no opinion: a judge's label on a skipped pair is still trained on.
    human_exists = select(human.id).where(human.pair_id == Label.pair_id, human.source == "human",
                                          human.undone.is_(False), human.choice != "skip").exists()
    sa, sb = aliased(Sample), aliased(Sample)
    stmt = (
        select(Label.id, Label.pair_id, Label.choice, Label.source, Prompt.text, sa.text, sb.text,
               Pair.created_version, Prompt.context)
        .join(Pair, Pair.id == Label.pair_id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(sa, sa.id == Pair.sample_a_id)
        .join(sb, sb.id == Pair.sample_b_id)
        .where(_unused_in(run), Label.undone.is_(False), Label.choice.in_(list(choices)), source_filter(sources))
        .where((Label.source == "human") | ~human_exists, not_excluded(exclude_labelers))
        .order_by(Label.id)
        .limit(limit)
    )
    out = []
    for lid, pid, choice, source, prompt, a_text, b_text, version, context in session.execute(stmt):
        chosen, rejected = (a_text, b_text) if choice == "a" else (b_text, a_text)
        prompt_input = conversation(context, prompt) if context else prompt
        out.append(TrainingLabel(label_id=lid, pair_id=pid, prompt=prompt_input,
                                 chosen=chosen, rejected=rejected, pair_version=version, source=source))
    return out


def not_excluded(labelers: Optional[Sequence[str]]) -> Any:
    """Leaves out the human labels of `labelers` (`odpo train --min-labeler-agreement`); true for
    every label when there are none. Their labels get no ledger row, so a lower threshold later
    trains them. An excluded person's opinion still overrides a judge's label on the same pair:
    their pair is simply not trained, rather than trained from a judge the person contradicted."""
    names = sorted(set(labelers or ()))
    if not names:
        return true()
    return ~((Label.source == "human") & Label.labeler.in_(names))


def count_unconsumed(session: Session, *, run: str = "default", sources: str = "all") -> int:
    """Live a/b labels `run` has not used yet (what its next versions will train on)."""
    stmt = select(func.count(Label.id)).where(_unused_in(run), Label.undone.is_(False),
                                              Label.choice.in_(TRAINABLE_CHOICES), source_filter(sources))
    return session.scalar(stmt) or 0


def label_uses(session: Session, *, run: str = "default") -> dict[int, tuple[int, int]]:
    """The ledger of one run: label id -> (version, step); step STALE_STEP = skipped as too stale."""
    rows = session.execute(select(LabelUse.label_id, LabelUse.version, LabelUse.step).where(LabelUse.run == run))
    return {lid: (version, step) for lid, version, step in rows}


def skip_stale_labels(session: Session, *, label_ids: Sequence[int], version: int, run: str = "default") -> int:
    """Record labels `run` has not used as skipped-for-staleness at `version`; returns how many."""
    if not label_ids:
        return 0
    used = set(session.scalars(select(LabelUse.label_id).where(LabelUse.run == run,
                                                               LabelUse.label_id.in_(list(label_ids)))))
    ids = [i for i in dict.fromkeys(label_ids) if i not in used]
    if not ids:
        return 0
    session.execute(update(Label).where(Label.id.in_(ids), Label.undone.is_(False)).values(uses=Label.uses + 1)
                    .execution_options(synchronize_session=False))
    # undone never goes back to false, and the rows just written are ours until commit: these are
    # exactly the labels the UPDATE counted.
    live = list(session.scalars(select(Label.id).where(Label.id.in_(ids), Label.undone.is_(False))))
    _write_uses(session, run=run, version=version, label_steps=dict.fromkeys(live, STALE_STEP))
    return len(live)


def _write_uses(session: Session, *, run: str, version: int, label_steps: dict[int, int]) -> None:
    if label_steps:
        now = utcnow()
        session.execute(insert(LabelUse), [{"label_id": lid, "run": run, "version": version, "step": st,
                                            "created_at": now} for lid, st in label_steps.items()])


def count_stale_skipped(session: Session, *, run: str = "default") -> int:
    """Labels `run` never trained on because their pair was too stale (current, not rolled back)."""
    return session.scalar(select(func.count()).select_from(LabelUse)
                          .where(LabelUse.run == run, LabelUse.step == STALE_STEP)) or 0


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


# --- run heads ---------------------------------------------------------------------------------


def run_head(session: Session, *, run: str = "default") -> int:
    """The version `run` serves and trains from (0 = the base model)."""
    head = session.scalar(select(Run.head).where(Run.name == run))
    if head is None:  # a run that never committed: its head is its newest live version, if any
        head = session.scalar(select(func.max(Adapter.version)).where(Adapter.run == run,
                                                                      Adapter.rolled_back.is_(False)))
    return int(head or 0)


def _ensure_run(session: Session, run: str) -> None:
    """Give `run` its head row if it has none, in one statement (two first commits may race).

    Its head is read first only as the value for a missing row; whoever moves it afterwards does so
    with the conditional UPDATE in `_move_head`."""
    row = {"name": run, "head": run_head(session, run=run), "updated_at": utcnow()}
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        stmt = (sqlite_insert if dialect == "sqlite" else postgresql_insert)(Run).values(**row)
        session.execute(stmt.on_conflict_do_nothing(index_elements=[Run.name]))
        return
    try:
        with session.begin_nested():
            session.execute(insert(Run).values(**row))
    except IntegrityError:
        pass  # someone else created it: their head stands


def _move_head(session: Session, *, run: str, expected: int, new: int) -> bool:
    """The one conditional write that serialises commits and rollbacks of a run: head expected -> new.

    PostgreSQL: a concurrent mover's UPDATE waits for this row lock, then re-checks the head and
    matches nothing. SQLite: both run under the database's write lock, one after the other."""
    moved = session.execute(update(Run).where(Run.name == run, Run.head == expected)
                            .values(head=new, updated_at=utcnow())
                            .execution_options(synchronize_session=False)).rowcount
    return moved == 1


def commit_adapter_version(session: Session, *, run: str, version: int, path: str, parent: Optional[int],
                           step: int, label_steps: dict[int, int], metrics: dict[str, Any],
                           step_ids: Sequence[int] = ()) -> Adapter:
    """Move the run's head from `parent` to `version`, insert the adapter row and write its labels
    into the run's ledger, in the caller's single transaction.

    `label_steps` maps label id -> the step that trained it. Refuses (and the caller's transaction
    rolls back) with HeadMoved when `parent` is no longer the head (a rollback came first); with
    StoreError when a label is already used by this run (never trained twice into one run); with
    LabelsRetracted when one was undone meanwhile (a taken-back vote is never committed). Each is
    decided by a conditional UPDATE or a key, so it holds against concurrent writers.
    """
    _ensure_run(session, run)
    if not _move_head(session, run=run, expected=parent or 0, new=version):
        raise HeadMoved(f"run {run!r} is at v{run_head(session, run=run)} now, not v{parent or 0} that "
                        f"v{version} was trained on (a rollback?): not committing it")
    adapter = Adapter(run=run, version=version, path=path, parent=parent, step=step, metrics=dict(metrics))
    session.add(adapter)
    session.flush()
    _consume(session, run=run, version=version, label_steps=label_steps)
    if step_ids:
        session.execute(update(TrainStep).where(TrainStep.id.in_(list(step_ids))).values(committed=True))
    session.flush()
    return adapter


def _consume(session: Session, *, run: str, version: int, label_steps: dict[int, int]) -> None:
    ids = list(label_steps)
    if not ids:
        return
    used = session.scalar(select(func.count()).select_from(LabelUse)
                          .where(LabelUse.run == run, LabelUse.label_id.in_(ids))) or 0
    if used:
        raise StoreError(f"{used} label(s) were already consumed by run {run!r}; refusing a double commit")
    counted = session.execute(update(Label).where(Label.id.in_(ids), Label.undone.is_(False))
                              .values(uses=Label.uses + 1).execution_options(synchronize_session=False)).rowcount
    if counted != len(ids):
        undone = session.scalar(select(func.count(Label.id)).where(Label.id.in_(ids), Label.undone.is_(True)))
        if undone:
            raise LabelsRetracted(f"{undone} vote(s) of this version were undone while it trained")
        raise StoreError(f"{len(ids) - counted} label(s) of this version do not exist; refusing the commit")
    _write_uses(session, run=run, version=version, label_steps=label_steps)


def rollback_to(session: Session, *, version: int, run: str = "default") -> int:
    """Serve and train `run` from `version` again: its newer versions are marked rolled back and
    their labels leave the run's ledger, so the next version (a new number, parent=`version`)
    retrains them. Other runs' uses stay. Returns the number of labels released. Version 0 means
    the base model.

    Only a version on the live line can be the target. A version rolled back earlier gave its labels
    back, and they have been (or will be) trained into another version since: reviving it would
    train them twice, so it is refused, and rolled-back versions stay rolled back for good. The head
    moves with a conditional UPDATE: a commit that lands meanwhile makes this raise HeadMoved.
    """
    _ensure_run(session, run)
    head = run_head(session, run=run)
    if version != 0:
        row = get_adapter(session, version=version, run=run)
        if row is None:
            raise StoreError(f"no adapter version v{version} to roll back to")
        if row.rolled_back:
            raise StoreError(f"v{version} was itself rolled back earlier and its labels went back to training; "
                             "pick the base or a version that is not marked rolled back")
    if version > head:
        raise StoreError(f"v{version} is newer than run {run!r}'s head v{head}; nothing to roll back")
    if not _move_head(session, run=run, expected=head, new=version):
        raise HeadMoved(f"run {run!r} moved past v{head} while rolling back; look at the versions and try again")
    session.execute(update(Adapter).where(Adapter.run == run, Adapter.version > version,
                                          Adapter.rolled_back.is_(False))
                    .values(rolled_back=True))
    released = select(LabelUse.label_id).where(LabelUse.run == run, LabelUse.version > version)
    session.execute(update(Label).where(Label.id.in_(released.scalar_subquery())).values(uses=Label.uses - 1)
                    .execution_options(synchronize_session=False))
    n = session.execute(delete(LabelUse).where(LabelUse.run == run, LabelUse.version > version)).rowcount or 0
    session.flush()
    return n


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


def list_versions(session: Session, *, run: str = "default") -> list[Adapter]:
    """Every adapter row of a run (rolled back ones too), oldest first."""
    return list(session.scalars(select(Adapter).where(Adapter.run == run).order_by(Adapter.version)))


def adapter_versions(session: Session, *, run: str = "default") -> list[dict[str, Any]]:
    rows = session.scalars(select(Adapter).where(Adapter.run == run).order_by(Adapter.version)).all()
    return [{"version": r.version, "parent": r.parent, "step": r.step, "rolled_back": r.rolled_back,
             "at": r.created_at} for r in rows]


def version_lineage(session: Session, *, version: int, run: str = "default") -> list[int]:
    """`version` and its ancestors (parent links), newest first; [] for the base model."""
    chain: list[int] = []
    current: Optional[int] = version
    while current and current not in chain:
        row = session.scalar(select(Adapter).where(Adapter.run == run, Adapter.version == current))
        if row is None:
            break
        chain.append(current)
        current = row.parent
    return chain


def trained_label_counts(session: Session, *, version: int, run: str = "default") -> dict[str, int]:
    """Labels trained into `version` and its ancestors, by source ("human", "judge:<spec>")."""
    lineage = version_lineage(session, version=version, run=run)
    if not lineage:
        return {}
    stmt = (select(Label.source, func.count(Label.id)).join(LabelUse, LabelUse.label_id == Label.id)
            .where(LabelUse.run == run, LabelUse.version.in_(lineage), LabelUse.step != STALE_STEP)
            .group_by(Label.source).order_by(Label.source))
    return {str(source): int(n) for source, n in session.execute(stmt)}


def train_series(session: Session, *, run: str = "default", limit: int = 5000) -> list[dict[str, Any]]:
    """The last `limit` training steps, oldest first: loss, reward accuracy/margin, version lag."""
    rows = session.scalars(select(TrainStep).where(TrainStep.run == run)
                           .order_by(TrainStep.id.desc()).limit(limit)).all()
    return [{"step": r.step, "version": r.version, "loss": r.loss, "reward_accuracy": r.reward_accuracy,
             "reward_margin": r.reward_margin, "version_lag": r.version_lag, "seconds": r.seconds,
             "committed": r.committed, "at": r.created_at} for r in reversed(rows)]


def last_train_step(session: Session, *, run: str = "default") -> Optional[dict[str, Any]]:
    row = session.scalar(select(TrainStep).where(TrainStep.run == run).order_by(TrainStep.id.desc()).limit(1))
    if row is None:
        return None
    return {"step": row.step, "version": row.version, "loss": row.loss, "at": row.created_at,
            "age_s": max(0.0, (utcnow() - row.created_at).total_seconds())}
