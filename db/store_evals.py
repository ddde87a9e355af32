"""Store functions for judges, evaluations and exports.

- judge work that is not the queue: pairs to shadow-label (humans labeled them) or to rescue
  (humans skipped them), and handing a claimed pair back when a judge abstains;
- human-judge agreement for the dashboard;
- eval results (win rates with intervals) and their lookup;
- labeled pairs for dataset export, with the same "human overrides judge" rule the trainer uses.
Like every store module: a Session first, keyword-only arguments, the caller owns the transaction.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, aliased

from odpo.db.models import Adapter, Eval, Label, Pair, Prompt, Sample
from odpo.db.store_pairs import StoreError
from odpo.db.store_training import source_filter

DECISIONS = ("a", "b", "tie", "both_bad")  # a label that states an opinion (skip does not)


@dataclass(frozen=True)
class PairText:
    pair_id: int
    prompt: str
    a: str
    b: str
    version: int


@dataclass(frozen=True)
class LabeledPair:
    """One trainable label with everything a dataset row needs."""

    label_id: int
    pair_id: int
    prompt_id: int
    prompt: str
    chosen: str
    rejected: str
    choice: str
    labeler: str
    source: str
    confidence: Optional[float]
    pair_version: int
    shown_left: Optional[str]
    shown_at: Optional[dt.datetime]
    answered_at: dt.datetime
    consumed_version: Optional[int]




def _pair_texts_stmt():
    sa, sb = aliased(Sample), aliased(Sample)
    return (select(Pair.id, Prompt.text, sa.text, sb.text, Pair.created_version)
            .join(Prompt, Prompt.id == Pair.prompt_id)
            .join(sa, sa.id == Pair.sample_a_id)
            .join(sb, sb.id == Pair.sample_b_id))


def _human_labeled(*, skipped: bool):
    """EXISTS a live human label on the pair: a skip (skipped=True) or an opinion."""
    h = aliased(Label)
    choice = (h.choice == "skip") if skipped else h.choice.in_(DECISIONS)
    return select(h.id).where(h.pair_id == Pair.id, h.source == "human", h.undone.is_(False), choice).exists()


def judge_candidates(session: Session, *, labeler: str, mode: str, limit: int) -> list[PairText]:
    """Pairs for a judge outside the queue, oldest first, that `labeler` has not labeled yet.

    mode "shadow": pairs a person labeled with an opinion (for agreement statistics);
    mode "skipped": pairs people only skipped (the judge gives them a label after all).
    """
    if mode not in ("shadow", "skipped"):
        raise StoreError(f"unknown judge mode {mode!r}")
    mine = aliased(Label)
    already = select(mine.id).where(mine.pair_id == Pair.id, mine.labeler == labeler,
                                    mine.undone.is_(False)).exists()
    stmt = _pair_texts_stmt().where(~already, _human_labeled(skipped=False) if mode == "shadow"
                                    else (_human_labeled(skipped=True) & ~_human_labeled(skipped=False)))
    rows = session.execute(stmt.order_by(Pair.id).limit(limit)).all()
    return [PairText(pair_id=pid, prompt=p, a=a, b=b, version=v) for pid, p, a, b, v in rows]


def judge_agreement(session: Session) -> list[dict[str, Any]]:
    """Per judge: on pairs both a person and the judge gave an opinion (skips and abstentions left
    out), how often they chose the same (a, b, tie or both_bad). One row per (human, judge) label
    pair, so overlapping human labels each count. Sorted by judge name."""
    h, j = aliased(Label), aliased(Label)
    stmt = (select(j.source, func.count(), func.sum(case((h.choice == j.choice, 1), else_=0)))
            .select_from(h).join(j, j.pair_id == h.pair_id)
            .where(h.source == "human", h.undone.is_(False), h.choice.in_(DECISIONS),
                   j.source.like("judge%"), j.undone.is_(False), j.choice.in_(DECISIONS))
            .group_by(j.source).order_by(j.source))
    out = []
    for judge, n, agree in session.execute(stmt):
        n, agree = int(n), int(agree or 0)
        out.append({"judge": judge, "n": n, "agree": agree, "rate": agree / n if n else 0.0})
    return out


def record_eval(session: Session, *, version_a: int, version_b: int, judge: str, n: int, wins: int,
                losses: int, ties: int, win_rate: float, ci_low: float, ci_high: float,
                details: dict[str, Any]) -> Eval:
    row = Eval(version_a=version_a, version_b=version_b, judge=judge, n=n, wins=wins, losses=losses,
               ties=ties, win_rate=win_rate, ci_low=ci_low, ci_high=ci_high, details=dict(details))
    session.add(row)
    session.flush()
    return row


def list_evals(session: Session, *, version_b: Optional[int] = None, judge: Optional[str] = None,
               run: Optional[str] = None) -> list[Eval]:
    """Evals oldest first (the dashboard plots win rate per version); filters are optional."""
    stmt = select(Eval).order_by(Eval.id)
    if version_b is not None:
        stmt = stmt.where(Eval.version_b == version_b)
    if judge is not None:
        stmt = stmt.where(Eval.judge == judge)
    rows = list(session.scalars(stmt))
    return rows if run is None else [r for r in rows if (r.details or {}).get("run", "default") == run]


def find_eval(session: Session, *, version_a: int, version_b: int, judge: str,
              run: str = "default") -> Optional[Eval]:
    rows = [r for r in list_evals(session, version_b=version_b, judge=judge, run=run) if r.version_a == version_a]
    return rows[-1] if rows else None


def labeled_pairs(session: Session, *, sources: str = "all") -> list[LabeledPair]:
    """Every live a/b label from `sources` (human | judge | all) as chosen/rejected, in label order.

    A judge label on a pair a person gave an opinion on is left out (human overrides judge, as in
    training); a person's skip does not override.
    """
    sa, sb = aliased(Sample), aliased(Sample)
    stmt = (select(Label, Prompt.id, Prompt.text, sa.text, sb.text, Pair.created_version)
            .join(Pair, Pair.id == Label.pair_id).join(Prompt, Prompt.id == Pair.prompt_id)
            .join(sa, sa.id == Pair.sample_a_id).join(sb, sb.id == Pair.sample_b_id)
            .where(Label.undone.is_(False), Label.choice.in_(("a", "b")), source_filter(sources))
            .where((Label.source == "human") | ~_human_labeled(skipped=False))
            .order_by(Label.id))
    out = []
    for label, prompt_id, prompt, a, b, version in session.execute(stmt):
        chosen, rejected = (a, b) if label.choice == "a" else (b, a)
        out.append(LabeledPair(label_id=label.id, pair_id=label.pair_id, prompt_id=prompt_id, prompt=prompt,
                               chosen=chosen, rejected=rejected, choice=label.choice, labeler=label.labeler,
                               source=label.source, confidence=label.judge_confidence, pair_version=version,
                               shown_left=label.shown_left, shown_at=label.shown_at,
                               answered_at=label.answered_at, consumed_version=label.consumed_version))
    return out


def version_lineage(session: Session, *, version: int, run: str = "default") -> list[int]:
    """`version` and its ancestors (parent links), newest first; [] for the base model."""
    chain: list[int] = []
    current: Optional[int] = version
    while current and current not in chain:
        row = session.scalar(select(Adapter).where(Adapter.run == run, Adapter.version == current))
        if row is None:
            break
        chain.append(current)
        current = row.parent
    return chain


def trained_label_counts(session: Session, *, version: int, run: str = "default") -> dict[str, int]:
    """Labels trained into `version` and its ancestors, by source ("human", "judge:<spec>")."""
    lineage = version_lineage(session, version=version, run=run)
    if not lineage:
        return {}
    stmt = (select(Label.source, func.count(Label.id)).where(Label.consumed_version.in_(lineage))
            .group_by(Label.source).order_by(Label.source))
    return {str(source): int(n) for source, n in session.execute(stmt)}


def list_versions(session: Session, *, run: str = "default") -> list[Adapter]:
    """Every adapter row of a run (rolled back ones too), oldest first."""
    return list(session.scalars(select(Adapter).where(Adapter.run == run).order_by(Adapter.version)))
