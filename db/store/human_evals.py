"""Blind human evaluation: eval pairs in the queue and the judgments people give on them.

An eval pair (`pairs.purpose = "eval"`) is a held-out prompt answered once by the policy
(`pairs.created_version`, the version that served it) and once by a reference (the base, or an
earlier version), stamped on the two samples' `adapter_version`. People see it exactly like a
training pair (same claim path, same random sides); their vote is an ordinary label written by the
one vote path (labels.record_label), and `record_judgment` adds the evaluation judgment, read from
the policy's side, in the same transaction. The trainer and the export never read labels of eval
pairs (labels.source_filter), so a vote on one is never trained on.
"""
from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from odpo.db.errors import StoreError
from odpo.db.models import HumanEval, Label, Pair, Prompt, Sample, utcnow
from odpo.db.store.labels import DECISIONS
from odpo.db.store.pairs import NewSample, add_pair
from odpo.db.store.prompts import pick_prompts_for_sampling

EVAL_PURPOSE = "eval"
OUTCOMES = ("win", "loss", "tie", "both_bad")


def pick_held_out_prompts(session: Session, *, n: int) -> list[Prompt]:
    """The n held-out prompts sampled least recently (never first), stamped as sampled now, so the
    sampler's eval pairs visit every held-out prompt before repeating one."""
    if n <= 0:
        return []
    return pick_prompts_for_sampling(session, n=n, held_out=True)


def add_eval_pair(session: Session, *, prompt_id: int, version: int, reference_version: int,
                  policy: NewSample, reference: NewSample, policy_side: str = "a",
                  labels_wanted: int = 1) -> Pair:
    """Queue an eval pair: `policy` drawn by `version`, `reference` by `reference_version`, the
    policy's sample stored as sample `policy_side` (a or b). The reference sample carries its own
    version, which is how a judgment later tells the two apart."""
    if version == reference_version:
        raise StoreError(f"an eval pair needs two different policies (both are v{version})")
    if policy_side not in ("a", "b"):
        raise StoreError(f"policy_side must be a or b, not {policy_side!r}")
    a, b = (policy, reference) if policy_side == "a" else (reference, policy)
    pair = add_pair(session, prompt_id=prompt_id, version=version, a=a, b=b, labels_wanted=labels_wanted,
                    purpose=EVAL_PURPOSE)
    ref_id = pair.sample_b_id if policy_side == "a" else pair.sample_a_id
    session.execute(update(Sample).where(Sample.id == ref_id).values(adapter_version=reference_version)
                    .execution_options(synchronize_session="fetch"))
    return pair


def record_judgment(session: Session, *, label: Label) -> Optional[HumanEval]:
    """The evaluation judgment of a label just written, when its pair is an eval pair and the
    label states an opinion (a skip judges nothing); None otherwise. Runs in the vote's transaction,
    so the label and its judgment are written together or not at all."""
    pair = session.get(Pair, label.pair_id)
    if pair is None or pair.purpose != EVAL_PURPOSE or label.choice not in DECISIONS:
        return None
    sample_a = session.get(Sample, pair.sample_a_id)
    sample_b = session.get(Sample, pair.sample_b_id)
    policy_side = "a" if sample_a.adapter_version == pair.created_version else "b"
    reference = sample_b if policy_side == "a" else sample_a
    outcome = {"tie": "tie", "both_bad": "both_bad"}.get(label.choice,
                                                         "win" if label.choice == policy_side else "loss")
    row = HumanEval(pair_id=pair.id, label_id=label.id, labeler=label.labeler, version=pair.created_version,
                    reference_version=reference.adapter_version, outcome=outcome, created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def drop_judgment(session: Session, *, label_id: int) -> int:
    """An undone vote takes its judgment with it (in the undo's transaction); returns rows removed."""
    return session.execute(delete(HumanEval).where(HumanEval.label_id == label_id)
                           .execution_options(synchronize_session=False)).rowcount or 0


def human_eval_counts(session: Session) -> list[dict[str, Any]]:
    """Per (version, reference version): wins, losses, ties and both-bad counts of live judgments,
    by version. Judgments of undone labels are deleted with the undo; the join keeps it honest."""
    stmt = (select(HumanEval.version, HumanEval.reference_version, HumanEval.outcome, func.count(HumanEval.id))
            .join(Label, Label.id == HumanEval.label_id).where(Label.undone.is_(False))
            .group_by(HumanEval.version, HumanEval.reference_version, HumanEval.outcome))
    table: dict[tuple[int, int], dict[str, Any]] = {}
    for version, reference, outcome, n in session.execute(stmt):
        row = table.setdefault((version, reference), {"version": version, "reference_version": reference,
                                                      **{o: 0 for o in OUTCOMES}})
        row[outcome] = int(n)
    return [table[k] for k in sorted(table)]


def count_eval_pairs(session: Session, *, status: Optional[str] = None) -> int:
    """Eval pairs (in one status, or all): the queue counters and tests read them."""
    stmt = select(func.count(Pair.id)).where(Pair.purpose == EVAL_PURPOSE)
    if status is not None:
        stmt = stmt.where(Pair.status == status)
    return session.scalar(stmt) or 0
