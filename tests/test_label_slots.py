"""The page's two slots (on screen + prefetched) without a browser: flips, refills, undo, typed
pairs, expired claims, concurrent ticks, and two pages labeling in parallel."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from odpo.app.config import ServeConfig
from odpo.app.services.labeling import LabelError, LabelService
from odpo.app.ui.slots import LabelSlots, SlotBook, SlotState
from odpo.db import store
from odpo.db.models import Assignment, Label
from tests.concurrency import run_in_threads
from tests.db_helpers import make_pairs
from tests.ui_fixtures import FakeSampler


def slots_for(database, sampler=None, **cfg) -> LabelSlots:
    return LabelSlots(LabelService(db=database, config=ServeConfig(**cfg), sampler=sampler))


def on_screen(st: SlotState):
    return st.ids[st.active]


def test_open_fills_both_slots_and_a_vote_shows_the_prefetched_pair(database):
    make_pairs(database, 4)
    slots, st = slots_for(database), SlotState()
    up = slots.open(st, labeler="ann")
    assert set(up.changed) == {0, 1} and up.ready and up.active == 0
    current, prefetched = up.changed[0], up.changed[1]
    up = slots.vote(st, labeler="ann", side="left", reason=None)
    assert up.active == 1 and on_screen(st) == prefetched.assignment_id
    assert set(up.changed) == {0} and up.changed[0] is not None  # only the hidden slot is redrawn
    assert up.changed[0].pair_id not in (current.pair_id, prefetched.pair_id)
    with database.sessions() as s:
        label = s.scalar(select(Label))
        shown = s.get(Assignment, prefetched.assignment_id).shown_at
    assert label.pair_id == current.pair_id and label.choice == current.left[0].lower()
    assert shown >= label.answered_at  # the prefetched pair's clock starts when it is shown


def test_slots_drain_to_the_sampling_state_and_refill_on_tick(database):
    make_pairs(database, 2)
    slots, st = slots_for(database), SlotState()
    slots.open(st, labeler="ann")
    up = slots.vote(st, labeler="ann", side="tie", reason=None)
    assert (up.active, up.ready, up.changed) == (1, False, {0: None})  # nothing to prefetch: hidden slot waits
    up = slots.vote(st, labeler="ann", side="skip", reason=None)
    assert (up.active, up.ready, up.changed) == (0, False, {1: None})  # flips to the waiting (sampling) slot
    with pytest.raises(LabelError, match="no pair on screen"):
        slots.vote(st, labeler="ann", side="left", reason=None)
    assert slots.refresh(st, labeler="ann").changed == {}
    make_pairs(database, 3, version=1)
    up = slots.refresh(st, labeler="ann")
    assert set(up.changed) == {0, 1} and up.ready and all(v is not None for v in up.changed.values())


def test_undo_puts_the_pair_back_and_loses_nothing(database):
    make_pairs(database, 5)
    slots, st = slots_for(database), SlotState()
    first = slots.open(st, labeler="ann").changed[0]
    slots.vote(st, labeler="ann", side="left", reason=None)
    displaced, old_prefetch = on_screen(st), st.ids[1 - st.active]
    up = slots.undo(st, labeler="ann")
    assert up.changed[up.active].pair_id == first.pair_id and st.ids[1 - st.active] == displaced
    seen = []
    for _ in range(4):
        seen.append(on_screen(st))
        slots.vote(st, labeler="ann", side="right", reason=None)
    assert old_prefetch in seen  # the prefetch set aside by the undo came back
    with database.sessions() as s:
        live = s.scalars(select(Label.pair_id).where(Label.undone.is_(False))).all()
    assert len(live) == len(set(live)) == 4


def test_typed_pair_jumps_to_the_front_when_ready(database):
    make_pairs(database, 3)
    sampler = FakeSampler(database, delay_s=0.2)
    slots, st = slots_for(database, sampler=sampler), SlotState()
    slots.open(st, labeler="ann")
    was_on_screen = on_screen(st)
    slots.svc.ask(labeler="ann", text="my own prompt")
    st.typed_pending = True
    assert slots.refresh(st, labeler="ann").typed_arrived is False
    time.sleep(0.5)
    up = slots.refresh(st, labeler="ann")
    assert up.typed_arrived and up.changed[up.active].typed and not st.typed_pending
    assert st.ids[1 - st.active] == was_on_screen  # then the pair it displaced


def test_expired_claim_is_dropped_and_resync_redraws_both(database):
    make_pairs(database, 4)
    slots, st = slots_for(database), SlotState()
    slots.open(st, labeler="ann")
    dead = on_screen(st)
    with database.sessions.begin() as s:
        store.release_assignment(s, assignment_id=dead, labeler="ann")
    with pytest.raises(Exception, match="expired"):
        slots.vote(st, labeler="ann", side="left", reason=None)
    assert on_screen(st) == dead and st.active == 0  # a failed vote leaves the slots untouched
    up = slots.resync(st, labeler="ann")
    assert set(up.changed) == {0, 1} and dead not in st.ids and None not in st.ids


def test_rename_gives_the_claims_back(database):
    make_pairs(database, 2)
    slots, st = slots_for(database), SlotState()
    slots.open(st, labeler="guest-1")
    slots.open(st, labeler="ann")
    with database.sessions() as s:
        open_by = dict(s.execute(select(Assignment.labeler, func.count()).where(Assignment.state == "open")
                                 .group_by(Assignment.labeler)).all())
    assert open_by == {"ann": 2}
    with pytest.raises(LabelError, match="name changed"):
        slots.vote(st, labeler="guest-1", side="left", reason=None)


def test_slot_book_is_bounded():
    book = SlotBook(max_sessions=2)
    a = book.get("a")
    book.get("b"), book.get("c")
    assert book.get("a") is not a and book.drop("c") is not None and book.drop("zzz") is None


def test_ticks_and_votes_of_one_page_never_corrupt_its_slots(database):
    make_pairs(database, 60)
    slots, st = slots_for(database), SlotState()
    slots.open(st, labeler="ann")
    stop, errors = threading.Event(), []

    def ticker():
        while not stop.is_set():
            try:
                slots.refresh(st, labeler="ann")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    th = threading.Thread(target=ticker)
    th.start()
    try:
        for _ in range(40):
            slots.vote(st, labeler="ann", side="left", reason=None)
    finally:
        stop.set()
        th.join(10)
    assert not errors
    with database.sessions() as s:
        labeled = s.scalars(select(Label.pair_id)).all()
        open_ids = set(s.scalars(select(Assignment.id).where(Assignment.state == "open")))
    assert len(labeled) == len(set(labeled)) == 40
    assert open_ids == set(st.ids)  # exactly the two slots are claimed, nothing leaked


def test_two_pages_label_100_pairs_in_parallel(database):
    """Each page votes 50 times at once; the scheduler decides the interleaving, never the outcome."""
    make_pairs(database, 110)
    slots = slots_for(database)
    book = SlotBook()
    both_open = threading.Barrier(2, timeout=30)

    def page(name: str) -> None:
        st = book.get(name)
        slots.open(st, labeler=name)
        both_open.wait()
        for _ in range(50):
            slots.vote(st, labeler=name, side="right", reason=None)

    assert run_in_threads(page, ("ann", "bob"), timeout=60) == []
    with database.sessions() as s:
        rows = s.execute(select(Label.pair_id, Label.labeler)).all()
    per_labeler = {n: sum(1 for _, who in rows if who == n) for n in ("ann", "bob")}
    assert len(rows) == 100 and len({p for p, _ in rows}) == 100 and per_labeler == {"ann": 50, "bob": 50}


def test_a_vote_from_an_out_of_date_page_is_refused(database):
    make_pairs(database, 6)
    slots, st = slots_for(database), SlotState()
    seq = slots.open(st, labeler="ann").seq
    with pytest.raises(LabelError, match="out of date"):
        slots.vote(st, labeler="ann", side="left", reason=None, seen_slot=1, seen_seq=seq)  # showed the prefetch
    with database.sessions.begin() as s:  # the pair on screen expires; a tick redraws that slot...
        store.release_assignment(s, assignment_id=on_screen(st), labeler="ann")
    redraw = slots.refresh(st, labeler="ann")
    assert st.active in redraw.changed
    with pytest.raises(LabelError, match="out of date"):  # ...so a vote sent before the page saw it is refused
        slots.vote(st, labeler="ann", side="left", reason=None, seen_slot=0, seen_seq=seq)
    slots.vote(st, labeler="ann", side="left", reason=None, seen_slot=0, seen_seq=redraw.seq)
    with database.sessions() as s:
        (label,) = s.scalars(select(Label)).all()
    assert label.pair_id == redraw.changed[st.hidden].pair_id  # the pair the page showed after the redraw
