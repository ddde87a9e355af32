"""Pairs chosen from K candidates: which selector chose them, and the candidates not shown.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

- `pairs.selector`: how the sampler chose the pair's two samples from its prompt's candidates
  (random, margin, uncertain, diverse, judge-uncertain; NULL for pairs from before, which were the
  only two drawn). The dashboard's tie and both-bad rates per selector read it.
- `samples.candidate_of`: a candidate drawn for a pair but not shown (its pair's id); NULL for the
  two samples a pair shows. Never trained on: only labels train, and labels name pairs.
- `samples.implicit_reward`: the policy's implicit reward of the sample when the selector scored
  it (margin, uncertain), else NULL.

Nullable columns only: no table rebuild on SQLite, nothing to backfill.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("pairs", sa.Column("selector", sa.String(20), nullable=True))
    op.add_column("samples", sa.Column("candidate_of", sa.Integer(), nullable=True))
    op.add_column("samples", sa.Column("implicit_reward", sa.Float(), nullable=True))
    op.create_index("ix_samples_candidate_of", "samples", ["candidate_of"])


def downgrade() -> None:
    op.drop_index("ix_samples_candidate_of", table_name="samples")
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("implicit_reward")
        batch.drop_column("candidate_of")
    with op.batch_alter_table("pairs") as batch:
        batch.drop_column("selector")
