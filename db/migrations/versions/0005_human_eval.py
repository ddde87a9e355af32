"""Blind human evaluation: the judgments people give on eval pairs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10

- `human_evals` (pair_id, label_id, labeler, version, reference_version, outcome, created_at): a
  vote on an eval pair (`pairs.purpose = "eval"`: a held-out prompt answered by the policy and by a
  reference) read from the policy's side, win | loss | tie | both_bad. The vote itself stays an
  ordinary label row (one vote path, one undo path); the trainer and the dataset export never read
  labels of eval pairs. One judgment per (pair, labeler) and per label.

A new table only: nothing to backfill, and older rows are untouched.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "human_evals", sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("pair_id", sa.Integer(), nullable=False), sa.Column("label_id", sa.Integer(), nullable=False),
        sa.Column("labeler", sa.String(200), nullable=False), sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("reference_version", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(10), nullable=False), sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.id"]), sa.ForeignKeyConstraint(["label_id"], ["labels.id"]),
        sa.UniqueConstraint("pair_id", "labeler", name="uq_human_eval_pair_labeler"),
        sa.UniqueConstraint("label_id", name="uq_human_eval_label"),
    )
    op.create_index("ix_human_evals_version", "human_evals", ["version", "reference_version"])


def downgrade() -> None:
    op.drop_index("ix_human_evals_version", table_name="human_evals")
    op.drop_table("human_evals")
