"""Small builders for DB tests: a queue of pairs without any model."""
from __future__ import annotations

from odpo.db import store
from odpo.db.engine import Database


def sample(text: str) -> store.NewSample:
    return store.NewSample(text=text, tokens=len(text.split()), finish_reason="stop",
                           params={"temperature": 1.0}, gen_seconds=0.01)


def make_pairs(db: Database, n: int, *, version: int = 0, labels_wanted: int = 1) -> list[int]:
    """n prompts with one pair each; sample A says 'A<i>', sample B says 'B<i>'."""
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=f"prompt {i} {version}") for i in range(n)])
    ids = []
    with db.sessions.begin() as s:
        for p in store.pick_prompts_for_sampling(s, n=n):
            i = p.text.split()[1]
            pair = store.add_pair(s, prompt_id=p.id, version=version, a=sample(f"A{i}"), b=sample(f"B{i}"),
                                  labels_wanted=labels_wanted)
            ids.append(pair.id)
    return ids


def label_all(db: Database, labeler: str, choice: str = "a") -> list[int]:
    """Claim and answer every pair available to `labeler`; returns label ids."""
    ids = []
    while True:
        with db.sessions.begin() as s:
            claimed = store.claim_next_pair(s, labeler=labeler)
            if claimed is None:
                return ids
            ids.append(store.record_label(s, assignment_id=claimed.assignment_id, labeler=labeler,
                                          choice=choice).id)


def rows(db: Database, model: type, **where: object) -> list:
    """All rows of `model` matching column == value for each keyword, oldest (lowest id) first."""
    from sqlalchemy import select

    with db.sessions() as s:
        stmt = select(model).order_by(model.id)
        for key, value in where.items():
            stmt = stmt.where(getattr(model, key) == value)
        return list(s.scalars(stmt))
