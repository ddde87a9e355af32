"""Blind human evaluation in the real page (Debian Chromium, Playwright) and over the HTTP API:
eval pairs at 1 in 5 are labeled like any pair, their DOM and API answers carry no marker, the
votes land as training labels and evaluation judgments in the right tables, and the dashboard
shows the human win rate with its n."""
from __future__ import annotations

import re

import pytest
from gradio_client import Client
from sqlalchemy import select

from odpo.db import store
from odpo.db.models import HumanEval, Label, Pair
from tests import ui_fixtures
from tests.db_helpers import sample
from tests.test_ui_browser import SETTLED_JS, open_as, press_and_wait, shot, visible, wait_visible

live_app = ui_fixtures.live_app  # fixtures, requested by name

pytestmark = pytest.mark.timeout(300)
EVERY = 5  # 1 pair in 5 is an eval pair
VERSION = 2

# The visible slot's label area (prompt, both answers, the buttons), its text masked: what a labeler
# could tell pairs apart by besides the words. The slot number in ids is normalised, and gradio's
# hidden loading overlays are dropped (they follow request timing, the same for every pair).
MASKED_JS = r"""() => {
  const slot = document.documentElement.getAttribute('data-odpo-slot') || '0';
  const parts = ['#odpo-slot-' + slot, '#odpo-actions'].map(sel => document.querySelector(sel).cloneNode(true));
  for (const el of parts) {
    el.querySelectorAll('[data-testid=status-tracker]').forEach(t => t.remove());  // gradio's loading overlay
    const walk = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    const texts = [];
    while (walk.nextNode()) texts.push(walk.currentNode);
    texts.forEach(t => { t.textContent = t.textContent.trim() ? '#' : ''; });
  }
  return parts.map(el => el.outerHTML).join('\n').replace(/(odpo-[a-z]+-)\d/g, '$1N');
}"""


def normalise(html: str) -> str:
    """What differs between two renders of the SAME pair goes: gradio's random per-render ids of its
    HTML blocks, the pressed-key flash left on a button by the previous vote, class-list spacing."""
    html = re.sub(r'id="html-[a-z0-9]+"', 'id="html-X"', html)
    return re.sub(r'class="([^"]*)"', lambda m: 'class="{}"'.format(
        " ".join(c for c in m.group(1).split() if c != "odpo-pressed")), html)


def queue_mixed(db, n: int = 20) -> dict[int, str]:
    """n pairs of version VERSION, every EVERY-th an eval pair (held-out prompt, the policy's answer
    against the base's). Texts: training samples 'A<i> ...'/'B<i> ...', eval samples 'P<i> ...'
    (policy) / 'R<i> ...' (reference). Returns pair id -> purpose."""
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=f"Question {i}: what does the cat think?",
                                                      held_out=(i + 1) % EVERY == 0) for i in range(n)])
    purposes = {}
    with db.sessions.begin() as s:
        train = iter(store.pick_prompts_for_sampling(s, n=n))
        held = iter(store.pick_held_out_prompts(s, n=n))
        for i in range(n):
            if (i + 1) % EVERY:
                pair = store.add_pair(s, prompt_id=next(train).id, version=VERSION, a=sample(f"A{i} answer here"),
                                      b=sample(f"B{i} answer here"))
            else:
                pair = store.add_eval_pair(s, prompt_id=next(held).id, version=VERSION, reference_version=0,
                                           policy=sample(f"P{i} answer here"), reference=sample(f"R{i} answer here"),
                                           policy_side="ab"[i % 2])
            purposes[pair.id] = pair.purpose
    return purposes


browser = ui_fixtures.browser  # fixture, requested by name


page = ui_fixtures.wide_page  # fixture, requested by name


@pytest.mark.browser
def test_twenty_votes_with_eval_pairs_at_one_in_five(live_app, page):
    purposes = queue_mixed(live_app.db)
    open_as(page, live_app.url, "Uma")
    shown = []  # (left text, masked label-area HTML, key)
    for i in range(20):
        wait_visible(page, "/^[ABPR]\\d/.test(vis('left'))")
        page.wait_for_function(SETTLED_JS)
        key = "1" if i % 3 else "2"  # mostly left, sometimes right
        shown.append((visible(page, "left").strip(), normalise(page.evaluate(MASKED_JS)), key))
        if i < 19:
            press_and_wait(page, key)
        else:
            page.keyboard.press(key)
    page.wait_for_function("() => (document.querySelector('#odpo-counters')?.innerText || '').length > 0")
    _wait_for_labels(live_app.db, 20)
    eval_shown = [s for s in shown if s[0][0] in "PR"]
    train_shown = [s for s in shown if s[0][0] in "AB"]
    assert len(eval_shown) == 4 and len(train_shown) == 16
    assert {html for _, html, _ in shown} == {train_shown[0][1]}  # one structure for every pair: no marker

    with live_app.db.sessions() as s:
        labels = list(s.scalars(select(Label).order_by(Label.id)))
        judgments = list(s.scalars(select(HumanEval).order_by(HumanEval.id)))
        trainable = store.unconsumed_labels(s, limit=100)
        eval_pairs = set(s.scalars(select(Pair.id).where(Pair.purpose == "eval")))
    assert len(labels) == 20 and {lb.labeler for lb in labels} == {"Uma"}
    assert {lb.pair_id for lb in labels} == set(purposes)
    assert {t.pair_id for t in trainable} == {pid for pid, p in purposes.items() if p == "train"}  # 16 training labels
    assert {j.pair_id for j in judgments} == eval_pairs and len(judgments) == 4  # 4 evaluation judgments
    expected = [("win" if (left[0] == "P") == (key == "1") else "loss") for left, _, key in eval_shown]
    assert [j.outcome for j in judgments] == expected
    assert {(j.version, j.reference_version, j.labeler) for j in judgments} == {(VERSION, 0, "Uma")}

    page.click("button[role=tab]:has-text('Dashboard')")
    page.wait_for_function("() => (document.querySelector('#odpo-dash-human')?.innerText || '').includes('v2')")
    table = page.inner_text("#odpo-dash-human")
    wins = expected.count("win")
    assert re.search(rf"v2\s+base\s+{round(wins / 4, 3):g}\s+4\s+\[", table), table
    shot(page, "dashboard-human-eval")


def _wait_for_labels(db, n: int) -> None:
    """The last vote's request may still be in flight when the page settles."""
    from tests.concurrency import wait_until

    def count() -> int:
        with db.sessions() as s:
            return len(list(s.scalars(select(Label.id))))

    wait_until(lambda: count() >= n, timeout=15)


def test_http_api_answers_eval_and_training_pairs_alike(live_app):
    purposes = queue_mixed(live_app.db, n=5)
    c = Client(live_app.url, verbose=False, download_files=False)
    answers = []
    pair = c.predict("Vic", api_name="/next_pair")["pair"]
    while pair is not None:
        res = c.predict(pair["assignment_id"], "left", "Vic", "", api_name="/vote")
        answers.append((pair, res))
        pair = res["pair"]
    assert [purposes[p["pair_id"]] for p, _ in answers] == ["train"] * 4 + ["eval"]
    (train_pair, train_res), (eval_pair, eval_res) = answers[0], answers[-1]
    assert train_pair.keys() == eval_pair.keys() and train_res.keys() == eval_res.keys()
    assert {k: type(v) for k, v in train_pair.items()} == {k: type(v) for k, v in eval_pair.items()}
    assert (eval_pair["version"], eval_pair["typed"]) == (train_pair["version"], train_pair["typed"])
    assert eval_res["label_id"] == train_res["label_id"] + 4  # one label sequence: nothing to tell by
    with live_app.db.sessions() as s:
        assert len(list(s.scalars(select(HumanEval)))) == 1
