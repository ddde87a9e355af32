"""Names and reasons are text, not controls: a labeler name with a control or text-direction
character is refused with one line, a reserved prefix (judge:, dataset:) is refused, and a vote's
reason loses such characters and becomes one line. Through LabelService and the HTTP API, on
SQLite and PostgreSQL (NUL is what PostgreSQL cannot store: it must never reach it)."""
from __future__ import annotations

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from sqlalchemy import select

from odpo.app.config import ServeConfig
from odpo.app.services.labeling import LabelError, LabelService, check_vote, normalise_labeler
from odpo.app.ui.shared import INTERNAL_ERROR
from odpo.db.models import Assignment, Label
from tests import ui_fixtures
from tests.db_helpers import make_pairs

live_app = ui_fixtures.live_app  # fixture, requested by name
pytestmark = pytest.mark.timeout(120)

HOSTILE_NAMES = ["ann\x00", "ann\x07", "ann\x1b[2J", "ann\x9b", "\u202eenna", "ann\u2066", "ann\u200e", "ann\u061c"]
HOSTILE_REASON = "too\x00 long\r\nand \u202ewrong\u202c\tsee\x85below\x1b[0m "
CLEAN_REASON = "too long and wrong see below[0m"


def test_a_reason_is_one_line_without_controls():
    assert check_vote("left", HOSTILE_REASON) == ("left", CLEAN_REASON)
    assert check_vote("tie", "\x00\u202e\n ") == ("tie", None)  # nothing left: no reason
    assert check_vote("skip", "x" * 600 + "\x00")[1] == "x" * 500


def test_names_with_controls_or_reserved_prefixes_are_refused_with_one_line():
    for name in HOSTILE_NAMES + ["judge:gpt", "DATASET:hh"]:
        with pytest.raises(LabelError) as err:
            normalise_labeler(name)
        assert "\n" not in str(err.value) and str(err.value).isprintable()
    assert normalise_labeler("  Zoë  O'Neil\n") == "Zoë O'Neil"  # trimmed; letters of any script are fine


def test_the_vote_path_stores_a_clean_reason(database):
    make_pairs(database, 2)
    svc = LabelService(db=database, config=ServeConfig())
    view = svc.current_pair(labeler="ann")
    svc.vote(labeler="ann", assignment_id=view.assignment_id, side="left", reason=HOSTILE_REASON)
    with database.sessions() as s:
        assert s.scalars(select(Label.reason)).all() == [CLEAN_REASON]


def test_the_http_api_refuses_hostile_names_in_one_line_and_cleans_reasons(live_app):
    make_pairs(live_app.db, 2)
    c = Client(live_app.url, verbose=False, download_files=False)
    for name in ["ann\x00", "\u202eenna", "dataset:hh"]:
        with pytest.raises(AppError) as err:
            c.predict(name, api_name="/next_pair")
        message = str(err.value)
        assert INTERNAL_ERROR not in message and "Traceback" not in message
        assert "control or text-direction" in message or "reserved for imported datasets" in message
    with live_app.db.sessions() as s:
        assert s.scalars(select(Assignment)).all() == []  # nothing was claimed for them
    pair = c.predict("ann", api_name="/next_pair")["pair"]
    c.predict(pair["assignment_id"], "right", "ann", HOSTILE_REASON, api_name="/vote")
    with live_app.db.sessions() as s:
        assert [(lb.labeler, lb.reason) for lb in s.scalars(select(Label))] == [("ann", CLEAN_REASON)]
