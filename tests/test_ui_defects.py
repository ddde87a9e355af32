"""Issue 13, items 4 and 5: an early keypress logs nothing, the trainer chip tells the truth,
exports reach only the admin who made them and leave no temp directories, and the page says
what it waits for while the model converts or loads."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import select

from odpo.app.config import ServeConfig
from odpo.app.services import status
from odpo.app.services.exports import ROOT_PREFIX, ExportStore
from odpo.app.services.labeling import LabelService
from odpo.app.web import StartingSampler
from odpo.db import store
from odpo.db.models import Assignment, Label, TrainStep
from tests import ui_fixtures
from tests.db_helpers import make_pairs

live_auth_app = ui_fixtures.live_auth_app  # fixture, requested by name

pytestmark = pytest.mark.timeout(180)


def fake_request(session: str = "page-1", username=None):
    """What the handlers read from a gr.Request: the session hash and (with auth) the user."""
    return SimpleNamespace(session_hash=session, username=username)


@pytest.fixture
def notes(monkeypatch):
    """The toasts handlers raise (gr.Info / gr.Warning), captured instead of printed."""
    import gradio as gr

    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(gr, "Info", lambda msg, *a, **k: seen.append(("info", msg)))
    monkeypatch.setattr(gr, "Warning", lambda msg, *a, **k: seen.append(("warning", msg)))
    return seen


def label_handlers(database, sampler=None):
    from odpo.app.ui.label import LabelHandlers
    from odpo.app.ui.shared import Identity

    return LabelHandlers(LabelService(db=database, config=ServeConfig(), sampler=sampler), Identity(auth_on=False))


# --- (a) a keypress before the page knows the labeler ----------------------------------------

def test_a_vote_before_the_name_is_set_is_a_calm_note_and_logs_nothing(database, notes, caplog):
    from odpo.app.ui.label import NO_NAME_YET, PAGE_LOADING, VOTE_OUTPUTS, resync_handler, undo_handler, vote_handler

    make_pairs(database, 3)
    h = label_handlers(database)
    with caplog.at_level(logging.DEBUG):
        out = vote_handler(h, "left")("", "", "", fake_request())  # as Gradio calls it: name still empty
        assert len(out) == VOTE_OUTPUTS and all(isinstance(o, dict) for o in out[:6] + out[7:])  # skips
        assert 'data-active="0" data-ready="0"' in out[6]  # the page is told its real slot: no flip
        assert vote_handler(h, "right")("ann", "", "0:1", fake_request())  # name typed, page load not done
        assert undo_handler(h)("", "", fake_request())
        assert resync_handler(h)("", "", fake_request())  # the fallback itself never raises
    assert [n for n in notes] == [("info", NO_NAME_YET), ("info", PAGE_LOADING), ("info", NO_NAME_YET)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    with database.sessions() as s:
        assert s.scalar(select(Label)) is None and s.scalar(select(Assignment)) is None  # nothing claimed


def test_after_the_page_loads_the_same_keypress_votes(database, notes, caplog):
    from odpo.app.ui.label import vote_handler

    make_pairs(database, 3)
    h = label_handlers(database)
    h.slots.open(h.state(fake_request()), labeler="ann")
    with caplog.at_level(logging.WARNING):
        vote_handler(h, "left")("ann", "", "", fake_request())
    assert not caplog.records and notes == []
    with database.sessions() as s:
        assert [lb.labeler for lb in s.scalars(select(Label))] == ["ann"]


# --- (b) honest trainer state -------------------------------------------------------------

def report_up(database, *, children, at=None, state="running"):
    with database.sessions.begin() as s:
        store.set_control(s, key=store.up_state_key("default"), value={
            "pid": 1, "state": state, "at": time.time() if at is None else at,
            "children": [{"name": n, "state": st} for n, st in children]})


def trainer(database):
    with database.sessions() as s:
        return status.trainer_state(s, run="default")


def test_trainer_state_from_up_reports_and_train_steps(database):
    assert trainer(database).state == status.UNKNOWN  # nothing says anything
    report_up(database, children=[("serve", "running"), ("train", "running")])
    assert trainer(database).state == status.RUNNING
    report_up(database, children=[("serve", "running"), ("train", "restarting")])
    assert trainer(database).state == status.STARTING
    report_up(database, children=[("serve", "running"), ("train", "given up")])
    assert trainer(database).state == status.DOWN
    report_up(database, children=[("serve", "running")])  # odpo up --no-train
    assert trainer(database).state == status.DOWN
    report_up(database, children=[("train", "running")], state="stopped")
    assert trainer(database).state == status.DOWN
    report_up(database, children=[("train", "running")], at=time.time() - 3600)  # up is long gone
    assert trainer(database).state == status.UNKNOWN
    with database.sessions.begin() as s:  # a trainer started by hand, at work
        s.add(TrainStep(run="default", step=1, version=1, loss=0.7))
    assert trainer(database).state == status.RUNNING


@pytest.mark.parametrize("until,paused,state,text", [
    (0, True, status.RUNNING, "paused"),
    (0, False, status.DOWN, "no trainer running"),
    (5, False, status.DOWN, "no trainer running"),
    (5, False, status.STARTING, "trainer starting"),
    (5, False, status.RUNNING, "5 more labels"),
    (1, False, status.UNKNOWN, "1 more label"),
    (0, False, status.RUNNING, "training…"),
    (0, False, status.UNKNOWN, "waiting for a trainer"),
])
def test_until_next_update_says_what_the_trainer_does(until, paused, state, text):
    assert status.update_chip(until_update=until, paused=paused, trainer=status.TrainerState(state)) == text


def test_the_counters_strip_shows_no_trainer_when_up_runs_none(database):
    report_up(database, children=[("serve", "running")])
    h = label_handlers(database)
    st = h.state(fake_request())
    html = h.counters(st, refresh=True)
    assert "no trainer running" in html and "training…" not in html


# --- (c) exports: only their admin, and no temp directories left ---------------------------

def test_export_store_replaces_expires_and_cleans_up(tmp_path):
    now = [0.0]
    exports = ExportStore(parent=tmp_path, ttl_s=60, clock=lambda: now[0])
    assert list(tmp_path.iterdir()) == []  # nothing on disk before the first export
    first_dir = exports.new_dir()
    first = exports.add(_write(first_dir / "a.jsonl"), owner="alice")
    other = exports.add(_write(exports.new_dir() / "b.jsonl"), owner="carol")
    second = exports.add(_write(exports.new_dir() / "c.jsonl"), owner="alice")
    assert exports.get(first.token) is None and not first_dir.exists()  # replaced: gone from disk
    assert exports.get(second.token).path.read_text() == "x" and exports.get(other.token) is not None
    now[0] = 61.0
    assert exports.get(second.token) is None and not second.path.exists()  # expired: gone too
    exports.close()
    assert list(tmp_path.iterdir()) == []  # the shutdown leaves no odpo temp dir behind


def _write(path: Path) -> Path:
    path.write_text("x", encoding="utf-8")
    return path


def admin_handlers(app):
    from odpo.app.services.accounts import load_auth
    from odpo.app.services.admin import AdminService
    from odpo.app.ui.admin import AdminHandlers
    from odpo.app.ui.shared import Identity

    labels = LabelService(db=app.db, config=app.ctx.config)
    admin = AdminService(db=app.db, config=app.ctx.config, labels=labels, auth=load_auth(app.auth_file),
                         extra_admins=frozenset(), data_dir=app.ctx.common.data_dir)
    return AdminHandlers(admin, Identity(auth_on=True), app.ctx.exports)


def signed_in(app, name: str) -> httpx.Client:
    c = httpx.Client(base_url=app.url, timeout=20)
    r = c.post("login", data={"username": name, "password": app.users[name]})
    assert r.status_code == 200, r.text
    return c


def test_an_export_downloads_only_for_the_admin_who_made_it(live_auth_app, notes):
    app = live_auth_app
    make_pairs(app.db, 2)
    labels = LabelService(db=app.db, config=app.ctx.config)
    labels.vote(labeler="bob", assignment_id=labels.next_pair(labeler="bob").assignment_id, side="left")
    h = admin_handlers(app)
    assert h.do_export("jsonl", fake_request(username="bob")) is not None  # skipped outputs, a warning
    assert notes and notes[-1][0] == "warning" and "admins only" in notes[-1][1]
    link = h.do_export("jsonl", fake_request(username="alice"))
    href = link.split('href="', 1)[1].split('"', 1)[0]
    entry = app.ctx.exports.get(href.rsplit("/", 1)[1])
    alice, bob = signed_in(app, "alice"), signed_in(app, "bob")
    got = alice.get(href)
    assert got.status_code == 200 and got.text.startswith("{") and "prompt" in got.text
    assert bob.get(href).status_code == 403
    assert httpx.get(app.url + href, timeout=20).status_code == 401
    for client in (bob, alice):  # Gradio never serves the file, whoever knows its path
        assert client.get(f"gradio_api/file={entry.path}").status_code in (403, 404)
    h.do_export("jsonl", fake_request(username="alice"))  # a new export replaces the old one
    assert alice.get(href).status_code == 404 and not entry.path.exists()
    root = app.ctx.exports.root
    assert root is not None and root.name.startswith(ROOT_PREFIX) and root.is_dir()
    app.ctx.exports.close()
    assert not root.exists()


def test_serve_shutdown_leaves_no_export_dir_and_starts_the_sampler_once_loaded(tmp_path, common_config,
                                                                               monkeypatch):
    """run_serve end to end without a model: the fake load hands a fake sampler over, the fake web
    app makes an export, and the shutdown removes it from the temp root (TMPDIR)."""
    import tempfile

    import odpo.app.web as serve

    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    real, seen = _Sampler(), {}
    monkeypatch.setattr(serve, "load_policy", lambda *a, **k: (None, None))
    monkeypatch.setattr(serve, "build_sampler", lambda *a, **k: seen.setdefault("ramp_up", k["ramp_up"]) and real)

    class Demo:
        def block_thread(self):
            seen["phase"] = seen["ctx"].sampler.state()["phase"]

        def close(self):
            seen["closed"] = True

    def launch(ctx):
        seen["ctx"] = ctx
        _write(ctx.exports.new_dir() / "x.jsonl")
        assert [p.name[:len(ROOT_PREFIX)] for p in temp_root.iterdir()] == [ROOT_PREFIX]
        return Demo()

    monkeypatch.setattr(serve, "_launch_ui", launch)
    serve.run_serve(common_config, ServeConfig(port=ui_fixtures.free_port(), inline_sampler=True))
    assert seen["phase"] == status.SAMPLING and seen["ramp_up"] is True and seen["closed"]
    assert real.started and real.stopped
    assert list(temp_root.iterdir()) == []  # no odpo temp dir stays behind


def test_the_admin_export_offers_the_adapter_as_a_gguf_zip(database, common_config, tiny_model_dir, tmp_path,
                                                           notes):
    import zipfile

    import torch

    from odpo.app.services.admin import AdminService
    from odpo.app.ui.admin import AdminHandlers
    from odpo.app.ui.shared import Identity
    from odpo.trainer.policy.loading import load_model_and_tokenizer
    from odpo.trainer.policy.lora import LoraSettings, attach_lora
    from tests.model_fixtures import tiny_model_config
    from tests.test_export import commit_version, perturb

    admin = AdminService(db=database, config=ServeConfig(), labels=LabelService(db=database, config=ServeConfig()),
                         auth=None, extra_admins=frozenset(), data_dir=common_config.data_dir)
    h = AdminHandlers(admin, Identity(auth_on=False), ExportStore(parent=tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert h.do_export("gguf", fake_request()) is not None and notes[-1][0] == "warning"  # no version: one line
    model, _ = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))
    torch.manual_seed(0)
    policy = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    perturb(policy, 1)
    commit_version(database, policy=policy, adapters_dir=tmp_path / "adapters", version=1,
                   model_spec=str(tiny_model_dir))
    link = h.do_export("gguf", fake_request())
    entry = h.exports.get(link.split('href="odpo/export/', 1)[1].split('"', 1)[0])
    with zipfile.ZipFile(entry.path) as zf:
        assert sorted(zf.namelist()) == ["Modelfile", "odpo-v1-lora-f32.gguf"]
    h.exports.close()
    assert list((tmp_path / "tmp").iterdir()) == []


# --- (d) the page says what it waits for ----------------------------------------------------

@pytest.mark.parametrize("state,title", [
    ({"phase": status.CONVERTING}, "Converting the model (first run only"),
    ({"phase": status.LOADING}, "Loading the model…"),
    ({"phase": status.FAILED, "last_error": "OSError: disk full"}, "The model failed to load"),
    ({"phase": status.SAMPLING, "pairs_made": 0, "generating": True}, "Sampling the first pair…"),
    ({"phase": status.SAMPLING, "pairs_made": 0, "generating": False}, "Sampling the first pair…"),
    ({"phase": status.SAMPLING, "pairs_made": 0, "generating": False, "no_prompts": True}, "No prompts to sample"),
    ({"phase": status.SAMPLING, "pairs_made": 3, "generating": True, "last_error": "RuntimeError: x"},
     "Sampling failed; retrying…"),
    ({"phase": status.SAMPLING, "pairs_made": 9, "generating": True}, "Sampling new pairs…"),
    ({}, "Sampling new pairs…"),  # no sampler state at all (tests, a headless build)
])
def test_waiting_message_follows_the_sampler_state(state, title):
    assert status.waiting_message(state)[0].startswith(title)


def test_serve_sampler_ramps_up_from_one_prompt_while_people_wait(database, tiny_model_and_tokenizer):
    """With ramp_up (what serve uses), a start with an empty queue samples 1 prompt, then 2, then 4:
    the first pair does not wait for a whole batch. Same parameters for every sample; once pairs
    sit unclaimed in the queue, or without ramp_up, batches are full."""
    from tests.test_sampler import add_prompts, make_sampler

    add_prompts(database)
    ramped = make_sampler(database, *tiny_model_and_tokenizer, queue_size=16, prompts_per_batch=4, ramp_up=True)
    assert not ramped._time_to_yield()  # full priority until the first pair is in (nobody's vote waits)
    made = []
    for _ in range(3):
        made.append(ramped.step())
        with database.sessions.begin() as s:  # a labeler on the page takes what is queued
            while store.claim_next_pair(s, labeler="ann") is not None:
                pass
    assert made == [1, 2, 4] and ramped._time_to_yield()
    plain = make_sampler(database, *tiny_model_and_tokenizer, queue_size=16, prompts_per_batch=4)
    assert plain._time_to_yield() and plain.step() == 4


class _Sampler:
    def __init__(self):
        self.started, self.typed, self.stopped = False, [], False

    def start(self):
        self.started = True

    def stop(self, timeout):
        self.stopped = True

    def request_typed(self, *, prompt_id, labeler):
        self.typed.append((prompt_id, labeler))

    def state(self):
        return {"pairs_made": 0, "generating": True}


def test_starting_sampler_reports_phases_and_hands_over_typed_prompts():
    handle = StartingSampler()
    assert handle.state()["phase"] == status.LOADING
    handle.set_phase(status.CONVERTING)
    assert status.waiting_message(handle.state())[0].startswith("Converting the model")
    handle.request_typed(prompt_id=7, labeler="ann")  # typed while the model converts: kept
    real = _Sampler()
    assert handle.start(real) and real.started and real.typed == [(7, "ann")]
    assert handle.state()["phase"] == status.SAMPLING
    assert status.waiting_message(handle.state())[0] == "Sampling the first pair…"
    handle.close(timeout=1)
    assert real.stopped and not StartingSampler().close(timeout=1)
    late = StartingSampler()
    late.close(timeout=1)
    assert not late.start(_Sampler())  # serve is stopping: a model that loads late never samples


def test_empty_slots_are_redrawn_when_what_they_wait_for_changes(database):
    from odpo.app.ui.label import slot_outputs

    h = label_handlers(database)
    st = h.state(fake_request())
    h.slots.open(st, labeler="ann")
    loading, first = ("Loading the model…", "x"), ("Sampling the first pair…", "y")
    up = h.slots.refresh(st, labeler="ann", waiting=loading)
    assert up.changed == {0: None, 1: None}
    assert "Loading the model" in slot_outputs(up, loading)[0]
    assert h.slots.refresh(st, labeler="ann", waiting=loading).changed == {}  # same text: nothing resent
    make_pairs(database, 1)
    up = h.slots.refresh(st, labeler="ann", waiting=first)
    assert up.changed[st.active] is not None  # the pair, never covered by the waiting text
    assert up.changed[1 - st.active] is None and "first pair" in slot_outputs(up, first)[3 * (1 - st.active)]


# --- in a real browser ------------------------------------------------------------------------

live_app = ui_fixtures.live_app


browser = ui_fixtures.browser  # fixture, requested by name


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    yield ctx.new_page()
    ctx.close()


@pytest.mark.browser
def test_a_shortcut_with_no_name_is_a_calm_note_in_the_browser(live_app, page, caplog):
    """The page's name emptied, then "1": a note says to type a name, nothing is logged or voted,
    and the page stays on the pair it shows (it flipped ahead, and is told to flip back)."""
    from odpo.app.ui.label import NO_NAME_YET
    from tests.test_ui_browser import SETTLED_JS, open_as, visible

    make_pairs(live_app.db, 4)
    with caplog.at_level(logging.WARNING):
        open_as(page, live_app.url, "Zed")
        page.wait_for_function(SETTLED_JS)
        page.wait_for_function("() => window.odpo.sync.ready")
        on_screen = visible(page)
        page.locator("#odpo-name textarea, #odpo-name input").first.fill("")
        page.locator("body").click(position={"x": 5, "y": 5})  # leave the field: shortcuts work again
        page.keyboard.press("1")
        page.get_by_text(NO_NAME_YET).first.wait_for(timeout=15000)
        page.wait_for_function(SETTLED_JS, timeout=15000)
        assert visible(page) == on_screen and "Traceback" not in page.content()
    with live_app.db.sessions() as s:
        assert s.scalar(select(Label)) is None
    assert not [r for r in caplog.records if r.name.startswith("odpo")], caplog.text


@pytest.mark.browser
def test_the_admin_tab_export_link_downloads_the_file(live_app, page):
    from tests.test_ui_browser import open_as

    make_pairs(live_app.db, 2)
    labels = LabelService(db=live_app.db, config=live_app.ctx.config)
    labels.vote(labeler="ann", assignment_id=labels.next_pair(labeler="ann").assignment_id, side="right")
    open_as(page, live_app.url, "Xia")
    page.click("button[role=tab]:has-text('Admin')")
    page.click("#odpo-export-btn")
    link = page.locator("#odpo-export-link a")
    link.wait_for(timeout=20000)
    with page.expect_download() as download:
        link.click()
    saved = Path(download.value.path())
    assert download.value.suggested_filename == "odpo-preferences.jsonl" and '"prompt"' in saved.read_text()
    assert link.get_attribute("href").startswith("odpo/export/")  # odpo's route, not Gradio's file serving


def test_the_http_api_says_what_it_waits_for_and_whether_a_trainer_runs(live_app):
    from gradio_client import Client

    c = Client(live_app.url, verbose=False, download_files=False)
    assert c.predict("ivy", api_name="/next_pair") == {"pair": None, "waiting": " ".join(
        status.waiting_message(live_app.sampler.state()))}
    assert c.predict(api_name="/counters")["trainer"] == status.UNKNOWN
    report_up(live_app.db, children=[("serve", "running")])
    assert c.predict(api_name="/counters")["trainer"] == status.DOWN


def test_a_first_run_knows_it_must_convert_the_default_model(common_config, tmp_path):
    from odpo.app.web import needs_conversion

    assert needs_conversion(common_config, ServeConfig())  # the bundled GGUF, an empty model cache
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}", encoding="utf-8")
    assert not needs_conversion(common_config, ServeConfig(model=str(checkpoint)))  # nothing to convert
    assert not needs_conversion(common_config, ServeConfig(model="no/such/model.gguf"))  # the load says why


def test_a_model_that_cannot_load_fails_serve_fast_without_a_web_app(common_config, monkeypatch):
    import odpo.app.web as serve

    def broken(*a, **k):
        raise FileNotFoundError("model path nowhere/model.gguf does not exist")

    monkeypatch.setattr(serve, "load_policy", broken)
    monkeypatch.setattr(serve, "_launch_ui", lambda ctx: pytest.fail("the web app was started"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        serve.run_serve(common_config, ServeConfig(port=ui_fixtures.free_port(), inline_sampler=True))
