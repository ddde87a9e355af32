"""Baseline: the schema the hand-made migrations created.

Their m001_initial: db/models.py as released before Alembic.

Revision ID: 0001
Revises:
Create Date: 2026-11-29

A database made before Alembic is stamped at this revision instead of running it, so this must stay
exactly what that release created; tests/test_migrations.py checks it against dumps it produced.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True)


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(), nullable=False)


def _required(name: str, type_: sa.types.TypeEngine) -> sa.Column:
    return sa.Column(name, type_, nullable=False)


def _optional(name: str, type_: sa.types.TypeEngine) -> sa.Column:
    return sa.Column(name, type_, nullable=True)


def upgrade() -> None:
    _create_data_tables()
    _create_training_tables()
    _create_process_tables()


def _create_data_tables() -> None:
    """Prompts, samples, pairs and the labels on them: what labelers and the sampler produce."""
    op.create_table(
        "prompts", _id(), _required("text", sa.Text()), _required("text_hash", sa.String(64)),
        _required("source", sa.String(200)), _required("tags", sa.JSON()), _required("held_out", sa.Boolean()),
        _required("times_sampled", sa.Integer()), _optional("last_sampled_at", sa.DateTime()), _created_at(),
        sa.UniqueConstraint("text_hash"),
    )
    op.create_index("ix_prompts_held_out", "prompts", ["held_out"])
    op.create_table(
        "samples", _id(), _required("prompt_id", sa.Integer()), _required("adapter_version", sa.Integer()),
        _required("text", sa.Text()), _required("tokens", sa.Integer()), _required("finish_reason", sa.String(20)),
        _required("params", sa.JSON()), _required("gen_seconds", sa.Float()), _created_at(),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"]),
    )
    op.create_index("ix_samples_prompt_id", "samples", ["prompt_id"])
    op.create_table(
        "pairs", _id(), _required("prompt_id", sa.Integer()), _required("sample_a_id", sa.Integer()),
        _required("sample_b_id", sa.Integer()), _required("created_version", sa.Integer()),
        _required("status", sa.String(10)), _required("labels_wanted", sa.Integer()), _required("claims", sa.Integer()),
        _required("purpose", sa.String(20)), _optional("requested_by", sa.String(200)), _created_at(),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"]),
        sa.ForeignKeyConstraint(["sample_a_id"], ["samples.id"]),
        sa.ForeignKeyConstraint(["sample_b_id"], ["samples.id"]),
    )
    op.create_index("ix_pairs_prompt_id", "pairs", ["prompt_id"])
    op.create_index("ix_pairs_status_id", "pairs", ["status", "id"])
    op.create_table(
        "assignments", _id(), _required("pair_id", sa.Integer()), _required("labeler", sa.String(200)),
        _required("shown_left", sa.String(1)), _required("shown_at", sa.DateTime()),
        _required("expires_at", sa.DateTime()), _required("state", sa.String(10)),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.id"]),
        sa.UniqueConstraint("pair_id", "labeler", name="uq_assignment_pair_labeler"),
    )
    op.create_index("ix_assignments_pair_id", "assignments", ["pair_id"])
    op.create_table(
        "labels", _id(), _required("pair_id", sa.Integer()), _required("choice", sa.String(10)),
        _optional("shown_left", sa.String(1)), _required("labeler", sa.String(200)),
        _required("source", sa.String(200)),
        _optional("judge_confidence", sa.Float()), _optional("reason", sa.Text()), _optional("shown_at", sa.DateTime()),
        _required("answered_at", sa.DateTime()), _optional("consumed_version", sa.Integer()),
        _optional("consumed_step", sa.Integer()), _required("undone", sa.Boolean()),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.id"]),
    )
    op.create_index("ix_labels_consumed_version", "labels", ["consumed_version"])
    op.create_index("ix_labels_pair_id", "labels", ["pair_id"])


def _create_training_tables() -> None:
    """Adapter versions, the DPO steps inside them and the evals between them: what the trainer writes."""
    op.create_table(
        "adapters", _id(), _required("run", sa.String(100)), _required("version", sa.Integer()),
        _required("path", sa.Text()), _optional("parent", sa.Integer()), _required("step", sa.Integer()),
        _required("rolled_back", sa.Boolean()), _created_at(), _required("metrics", sa.JSON()),
        sa.UniqueConstraint("run", "version", name="uq_adapter_run_version"),
    )
    op.create_table(
        "train_steps", _id(), _required("run", sa.String(100)), _required("step", sa.Integer()),
        _required("version", sa.Integer()), _required("label_ids", sa.JSON()), _required("metrics", sa.JSON()),
        *(_required(name, sa.Float()) for name in ("loss", "reward_accuracy", "reward_margin", "kl", "grad_norm",
                                                   "seconds", "version_lag")),
        _required("committed", sa.Boolean()), _created_at(),
    )
    op.create_table(
        "evals", _id(), _required("version_a", sa.Integer()), _required("version_b", sa.Integer()),
        _required("judge", sa.String(200)),
        *(_required(name, sa.Integer()) for name in ("n", "wins", "losses", "ties")),
        *(_required(name, sa.Float()) for name in ("win_rate", "ci_low", "ci_high")),
        _required("details", sa.JSON()), _created_at(),
    )


def _create_process_tables() -> None:
    """Labelers, hot reloads and the control switches the processes share."""
    op.create_table(
        "labelers", _id(), _required("name", sa.String(200)), _required("is_admin", sa.Boolean()), _created_at(),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "reloads", _id(), _required("version", sa.Integer()), _required("swap_ms", sa.Float()),
        _required("commit_to_serving_ms", sa.Float()), _required("retired_pairs", sa.Integer()), _created_at(),
    )
    op.create_table(
        "control", sa.Column("key", sa.String(100), primary_key=True), _required("value", sa.JSON()),
        _required("updated_at", sa.DateTime()),
    )


def downgrade() -> None:
    for table in ("labels", "assignments", "pairs", "samples", "prompts", "train_steps", "adapters", "evals",
                  "labelers", "reloads", "control"):
        op.drop_table(table)  # children before parents; their indexes go with them
    # 0002's downgrade recreated the old release's record of this schema: it goes with the schema.
    op.execute("DROP TABLE IF EXISTS _odpo_migrations")
