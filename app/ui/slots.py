"""Two display slots per browser session: the pair on screen and a prefetched next pair.

Why: a Gradio round trip plus rendering costs 50-200 ms on a busy machine, over the DESIGN budget
(next pair p50 <= 50 ms). So the page always holds the NEXT pair already rendered in a hidden slot;
a vote flips which slot is visible in the browser at once (static/odpo.js), and the server, in
the same request that records the vote, fills the slot that just went hidden with a new prefetch.

The server is the authority: every update carries (active slot, whether the hidden slot is ready,
a sequence number), which the page applies. The slot state lives here per session, guarded by a
lock, because a vote, a timer tick and an undo of one session may run concurrently.

This module holds page state only: every claim, vote and undo goes through LabelService (the same
methods the HTTP API calls), and a slot changes only after the service call that backs it has
committed, so slots never point at claims that were never made. No gradio and no database here.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Optional

from odpo.app.services.labeling import DEFAULT_CLIENT, Counters, LabelError, LabelService, PairView, check_vote

MAX_SESSIONS = 5000


@dataclass
class SlotState:
    """One page's view: which slot shows, the assignment id in each slot, counters of the page."""

    labeler: Optional[str] = None
    client: str = DEFAULT_CLIENT  # this page's key (its Gradio session): the holder of its claims
    active: int = 0
    ids: list = field(default_factory=lambda: [None, None])
    seq: int = 0
    changed_at: list = field(default_factory=lambda: [0, 0])  # seq that last redrew each slot
    typed_pending: bool = False
    session_labels: int = 0
    counters: Optional[Counters] = None
    counters_html: str = ""  # what the page shows now (the UI skips resending it)
    waiting: Optional[tuple] = None  # what the page's empty slots say they wait for (status.waiting_message)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def hidden(self) -> int:
        return 1 - self.active


@dataclass(frozen=True)
class SlotUpdate:
    """What the page must change: new content for some slots (None = the sampling state)."""

    active: int
    ready: bool  # the hidden slot holds a pair, so the next vote can flip at once
    seq: int
    changed: dict
    label_id: Optional[int] = None
    judge_note: Optional[str] = None
    typed_arrived: bool = False


class SlotBook:
    """Slot states by session key (Gradio's session hash), oldest evicted beyond MAX_SESSIONS."""

    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        self._states: OrderedDict[str, SlotState] = OrderedDict()
        self._lock = threading.Lock()
        self.max_sessions = max_sessions

    def get(self, key: str) -> SlotState:
        with self._lock:
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = SlotState(client=key)
                while len(self._states) > self.max_sessions:
                    self._states.popitem(last=False)
            self._states.move_to_end(key)
            return state

    def drop(self, key: str) -> Optional[SlotState]:
        with self._lock:
            return self._states.pop(key, None)


class LabelSlots:
    """Slot-aware labeling on top of LabelService; every method takes the session's SlotState."""

    def __init__(self, svc: LabelService) -> None:
        self.svc = svc

    def open(self, st: SlotState, *, labeler: str) -> SlotUpdate:
        """Page load or new name: start from this labeler's open claims (taken over from another
        page of theirs: a reload gets its pairs back), then new ones."""
        with st.lock:
            if st.labeler is not None and st.labeler != labeler:
                self._release(st)
            st.labeler, st.active, st.ids, st.session_labels = labeler, 0, [None, None], 0
            update = self._fill(st, changed={}, take_over=True)
            return replace(update, changed={0: None, 1: None, **update.changed})  # the page draws both

    def refresh(self, st: SlotState, *, labeler: str, waiting: Optional[tuple] = None) -> Optional[SlotUpdate]:
        """Timer tick: bring a ready typed pair to the front, fill empty slots, drop dead claims.
        With `waiting` (what empty slots should say), slots still empty are redrawn when it
        changed (model loading -> sampling the first pair), under the same lock as every fill, so
        a redraw never covers a pair. Returns None when another request of this page holds the
        slots (try next tick)."""
        if not st.lock.acquire(blocking=False):
            return None
        try:
            if st.labeler != labeler:
                return None
            changed: dict = {}
            arrived = st.typed_pending and self.svc.typed_ready(labeler=labeler)
            alive = self.svc.open_claims(labeler=labeler, ids=self._ids(st), client=st.client)
            for slot in (0, 1):
                if st.ids[slot] is not None and st.ids[slot] not in alive:  # expired or moved meanwhile
                    self._put(st, slot, None, changed)
            if arrived:
                self._push_front(st, changed, self.svc.next_pair(labeler=labeler, exclude=self._ids(st),
                                                                 client=st.client))
                st.typed_pending = False
            if waiting is not None and waiting != st.waiting:
                st.waiting = waiting
                changed.update({slot: None for slot in (0, 1) if st.ids[slot] is None and slot not in changed})
            return self._fill(st, changed=changed, typed_arrived=arrived)
        finally:
            st.lock.release()

    def vote(self, st: SlotState, *, labeler: str, side: str, reason: Optional[str],
             seen_slot: Optional[int] = None, seen_seq: Optional[int] = None) -> SlotUpdate:
        """Record the vote for the visible slot, show the prefetched pair, prefetch another: one
        service call, one commit. `seen_slot`/`seen_seq` say what the page showed when the person
        voted; if the server's slot differs or was redrawn since, nothing is recorded (a vote only
        ever lands on the pair its voter actually saw)."""
        side, reason = check_vote(side, reason)
        with st.lock:
            self._check_owner(st, labeler)
            stale = (seen_slot is not None and seen_slot != st.active) or \
                (seen_seq is not None and st.changed_at[st.active] > seen_seq)
            if stale:
                raise LabelError("the page was out of date, so that vote was not recorded: please vote again")
            voted = st.ids[st.active]
            if voted is None:
                raise LabelError("no pair on screen yet: wait for the next pair to appear")
            res = self.svc.vote(labeler=labeler, assignment_id=voted, side=side, reason=reason,
                                prefetched=st.ids[st.hidden], prefetch=True, client=st.client)
            changed: dict = {}
            self._put(st, st.active, None, changed)
            st.active = st.hidden
            self._put(st, st.active, res.next, changed)
            self._put(st, st.hidden, res.prefetch, changed)
            st.session_labels += 1
            return self._update(st, changed, label_id=res.label_id, judge_note=res.judge_note)

    def undo(self, st: SlotState, *, labeler: str) -> SlotUpdate:
        """The undone pair goes on screen, the pair it displaces becomes the next one; the old
        prefetch stays claimed and comes back later (never lost)."""
        with st.lock:
            self._check_owner(st, labeler)
            view = self.svc.undo(labeler=labeler, client=st.client)
            changed: dict = {}
            self._push_front(st, changed, view)
            st.session_labels = max(0, st.session_labels - 1)
            return self._update(st, changed)

    def resync(self, st: SlotState, *, labeler: str) -> SlotUpdate:
        """After a refused request: drop claims that died, refill, and resend BOTH slots so the
        page matches the server again whatever it had flipped to."""
        with st.lock:
            if st.labeler != labeler:
                st.labeler, st.ids = labeler, [None, None]
            views = self.svc.views(labeler=labeler, ids=st.ids, client=st.client)
            st.ids = [i if i in views else None for i in st.ids]
            drawn = {slot: views.get(st.ids[slot]) for slot in (0, 1)}
            update = self._fill(st, changed={})
            return SlotUpdate(active=update.active, ready=update.ready, seq=update.seq,
                              changed={**drawn, **update.changed})

    def snapshot(self, st: SlotState) -> SlotUpdate:
        """No change, with a fresh sequence number: the page's sync element re-told after a vote
        the server did not take, so a page that flipped ahead to its prefetched slot flips back."""
        with st.lock:
            return self._update(st, {})

    def release(self, st: SlotState) -> None:
        """Give both claims back (the labeler changed name or closed the page)."""
        with st.lock:
            self._release(st)

    def counters(self, st: SlotState) -> Counters:
        st.counters = self.svc.counters()
        return st.counters

    # -- internals (caller holds st.lock) --------------------------------------------------
    def _fill(self, st: SlotState, *, changed: dict, typed_arrived: bool = False,
              take_over: bool = False) -> SlotUpdate:
        for slot in (st.active, st.hidden):
            if st.ids[slot] is None:
                view = self.svc.next_pair(labeler=st.labeler, exclude=self._ids(st), client=st.client,
                                          take_over=take_over)
                self._put(st, slot, view, changed)
        return self._update(st, changed, typed_arrived=typed_arrived)

    def _push_front(self, st: SlotState, changed: dict, view: Optional[PairView]) -> None:
        if view is None:
            return
        displaced = st.ids[st.active]
        self._put(st, st.hidden, None, changed)  # the old prefetch stays claimed; it comes back later
        self._put(st, st.active, view, changed)
        if displaced is not None and displaced != view.assignment_id:
            shown = self.svc.views(labeler=st.labeler, ids=[displaced], client=st.client).get(displaced)
            self._put(st, st.hidden, shown, changed)

    @staticmethod
    def _put(st: SlotState, slot: int, view: Optional[PairView], changed: dict) -> None:
        """Set a slot; only a real change is sent to the page (an empty queue re-sends nothing)."""
        new = view.assignment_id if view else None
        if new != st.ids[slot]:
            st.ids[slot] = new
            changed[slot] = view

    @staticmethod
    def _ids(st: SlotState) -> list[int]:
        return [i for i in st.ids if i is not None]

    @staticmethod
    def _update(st: SlotState, changed: dict, **extra) -> SlotUpdate:
        st.seq += 1
        for slot in changed:
            st.changed_at[slot] = st.seq
        return SlotUpdate(active=st.active, ready=st.ids[st.hidden] is not None, seq=st.seq,
                          changed=dict(changed), **extra)

    @staticmethod
    def _check_owner(st: SlotState, labeler: str) -> None:
        if st.labeler != labeler:
            raise LabelError("your name changed: press Enter in the name field to load your pairs")

    def _release(self, st: SlotState) -> None:
        for aid in self._ids(st):
            self.svc.release(labeler=st.labeler, assignment_id=aid, client=st.client)
        st.ids = [None, None]
