"""The admin's labeler-quality controls in a real browser: mark a gold answer, edit the
guidelines; the dashboard then shows each labeler's agreement with gold and the Label tab shows
the new guidelines on its next load."""
from __future__ import annotations

import pytest

from odpo.db import store
from tests import ui_fixtures
from tests.db_helpers import make_pairs
from tests.test_ui_browser import open_as

live_app = ui_fixtures.live_app  # fixtures, requested by name
browser = ui_fixtures.browser

pytestmark = [pytest.mark.timeout(300), pytest.mark.browser]
GUIDE = "Prefer the answer that finishes its sentence; ignore length otherwise."


page = ui_fixtures.wide_page  # fixture, requested by name


def test_admin_marks_gold_and_edits_guidelines(live_app, page):
    first, second = make_pairs(live_app.db, 2)
    with live_app.db.sessions.begin() as s:  # ann agrees with the gold answer to come, bo does not
        store.add_direct_label(s, pair_id=first, labeler="ann", choice="a", source="human")
        store.add_direct_label(s, pair_id=first, labeler="bo", choice="b", source="human")
    open_as(page, live_app.url, "Xia")
    page.click("button[role=tab]:has-text('Admin')")
    page.fill("#odpo-gold-pair input, #odpo-gold-pair textarea", str(first))
    page.click("#odpo-gold-choice label:has-text('A')")
    page.click("#odpo-gold-btn")
    _wait_for(lambda: _control(live_app.db, f"{store.GOLD_PREFIX}{first}"))
    assert _control(live_app.db, f"{store.GOLD_PREFIX}{first}")["choice"] == "a"

    page.fill("#odpo-guidelines-edit textarea", GUIDE)
    page.click("#odpo-guidelines-btn")
    _wait_for(lambda: (_control(live_app.db, "guidelines") or {}).get("text") == GUIDE)
    assert _control(live_app.db, "guidelines")["by"] == "admin"  # without sign-in, the admin is anonymous

    page.click("button[role=tab]:has-text('Dashboard')")
    page.wait_for_function("() => (document.querySelector('#odpo-dash-quality')?.innerText || '').includes('ann')")
    cells = [c.strip() for c in page.inner_text("#odpo-dash-quality").splitlines() if c.strip()]
    row = {name: cells[cells.index(name) + 1:cells.index(name) + 5] for name in ("ann", "bo")}
    assert row["ann"] == ["1", "1 · 0%", "–", "1 · 100%"]  # labels, vs people, vs judges, vs gold
    assert row["bo"] == ["1", "1 · 0%", "–", "1 · 0%"]

    open_as(page, live_app.url, "Xia")  # the next page load shows the admin's guidelines
    page.click("#odpo-guidelines button, #odpo-guidelines .label-wrap")
    page.wait_for_function(f"() => (document.querySelector('#odpo-guidelines-text')?.innerText || '')"
                           f".includes({GUIDE[:30]!r})")
    assert second  # the second pair stays queued for people: gold marks change no queue


def _control(db, key: str):
    with db.sessions() as s:
        return store.get_control(s, key=key)


def _wait_for(condition, timeout: float = 15.0) -> None:
    from tests.concurrency import wait_until

    wait_until(condition, timeout=timeout)
