"""SQLAlchemy 2.0 typed models for odpo's data model (docs/architecture.md, "Data model").

Every row carries enough provenance to derive on-policy-ness (adapter versions), labeler speed
(shown/answered timestamps) and judge agreement later, without side files.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    """Naive UTC timestamps: SQLite has no time zones, and mixing aware/naive breaks comparisons."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[int]: JSON}


PAIR_STATUSES = ("queued", "shown", "labeled", "retired")
CHOICES = ("a", "b", "tie", "both_bad", "skip")
TRAINABLE_CHOICES = ("a", "b")


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    # sha256 of the normalised text: a unique key that works on every backend (TEXT can't be indexed
    # uniquely everywhere) and makes duplicate imports cheap to detect.
    text_hash: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(200), default="import")
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    held_out: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    # The earlier turns of a conversation ({"role", "content"} dicts: an optional system message,
    # then alternating user/assistant turns ending with an assistant one; store.split_conversation
    # checks it); NULL for a single-turn prompt. `text` is always the final user message.
    # none_as_null: Python None is SQL NULL (not JSON 'null'), so "has context" is `IS NOT NULL`.
    context: Mapped[Optional[list[dict[str, str]]]] = mapped_column(JSON(none_as_null=True), nullable=True)
    times_sampled: Mapped[int] = mapped_column(Integer, default=0)
    last_sampled_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    def messages(self) -> list[dict[str, str]]:
        """What the model is conditioned on, as chat messages: the earlier turns, then the final
        user message. One place builds it, so sampling, judging, training and exports agree."""
        return [*(self.context or []), {"role": "user", "content": self.text}]

    def conditioning(self) -> str | list[dict[str, str]]:
        """The prompt as trainer/policy/batching.py takes it: the bare text for a single-turn prompt (so
        its rendering stays byte-identical to before conversations existed), else the messages."""
        return self.messages() if self.context else self.text


class Sample(Base):
    __tablename__ = "samples"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    adapter_version: Mapped[int] = mapped_column(Integer, default=0)  # 0 = base model
    text: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str] = mapped_column(String(20), default="stop")  # stop | length
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # temperature, top_p, ...
    gen_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # What the policy was fed and what it emitted (its eos included when it stopped): the trainer
    # scores exactly these. NULL on samples stored before revision 0004 (re-tokenised instead).
    prompt_token_ids: Mapped[Optional[list[int]]] = mapped_column(JSON, nullable=True)
    token_ids: Mapped[Optional[list[int]]] = mapped_column(JSON, nullable=True)
    # A candidate drawn for a pair but not shown (the pair's id; NULL for the two a pair shows), and
    # the policy's implicit reward when a selector scored it (revision 0008).
    candidate_of: Mapped[Optional[int]] = mapped_column(Integer, nullable=True, index=True)
    implicit_reward: Mapped[Optional[float]] = mapped_column(Float, nullable=True)


class Pair(Base):
    __tablename__ = "pairs"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    sample_a_id: Mapped[int] = mapped_column(ForeignKey("samples.id"))
    sample_b_id: Mapped[int] = mapped_column(ForeignKey("samples.id"))
    created_version: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(10), default="queued")
    # How many labelers should see this pair (overlap); claims counts the live/answered showings.
    labels_wanted: Mapped[int] = mapped_column(Integer, default=1)
    claims: Mapped[int] = mapped_column(Integer, default=0)
    purpose: Mapped[str] = mapped_column(String(20), default="train")  # train | typed | eval
    requested_by: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    # How the sampler chose this pair from its prompt's candidates (trainer/sampling/selection.py);
    # NULL: drawn as a pair (before revision 0008).
    selector: Mapped[Optional[str]] = mapped_column(String(20), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (Index("ix_pairs_status_id", "status", "id"),)


class Assignment(Base):
    """One showing of a pair to one labeler: what was on the left, and when it expires.

    Claims go through this table so several labelers never get the same pair (unless overlap asks
    for it) and a closed browser tab gives its pair back after a timeout.
    """

    __tablename__ = "assignments"
    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"), index=True)
    labeler: Mapped[str] = mapped_column(String(200))
    # Which client of the labeler holds the open claim (a page's session, an API client): one name
    # in two clients never holds one claim twice; re-showing it to another client moves it here.
    client: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    shown_left: Mapped[str] = mapped_column(String(1))  # "a" or "b"
    shown_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    state: Mapped[str] = mapped_column(String(10), default="open")  # open | answered | expired
    __table_args__ = (UniqueConstraint("pair_id", "labeler", name="uq_assignment_pair_labeler"),)


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"), index=True)
    choice: Mapped[str] = mapped_column(String(10))
    shown_left: Mapped[Optional[str]] = mapped_column(String(1), nullable=True)
    labeler: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(200), default="human")  # human | judge:<spec>
    judge_confidence: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    reason: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    shown_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    answered_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    undone: Mapped[bool] = mapped_column(Boolean, default=False)
    # How many runs hold this label in their ledger (label_uses rows). Kept on the label row because
    # a commit (uses + 1 WHERE NOT undone) and an undo (undone WHERE uses = 0) must write the SAME
    # row to exclude each other on PostgreSQL; a NOT EXISTS over label_uses would not.
    uses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class LabelUse(Base):
    """The ledger: a label consumed by one run, trained into `version` at `step` (or skipped as too
    stale: step STALE_STEP). One row per label and run, so a label trains at most once per run."""

    __tablename__ = "label_uses"
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id"), primary_key=True)
    run: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (Index("ix_label_uses_run_version", "run", "version"),)


class Run(Base):
    """A training run's head: the version its next commit must name as parent (0 = the base).

    Commits and rollbacks move it with one conditional UPDATE (WHERE head = the version they
    started from), so they are serialised per run and a commit on top of a rolled-back parent is
    refused instead of silently undoing the rollback."""

    __tablename__ = "runs"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    head: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Adapter(Base):
    __tablename__ = "adapters"
    id: Mapped[int] = mapped_column(primary_key=True)
    run: Mapped[str] = mapped_column(String(100), default="default")
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    parent: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    rolled_back: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    __table_args__ = (UniqueConstraint("run", "version", name="uq_adapter_run_version"),)


class TrainStep(Base):
    __tablename__ = "train_steps"
    id: Mapped[int] = mapped_column(primary_key=True)
    run: Mapped[str] = mapped_column(String(100), default="default")
    step: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)  # the version this step's update lands in
    label_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    loss: Mapped[float] = mapped_column(Float)
    reward_accuracy: Mapped[float] = mapped_column(Float, default=0.0)
    reward_margin: Mapped[float] = mapped_column(Float, default=0.0)
    kl: Mapped[float] = mapped_column(Float, default=0.0)
    grad_norm: Mapped[float] = mapped_column(Float, default=0.0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    version_lag: Mapped[float] = mapped_column(Float, default=0.0)
    committed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Eval(Base):
    __tablename__ = "evals"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_a: Mapped[int] = mapped_column(Integer)
    version_b: Mapped[int] = mapped_column(Integer)  # 0 = base
    judge: Mapped[str] = mapped_column(String(200))
    n: Mapped[int] = mapped_column(Integer)
    wins: Mapped[int] = mapped_column(Integer, default=0)
    losses: Mapped[int] = mapped_column(Integer, default=0)
    ties: Mapped[int] = mapped_column(Integer, default=0)
    win_rate: Mapped[float] = mapped_column(Float)
    ci_low: Mapped[float] = mapped_column(Float)
    ci_high: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class HumanEval(Base):
    """A person's vote on an eval pair, read from the policy's side: the evaluation judgment.

    An eval pair (`pairs.purpose = "eval"`) is a held-out prompt answered once by the policy
    (`version`) and once by a reference (`reference_version`, 0 = the base); the vote itself is an
    ordinary label (the one vote path), which the trainer never reads (store.labels.source_filter).
    One row per label and per (pair, labeler); an undo deletes it with the label's undo."""

    __tablename__ = "human_evals"
    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"))
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id"))
    labeler: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)  # the policy judged
    reference_version: Mapped[int] = mapped_column(Integer)  # 0 = base
    outcome: Mapped[str] = mapped_column(String(10))  # win | loss | tie | both_bad (for the policy)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (UniqueConstraint("pair_id", "labeler", name="uq_human_eval_pair_labeler"),
                      UniqueConstraint("label_id", name="uq_human_eval_label"),
                      Index("ix_human_evals_version", "version", "reference_version"))


class Labeler(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Reload(Base):
    """A hot reload seen by a sampler: how long the swap took and how stale serving was."""

    __tablename__ = "reloads"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    swap_ms: Mapped[float] = mapped_column(Float)
    commit_to_serving_ms: Mapped[float] = mapped_column(Float)
    retired_pairs: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Control(Base):
    """Small key/value switches shared between processes (pause training, process heartbeats)."""

    __tablename__ = "control"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class SampleRequest(Base):
    """A prompt a labeler typed, waiting for a sampler worker ("ask your own prompt").

    The web app holds no model: it writes this row, any `odpo sample` worker claims it (one
    conditional UPDATE, so two workers never sample it twice) and marks it done in the transaction
    that stores the pair. A claim whose worker died is offered again after a timeout."""

    __tablename__ = "sample_requests"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    labeler: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(10), default="pending")  # pending | claimed | done
    worker: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    claimed_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (Index("ix_sample_requests_state", "state", "id"),)
