"""Per-run ledger: run heads, label uses per run, the client holding a claim.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

- `runs` (name, head): the version a run's next commit must name as parent. Commits and rollbacks
  move it with a conditional UPDATE, so they are serialised per run.
- `label_uses` (label_id, run, version, step), primary key (label_id, run): a label trains at most
  once per run, and two runs on one database each train every label. It replaces
  `labels.consumed_version` / `consumed_step`, which held one consumption for all runs.
- `labels.uses`: how many runs hold the label; commit and undo both write it, which is what makes
  them exclude each other on PostgreSQL.
- `assignments.client`: which client of a labeler holds an open claim.

Backfill: every run in `adapters` gets a `runs` row whose head is its newest live version. Every
consumed label becomes a `label_uses` row for the run of the adapter version that consumed it (the
live row first). A label skipped as stale at a version no row has (v0, the base) goes to the only
run when there is one, else to "default". Nothing is dropped before it is copied.
"""
from __future__ import annotations

import datetime as dt
from typing import Iterator

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

CHUNK = 5000
DEFAULT_RUN = "default"

adapters = sa.table("adapters", sa.column("id", sa.Integer), sa.column("run", sa.String),
                    sa.column("version", sa.Integer), sa.column("rolled_back", sa.Boolean))
labels = sa.table("labels", sa.column("id", sa.Integer), sa.column("consumed_version", sa.Integer),
                  sa.column("consumed_step", sa.Integer), sa.column("uses", sa.Integer))
label_uses = sa.table("label_uses", sa.column("label_id", sa.Integer), sa.column("run", sa.String),
                      sa.column("version", sa.Integer), sa.column("step", sa.Integer),
                      sa.column("created_at", sa.DateTime))
runs = sa.table("runs", sa.column("name", sa.String), sa.column("head", sa.Integer),
                sa.column("updated_at", sa.DateTime))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def upgrade() -> None:
    op.create_table(
        "runs", sa.Column("name", sa.String(100), primary_key=True), sa.Column("head", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "label_uses", sa.Column("label_id", sa.Integer(), nullable=False),
        sa.Column("run", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False), sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["label_id"], ["labels.id"]), sa.PrimaryKeyConstraint("label_id", "run"),
    )
    op.create_index("ix_label_uses_run_version", "label_uses", ["run", "version"])
    with op.batch_alter_table("assignments") as batch:
        batch.add_column(sa.Column("client", sa.String(200), nullable=True))
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("uses", sa.Integer(), nullable=False, server_default="0"))
    _backfill_runs()
    _backfill_label_uses()
    with op.batch_alter_table("labels") as batch:
        batch.drop_index("ix_labels_consumed_version")
        batch.drop_column("consumed_version")
        batch.drop_column("consumed_step")


def _backfill_runs() -> None:
    """A run's head is its newest version not rolled back (0 when all were)."""
    live = sa.case((adapters.c.rolled_back.is_(False), adapters.c.version))
    heads = sa.select(adapters.c.run, sa.func.coalesce(sa.func.max(live), 0), sa.literal(_now(), sa.DateTime))
    op.execute(runs.insert().from_select(["name", "head", "updated_at"], heads.group_by(adapters.c.run)))


def _backfill_label_uses() -> None:
    """One ledger row per consumed label, for the run of the version that consumed it."""
    bind = op.get_bind()
    owner: dict[int, str] = {}  # version -> run; the last row written wins: live rows, the oldest first
    rows = bind.execute(sa.select(adapters.c.version, adapters.c.run)
                        .order_by(adapters.c.rolled_back.desc(), adapters.c.id.desc())).all()
    for version, run in rows:
        owner[version] = run
    run_names = {run for _, run in rows}
    fallback = next(iter(run_names)) if len(run_names) == 1 else DEFAULT_RUN
    now = _now()
    for chunk in _consumed_labels(bind):
        op.bulk_insert(label_uses, [{"label_id": lid, "run": owner.get(version, fallback), "version": version,
                                     "step": step if step is not None else 0, "created_at": now}
                                    for lid, version, step in chunk])
    op.execute(labels.update().where(labels.c.consumed_version.is_not(None)).values(uses=1))


def _consumed_labels(bind: sa.Connection) -> Iterator[list[tuple]]:
    """(id, consumed_version, consumed_step) of consumed labels, CHUNK at a time, by id."""
    last = 0
    while True:
        chunk = bind.execute(sa.select(labels.c.id, labels.c.consumed_version, labels.c.consumed_step)
                             .where(labels.c.consumed_version.is_not(None), labels.c.id > last)
                             .order_by(labels.c.id).limit(CHUNK)).all()
        if not chunk:
            return
        yield [tuple(r) for r in chunk]
        last = chunk[-1][0]


def downgrade() -> None:
    """Back to one consumption per label: a label keeps its use in "default" when it has one, else
    its oldest; the other runs' uses are lost (the old schema cannot hold them)."""
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("consumed_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("consumed_step", sa.Integer(), nullable=True))
        batch.create_index("ix_labels_consumed_version", ["consumed_version"])
    bind = op.get_bind()
    chosen: dict[int, tuple[int, int]] = {}
    for lid, version, step in bind.execute(
            sa.select(label_uses.c.label_id, label_uses.c.version, label_uses.c.step)
            .order_by(label_uses.c.label_id, label_uses.c.run != DEFAULT_RUN, label_uses.c.version)):
        chosen.setdefault(lid, (version, step))
    for lid, (version, step) in chosen.items():
        op.execute(labels.update().where(labels.c.id == lid).values(consumed_version=version, consumed_step=step))
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("uses")
    with op.batch_alter_table("assignments") as batch:
        batch.drop_column("client")
    op.drop_index("ix_label_uses_run_version", table_name="label_uses")
    op.drop_table("label_uses")
    op.drop_table("runs")
