"""Prompts: import (deduplicated by normalised text, one transaction) and least-recently-used picks.

A prompt is its final user message (`text`) and, for a conversation, the earlier turns
(`context`): `split_conversation` is the one place that checks a conversation's shape, and
`prompt_hash` covers both, so the same last question in two conversations is two prompts.

Like every store module: a Session first, keyword-only arguments, the caller owns the transaction.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from odpo.db.models import Pair, Prompt, utcnow
from odpo.db.vocabulary import PROMOTED_SOURCE, TYPED_SOURCE

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def normalise_prompt(text: str) -> str:
    """The form used for duplicate detection: whitespace collapsed, case folded."""
    return re.sub(r"\s+", " ", text.strip()).casefold()


def prompt_hash(text: str, context: Optional[Sequence[Mapping[str, str]]] = None) -> str:
    """The unique key of a prompt. Without earlier turns it is the hash of the normalised text
    alone, exactly as before conversations existed, so stored single-turn rows keep their keys."""
    key = normalise_prompt(text)
    if context:
        turns = [[m["role"], normalise_prompt(m["content"])] for m in context]
        key = json.dumps({"context": turns, "text": key}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def split_conversation(messages: Sequence[Any]) -> tuple[list[Message], str]:
    """(earlier turns, final user text) of a conversation; ValueError (one line) when it is not one
    odpo can continue: a system message may come first only, then user and assistant turns
    alternate, starting and ending with a user turn. Why so strict: chat templates of many models
    refuse anything else, and a refused row is better than a silently reordered conversation."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    out: list[Message] = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: each message must be an object with a 'role' and text 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": role, "content": message["content"]})
    turns = out[1:] if out[0]["role"] == "system" else out
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    roles = [m["role"] for m in turns]
    if not turns or roles[-1] != "user":
        raise ValueError(f"a conversation must end with a user message, got roles {[m['role'] for m in out]}")
    if roles != expected:
        raise ValueError("after an optional first system message, user and assistant turns must alternate "
                         f"starting with a user turn, got roles {[m['role'] for m in out]}")
    return out[:-1], out[-1]["content"]


def conversation(context: Optional[Sequence[Mapping[str, str]]], text: str) -> list[Message]:
    """The messages a prompt stands for: its earlier turns, then the final user message."""
    return [*({"role": m["role"], "content": m["content"]} for m in (context or ())), {"role": "user", "content": text}]


def pair_conversations(session: Session, *, pair_ids: Sequence[int]) -> dict[int, list[Message]]:
    """pair id -> the whole conversation, for the pairs among `pair_ids` whose prompt has earlier
    turns (single-turn pairs are left out: their prompt text is all there is)."""
    ids = list(dict.fromkeys(int(i) for i in pair_ids))
    out: dict[int, list[Message]] = {}
    for start in range(0, len(ids), 500):
        stmt = (select(Pair.id, Prompt.text, Prompt.context).join(Prompt, Prompt.id == Pair.prompt_id)
                .where(Pair.id.in_(ids[start:start + 500]), Prompt.context.is_not(None)))
        out.update((pid, conversation(context, text)) for pid, text, context in session.execute(stmt) if context)
    return out


@dataclass(frozen=True)
class NewPrompt:
    """A prompt to store; `context` holds the earlier turns of a conversation ({"role", "content"}
    dicts, as `split_conversation` returns them), empty for a single-turn prompt."""

    text: str
    source: str = "import"
    tags: tuple[str, ...] = ()
    held_out: bool = False
    context: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True)
class ImportResult:
    added: int
    duplicates: int
    held_out: int


def add_prompts(session: Session, *, prompts: Iterable[NewPrompt]) -> ImportResult:
    """Insert prompts not already stored (by normalised text). The caller owns the transaction,
    so an import of a whole file is all-or-nothing."""
    items = list(prompts)
    hashes = [prompt_hash(p.text, p.context) for p in items]
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
        session.add(Prompt(text=item.text.strip(), text_hash=h, source=item.source, tags=list(item.tags),
                           held_out=item.held_out, context=conversation(item.context, "")[:-1] or None))
        added += 1
        held += int(item.held_out)
    session.flush()
    return ImportResult(added=added, duplicates=dup, held_out=held)


def add_typed_prompt(session: Session, *, text: str, source: str = TYPED_SOURCE) -> Prompt:
    """A prompt a labeler typed: reuse the stored row when the same text exists (a held-out prompt
    stays held out, an imported one stays in the pool), else a new row of source TYPED_SOURCE,
    which samples only for its typist and never trains until promoted (db/vocabulary.py)."""
    h = prompt_hash(text)
    row = session.scalar(select(Prompt).where(Prompt.text_hash == h))
    if row is None:
        row = Prompt(text=text.strip(), text_hash=h, source=source, tags=["typed"], held_out=False)
        session.add(row)
        session.flush()
    return row


def promote_prompts(session: Session, *, ids: Sequence[int]) -> int:
    """An admin vouches for typed prompts: they join the shared pool, and their pairs' labels may
    train. One conditional UPDATE (only rows still typed move); returns how many did."""
    if not ids:
        return 0
    result = session.execute(update(Prompt).where(Prompt.id.in_(list(ids)), Prompt.source == TYPED_SOURCE)
                             .values(source=PROMOTED_SOURCE))
    return result.rowcount


def typed_prompts(session: Session, *, limit: int = 50) -> list[Prompt]:
    """Typed prompts waiting for an admin's promotion, newest first."""
    return list(session.scalars(select(Prompt).where(Prompt.source == TYPED_SOURCE)
                                .order_by(Prompt.id.desc()).limit(limit)))


def pick_prompts_for_sampling(session: Session, *, n: int, exclude_ids: Sequence[int] = (),
                              held_out: bool = False) -> list[Prompt]:
    """The n training prompts (held-out ones with `held_out`: blind eval pairs) sampled least
    recently (never-sampled first), stamped as sampled now, so every prompt gets visited before any
    is repeated."""
    stmt = (
        select(Prompt)
        .where(Prompt.held_out.is_(held_out), Prompt.source != TYPED_SOURCE)  # typed ones: their typist's only
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
