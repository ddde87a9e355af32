"""Sampler workers: typed prompts travel to them through the database.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-18

- `sample_requests` (prompt_id, labeler, state pending/claimed/done, worker, claimed_at,
  created_at): "ask your own prompt" from the web app, which holds no model since the sampler
  became its own process (`odpo sample`). A worker claims a row with one conditional UPDATE and
  marks it done in the transaction that stores the pair.

A new table only: nothing to backfill.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sample_requests", sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("prompt_id", sa.Integer(), nullable=False), sa.Column("labeler", sa.String(200), nullable=False),
        sa.Column("state", sa.String(10), nullable=False), sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("claimed_at", sa.DateTime(), nullable=True), sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"]),
    )
    op.create_index("ix_sample_requests_state", "sample_requests", ["state", "id"])


def downgrade() -> None:
    op.drop_index("ix_sample_requests_state", table_name="sample_requests")
    op.drop_table("sample_requests")
