"""Drop _odpo_migrations, the hand-made migrations' record.

alembic_version now says where the schema is.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

Fresh databases never had the table (IF EXISTS). The downgrade puts it back with the baseline
recorded, so the release before Alembic finds its one migration applied and runs as it did.
"""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP TABLE IF EXISTS _odpo_migrations")


def downgrade() -> None:
    table = op.create_table(
        "_odpo_migrations", sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("applied_at", sa.DateTime(), nullable=True),
    )
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    op.bulk_insert(table, [{"name": "m001_initial", "applied_at": now}])
