"""A three-turn conversation through the real page (Debian Chromium, Playwright): `odpo prompts
import` of a chat, the Label tab showing the earlier turns collapsed above the final question and
the two candidate replies, a vote with the keyboard, and `odpo export dataset` writing the whole
conversation with chosen/rejected as voted. With ODPO_UPDATE_SCREENSHOT=1 the page, its history
opened, is also saved to docs/label-conversation.png (a normal run never rewrites tracked files)."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from odpo.db import store
from odpo.db.models import Label
from tests import ui_fixtures
from tests.concurrency import wait_until
from tests.db_helpers import sample
from tests.test_ui_browser import ARTIFACTS, DOCS, SETTLED_JS, open_as, visible, wait_visible

live_app = ui_fixtures.live_app  # fixtures, requested by name
browser = ui_fixtures.browser
pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

CHAT = [
    {"role": "user", "content": "I'm visiting Lisbon for four days in May. Is that a good time to go?"},
    {"role": "assistant", "content": "Yes. May is warm and mostly dry, the jacaranda trees are in bloom, and the "
                                     "summer crowds have not arrived yet."},
    {"role": "user", "content": "Great. What should I pack?"},
    {"role": "assistant", "content": "Light layers for cool evenings, comfortable shoes for the steep cobbled "
                                     "hills, sunscreen, and a light rain jacket just in case."},
    {"role": "user", "content": "Which neighbourhood should I stay in?"},
]
REPLY_A = ("**Baixa or Chiado** if it is your first visit: central, flat by Lisbon standards, and close to the "
           "river, the trams and the metro.\n\nFor more character, **Alfama** has the castle and fado bars, but "
           "its hills are steep: the comfortable shoes will earn their place.")
REPLY_B = "Lisbon has many neighbourhoods. Remember to pack a rain jacket."

DETAILS_JS = """() => {
  const slot = document.documentElement.getAttribute('data-odpo-slot') || '0';
  const d = document.querySelector('#odpo-prompt-' + slot + ' details.odpo-context');
  return d ? {open: d.open, summary: d.querySelector('summary').innerText, text: d.innerText,
              turns: d.querySelectorAll('.odpo-turn').length, bold: d.querySelectorAll('b, strong').length} : null;
}"""


page = ui_fixtures.wide_page  # fixture, requested by name


def cli(app, *args: str) -> str:
    from odpo.app.cli import cli as odpo_cli

    common = app.ctx.common
    result = CliRunner().invoke(odpo_cli, ["--data-dir", str(common.data_dir), "--db", common.db_url, *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_three_turn_conversation_is_imported_labeled_and_exported_whole(live_app, page, tmp_path):
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text(json.dumps({"messages": CHAT}) + "\n", encoding="utf-8")
    cli(live_app, "prompts", "import", str(chat_file))
    with live_app.db.sessions.begin() as s:  # what the sampler does with it: two replies to the conversation
        (prompt,) = store.pick_prompts_for_sampling(s, n=5)
        assert prompt.messages() == CHAT
        store.add_pair(s, prompt_id=prompt.id, version=1, a=sample(REPLY_A), b=sample(REPLY_B))

    open_as(page, live_app.url, "Lee")
    wait_visible(page, "vis('prompt').includes('Which neighbourhood')")
    page.wait_for_function(SETTLED_JS)
    closed = page.evaluate(DETAILS_JS)
    assert closed["open"] is False and closed["summary"] == "Earlier conversation (4 turns)"
    assert closed["turns"] == 4 and "jacaranda" not in closed["text"]  # collapsed: the history is hidden
    prompt_text = visible(page)
    assert prompt_text.index("Earlier conversation") < prompt_text.index("Which neighbourhood")
    assert "Baixa" in visible(page, "left") + visible(page, "right")

    page.locator("details.odpo-context summary").filter(has_text="Earlier conversation").first.click()
    page.wait_for_function(f"() => ({DETAILS_JS})().open")
    opened = page.evaluate(DETAILS_JS)
    assert all(m["content"] in opened["text"] for m in CHAT[:-1]) and opened["bold"] == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "label-conversation.png"), full_page=False)
    if os.environ.get("ODPO_UPDATE_SCREENSHOT") == "1":
        page.screenshot(path=str(DOCS / "label-conversation.png"), full_page=False)

    left = visible(page, "left")
    page.locator("body").click(position={"x": 5, "y": 5})  # focus off the summary: shortcuts apply
    page.keyboard.press("1")  # A (left) is better
    wait_until(lambda: _labels(live_app.db) == 1, timeout=15)
    out = tmp_path / "prefs.jsonl"
    cli(live_app, "export", "dataset", str(out))
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    chosen, rejected = (REPLY_A, REPLY_B) if "Baixa" in left else (REPLY_B, REPLY_A)
    assert row["prompt"] == CHAT
    assert row["chosen"] == [{"role": "assistant", "content": chosen}]
    assert row["rejected"] == [{"role": "assistant", "content": rejected}]
    assert row["labeler"] == "Lee" and row["source"] == "human"


def _labels(db) -> int:
    with db.sessions() as s:
        return len(list(s.scalars(select(Label.id))))
