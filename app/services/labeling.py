"""The one labeling service: claim, vote, undo and typed prompts for the web page and the HTTP API.

Both callers go through the same methods, so there is one claim path (`next_pair`), one vote path
(`vote`) and one undo path (`undo`); the page only adds its display slots on top (app/ui/slots.py)
and never touches the database itself. Every method takes plain values, opens its own short
transaction, returns plain data and raises LabelError (one readable line) for anything the labeler
can fix, so the whole flow is tested without a browser. Left/right is what the labeler saw; the
store speaks absolute a/b, and the mapping happens in exactly one place: `absolute_choice`.

`client` says which client of a labeler asks (the page's Gradio session, an API client's session):
an open claim is held by one client, and only that one may vote on it (store/claims.py). Asking
for "the pair already on my screen" (`current_pair`, a page load) takes the labeler's open claims
over from their other clients, so a reloaded page or a restarted script gets its pairs back and
the old one can no longer vote on them; every other path keeps to the client's own claims and new
ones, so two live clients of one name never fight over a pair.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

from odpo.app.config import ServeConfig
from odpo.app.services.label_text import (  # noqa: F401 - re-exported: the labeling API in one import
    DEFAULT_GUIDELINES,
    SIDES,
    LabelError,
    absolute_choice,
    check_vote,
    guest_name,
    load_guidelines,
    normalise_labeler,
)
from odpo.app.services.limits import RateLimits
from odpo.db import store
from odpo.db.engine import Database
from odpo.db.models import Assignment, Pair, Prompt
from odpo.trainer.options import MAX_PROMPT_CHARS

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_CLIENT = "default"  # the client of callers that name none (one client per labeler, as before)


class SamplerHandle(Protocol):
    """The part of the background sampler the UI talks to (in-process, same `odpo serve`)."""

    def request_typed(self, *, prompt_id: int, labeler: str) -> None:
        """Sample a pair for a prompt a labeler typed, ahead of the regular queue."""

    def state(self) -> dict:
        """Serving version, queue size, last generation timings, errors: for counters/dashboard."""


@dataclass(frozen=True)
class PairView:
    """What one labeler sees. Which sample is on the left stays on the server (never sent)."""

    assignment_id: int
    pair_id: int
    prompt: str
    left: str
    right: str
    version: int
    typed: bool = False
    # The earlier turns of a conversation ({"role", "content"} dicts, oldest first); None when the
    # prompt is a single user message. `prompt` is always the final user message.
    context: Optional[list[dict[str, str]]] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VoteResult:
    """A stored vote and what to show after it: `next` on screen and, when the caller keeps a
    prefetched pair (the page), `prefetch` for the hidden slot."""

    label_id: int
    choice: str  # absolute: a | b | tie | both_bad | skip
    next: Optional[PairView]
    judge_note: Optional[str] = None
    prefetch: Optional[PairView] = None


@dataclass(frozen=True)
class Counters:
    queue: int
    serving_version: int
    unconsumed: int
    per_update: int
    until_update: int
    paused: bool
    generating: Optional[bool] = None
    sampler_error: Optional[str] = None


class LabelService:
    """One per serve process; safe to share between request threads (no mutable state besides a
    timestamp, and every method opens its own short transaction)."""

    def __init__(self, *, db: Database, config: ServeConfig, sampler: Optional[SamplerHandle] = None,
                 clock: Callable[[], float] = time.monotonic, sides: Optional[random.Random] = None,
                 limits: Optional[RateLimits] = None) -> None:
        self.db, self.config, self.sampler, self._clock = db, config, sampler, clock
        self._sides = sides  # left/right coin; None = a fresh unseeded one per claim (tests pass a seeded one)
        self._last_release = float("-inf")
        self.limits = limits or RateLimits()
        self._ask_lock = threading.Lock()  # the typed-prompt cap counts, then inserts: one ask at a time

    # -- claims ---------------------------------------------------------------------------------
    def current_pair(self, *, labeler: str, client: str = DEFAULT_CLIENT) -> Optional[PairView]:
        """The pair to show this labeler now (the HTTP API's `next_pair`): a pair for a prompt they
        typed when one is ready, else the pair they were already shown (taken over from another
        client of theirs), else the next queued pair."""
        self.release_expired_claims()
        return self.next_pair(labeler=labeler, client=client, take_over=True)

    def next_pair(self, *, labeler: str, exclude: Sequence[int] = (), client: str = DEFAULT_CLIENT,
                  take_over: bool = False) -> Optional[PairView]:
        """The claim path: typed pair first; else a claim of this client's not in `exclude` (what the
        page already holds), oldest first (with `take_over`, the labeler's other clients' claims
        too); else a new claim. None while the queue is empty. Its writes are conditional UPDATEs, so
        it needs no IMMEDIATE transaction (an idle page polling an empty queue takes no write lock)."""
        self.limits.take("next", labeler)
        with self.db.sessions.begin() as s:
            return self._next_for(s, labeler=labeler, client=client, exclude=exclude, take_over=take_over)

    def open_claims(self, *, labeler: str, ids: Sequence[int], client: str = DEFAULT_CLIENT) -> set[int]:
        """Which of these assignments this client still holds open (others expired or moved)."""
        with self.db.sessions() as s:
            return set(store.open_claim_ids(s, labeler=labeler, ids=list(ids), client=client))

    def views(self, *, labeler: str, ids: Sequence[Optional[int]],
              client: str = DEFAULT_CLIENT) -> dict[int, PairView]:
        """PairViews of those ids this client still holds open (to redraw a page)."""
        out: dict[int, PairView] = {}
        with self.db.sessions() as s:
            for aid in (i for i in ids if i is not None):
                claimed = store.open_claim(s, assignment_id=int(aid), labeler=labeler, client=client)
                if claimed is not None:
                    out[int(aid)] = _view(s, claimed)
        return out

    def release_expired_claims(self) -> None:
        """Closed tabs give their pairs back. The sampler does this too; doing it here (at most
        every few seconds) means a lone UI process without a sampler still recovers them."""
        now = self._clock()
        if now - self._last_release < min(10.0, self.config.claim_timeout_s / 4):
            return
        self._last_release = now
        with self.db.sessions.begin() as s:
            released = store.release_expired(s)
        if released:
            log.info("released %d expired claim(s)", released)

    def release(self, *, labeler: str, assignment_id: Optional[int], client: str = DEFAULT_CLIENT) -> None:
        """Give back a pair the labeler will not answer (they switched name); one another client of
        theirs holds now stays with that client."""
        if assignment_id is None:
            return
        with self.db.sessions.begin() as s:
            store.release_assignment(s, assignment_id=int(assignment_id), labeler=labeler, client=client)

    # -- votes ------------------------------------------------------------------------------------
    def vote(self, *, labeler: str, assignment_id: Optional[int], side: str, reason: Optional[str] = None,
             prefetched: Optional[int] = None, prefetch: bool = False,
             client: str = DEFAULT_CLIENT) -> VoteResult:
        """The vote path: record the vote and pick what shows next, in ONE short transaction.

        `prefetched` is a claim the caller already holds for the next screen (the page's hidden
        slot): it is shown next when still open, else the next claim is. With `prefetch`, one more
        pair is claimed for the caller to hold. The HTTP API passes neither. A second vote on the
        same claim (double click, retry, another tab) raises AlreadyAnswered and writes nothing.
        """
        side, reason = check_vote(side, reason)
        if assignment_id is None:
            raise LabelError("no pair on screen yet: wait for the next pair to appear")
        self.limits.take("vote", labeler)
        self.release_expired_claims()
        mine = {"labeler": labeler, "client": client}
        with self.db.writes.begin() as s:
            label_id, choice, note = self._record(s, assignment_id=assignment_id, side=side, reason=reason, **mine)
            nxt = self._promote(s, assignment_id=prefetched, **mine)
            if nxt is None:
                nxt = self._next_for(s, exclude=[i for i in (prefetched,) if i is not None], **mine)
            after = self._next_for(s, exclude=[nxt.assignment_id] if nxt else [], **mine) if prefetch else None
        log.debug("label %d by %s: %s", label_id, labeler, choice)
        return VoteResult(label_id=label_id, choice=choice, next=nxt, judge_note=note, prefetch=after)

    def undo(self, *, labeler: str, client: str = DEFAULT_CLIENT) -> PairView:
        """The undo path: take back this labeler's last vote that no run has used yet, and claim
        that pair for this client again."""
        self.limits.take("vote", labeler)
        with self.db.writes.begin() as s:
            label = store.last_undoable_label(s, labeler=labeler)
            if label is None:
                raise LabelError("nothing to undo: no vote of yours is waiting for training")
            claimed = store.undo_label(s, label_id=label.id, labeler=labeler, client=client,
                                       timeout_s=self.config.claim_timeout_s)
            store.drop_judgment(s, label_id=label.id)  # an eval pair's judgment goes with its vote
            return _view(s, claimed)

    # -- inside one transaction -------------------------------------------------------------------
    def _next_for(self, s, *, labeler: str, client: str, exclude: Sequence[int] = (),
                  take_over: bool = False) -> Optional[PairView]:
        if not store.typed_pair_waiting(s, labeler=labeler):
            shown = store.oldest_open_claim(s, labeler=labeler, client=client, exclude=exclude, take_over=take_over)
            if shown is not None:
                return _view(s, shown)
        claimed = store.claim_next_pair(s, labeler=labeler, client=client, timeout_s=self.config.claim_timeout_s,
                                        evals=True, rng=self._sides)  # blind human eval pairs come in the same queue
        return None if claimed is None else _view(s, claimed)

    def _promote(self, s, *, labeler: str, client: str, assignment_id: Optional[int]) -> Optional[PairView]:
        """A held prefetch goes on screen (its claim restarts as shown), or None when it died."""
        if assignment_id is None or not store.mark_shown(s, assignment_id=int(assignment_id), labeler=labeler,
                                                         client=client, timeout_s=self.config.claim_timeout_s):
            return None
        claimed = store.open_claim(s, assignment_id=int(assignment_id), labeler=labeler, client=client)
        return None if claimed is None else _view(s, claimed)

    def _record(self, s, *, labeler: str, client: str, assignment_id: int, side: str,
                reason: Optional[str]) -> tuple[int, str, Optional[str]]:
        """Store one vote: (label id, absolute choice, judge note). The store's conditional UPDATE
        decides; this read only maps left/right (shown_left never changes on a claim)."""
        asg = s.get(Assignment, int(assignment_id))
        if asg is None or asg.labeler != labeler:
            raise LabelError("this pair is not assigned to you (it may have expired); showing the next one")
        shown_left = asg.shown_left
        label = store.record_label(s, assignment_id=asg.id, labeler=labeler, client=client,
                                   choice=absolute_choice(side, shown_left), reason=reason)
        store.record_judgment(s, label=label)  # on an eval pair: the evaluation judgment, same transaction
        note = self._judge_note(s, label.pair_id, shown_left) if self.config.show_judge_after_vote else None
        return label.id, label.choice, note

    def _judge_note(self, s, pair_id: int, shown_left: str) -> Optional[str]:
        """The judge's pick for the pair just voted on, in the labeler's own left/right terms."""
        picks = store.judge_labels_for_pair(s, pair_id=pair_id)
        if not picks:
            return None
        names = {shown_left: "A (left)", ("b" if shown_left == "a" else "a"): "B (right)",
                 "tie": "a tie", "both_bad": "both bad", "skip": "skip"}
        notes = []
        for p in picks:
            conf = f" (confidence {p['confidence']:.2f})" if p["confidence"] is not None else ""
            notes.append(f"{p['judge']} picked {names.get(p['choice'], p['choice'])}{conf}")
        return "; ".join(notes)

    # -- typed prompts ------------------------------------------------------------------------
    def ask(self, *, labeler: str, text: str) -> int:
        """Store a typed prompt (source "typed") and ask the sampler for a pair; returns the prompt
        id. The pair reaches this labeler first (claim_next_pair puts their typed pairs first), and
        only them: the prompt joins no one else's queue, no judge and no training until an admin
        promotes it. Rate limited, and at most `max_typed_pending` waiting per labeler."""
        text = (text or "").strip()
        if not text:
            raise LabelError("type a prompt first")
        if "\x00" in text:  # PostgreSQL text cannot hold it; imports refuse it the same way
            raise LabelError("a prompt cannot contain a NUL character")
        if len(text) > MAX_PROMPT_CHARS:
            raise LabelError(f"a prompt can have at most {MAX_PROMPT_CHARS} characters")
        if self.sampler is None:
            raise LabelError("no sampler is running in this process, so typed prompts cannot be sampled")
        self.limits.take("ask", labeler)
        cap = self.config.max_typed_pending
        with self._ask_lock:
            with self.db.sessions.begin() as s:
                if store.open_sample_requests(s, labeler=labeler) >= cap:
                    raise LabelError(f"you have {cap} typed prompts waiting to be sampled; label their pairs first")
                prompt_id = store.add_typed_prompt(s, text=text).id
            self.sampler.request_typed(prompt_id=prompt_id, labeler=labeler)
        return prompt_id

    def typed_ready(self, *, labeler: str) -> bool:
        with self.db.sessions() as s:
            return store.typed_pair_waiting(s, labeler=labeler)

    # -- counters -----------------------------------------------------------------------------
    def counters(self) -> Counters:
        """Queue size, serving version and labels until the next adapter update."""
        state = self.sampler_state()
        with self.db.sessions() as s:
            train_cfg = store.get_control(s, key="train.config") or {}
            per_update = _per_update(train_cfg)
            sources = train_cfg.get("sources", "all")
            unconsumed = store.count_unconsumed(s, run=self.config.run,
                                                sources=sources if sources in ("human", "judge") else "all")
            per_update, unconsumed = _round_counts(s, run=self.config.run, default=(per_update, unconsumed))
            paused = bool((store.get_control(s, key="train.paused") or {}).get("paused", False))
            queue = store.count_pairs(s, status="queued") + store.count_eval_pairs(s, status="queued")
            serving = state.get("serving_version")
            if serving is None:
                latest = store.latest_adapter(s, run=self.config.run)
                serving = latest.version if latest else 0
        return Counters(queue=queue, serving_version=int(serving), unconsumed=unconsumed, per_update=per_update,
                        until_update=max(0, per_update - unconsumed), paused=paused,
                        generating=state.get("generating"), sampler_error=state.get("last_error"))

    def sampler_state(self) -> dict[str, Any]:
        """sampler.state(), or {} without a sampler; a failing sampler never breaks a page."""
        if self.sampler is None:
            return {}
        try:
            return dict(self.sampler.state() or {})
        except Exception as exc:  # the sampler is another team's thread: report, don't crash
            log.warning("sampler.state() failed: %s", exc)
            return {"last_error": f"sampler state unavailable: {exc}"}

def _round_counts(s, *, run: str, default: tuple[int, int]) -> tuple[int, int]:
    """(labels a version takes, labels toward it) of an iterative trainer's round: its own count of
    the serving version's labels (`train.progress`, trainer/training/modes.py), since a round trains only
    those; else `default` (online: batch x save_every and every unused label)."""
    progress = store.get_control(s, key=store.TRAIN_PROGRESS_KEY) or {}
    if progress.get("mode") != "iterative" or progress.get("run", run) != run:
        return default
    try:
        return max(1, int(progress["needed"])), max(0, int(progress["labels"]))
    except (KeyError, TypeError, ValueError):
        return default


def _per_update(train_cfg: dict[str, Any]) -> int:
    """Labels one adapter version consumes: batch_size x save_every from the trainer's config."""
    try:
        batch = int(train_cfg.get("batch_size") or DEFAULT_BATCH_SIZE)
        every = int(train_cfg.get("save_every") or 1)
    except (TypeError, ValueError):
        return DEFAULT_BATCH_SIZE
    return max(1, batch) * max(1, every)


def _view(s, claimed: store.ClaimedPair) -> PairView:
    pair = s.get(Pair, claimed.pair_id)  # already in the session's identity map: no query
    prompt = s.get(Prompt, pair.prompt_id) if pair is not None else None  # so is its prompt
    return PairView(assignment_id=claimed.assignment_id, pair_id=claimed.pair_id, prompt=claimed.prompt,
                    left=claimed.left, right=claimed.right, version=claimed.version,
                    typed=bool(pair is not None and pair.purpose == "typed"),
                    context=list(prompt.context) if prompt is not None and prompt.context else None)
