"""Samples and pairs: two samples of one prompt go in as a queued pair; stale pairs are retired.

Also the reads that pick pairs by their state: a typed prompt's pair still waiting, and pairs a
judge should label outside the queue (shadow-labels for agreement, rescues of skipped pairs).
Taking a pair from the queue is a claim: see claims.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased

from odpo.db.errors import StoreError
from odpo.db.models import Label, Pair, Prompt, Sample
from odpo.db.store.labels import human_labeled
from odpo.db.vocabulary import TYPED_SOURCE


@dataclass(frozen=True)
class NewSample:
    """One sample to store. `prompt_token_ids`/`token_ids` are what the policy was fed and what it
    emitted (trainer.sampling.generation.Generated): the trainer scores exactly those ids."""

    text: str
    tokens: int
    finish_reason: str
    params: dict[str, Any]
    gen_seconds: float
    prompt_token_ids: Optional[Sequence[int]] = None
    token_ids: Optional[Sequence[int]] = None
    implicit_reward: Optional[float] = None  # the policy's, when a selector scored the candidates


def add_pair(session: Session, *, prompt_id: int, version: int, a: NewSample, b: NewSample,
             labels_wanted: int = 1, purpose: str = "train", requested_by: Optional[str] = None,
             selector: Optional[str] = None, unshown: Sequence[NewSample] = ()) -> Pair:
    """Store two samples of one prompt from policy `version` and queue them as a pair; `unshown`
    are the other candidates the selector drew for it (stored with `candidate_of`, never trained).

    All samples must have been drawn from the same prompt ids: DPO compares two completions of
    ONE context, so a pair whose samples saw different prompts is refused (it cannot be built by
    the sampler, which feeds every row of a prompt the same ids)."""
    if any(_ids(x.prompt_token_ids) != _ids(a.prompt_token_ids) for x in (b, *unshown)):
        raise StoreError(f"the samples of a pair for prompt {prompt_id} were drawn from different "
                         "prompt token ids; refusing to store them as a pair")
    rows = [_sample_row(s, prompt_id, version) for s in (a, b)]
    session.add_all(rows)
    session.flush()
    pair = Pair(prompt_id=prompt_id, sample_a_id=rows[0].id, sample_b_id=rows[1].id, created_version=version,
                labels_wanted=labels_wanted, purpose=purpose, requested_by=requested_by, selector=selector)
    session.add(pair)
    session.flush()
    if unshown:
        session.add_all([_sample_row(s, prompt_id, version, candidate_of=pair.id) for s in unshown])
        session.flush()
    return pair


def _sample_row(s: NewSample, prompt_id: int, version: int, candidate_of: Optional[int] = None) -> Sample:
    return Sample(prompt_id=prompt_id, adapter_version=version, text=s.text, tokens=s.tokens,
                  finish_reason=s.finish_reason, params=s.params, gen_seconds=s.gen_seconds,
                  prompt_token_ids=_ids(s.prompt_token_ids), token_ids=_ids(s.token_ids),
                  implicit_reward=s.implicit_reward, candidate_of=candidate_of)


def _ids(ids: Optional[Sequence[int]]) -> Optional[list[int]]:
    return None if ids is None else [int(t) for t in ids]


@dataclass(frozen=True)
class SampledIds:
    """The ids a label's pair was sampled with, chosen/rejected as the label says.

    The id fields are None for samples stored before ids were (train those by re-tokenising);
    finish reasons are always known."""

    label_id: int
    prompt_token_ids: Optional[list[int]]
    chosen_ids: Optional[list[int]]
    rejected_ids: Optional[list[int]]
    chosen_finish: str
    rejected_finish: str


def sampled_ids(session: Session, *, label_ids: Sequence[int]) -> dict[int, SampledIds]:
    """For each a/b label in `label_ids`, its pair's sampled ids and finish reasons (by label id).

    Raises StoreError if the two samples of a pair hold different prompt ids (add_pair refuses
    them, so only a hand-edited database gets there): training would compare two contexts."""
    if not label_ids:
        return {}
    sa, sb = aliased(Sample), aliased(Sample)
    stmt = (select(Label.id, Label.choice, Pair.id, sa.prompt_token_ids, sb.prompt_token_ids, sa.token_ids,
                   sb.token_ids, sa.finish_reason, sb.finish_reason)
            .join(Pair, Pair.id == Label.pair_id)
            .join(sa, sa.id == Pair.sample_a_id).join(sb, sb.id == Pair.sample_b_id)
            .where(Label.id.in_(list(label_ids)), Label.choice.in_(("a", "b"))))
    out = {}
    for lid, choice, pair_id, prompt_a, prompt_b, ids_a, ids_b, fin_a, fin_b in session.execute(stmt):
        if prompt_a != prompt_b:
            raise StoreError(f"pair {pair_id}: its two samples were drawn from different prompt token ids")
        if choice == "b":
            ids_a, ids_b, fin_a, fin_b = ids_b, ids_a, fin_b, fin_a
        exact = prompt_a is not None and ids_a is not None and ids_b is not None
        out[lid] = SampledIds(label_id=lid, prompt_token_ids=prompt_a if exact else None,
                              chosen_ids=ids_a if exact else None, rejected_ids=ids_b if exact else None,
                              chosen_finish=fin_a, rejected_finish=fin_b)
    return out


def count_pairs(session: Session, *, status: str = "queued", purpose: str = "train") -> int:
    stmt = select(func.count(Pair.id)).where(Pair.status == status, Pair.purpose == purpose)
    return session.scalar(stmt) or 0


def retire_stale_pairs(session: Session, *, current_version: int, max_staleness: int) -> int:
    """Retire queued pairs more than `max_staleness` versions behind, so labelers see the current
    policy. Pairs already on someone's screen are left alone, and so are eval pairs: they judge
    the version that drew them, which stays meaningful after it stops serving."""
    stmt = (update(Pair).where(Pair.status == "queued", Pair.claims == 0, Pair.purpose == "train",
                               Pair.created_version < current_version - max_staleness)
            .values(status="retired"))
    return session.execute(stmt).rowcount or 0


def retire_queue(session: Session) -> int:
    """Admin action: drop every unclaimed queued pair (e.g. after a rollback)."""
    stmt = update(Pair).where(Pair.status == "queued", Pair.claims == 0).values(status="retired")
    return session.execute(stmt).rowcount or 0


def retire_pairs_newer_than(session: Session, *, version: int) -> int:
    """After a rollback to `version`, retire unclaimed queued pairs sampled from the newer,
    rolled-back versions: labeling them would train the restored policy on another policy's
    samples. Typed pairs stay: a labeler asked for them explicitly."""
    stmt = (update(Pair).where(Pair.status == "queued", Pair.claims == 0, Pair.purpose.in_(("train", "eval")),
                               Pair.created_version > version)
            .values(status="retired"))
    return session.execute(stmt).rowcount or 0


def typed_pair_waiting(session: Session, *, labeler: str) -> bool:
    """Whether a pair sampled for a prompt this labeler typed is queued and not yet shown."""
    stmt = select(Pair.id).where(Pair.status == "queued", Pair.requested_by == labeler).limit(1)
    return session.scalar(stmt) is not None


@dataclass(frozen=True)
class PairText:
    pair_id: int
    prompt: str
    a: str
    b: str
    version: int


def _pair_texts_stmt():
    sa, sb = aliased(Sample), aliased(Sample)
    return (select(Pair.id, Prompt.text, sa.text, sb.text, Pair.created_version)
            .join(Prompt, Prompt.id == Pair.prompt_id)
            .join(sa, sa.id == Pair.sample_a_id)
            .join(sb, sb.id == Pair.sample_b_id))


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
    stmt = _pair_texts_stmt().where(~already, human_labeled(skipped=False) if mode == "shadow"
                                    else (human_labeled(skipped=True) & ~human_labeled(skipped=False)))
    # a typed prompt no admin promoted is its typist's alone: no judge labels it (held-out prompts'
    # pairs may be shadowed: agreement statistics only, they never train)
    stmt = stmt.where(Prompt.source != TYPED_SOURCE)
    rows = session.execute(stmt.order_by(Pair.id).limit(limit)).all()
    return [PairText(pair_id=pid, prompt=p, a=a, b=b, version=v) for pid, p, a, b, v in rows]
