"""Evals: win rates of one adapter version against another, with intervals, and their lookup."""
from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from odpo.db.models import Eval


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


def eval_series(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(Eval).order_by(Eval.version_a, Eval.id)).all()
    return [{"version": r.version_a, "vs": r.version_b, "judge": r.judge, "win_rate": r.win_rate,
             "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n, "at": r.created_at} for r in rows]
