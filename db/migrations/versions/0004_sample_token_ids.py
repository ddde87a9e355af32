"""Samples keep the token ids they were drawn with: the prompt ids fed and the ids emitted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

The trainer scores exactly these ids (exact on-policy data). Both columns are nullable: samples
stored before this revision have no ids and keep training through the re-tokenising path
(trainer/policy/batching.py). Adding a nullable column needs no table rebuild on SQLite.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("samples", sa.Column("prompt_token_ids", sa.JSON(), nullable=True))
    op.add_column("samples", sa.Column("token_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("token_ids")
        batch.drop_column("prompt_token_ids")
