"""Labeler quality for the dashboard: one row per person, with their agreement with other people,
with judges and with gold answers (the queries are db/store/quality.py).

Only a/b decisions are compared; ties, both_bad and skips count in `labels` but in no agreement.
A rate is None (shown empty) when there is nothing to compare yet, never a misleading 0.
"""
from __future__ import annotations

from typing import Any, Optional

from sqlalchemy.orm import Session

from odpo.db import store
from odpo.db.store.quality import AGREEMENT_BASES, rate


def labeler_quality(session: Session) -> list[dict[str, Any]]:
    """Rows {labeler, labels, people_n, people_rate, judges_n, judges_rate, gold_n, gold_rate},
    most labels first; every person with a live label or a comparison appears."""
    agreement = store.labeler_agreement(session)
    labels = {r["labeler"]: int(r["labels"]) for r in store.labeler_stats(session)}
    rows = []
    for name in sorted(set(labels) | set(agreement)):
        kinds = agreement.get(name) or {kind: (0, 0) for kind in AGREEMENT_BASES}
        row: dict[str, Any] = {"labeler": name, "labels": labels.get(name, 0)}
        for kind in AGREEMENT_BASES:
            row[f"{kind}_n"] = kinds[kind][0]
            row[f"{kind}_rate"] = rate(kinds[kind])
        rows.append(row)
    return sorted(rows, key=lambda r: (-r["labels"], r["labeler"]))


def cell(n: int, value: Optional[float]) -> str:
    """"12 · 83%" for a table cell; "–" when nothing was compared."""
    return "–" if not n or value is None else f"{n} · {value:.0%}"
