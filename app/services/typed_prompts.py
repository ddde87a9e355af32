"""Typed prompts an admin may promote: a prompt a labeler typed is theirs alone (sampled for them,
never in the shared pool, never judged, never trained) until an admin vouches for it, because one
labeler must not steer what everyone labels and what the policy learns. Promotion is one
conditional UPDATE (db/store/prompts.py `promote_prompts`): only rows still typed move."""
from __future__ import annotations

from typing import Any, Sequence

from odpo.db import store
from odpo.db.engine import Database


def waiting(db: Database, *, limit: int = 50) -> list[dict[str, Any]]:
    """Typed prompts not promoted yet, newest first: id, text, when first sampled, times sampled."""
    with db.sessions() as s:
        return [{"id": p.id, "text": p.text, "times_sampled": p.times_sampled or 0}
                for p in store.typed_prompts(s, limit=limit)]


def promote(db: Database, *, ids: Sequence[int]) -> int:
    """Promote these typed prompts; returns how many were still typed (others are left as they are)."""
    with db.writes.begin() as s:
        return store.promote_prompts(s, ids=[int(i) for i in ids])
