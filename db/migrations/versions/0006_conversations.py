"""Multi-turn prompts: a prompt may carry the earlier turns of a conversation.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-17

- `prompts.context` (JSON, nullable): the turns before the final user message, a list of
  {"role", "content"} dicts (system/user/assistant) that ends with an assistant turn. NULL (or
  absent) means a single-turn prompt, so every row stored before this revision keeps its meaning.
  `prompts.text` stays the final user message: what lists, search and the label page headline show.

A nullable column only: nothing to backfill, no table rebuild on SQLite. The prompt hash of new
rows covers the context (db/store/prompts.py); stored single-turn hashes are unchanged.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("prompts", sa.Column("context", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prompts") as batch:
        batch.drop_column("context")
