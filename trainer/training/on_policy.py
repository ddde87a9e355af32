"""Labels -> the exact examples the trainer scores: the ids the policy was fed and emitted.

The trainer reads labels (store.unconsumed_labels gives texts); this module joins each to its
pair's stored token ids (store.sampled_ids) so a DPO step scores exactly what the sampler drew.
Samples from before ids were stored come back without them and are re-tokenised by
trainer/policy/batching.py, with an EOS only where the model stopped by itself.

`length_cut` ("keep" or "drop", TrainConfig / `odpo train --length-cut`) decides what happens to a
pair with a completion cut at max_new_tokens: "keep" trains it as cut (no EOS), "drop" leaves it
out. The choice of default is argued in trainer/training/train_config.py.
"""
from __future__ import annotations

import logging
from typing import Protocol, Sequence

from odpo.db import store
from odpo.db.engine import Database
from odpo.trainer.options import LENGTH_CUT_MODES
from odpo.trainer.policy.batching import FINISH_LENGTH, PairExample, PromptInput

log = logging.getLogger(__name__)



class LabelLike(Protocol):
    """What the trainer's labels provide (store.TrainingLabel has these and more)."""

    label_id: int
    prompt: PromptInput  # the text, or a conversation's messages
    chosen: str
    rejected: str


def training_examples(db: Database, labels: Sequence[LabelLike]) -> list[PairExample]:
    """One PairExample per label, in order, carrying the sampled ids when the samples have them."""
    with db.sessions() as s:
        found = store.sampled_ids(s, label_ids=[lb.label_id for lb in labels])
    out = []
    for lb in labels:
        ids = found.get(lb.label_id)
        if ids is None:  # not an a/b label: the trainer never fetches those
            raise ValueError(f"label {lb.label_id} is not a trainable a/b label")
        out.append(PairExample(prompt=lb.prompt, chosen=lb.chosen, rejected=lb.rejected,
                               prompt_ids=ids.prompt_token_ids, chosen_ids=ids.chosen_ids,
                               rejected_ids=ids.rejected_ids, chosen_finish=ids.chosen_finish,
                               rejected_finish=ids.rejected_finish))
    return out


def labels_to_drop(db: Database, labels: Sequence[LabelLike], *, length_cut: str) -> list[int]:
    """Ids of the labels to leave out under `length_cut`, in label order: none for "keep" (no
    query); for "drop" every label whose pair has a completion cut at max_new_tokens. The trainer
    skips them the way it skips too-stale labels, so they are never fetched again in this run."""
    if length_cut not in LENGTH_CUT_MODES:
        raise ValueError(f"length_cut must be one of {', '.join(LENGTH_CUT_MODES)}, got {length_cut!r}")
    if length_cut == "keep" or not labels:
        return []
    with db.sessions() as s:
        found = store.sampled_ids(s, label_ids=[lb.label_id for lb in labels])
    cut = {lid for lid, ids in found.items() if FINISH_LENGTH in (ids.chosen_finish, ids.rejected_finish)}
    return [lb.label_id for lb in labels if lb.label_id in cut]



def drop_length_cut(db: Database, labels: Sequence[LabelLike], *, length_cut: str, version: int,
                    run: str = "default") -> int:
    """Under "drop", record the length-cut labels among `labels` as skipped by `run` at `version`
    (as the trainer records too-stale ones: not fetched again, released by a rollback); returns
    how many."""
    cut = labels_to_drop(db, labels, length_cut=length_cut)
    if not cut:
        return 0
    with db.writes.begin() as s:
        n = store.skip_stale_labels(s, label_ids=cut, version=version, run=run)
    log.info("left out %d label(s) of pairs with an answer cut at max_new_tokens (--length-cut drop)", n)
    return n
