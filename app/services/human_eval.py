"""Blind human evaluation, as the dashboard shows it: the human win rate of each version.

People's judgments on eval pairs (db/store/human_evals.py) are counted per (version, reference)
and turned into a win rate with the same convention and interval as the judge evals
(trainer/evaluation/win_rate.py): ties and both-bad count half a win, and a 95% Wilson score interval.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from odpo.db import store

HUMAN = "human"  # the series name prefix beside the judges' in the win-rate plot


def human_win_rates(session: Session) -> list[dict[str, Any]]:
    """One row per (version, reference): wins, losses, ties (both-bad included), n, the win rate
    (wins + ties/2) / n and its 95% Wilson interval. Versions without a judgment are absent."""
    from odpo.trainer.evaluation.win_rate import (
        wilson_interval,  # trainer.evaluation.win_rate imports torch: only when asked
    )

    out = []
    for row in store.human_eval_counts(session):
        ties = row["tie"] + row["both_bad"]
        if row["win"] + row["loss"] + ties == 0:
            continue
        w = wilson_interval(row["win"], row["loss"], ties)
        out.append({"version": row["version"], "vs": row["reference_version"], "wins": w.wins,
                    "losses": w.losses, "ties": row["tie"], "both_bad": row["both_bad"], "n": w.n,
                    "win_rate": w.rate, "ci_low": w.low, "ci_high": w.high})
    return out


def human_series(rates: list[dict[str, Any]], *, vs: int = 0) -> list[dict[str, Any]]:
    """The win-rate plot's human series against `vs` (the base): one name for all versions,
    "human (n=<judgments>)", so the points join into one line beside each judge's."""
    rows = [r for r in rates if r["vs"] == vs]
    name = f"{HUMAN} (n={sum(r['n'] for r in rows)})"
    return [{"version": r["version"], "win_rate": r["win_rate"], "judge": name} for r in rows]
