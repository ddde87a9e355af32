"""Prompts: import (deduplicated by normalised text, one transaction) and least-recently-used picks.

Like every store module: a Session first, keyword-only arguments, the caller owns the transaction.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from odpo.db.models import Prompt, utcnow


def normalise_prompt(text: str) -> str:
    """The form used for duplicate detection: whitespace collapsed, case folded."""
    return re.sub(r"\s+", " ", text.strip()).casefold()


def prompt_hash(text: str) -> str:
    return hashlib.sha256(normalise_prompt(text).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class NewPrompt:
    text: str
    source: str = "import"
    tags: tuple[str, ...] = ()
    held_out: bool = False


@dataclass(frozen=True)
class ImportResult:
    added: int
    duplicates: int
    held_out: int


def add_prompts(session: Session, *, prompts: Iterable[NewPrompt]) -> ImportResult:
    """Insert prompts not already stored (by normalised text). The caller owns the transaction,
    so an import of a whole file is all-or-nothing."""
    items = list(prompts)
    hashes = [prompt_hash(p.text) for p in items]
    existing: set[str] = set()
    for chunk_start in range(0, len(hashes), 500):  # stay under SQL parameter limits
        chunk = hashes[chunk_start : chunk_start + 500]
        existing.update(session.scalars(select(Prompt.text_hash).where(Prompt.text_hash.in_(chunk))))
    added = dup = held = 0
    for item, h in zip(items, hashes, strict=True):
        if h in existing:
            dup += 1
            continue
        existing.add(h)
        session.add(Prompt(text=item.text.strip(), text_hash=h, source=item.source,
                           tags=list(item.tags), held_out=item.held_out))
        added += 1
        held += int(item.held_out)
    session.flush()
    return ImportResult(added=added, duplicates=dup, held_out=held)


def add_typed_prompt(session: Session, *, text: str, source: str = "typed") -> Prompt:
    """A prompt a labeler typed: reuse the stored row when the same text exists."""
    h = prompt_hash(text)
    row = session.scalar(select(Prompt).where(Prompt.text_hash == h))
    if row is None:
        row = Prompt(text=text.strip(), text_hash=h, source=source, tags=["typed"], held_out=False)
        session.add(row)
        session.flush()
    return row


def pick_prompts_for_sampling(session: Session, *, n: int, exclude_ids: Sequence[int] = (),
                              held_out: bool = False) -> list[Prompt]:
    """The n training prompts (held-out ones with `held_out`: blind eval pairs) sampled least
    recently (never-sampled first), stamped as sampled now, so every prompt gets visited before any
    is repeated."""
    stmt = (
        select(Prompt)
        .where(Prompt.held_out.is_(held_out))
        .order_by(Prompt.last_sampled_at.is_not(None), Prompt.last_sampled_at, Prompt.id)
        .limit(n)
    )
    if exclude_ids:
        stmt = stmt.where(Prompt.id.not_in(list(exclude_ids)))
    rows = list(session.scalars(stmt))
    now = utcnow()
    for row in rows:
        row.last_sampled_at = now
        row.times_sampled = (row.times_sampled or 0) + 1
    session.flush()
    return rows


def list_prompts(session: Session, *, limit: int = 50, offset: int = 0,
                 held_out: Optional[bool] = None) -> list[Prompt]:
    stmt = select(Prompt).order_by(Prompt.id).limit(limit).offset(offset)
    if held_out is not None:
        stmt = stmt.where(Prompt.held_out.is_(held_out))
    return list(session.scalars(stmt))


def held_out_prompts(session: Session, *, limit: int) -> list[Prompt]:
    """Evaluation prompts in a stable order, so two evals of different versions share prompts."""
    stmt = select(Prompt).where(Prompt.held_out.is_(True)).order_by(Prompt.id).limit(limit)
    return list(session.scalars(stmt))


def count_prompts(session: Session) -> tuple[int, int]:
    total = session.scalar(select(func.count(Prompt.id))) or 0
    held = session.scalar(select(func.count(Prompt.id)).where(Prompt.held_out.is_(True))) or 0
    return total, held
