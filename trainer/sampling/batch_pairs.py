"""A sampled batch -> the pairs the sampler stores: which two candidates each prompt shows (the
selector), the unshown ones kept beside the pair, blind eval pairs, and a confident judge's own
label on another pair of candidates when it is asked to label those.

Separate from the sampler thread (sampler.py) because it is the batch's bookkeeping, not its
scheduling; both run under the sampler's rules (one transaction per batch)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

from odpo.db import store
from odpo.trainer.sampling.generation import Generated
from odpo.trainer.sampling.selection import Pick, Selector

log = logging.getLogger(__name__)


def pick_pairs(selector: Optional[Selector], jobs: Sequence[Any], outputs: Sequence[Sequence[Generated]], *,
               version: int) -> list[Optional[Pick]]:
    """A Pick per job (None for eval jobs: their pair is the policy's answer and the reference's)."""
    at = [i for i, job in enumerate(jobs) if job.purpose != "eval"]
    picks: list[Optional[Pick]] = [None] * len(jobs)
    if not at:
        return picks
    if selector is None:
        chosen = [Pick(0, 1) for _ in at]
    else:
        chosen = selector.pick([jobs[i].text for i in at], [outputs[i] for i in at], version=version)
    for i, pick in zip(at, chosen, strict=True):
        picks[i] = pick
    return picks


def store_batch(s: Any, jobs: Sequence[Any], outputs: Sequence[Sequence[Generated]], picks: Sequence[Optional[Pick]],
                *, version: int, params: Any, settings: Any, selector: Optional[Selector],
                eval_side: Callable[[], str], new_sample: Callable[..., store.NewSample]) -> int:
    """Store one batch's pairs in the caller's transaction (each sample records `params`, the
    batch's own seed included); returns the judge labels it wrote."""
    base = {**params.as_dict(), "batch_rows": sum(len(rows) for rows in outputs)}
    auto_labels = 0
    for job, rows, pick in zip(jobs, outputs, picks, strict=True):
        if job.purpose == "eval":  # held-out: an eval pair, never a training pair
            if version:
                a, b = (new_sample(g, params=base) for g in rows[:2])
                store.add_eval_pair(s, prompt_id=job.prompt_id, version=version,
                                    reference_version=settings.human_eval_reference, policy=a, reference=b,
                                    labels_wanted=settings.overlap, policy_side=eval_side())
            continue
        samples = [_scored(new_sample(g, params=base), pick, k) for k, g in enumerate(rows)]
        shown = {pick.a, pick.b}
        name = None if selector is None else selector.name
        pair = store.add_pair(s, prompt_id=job.prompt_id, version=version, a=samples[pick.a], b=samples[pick.b],
                              labels_wanted=1 if job.purpose == "typed" else settings.overlap, purpose=job.purpose,
                              requested_by=job.requested_by, selector=name,
                              unshown=[x for k, x in enumerate(samples) if k not in shown])
        if pick.auto is not None and job.purpose == "train" and selector is not None:
            auto_labels += _auto_label(s, job, samples, pick, version=version, selector=selector, near=pair.id)
    return auto_labels


def _scored(sample: store.NewSample, pick: Pick, k: int) -> store.NewSample:
    if pick.scores is None:
        return sample
    return dataclasses.replace(sample, implicit_reward=float(pick.scores[k]))


def _auto_label(s: Any, job: Any, samples: list[store.NewSample], pick: Pick, *, version: int,
                selector: Selector, near: int) -> int:
    """The pair the judge was surest of, stored and labeled by the judge itself (never queued for
    people): a judge-labeled pair, trained like any other judge label."""
    from odpo.trainer.judges import judge_labeler_name

    i, j, choice, confidence = pick.auto
    pair = store.add_pair(s, prompt_id=job.prompt_id, version=version, a=samples[i], b=samples[j],
                          selector="judge-confident")
    pair.status = "labeled"  # the judge's alone: never in the people's queue
    name = judge_labeler_name(selector.judge.spec)
    store.add_direct_label(s, pair_id=pair.id, choice=choice, labeler=name, source=name, confidence=confidence)
    log.debug("judge labeled pair %d (%s, %.2f) beside pair %d", pair.id, choice, confidence, near)
    return 1
