"""Labeler quality: how often each person agrees with other people, with judges and with gold answers.

Every comparison is in PAIR terms (labels store a/b of the pair, not the side shown on screen,
see labels.record_label), so two people who saw the pair mirrored still compare correctly. Only
a/b decisions are compared: a tie, both_bad or skip on either side leaves that comparison out
(they state no preference a pair-level answer can match).

Gold answers are control rows ("gold:<pair_id>" -> {"choice", "by"}), so marking one needs no
migration; `set_gold` writes one with a single upsert. `excluded_labelers` is what
`odpo train --min-labeler-agreement` asks once per label read.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Optional

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, aliased

from odpo.db.errors import StoreError
from odpo.db.models import TRAINABLE_CHOICES, Label, Pair
from odpo.db.store.control import controls_with_prefix, set_control

log = logging.getLogger(__name__)

GOLD_PREFIX = "gold:"
GOLD_CHOICES = TRAINABLE_CHOICES  # a gold answer is a preference: a or b
AGREEMENT_BASES = ("gold", "people", "judges")  # the order `excluded_labelers` trusts them in
_CHUNK = 500


def gold_key(pair_id: int) -> str:
    return f"{GOLD_PREFIX}{int(pair_id)}"


def set_gold(session: Session, *, pair_id: int, choice: str, by: str) -> None:
    """Mark the gold answer of a pair (replacing an earlier one): one upsert, so two admins marking
    the same pair at once leave exactly one of their answers, never a mix."""
    if choice not in GOLD_CHOICES:
        raise StoreError(f"gold choice must be 'a' or 'b', got {choice!r}")
    if session.scalar(select(Pair.id).where(Pair.id == pair_id)) is None:
        raise StoreError(f"no pair with id {pair_id}")
    set_control(session, key=gold_key(pair_id), value={"choice": choice, "by": by})


def gold_answers(session: Session) -> dict[int, str]:
    """pair id -> gold choice, for every well-formed gold row (a hand-edited bad row is ignored)."""
    out: dict[int, str] = {}
    for key, value in controls_with_prefix(session, prefix=GOLD_PREFIX).items():
        suffix, choice = key[len(GOLD_PREFIX):], value.get("choice")
        if suffix.isdigit() and choice in GOLD_CHOICES:
            out[int(suffix)] = str(choice)
    return out


def _human_decided(label: Any) -> tuple:
    return (label.source == "human", label.undone.is_(False), label.choice.in_(TRAINABLE_CHOICES))


def people_agreement(session: Session) -> dict[str, tuple[int, int]]:
    """labeler -> (n, agree) over every other person's a/b label on a pair both labeled a/b.

    One comparison per (label, other person's label), so with overlap 3 each person gets 2 per pair."""
    h, o = aliased(Label), aliased(Label)
    stmt = (select(h.labeler, func.count(), func.sum(case((h.choice == o.choice, 1), else_=0)))
            .select_from(h).join(o, o.pair_id == h.pair_id)
            .where(*_human_decided(h), *_human_decided(o), o.labeler != h.labeler).group_by(h.labeler))
    return {name: (int(n), int(agree or 0)) for name, n, agree in session.execute(stmt)}


def judge_agreement_by_labeler(session: Session) -> dict[str, tuple[int, int]]:
    """labeler -> (n, agree) over every judge's a/b label on pairs the person labeled a/b."""
    h, j = aliased(Label), aliased(Label)
    stmt = (select(h.labeler, func.count(), func.sum(case((h.choice == j.choice, 1), else_=0)))
            .select_from(h).join(j, j.pair_id == h.pair_id)
            .where(*_human_decided(h), j.source.like("judge%"), j.undone.is_(False),
                   j.choice.in_(TRAINABLE_CHOICES))
            .group_by(h.labeler))
    return {name: (int(n), int(agree or 0)) for name, n, agree in session.execute(stmt)}


def gold_agreement(session: Session, *, gold: Optional[dict[int, str]] = None) -> dict[str, tuple[int, int]]:
    """labeler -> (n, agree) over the person's a/b labels on pairs with a gold answer."""
    gold = gold_answers(session) if gold is None else gold
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    ids = sorted(gold)
    for start in range(0, len(ids), _CHUNK):
        stmt = (select(Label.labeler, Label.pair_id, Label.choice)
                .where(*_human_decided(Label), Label.pair_id.in_(ids[start:start + _CHUNK])))
        for name, pair_id, choice in session.execute(stmt):
            counts[name][0] += 1
            counts[name][1] += int(choice == gold[pair_id])
    return {name: (n, agree) for name, (n, agree) in counts.items()}


def labeler_agreement(session: Session) -> dict[str, dict[str, tuple[int, int]]]:
    """labeler -> {"people": (n, agree), "judges": (n, agree), "gold": (n, agree)} for every person
    with at least one comparison of any kind (missing kinds are (0, 0))."""
    parts = {"people": people_agreement(session), "judges": judge_agreement_by_labeler(session),
             "gold": gold_agreement(session)}
    names = set().union(*parts.values())
    return {name: {kind: parts[kind].get(name, (0, 0)) for kind in AGREEMENT_BASES} for name in sorted(names)}


def rate(counts: tuple[int, int]) -> Optional[float]:
    n, agree = counts
    return agree / n if n else None


def excluded_labelers(session: Session, *, min_agreement: float, min_n: int,
                      known: Optional[dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """People whose agreement is below `min_agreement`, judged on the first basis with at least
    `min_n` comparisons: gold, else other people, else judges. A person with fewer than `min_n`
    comparisons on every basis is kept (too little evidence to drop their work).

    Returns labeler -> {"basis", "n", "rate"}, the numbers that excluded them. Each person not in
    `known` (the caller's previous answer) is logged once, so a trainer asking every batch says
    when someone becomes excluded without repeating it."""
    out: dict[str, dict[str, Any]] = {}
    for name, kinds in labeler_agreement(session).items():
        basis = next((kind for kind in AGREEMENT_BASES if kinds[kind][0] >= min_n), None)
        if basis is None:
            continue
        value = rate(kinds[basis])
        if value is not None and value < min_agreement:
            out[name] = {"basis": basis, "n": kinds[basis][0], "rate": value}
    for name in sorted(set(out) - set(known or {})):
        why = out[name]
        log.warning("not training on labels of %r: agreement with %s %.0f%% over %d comparisons is below %.0f%%",
                    name, why["basis"], 100 * why["rate"], why["n"], 100 * min_agreement)
    return out
