"""The labeling service without a browser: left/right mapping, next pair, undo, typed prompts,
counters, expired claims, judge pick after the vote, safe rendering, parallel labelers."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from odpo.app.config import ServeConfig
from odpo.app.services.labeling import (
    DEFAULT_GUIDELINES,
    LabelError,
    LabelService,
    absolute_choice,
    load_guidelines,
    normalise_labeler,
)
from odpo.app.services.rendering import render_markdown
from odpo.db import store
from odpo.db.models import Label, Pair, Prompt
from tests.concurrency import run_in_threads
from tests.db_helpers import make_pairs
from tests.ui_fixtures import FakeSampler


def service(database, sampler=None, **cfg) -> LabelService:
    return LabelService(db=database, config=ServeConfig(**cfg), sampler=sampler)


def labels(database) -> list[Label]:
    with database.sessions() as s:
        return list(s.scalars(select(Label).order_by(Label.id)))


def left_is_a(view) -> bool:
    """make_pairs writes 'A<i>' as sample A and 'B<i>' as sample B."""
    return view.left.startswith("A")


@pytest.mark.parametrize("side,shown_left,expected", [
    ("left", "a", "a"), ("left", "b", "b"), ("right", "a", "b"), ("right", "b", "a"),
    ("tie", "a", "tie"), ("both_bad", "b", "both_bad"), ("skip", "a", "skip")])
def test_absolute_choice(side, shown_left, expected):
    assert absolute_choice(side, shown_left) == expected


def test_vote_maps_left_right_through_shown_left(database):
    import random

    make_pairs(database, 12)
    svc = LabelService(db=database, config=ServeConfig(), sides=random.Random(7))  # seeded: both sides come up
    view = svc.current_pair(labeler="ann")
    expected, lefts = [], set()
    for i in range(12):
        side = "left" if i % 2 else "right"
        lefts.add(left_is_a(view))
        expected.append((view.pair_id, "a" if (side == "left") == left_is_a(view) else "b",
                         "a" if left_is_a(view) else "b"))
        view = svc.vote(labeler="ann", assignment_id=view.assignment_id, side=side, reason=f"r{i}").next
    assert view is None  # queue exhausted: the sampling state
    assert lefts == {True, False}  # left/right really is randomised
    got = [(lb.pair_id, lb.choice, lb.shown_left) for lb in labels(database)]
    assert got == expected
    assert {lb.labeler for lb in labels(database)} == {"ann"} and labels(database)[3].reason == "r3"


def test_reload_shows_the_same_pair_and_labelers_never_share(database):
    make_pairs(database, 3)
    svc = service(database)
    first = svc.current_pair(labeler="ann")
    assert svc.current_pair(labeler="ann") == first  # page reload: same assignment, same sides
    other = svc.current_pair(labeler="bob")
    assert other.pair_id != first.pair_id


def test_vote_errors_are_user_errors(database):
    make_pairs(database, 2)
    svc = service(database)
    view = svc.current_pair(labeler="ann")
    with pytest.raises(LabelError, match="unknown choice"):
        svc.vote(labeler="ann", assignment_id=view.assignment_id, side="up")
    with pytest.raises(LabelError, match="not assigned to you"):
        svc.vote(labeler="bob", assignment_id=view.assignment_id, side="left")
    with pytest.raises(LabelError, match="no pair on screen"):
        svc.vote(labeler="ann", assignment_id=None, side="left")
    svc.vote(labeler="ann", assignment_id=view.assignment_id, side="left")
    with pytest.raises(store.StoreError, match="already answered"):
        svc.vote(labeler="ann", assignment_id=view.assignment_id, side="left")
    assert len(labels(database)) == 1


def test_undo_reshows_the_pair_until_it_is_consumed(database):
    make_pairs(database, 3)
    svc = service(database)
    first = svc.current_pair(labeler="ann")
    second = svc.vote(labeler="ann", assignment_id=first.assignment_id, side="left").next
    again = svc.undo(labeler="ann")
    assert (again.pair_id, again.left, again.right) == (first.pair_id, first.left, first.right)
    assert labels(database)[0].undone
    res = svc.vote(labeler="ann", assignment_id=again.assignment_id, side="right")
    assert res.next.pair_id == second.pair_id  # the pair displaced by the undo comes back
    with database.sessions.begin() as s:  # training consumes every vote
        store.commit_adapter_version(s, run="default", version=1, path="/v1", parent=0, step=1, metrics={},
                                     label_steps={lb.id: 1 for lb in s.scalars(select(Label).where(~Label.undone))})
    with pytest.raises(LabelError, match="nothing to undo"):
        svc.undo(labeler="ann")
    live = [lb for lb in labels(database) if not lb.undone]
    assert [(lb.pair_id, lb.choice) for lb in live] == [(first.pair_id, "b" if left_is_a(first) else "a")]


def test_typed_prompt_is_sampled_and_shown_first(database):
    make_pairs(database, 3)
    sampler = FakeSampler(database)
    svc = service(database, sampler=sampler)
    on_screen = svc.current_pair(labeler="ann")
    prompt_id = svc.ask(labeler="ann", text="  Write a haiku about DPO  ")
    assert sampler.requests == [(prompt_id, "ann")]
    assert svc.typed_ready(labeler="ann") and not svc.typed_ready(labeler="bob")
    assert svc.current_pair(labeler="bob").typed is False  # only the asker gets it
    typed = svc.current_pair(labeler="ann")
    assert typed.typed and typed.prompt == "Write a haiku about DPO"
    assert {typed.left, typed.right} == {"typed answer A", "typed answer B"}
    with database.sessions() as s:
        assert s.get(Prompt, prompt_id).source == "typed"
    after = svc.vote(labeler="ann", assignment_id=typed.assignment_id, side="left").next
    assert after.pair_id == on_screen.pair_id  # then back to the pair that was on screen
    with pytest.raises(LabelError, match="type a prompt"):
        svc.ask(labeler="ann", text="   ")
    with database.sessions() as s:
        prompts_before = s.query(Prompt).count()
    with pytest.raises(LabelError, match="NUL"):
        svc.ask(labeler="ann", text="a prompt with a \x00 inside")
    with database.sessions() as s:
        assert s.query(Prompt).count() == prompts_before  # nothing stored
    with pytest.raises(LabelError, match="no sampler"):
        service(database).ask(labeler="ann", text="hello")


def test_counters(database):
    make_pairs(database, 5)
    svc = service(database)
    c = svc.counters()
    assert (c.queue, c.serving_version, c.until_update, c.per_update, c.paused) == (5, 0, 8, 8, False)
    view = svc.current_pair(labeler="ann")
    for _ in range(3):
        view = svc.vote(labeler="ann", assignment_id=view.assignment_id, side="left").next
    svc.vote(labeler="ann", assignment_id=view.assignment_id, side="tie")  # not trainable
    with database.sessions.begin() as s:
        store.set_control(s, key="train.config", value={"batch_size": 2, "save_every": 2})
        store.set_control(s, key="train.paused", value={"paused": True})
    c = svc.counters()
    assert (c.queue, c.unconsumed, c.per_update, c.until_update, c.paused) == (0, 3, 4, 1, True)  # 5th on screen
    assert service(database, sampler=FakeSampler(database, serving_version=7)).counters().serving_version == 7
    with database.sessions.begin() as s:  # an iterative trainer counts its round: the serving version's labels
        store.set_control(s, key="train.progress", value={"mode": "iterative", "round": 2, "labels": 1,
                                                          "needed": 6, "run": "default"})
    c = svc.counters()
    assert (c.unconsumed, c.per_update, c.until_update) == (1, 6, 5)
    with database.sessions.begin() as s:  # another run's round says nothing about this one
        store.set_control(s, key="train.progress", value={"mode": "iterative", "labels": 1, "needed": 6,
                                                          "run": "other"})
    assert (svc.counters().per_update, svc.counters().until_update) == (4, 1)


def test_closed_tab_returns_its_pair_after_the_timeout(database):
    make_pairs(database, 1)
    svc = service(database, claim_timeout_s=1.0)
    gone = svc.current_pair(labeler="closed-tab")
    assert svc.current_pair(labeler="bob") is None
    time.sleep(1.3)
    got = svc.current_pair(labeler="bob")
    assert got is not None and got.pair_id == gone.pair_id
    with pytest.raises(store.StoreError, match="expired"):
        svc.vote(labeler="closed-tab", assignment_id=gone.assignment_id, side="left")


def test_release_on_rename_gives_the_pair_back(database):
    make_pairs(database, 1)
    svc = service(database)
    view = svc.current_pair(labeler="old name")
    svc.release(labeler="old name", assignment_id=view.assignment_id)
    assert svc.current_pair(labeler="new name").pair_id == view.pair_id


def test_judge_pick_only_after_the_vote(database):
    make_pairs(database, 2)
    svc = service(database, show_judge_after_vote=True)
    view = svc.current_pair(labeler="ann")
    assert "judge" not in view.to_dict()  # nothing about the judge is sent before the vote
    with database.sessions.begin() as s:
        store.add_direct_label(s, pair_id=view.pair_id, labeler="judge:rule:len", choice="a",
                               source="judge:rule:len", confidence=0.9)
    res = svc.vote(labeler="ann", assignment_id=view.assignment_id, side="tie")
    side = "A (left)" if left_is_a(view) else "B (right)"
    assert res.judge_note == f"judge:rule:len picked {side} (confidence 0.90)"
    quiet = service(database).vote(labeler="ann", assignment_id=res.next.assignment_id, side="skip")
    assert quiet.judge_note is None


def test_labeler_names():
    assert normalise_labeler("  Ada   Lovelace ") == "Ada Lovelace"
    for bad in ("", "   ", "judge:me", "Dataset:hh-rlhf", "x" * 101):
        with pytest.raises(LabelError):
            normalise_labeler(bad)
    for bad in ("Ada\x00", "A\tda", "Ada\x1b[31m", "Ada\x85x", "\u202eada", "Ada\u2066", "Ada\u200f", "Ada\u061c"):
        with pytest.raises(LabelError, match=r"control or text-direction characters \(found U\+") as err:
            normalise_labeler(bad)
        assert "\n" not in str(err.value)


def test_guidelines(tmp_path):
    assert load_guidelines(None) == DEFAULT_GUIDELINES
    assert load_guidelines(tmp_path / "missing.md") == DEFAULT_GUIDELINES
    (tmp_path / "g.md").write_text("# Be kind\n", encoding="utf-8")
    assert load_guidelines(tmp_path / "g.md") == "# Be kind"


def test_rendered_markdown_makes_html_inert_but_keeps_code():
    evil = 'Hi <script>alert(1)</script> <img src=x onerror="alert(2)"> ![t](http://evil/p.png) & more'
    out = render_markdown(evil)
    assert "<script" not in out and "<img" not in out and "&lt;script&gt;" in out
    assert "[image: t — http://evil/p.png]" in out and "&amp; more" in out  # an image is text, never fetched
    code = "Use `a<b` and\n```html\n<b>bold</b>\n```\nthen <i>x</i>"
    assert render_markdown(code) == ("<p>Use <code>a&lt;b</code> and</p>\n<pre><code>&lt;b&gt;bold&lt;/b&gt;\n"
                                     "</code></pre>\n<p>then &lt;i&gt;x&lt;/i&gt;</p>\n")
    assert render_markdown("~~~\n<x>\n~~~~\n<y>") == "<pre><code>&lt;x&gt;\n</code></pre>\n<p>&lt;y&gt;</p>\n"
    assert render_markdown("```\n<unclosed>") == "<pre><code>&lt;unclosed&gt;</code></pre>\n"  # runs to the end
    assert render_markdown(None) == ""


def test_two_labelers_in_parallel_never_label_the_same_pair(database):
    """Each labeler votes 50 times at once; scheduling may interleave them any way but never share a pair."""
    from odpo.app.services.limits import DEFAULT_LIMITS, Limit, RateLimits

    make_pairs(database, 110)
    # about claims racing, not rates: the per-labeler limits (tests/test_security.py) would stop the loop
    unlimited = RateLimits(limits={action: Limit(rate=1e6, burst=10**6) for action in DEFAULT_LIMITS})
    svc = LabelService(db=database, config=ServeConfig(), limits=unlimited)
    done: dict[str, list[int]] = {"ann": [], "bob": []}
    both_ready = threading.Barrier(2, timeout=30)

    def work(name: str) -> None:
        view = svc.current_pair(labeler=name)
        both_ready.wait()
        for _ in range(50):
            done[name].append(view.pair_id)
            view = svc.vote(labeler=name, assignment_id=view.assignment_id, side="left").next

    assert run_in_threads(work, done, timeout=60) == []
    voted = done["ann"] + done["bob"]
    assert len(voted) == 100 and len(set(voted)) == 100
    with database.sessions() as s:
        per_pair = s.execute(select(Label.pair_id, func.count()).group_by(Label.pair_id)).all()
        assert all(n == 1 for _, n in per_pair) and len(per_pair) == len(voted)
        assert s.scalar(select(func.count()).select_from(Pair).where(Pair.status == "labeled")) == len(voted)
