"""Labels: answering a claim, undo, judge labels, and the reads over labels.

The reads are the dashboard's (labels per hour, per-labeler speed, human-judge agreement) and the
dataset export's. Both the export and the trainer follow one rule, "a person's opinion overrides a
judge's label on the same pair" (a person's skip does not), built from the filters defined here.
Aggregations that differ between SQL dialects (hour truncation, medians) are done in Python over
bounded row sets, so the same code runs on SQLite and PostgreSQL.
"""
from __future__ import annotations

import datetime as dt
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import ColumnElement, Exists, and_, case, func, select, update
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.attributes import set_committed_value

from odpo.db.errors import StoreError
from odpo.db.models import CHOICES, Assignment, Label, LabelUse, Pair, Prompt, Sample, utcnow
from odpo.db.store.claims import ClaimedPair, claimed_view, held_by
from odpo.db.vocabulary import CLAIM_TIMEOUT_S, DATASET_SOURCE_PREFIX, LABEL_SOURCES, TYPED_SOURCE

DECISIONS = ("a", "b", "tie", "both_bad")  # a label that states an opinion (skip does not)


class AlreadyAnswered(StoreError):
    """A second vote on one claim (a double click, two tabs, a retried request): nothing was written."""


class ClaimMoved(StoreError):
    """The claim was shown to another client of the same labeler since: only that one may vote on it."""


def record_label(session: Session, *, assignment_id: int, labeler: str, choice: str,
                 reason: Optional[str] = None, source: str = "human",
                 confidence: Optional[float] = None, client: Optional[str] = None) -> Label:
    """Answer an assignment. `choice` is absolute (a/b/tie/both_bad/skip): the UI maps left/right
    through `shown_left` before calling, and the mapping is stored with the label.

    The vote is ONE conditional UPDATE of the assignment from open to answered (and, with a
    `client`, held by that client); only when it matched exactly one row is the label written.
    Two simultaneous votes on one claim therefore give one label and one AlreadyAnswered, on
    SQLite (the UPDATE runs under the write lock) and PostgreSQL (the second UPDATE waits for the
    first's row lock, then re-checks state) alike.
    """
    if choice not in CHOICES:
        raise StoreError(f"unknown choice {choice!r}; expected one of {', '.join(CHOICES)}")
    answered = session.execute(update(Assignment)
                               .where(Assignment.id == assignment_id, Assignment.labeler == labeler,
                                      Assignment.state == "open", *held_by(client))
                               .values(state="answered").execution_options(synchronize_session=False)).rowcount
    if answered != 1:
        raise _vote_refusal(session, assignment_id=assignment_id, labeler=labeler, client=client)
    asg = session.get(Assignment, assignment_id, populate_existing=True)  # the row as answered, read once
    label = Label(pair_id=asg.pair_id, choice=choice, shown_left=asg.shown_left, labeler=labeler, source=source,
                  judge_confidence=confidence, reason=(reason or None), shown_at=asg.shown_at, answered_at=utcnow())
    session.add(label)
    session.flush()
    _refresh_pair_status(session, asg.pair_id)
    return label


def _vote_refusal(session: Session, *, assignment_id: int, labeler: str, client: Optional[str]) -> StoreError:
    """Why a vote matched no row, as the one line the labeler sees (read after the refusal)."""
    row = session.execute(select(Assignment.labeler, Assignment.state, Assignment.client)
                          .where(Assignment.id == assignment_id)).first()
    if row is None or row.labeler != labeler:
        return StoreError("this pair is not assigned to you (it may have expired); load the next pair")
    if row.state == "answered":
        return AlreadyAnswered("this pair was already answered: that vote was not counted again")
    if row.state != "open":
        return StoreError("this pair expired and went back to the queue; load the next pair")
    return ClaimMoved(f"this pair is now open in another window or client labeling as {labeler}: "
                      "vote there, or load the next pair here")


def add_direct_label(session: Session, *, pair_id: int, labeler: str, choice: str, source: str,
                     confidence: Optional[float] = None) -> Label:
    """A label that needs no screen (judge shadow-labels); skips the queue bookkeeping."""
    if choice not in CHOICES:
        raise StoreError(f"unknown choice {choice!r}")
    label = Label(pair_id=pair_id, choice=choice, shown_left=None, labeler=labeler, source=source,
                  judge_confidence=confidence, answered_at=utcnow())
    session.add(label)
    session.flush()
    return label


def _refresh_pair_status(session: Session, pair_id: int) -> None:
    """Mark the pair labeled once it has the labels it asked for.

    The pair row is written first: on PostgreSQL that takes its row lock, so of two labelers
    answering one overlap pair at once the second counts the first's label too."""
    session.execute(update(Pair).where(Pair.id == pair_id).values(status=Pair.status)
                    .execution_options(synchronize_session=False))
    answered = session.scalar(select(func.count(Label.id)).where(Label.pair_id == pair_id,
                                                                 Label.undone.is_(False))) or 0
    session.execute(update(Pair).where(Pair.id == pair_id, Pair.labels_wanted <= answered)
                    .values(status="labeled"))


def undo_label(session: Session, *, label_id: int, labeler: str, timeout_s: float = CLAIM_TIMEOUT_S,
               client: Optional[str] = None) -> ClaimedPair:
    """Take back a vote no run has used yet; the pair is shown to the labeler (`client`) again.

    Conditional on `uses = 0` in the same UPDATE that marks it undone: a version commit raises
    `uses` on the same row, so of an undo and a commit racing for one label exactly one wins."""
    label = session.get(Label, label_id)
    if label is None or label.labeler != labeler or label.undone:
        raise StoreError("nothing to undo")
    taken_back = session.execute(
        update(Label).where(Label.id == label_id, Label.labeler == labeler, Label.undone.is_(False),
                            Label.uses == 0)
        .values(undone=True).execution_options(synchronize_session=False)).rowcount
    if taken_back != 1:
        raise _too_late(session, label_id)
    set_committed_value(label, "undone", True)
    now = utcnow()
    reopened = session.execute(
        update(Assignment).where(Assignment.pair_id == label.pair_id, Assignment.labeler == labeler,
                                 Assignment.state == "answered")
        .values(state="open", client=client, shown_at=now, expires_at=now + dt.timedelta(seconds=timeout_s))
        .execution_options(synchronize_session=False)).rowcount
    if reopened != 1:
        raise StoreError("nothing to undo")  # the caller's transaction rolls the undone flag back
    session.execute(update(Pair).where(Pair.id == label.pair_id).values(status="shown"))
    asg = session.scalar(select(Assignment).where(Assignment.pair_id == label.pair_id, Assignment.labeler == labeler)
                         .execution_options(populate_existing=True))
    return claimed_view(session, asg)


def _too_late(session: Session, label_id: int) -> StoreError:
    use = session.execute(select(LabelUse.run, LabelUse.version).where(LabelUse.label_id == label_id)
                          .order_by(LabelUse.version).limit(1)).first()
    if use is None:
        return StoreError("nothing to undo")  # undone meanwhile (another tab)
    return StoreError(f"too late to undo: this vote is already trained into v{use.version} (run {use.run})")


def last_undoable_label(session: Session, *, labeler: str) -> Optional[Label]:
    return session.scalar(select(Label).where(Label.labeler == labeler, Label.undone.is_(False), Label.uses == 0)
                          .order_by(Label.id.desc()).limit(1))


def count_labels(session: Session, *, labeler: str) -> int:
    stmt = select(func.count(Label.id)).where(Label.labeler == labeler, Label.undone.is_(False))
    return session.scalar(stmt) or 0


def judge_labels_for_pair(session: Session, *, pair_id: int) -> list[dict[str, Any]]:
    rows = session.scalars(select(Label).where(Label.pair_id == pair_id, Label.source.like("judge%"),
                                               Label.undone.is_(False)).order_by(Label.id)).all()
    return [{"judge": r.source, "choice": r.choice, "confidence": r.judge_confidence} for r in rows]


def labels_per_hour(session: Session, *, since: dt.datetime) -> list[dict[str, Any]]:
    """Label counts per hour and source since `since` (undone labels excluded). Imported dataset
    labels are left out: they were given elsewhere, and an import would show as one huge hour."""
    rows = session.execute(select(Label.answered_at, Label.source)
                           .where(Label.answered_at >= since, Label.undone.is_(False),
                                  ~is_dataset_label())).all()
    counts = Counter((at.replace(minute=0, second=0, microsecond=0), source) for at, source in rows)
    return [{"hour": hour, "source": source, "labels": n} for (hour, source), n in sorted(counts.items())]


def labeler_stats(session: Session, *, recent: int = 5000) -> list[dict[str, Any]]:
    """Per human labeler: label count, and median seconds from shown to answered over the most
    recent `recent` labels (bounded so the dashboard stays cheap on a big database)."""
    base = and_(Label.source == "human", Label.undone.is_(False))
    counts = session.execute(select(Label.labeler, func.count(Label.id), func.max(Label.answered_at))
                             .where(base).group_by(Label.labeler)).all()
    timing = session.execute(select(Label.labeler, Label.shown_at, Label.answered_at)
                             .where(base, Label.shown_at.is_not(None))
                             .order_by(Label.id.desc()).limit(recent)).all()
    seconds: dict[str, list[float]] = defaultdict(list)
    for name, shown, answered in timing:
        seconds[name].append(max(0.0, (answered - shown).total_seconds()))
    out = [{"labeler": name, "labels": int(n), "median_seconds": _median(seconds.get(name)), "last_at": last}
           for name, n, last in counts]
    return sorted(out, key=lambda r: -r["labels"])


def _median(values: Optional[list[float]]) -> Optional[float]:
    return round(statistics.median(values), 2) if values else None


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




def choices_by_selector(session: Session) -> list[dict[str, Any]]:
    """Per selector and policy version: live labels of people and judges on training pairs, and
    their share of ties and both-bad (the labels that teach DPO nothing): what the dashboard shows
    to compare selectors. Pairs from before selectors count as "random" (they were a random pair)."""
    selector = func.coalesce(Pair.selector, "random")
    stmt = (select(selector, Pair.created_version, Label.choice, func.count(Label.id))
            .join(Pair, Pair.id == Label.pair_id)
            .where(Label.undone.is_(False), Pair.purpose == "train", ~is_dataset_label())
            .group_by(selector, Pair.created_version, Label.choice))
    rows: dict[tuple[str, int], Counter] = defaultdict(Counter)
    for name, version, choice, n in session.execute(stmt):
        rows[(name, int(version))][choice] += int(n)
    out = []
    for (name, version), counts in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        total = sum(counts.values())
        out.append({"selector": name, "version": version, "labels": total,
                    "tie_rate": counts["tie"] / total, "both_bad_rate": counts["both_bad"] / total,
                    "undecided_rate": (counts["tie"] + counts["both_bad"]) / total})
    return out


def source_filter(sources: str) -> ColumnElement[bool]:
    """`human`, `judge`, `all` or `dataset`: which label sources the trainer learns from (and the
    export writes); one definition, so both read the same labels for the same word. Labels of eval pairs
    (blind human evaluation, store/human_evals.py) are never among them: they judge, never train.

    `all` is the live feedback (people and judges) and leaves imported datasets out: an imported
    file is trained on only when asked (`odpo train --mode offline`), never by the online loop.
    Labels of pairs whose prompt is held out, or typed and not promoted, never train either
    (`trainable_pair`)."""
    if sources == "human":
        return (Label.source == "human") & trainable_pair()
    if sources == "judge":
        return (Label.source.like("judge%")) & trainable_pair()
    if sources == "all":
        return (Label.source.is_not(None) & ~is_dataset_label()) & trainable_pair()
    if sources == "dataset":
        return (is_dataset_label()) & trainable_pair()
    raise StoreError(f"unknown label sources {sources!r}; expected {', '.join(LABEL_SOURCES)}")


def is_dataset_label() -> ColumnElement[bool]:
    """Labels `odpo import dataset` wrote (source "dataset:<name>"), not given by anyone here."""
    return Label.source.startswith(DATASET_SOURCE_PREFIX, autoescape=True)


def human_labeled(*, skipped: bool) -> Exists:
    """EXISTS a live human label on the pair: a skip (skipped=True) or an opinion.

    Correlated with `Pair.id`; the export uses it for "human overrides judge", and pairs.py to
    pick the pairs a judge labels outside the queue."""
    h = aliased(Label)
    choice = (h.choice == "skip") if skipped else h.choice.in_(DECISIONS)
    return select(h.id).where(h.pair_id == Pair.id, h.source == "human", h.undone.is_(False), choice).exists()


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
    context: Optional[list[dict[str, str]]] = None  # the earlier turns of a conversational prompt


def labeled_pairs(session: Session, *, sources: str = "all", run: str = "default") -> list[LabeledPair]:
    """Every live a/b label from `sources` (human | judge | all) as chosen/rejected, in label order;
    `consumed_version` is the version of `run` that used it (None when that run has not).

    A judge label on a pair a person gave an opinion on is left out (human overrides judge, as in
    training); a person's skip does not override.
    """
    sa, sb = aliased(Sample), aliased(Sample)
    used_in = select(LabelUse.version).where(LabelUse.label_id == Label.id, LabelUse.run == run).scalar_subquery()
    stmt = (select(Label, Prompt.id, Prompt.text, sa.text, sb.text, Pair.created_version, used_in, Prompt.context)
            .join(Pair, Pair.id == Label.pair_id).join(Prompt, Prompt.id == Pair.prompt_id)
            .join(sa, sa.id == Pair.sample_a_id).join(sb, sb.id == Pair.sample_b_id)
            .where(Label.undone.is_(False), Label.choice.in_(("a", "b")), source_filter(sources))
            .where((Label.source == "human") | ~human_labeled(skipped=False))
            .order_by(Label.id))
    out = []
    for label, prompt_id, prompt, a, b, version, used, context in session.execute(stmt):
        chosen, rejected = (a, b) if label.choice == "a" else (b, a)
        out.append(LabeledPair(label_id=label.id, pair_id=label.pair_id, prompt_id=prompt_id, prompt=prompt,
                               chosen=chosen, rejected=rejected, choice=label.choice, labeler=label.labeler,
                               source=label.source, confidence=label.judge_confidence, pair_version=version,
                               shown_left=label.shown_left, shown_at=label.shown_at,
                               answered_at=label.answered_at, consumed_version=used, context=context or None))
    return out


def trainable_pair() -> ColumnElement[bool]:
    """The label's pair may train: NOT an eval pair (blind human evaluation), NOT a pair whose
    prompt is held out (whoever typed or imported it again), NOT a pair of a typed prompt no admin
    promoted (one labeler must not steer the loop). Correlated with Label, and through aliases, so
    a query that joins Pair and Prompt itself keeps its own."""
    ep, pp = aliased(Pair), aliased(Prompt)
    barred = (ep.purpose == "eval") | pp.held_out.is_(True) | (pp.source == TYPED_SOURCE)
    return ~select(ep.id).join(pp, pp.id == ep.prompt_id).where(ep.id == Label.pair_id, barred).exists()
