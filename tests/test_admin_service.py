"""users.toml auth, admin actions and dashboard data, without a browser."""
from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import select

from odpo.app.config import ServeConfig
from odpo.app.services.accounts import AuthFileError, load_auth, load_users, resolve_auth_file
from odpo.app.services.admin import AdminError, AdminService, NotAdminError
from odpo.app.services.labeling import LabelService
from odpo.app.ui.dashboard import dashboard_outputs, state_markdown
from odpo.db import store
from odpo.db.models import Eval, Label, Pair
from tests.db_helpers import label_all, make_pairs
from tests.ui_fixtures import FakeSampler, write_users


def admin_service(database, auth=None) -> AdminService:
    cfg = ServeConfig()
    return AdminService(db=database, config=cfg, labels=LabelService(db=database, config=cfg), auth=auth)


def test_users_file(tmp_path):
    path = write_users(tmp_path / "users.toml", {"alice": ("pw", True), "bob": ("secret", False)})
    auth = load_auth(path)
    assert auth.verify("alice", "pw") and auth.verify("bob", "secret")
    assert not auth.verify("alice", "PW") and not auth.verify("carol", "pw") and not auth.verify("bob", "")
    assert auth.admins == {"alice"} and not auth.is_admin("bob")
    assert "pw" not in path.read_text() and "secret" not in path.read_text()  # salted hashes only


HASH = "scrypt$1024$8$1$c2FsdHNhbHRzYWx0$" + "A" * 43 + "="


@pytest.mark.parametrize("content,message", [
    ("", "at least one"),
    ('[[users]]\nname = "a"\n', "missing 'password_hash'"),
    ('[[users]]\nname = "a"\npassword = "x"\n', "plain passwords are not accepted; `odpo users rehash"),
    ('[[users]]\nname = "a"\npassword_sha256 = "00"\n', "unsalted password_sha256 is not accepted"),
    ('[[users]]\nname = "a"\npassword_hash = "xyz"\n', "bad password_hash"),
    (f'[[users]]\nname = "judge:x"\npassword_hash = "{HASH}"\n', "reserved"),
    (f'[[users]]\nname = "dataset:x"\npassword_hash = "{HASH}"\n', "reserved"),
    (f'[[users]]\nname = "a"\npassword_hash = "{HASH}"\nadmin = "yes"\n', "true or false"),
    (f'[[users]]\nname = "a"\npassword_hash = "{HASH}"\n[[users]]\nname = "a"\npassword_hash = "{HASH}"\n',
     "twice"),
    ("users = [", "not valid TOML"),
])
def test_bad_users_file_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "users.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AuthFileError, match=re.escape(message)) as err:
        load_users(path)
    assert "\n" not in str(err.value)


def test_auth_file_resolution(tmp_path):
    assert resolve_auth_file(None, environ={}) is None
    assert resolve_auth_file(None, environ={"ODPO_AUTH_FILE": str(tmp_path / "u.toml")}) == tmp_path / "u.toml"
    assert resolve_auth_file(tmp_path / "cli.toml", environ={"ODPO_AUTH_FILE": "env.toml"}) == tmp_path / "cli.toml"
    assert resolve_auth_file(None, data_dir=tmp_path, environ={}) is None  # no users.toml there yet
    (tmp_path / "users.toml").write_text("")
    assert resolve_auth_file(None, data_dir=tmp_path, environ={}) == tmp_path / "users.toml"
    with pytest.raises(AuthFileError, match="does not exist"):
        load_auth(tmp_path / "missing.toml")

def test_admin_actions_need_an_admin_when_auth_is_on(database, tmp_path):
    auth = load_auth(write_users(tmp_path / "u.toml", {"alice": ("a", True), "bob": ("b", False)}))
    svc = admin_service(database, auth)
    for call in (lambda u: svc.set_paused(username=u, paused=True), lambda u: svc.retire_queue(username=u),
                 lambda u: svc.rollback(username=u, version=0)):
        with pytest.raises(NotAdminError):
            call("bob")
        with pytest.raises(NotAdminError):
            call(None)
    assert not svc.is_paused()
    svc.set_paused(username="alice", paused=True)
    assert svc.is_paused()
    assert admin_service(database).is_admin(None)  # auth off: the local user is the admin


def test_import_prompts_upload(database):
    svc = admin_service(database)
    res = svc.import_prompts(username=None, data=b'{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "One"}\n',
                             filename="/tmp/x/prompts.jsonl", held_out_fraction=0.0)
    assert (res.added, res.duplicates) == (2, 1)
    with pytest.raises(AdminError, match="prompts.jsonl, line 2") as err:
        svc.import_prompts(username=None, data=b'{"prompt": "ok"}\n{"nope": 1}\n', filename="prompts.jsonl")
    assert "\n" not in str(err.value)
    with database.sessions() as s:
        assert store.count_prompts(s)[0] == 2  # the bad file added nothing


def _commit_version(database, version: int, parent: int) -> None:
    with database.sessions.begin() as s:
        ids = [lb.label_id for lb in store.unconsumed_labels(s, limit=100)]
        store.commit_adapter_version(s, run="default", version=version, path=f"/x/v{version}", parent=parent,
                                     step=version, label_steps={i: version for i in ids}, metrics={})


def test_rollback_and_retire(database):
    svc = admin_service(database)
    make_pairs(database, 2)
    label_all(database, "ann")
    _commit_version(database, 1, 0)
    make_pairs(database, 3, version=1)
    res = svc.rollback(username=None, version=0)
    assert res == {"version": 0, "released_labels": 2, "retired_pairs": 3}
    assert [v["rolled_back"] for v in svc.versions()] == [True]
    with pytest.raises(store.StoreError, match="no adapter version v9"):
        svc.rollback(username=None, version=9)
    make_pairs(database, 2, version=2)
    assert svc.retire_queue(username=None) == 2
    with database.sessions() as s:
        assert store.count_pairs(s, status="queued") == 0


def test_export_download_and_its_guard(database, tmp_path, monkeypatch):
    svc = admin_service(database)
    make_pairs(database, 3)
    label_all(database, "ann", "b")
    if svc.export_available():  # trainer/export/exporters.py is there: the admin download works end to end
        path = svc.export(username=None, fmt="jsonl", out_dir=tmp_path / "x")
        assert path.suffix == ".jsonl" and len(path.read_text(encoding="utf-8").splitlines()) == 3
    monkeypatch.setattr(AdminService, "export_available", lambda self: False)
    with pytest.raises(AdminError, match="not available"):
        svc.export(username=None, fmt="jsonl", out_dir=tmp_path)


def test_dashboard_data(database):
    make_pairs(database, 4)
    label_all(database, "ann", "a")
    with database.sessions.begin() as s:
        pair_ids = list(s.scalars(select(Pair.id).order_by(Pair.id)))
        for i, pid in enumerate(pair_ids):  # the judge agrees on 3 of 4
            store.add_direct_label(s, pair_id=pid, labeler="judge:rule:x", choice="a" if i else "b",
                                   source="judge:rule:x", confidence=0.8)
        for row in s.scalars(select(Label).where(Label.source == "human")):
            row.shown_at = row.answered_at - dt.timedelta(seconds=4)
        store.record_train_step(s, run="default", step=1, version=1, label_ids=[1, 2],
                                metrics={"loss": 0.69, "reward_accuracy": 0.5, "reward_margin": 0.01,
                                         "version_lag": 0.0})
        s.add(Eval(version_a=1, version_b=0, judge="rule:x", n=10, wins=6, losses=4, win_rate=0.6, ci_low=0.3,
                   ci_high=0.85))
    data = admin_service(database).dashboard()
    assert data["agreement"] == [{"judge": "judge:rule:x", "n": 4, "agree": 3, "rate": 0.75}]
    assert data["labelers"][0]["labeler"] == "ann" and data["labelers"][0]["labels"] == 4
    assert data["labelers"][0]["median_seconds"] == pytest.approx(4.0, abs=0.01)
    assert sum(r["labels"] for r in data["labels_per_hour"] if r["source"] == "human") == 4
    md, loss, acc, margin, lag, win, hours, labelers, agreement = dashboard_outputs(data)
    assert list(loss["loss"]) == [0.69] and list(win["win_rate"]) == [0.6] and len(agreement) == 1
    assert "no training step" not in md and "loss 0.6900" in md


def test_state_markdown_escapes_other_processes_text(database):
    data = admin_service(database).dashboard()
    data["sampler"] = {**FakeSampler(database).state(), "last_error": "<img src=x onerror=alert(1)>"}
    md = state_markdown(data)
    assert "<img" not in md and "&lt;img" in md and "serving v0" in md


def test_the_dashboard_shows_an_iterative_trainers_round(database):
    admin = admin_service(database)
    assert "round" not in state_markdown(admin.dashboard())  # online: no rounds to show
    with database.sessions.begin() as s:
        store.set_control(s, key="train.progress", value={"mode": "iterative", "round": 3, "labels": 17,
                                                          "needed": 32, "training": False, "run": "default"})
    assert "; round 3: 17/32 labels" in state_markdown(admin.dashboard()).splitlines()[0]


def test_the_dashboard_says_no_trainer_was_seen_rather_than_running(database):
    admin = admin_service(database)
    first = state_markdown(admin.dashboard()).splitlines()[0]
    assert first.startswith("**Trainer** — not seen lately;") and "running" not in first
    admin.set_paused(username=None, paused=True)
    assert state_markdown(admin.dashboard()).startswith("**Trainer** — **paused**;")
