"""Riding out ordinary faults: which are transient, how each process pauses and goes on, and that
nothing is lost or counted twice when a write's outcome was hidden by the fault."""
from __future__ import annotations

import errno
import logging
import time

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from odpo.app.cli import cli
from odpo.db import store
from odpo.db.errors import StoreError
from odpo.db.models import Label
from odpo.db.transient import Backoff, classify, retry_transient
from odpo.trainer.training.loop import DPOTrainer
from tests.db_helpers import label_all, make_pairs
from tests.model_fixtures import tiny_train_config

torch.set_num_threads(1)


def _db_error(text: str) -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception(text))


# -- the one decision ------------------------------------------------------------------------------

@pytest.mark.parametrize("exc, transient, what", [
    (_db_error("connection to server at \"127.0.0.1\", port 5432 failed: Connection refused"), True, "database"),
    (_db_error("terminating connection due to administrator command"), True, "database"),
    (_db_error("could not serialize access due to concurrent update"), True, "database"),
    (_db_error("database is locked"), True, "database"),
    (_db_error("database or disk is full"), True, "disk"),
    (OSError(errno.ENOSPC, "No space left on device"), True, "disk"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True, "disk"),
    (RuntimeError("Error while serializing: IoError(No space left on device (os error 28))"), True, "disk"),
    (ConnectionRefusedError(111, "Connection refused"), True, "server"),
    (_db_error("connection is bad: connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: No such file "
               "or directory\n\tIs the server running locally and accepting connections on that socket?"),
     True, "database"),
    (_db_error("FATAL: password authentication failed for user \"odpo\""), False, "database"),
    (_db_error("connection is bad: connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  "
               "password authentication failed for user \"odpo\""), False, "database"),
    (_db_error("connection failed: FATAL:  database \"odpo\" does not exist"), False, "database"),
    (StoreError("no pair 7"), False, "error"),
    (FileNotFoundError(2, "No such file or directory", "/models/x.gguf"), False, "error"),
])
def test_transient_or_fatal_is_decided_once(exc, transient, what):
    fault = classify(exc)
    assert (fault.transient, fault.what) == (transient, what)
    assert "\n" not in fault.line and fault.line


def test_classify_follows_wrapped_causes_and_opt_in_exceptions():
    from odpo.trainer.sampling.vllm_client import VllmServerDown

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("writing v3 failed") from inner
    except RuntimeError as outer:
        assert classify(outer).what == "disk"
    assert classify(VllmServerDown("http://127.0.0.1:9/ is down")).transient


def test_backoff_doubles_to_a_cap_with_jitter():
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(8)]
    caps = [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_retry_transient_waits_out_a_fault_in_one_line_each_and_raises_a_fatal_one(caplog):
    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _db_error("connection refused")
        return "done"

    with caplog.at_level(logging.WARNING):
        assert retry_transient(flaky, what="judge", log=logging.getLogger("t"), sleep=slept.append) == "done"
    assert len(slept) == 2 and "Traceback" not in caplog.text
    assert caplog.text.count("judge paused: database unreachable") == 2 and "judge resumed" in caplog.text
    with pytest.raises(OperationalError, match="password"):
        retry_transient(lambda: (_ for _ in ()).throw(_db_error("password authentication failed")),
                        what="x", log=logging.getLogger("t"), sleep=slept.append)


def test_an_unreachable_database_is_one_line_and_exit_status_75():
    """The status `odpo up` restarts a child on without counting it (sysexits EX_TEMPFAIL)."""
    result = CliRunner().invoke(cli, ["--db", "postgresql+psycopg://odpo:pw@127.0.0.1:1/odpo", "status"])
    assert result.exit_code == 75, result.output
    assert result.output.startswith("Error: cannot connect to database") and "pw" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# -- the trainer pauses and goes on ----------------------------------------------------------------

@pytest.fixture
def trainer(database, tmp_path, tiny_model_dir):
    made = []

    def build(**overrides) -> DPOTrainer:
        settings = {"exit_when_idle": None, "max_steps": 1, **overrides}
        t = DPOTrainer(tiny_train_config(tiny_model_dir, **settings), db=database,
                       adapters_dir=tmp_path / "runs" / "default" / "adapters", model_cache_dir=tmp_path / "models")
        t.start()
        t.pause.backoff.first_s = t.pause.backoff.max_s = 0.01  # the test's patience
        made.append(t)
        return t

    yield build
    for t in made:
        t.close()


def _fault(database):
    with database.sessions() as s:
        return store.get_control(s, key=store.TRAIN_FAULT_KEY)


def test_a_full_disk_pauses_training_and_loses_nothing(database, trainer, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    t = trainer()
    make_pairs(database, 4)
    label_all(database, "ann")
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    checks = []

    def nearly_full(path):
        checks.append(path)
        return usage(100 << 20, 99 << 20, (1 << 20) if len(checks) <= 3 else (500 << 20))

    steps = []
    real_step = t.take_step
    monkeypatch.setattr(t, "take_step", lambda *a, **k: (steps.append(1), real_step(*a, **k)))
    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with caplog.at_level(logging.WARNING):
        stats = t.run()
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert caplog.text.count("training paused: disk full: 1 MB free") == 3 and "training resumed" in caplog.text
    assert len(steps) == 2  # the step the full disk refused, and its replay: none while still full
    assert stats.versions == [1] and t.version == 1  # committed once there was room
    assert not list((t.adapters_dir).glob("*.tmp"))
    with database.sessions() as s:
        assert store.count_unconsumed(s, run="default") == 0
        assert len(store.label_uses(s, run="default")) == 4  # each label trained once
    assert _fault(database) == {}  # the pause report is cleared


def test_a_write_that_hits_a_full_disk_leaves_no_tmp_dir_and_replays(database, trainer, monkeypatch, caplog):
    t = trainer()
    make_pairs(database, 4)
    label_all(database, "ann")
    real_save = t.model.save_pretrained
    failures = []

    def disk_full_once(path, *a, **k):
        if not failures:
            failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(path, *a, **k)

    monkeypatch.setattr(t.model, "save_pretrained", disk_full_once)
    with caplog.at_level(logging.WARNING):
        t.run()
    assert failures and "training paused: disk full" in caplog.text
    assert t.version == 1 and not list(t.adapters_dir.glob("*.tmp"))
    with database.sessions() as s:
        assert len(store.label_uses(s, run="default")) == 4


def test_a_database_outage_pauses_training_and_it_resumes(database, trainer, monkeypatch, caplog):
    t = trainer()
    make_pairs(database, 4)
    label_all(database, "ann")
    real = store.unconsumed_labels
    outage = [3]

    def down(*a, **k):
        if outage[0]:
            outage[0] -= 1
            raise _db_error("connection to server failed: Connection refused")
        return real(*a, **k)

    monkeypatch.setattr(store, "unconsumed_labels", down)
    with caplog.at_level(logging.WARNING):
        t.run()
    assert caplog.text.count("training paused: database unreachable") == 3 and "Traceback" not in caplog.text
    assert t.version == 1


def test_a_commit_whose_outcome_the_outage_hid_is_found_committed_once(database, trainer, monkeypatch):
    """The commit's transaction went through, then the connection dropped before the trainer heard
    back: the trainer pauses, follows the head (its own version) and never trains those labels again."""
    t = trainer(max_steps=2)
    make_pairs(database, 8)
    label_all(database, "ann")
    real = t._commit_row
    hidden = []

    def committed_then_lost(**kwargs):
        real(**kwargs)
        if not hidden:
            hidden.append(kwargs["version"])
            raise _db_error("server closed the connection unexpectedly")

    monkeypatch.setattr(t, "_commit_row", committed_then_lost)
    t.run()
    assert hidden == [1] and (t.adapters_dir / "v1").is_dir()  # kept: its row exists
    with database.sessions() as s:
        uses = store.label_uses(s, run="default")
        versions = [a.version for a in store.list_versions(s, run="default")]
    assert versions == [1, 2] and len(uses) == 8 and sorted({v for v, _ in uses.values()}) == [1, 2]


def test_a_commit_the_outage_refused_leaves_no_version_directory_behind(database, trainer, monkeypatch):
    """The commit's transaction never happened: after the pause the head is still v0, so the written
    v1/ goes at once (a stop before the replay must not leave a directory without a row)."""
    t = trainer(max_steps=1)
    make_pairs(database, 4)
    label_all(database, "ann")
    real, refused, seen = t._commit_row, [], []

    def refused_once(**kwargs):
        if not refused:
            refused.append(kwargs["version"])
            raise _db_error("server closed the connection unexpectedly")
        seen.append((t.adapters_dir / "v1").is_dir())  # the replay wrote v1/ afresh
        real(**kwargs)

    real_after = t._after_fault

    def after_fault():
        real_after()
        seen.append((t.adapters_dir / "v1").exists())

    monkeypatch.setattr(t, "_commit_row", refused_once)
    monkeypatch.setattr(t, "_after_fault", after_fault)
    t.run()
    assert refused == [1] and seen == [False, True] and t.version == 1
    with database.sessions() as s:
        assert len(store.label_uses(s, run="default")) == 4


# -- the web app: a vote is acknowledged only when committed ---------------------------------------

def test_a_vote_the_database_refused_is_not_recorded_and_says_so(database, monkeypatch):
    from odpo.app.config import ServeConfig
    from odpo.app.services.labeling import LabelService
    from odpo.app.ui.shared import outage_message

    make_pairs(database, 2)
    svc = LabelService(db=database, config=ServeConfig())
    view = svc.next_pair(labeler="ann")
    real = store.record_label

    def down(*a, **k):
        raise _db_error("terminating connection due to administrator command")

    monkeypatch.setattr(store, "record_label", down)
    with pytest.raises(OperationalError) as err:
        svc.vote(labeler="ann", assignment_id=view.assignment_id, side="left")
    assert outage_message(err.value) == ("The database is unreachable: your vote was not recorded. "
                                         "Try again in a moment.")
    monkeypatch.setattr(store, "record_label", real)
    with database.sessions() as s:
        assert s.scalars(select(Label)).all() == []  # nothing half-written
    assert svc.vote(labeler="ann", assignment_id=view.assignment_id, side="left").label_id  # the retry counts


def test_a_vote_committed_before_the_connection_dropped_counts_once(database, monkeypatch):
    from odpo.app.config import ServeConfig
    from odpo.app.services.labeling import LabelService
    from odpo.db.store.labels import AlreadyAnswered

    make_pairs(database, 2)
    svc = LabelService(db=database, config=ServeConfig())
    view = svc.next_pair(labeler="ann")
    real_begin = database.writes.begin
    lost = []

    class LostAck:
        def __init__(self):
            self.inner = real_begin()

        def __enter__(self):
            return self.inner.__enter__()

        def __exit__(self, *exc):
            out = self.inner.__exit__(*exc)
            if exc[0] is None and not lost:
                lost.append(1)
                raise _db_error("server closed the connection unexpectedly")
            return out

    monkeypatch.setattr(database.writes, "begin", LostAck)
    with pytest.raises(OperationalError):
        svc.vote(labeler="ann", assignment_id=view.assignment_id, side="left")
    monkeypatch.setattr(database.writes, "begin", real_begin)
    with pytest.raises(AlreadyAnswered):  # the person's retry: one conditional write, it happened once
        svc.vote(labeler="ann", assignment_id=view.assignment_id, side="left")
    with database.sessions() as s:
        assert len(s.scalars(select(Label)).all()) == 1


def test_status_shows_the_free_space_of_the_data_disk_and_why_training_paused(common_config):
    args = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "status"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and " MB free in " in result.output
    assert "trainer: unknown: no trainer seen" in result.output
    db = common_config.open_db()
    with db.sessions.begin() as s:
        line = "disk full: 12 MB free in /x, a version needs about 78 MB; retrying in 8 s"
        store.set_control(s, key=store.TRAIN_FAULT_KEY, value={"line": line, "retry_at": time.time() + 8})
    db.close()
    result = CliRunner().invoke(cli, args)
    assert "trainer: paused: disk full: 12 MB free in /x, a version needs about 78 MB; retrying in 8 s" in result.output


def test_a_worker_loop_waits_out_a_transient_fault_in_one_line_and_logs_a_bug_with_its_traceback(caplog):
    """The sampler's and reload watcher's loops (wait_after): an outage is a warning line with a
    growing delay; anything else is a bug, logged with its traceback and retried after a fixed wait."""
    from odpo.db.transient import wait_after

    backoff, log = Backoff(first_s=2.0, max_s=8.0), logging.getLogger("odpo.t")
    with caplog.at_level(logging.WARNING):
        first, shown = wait_after(_db_error("connection refused"), what="sampling", log=log, backoff=backoff,
                                  fixed_s=5.0)
        second, _ = wait_after(_db_error("connection refused"), what="sampling", log=log, backoff=backoff,
                               fixed_s=5.0)
    assert 1.0 <= first <= 2.0 and 2.0 <= second <= 4.0 and "retrying in" in shown
    assert caplog.text.count("sampling paused: database unreachable") == 2 and "Traceback" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        try:
            raise KeyError("a bug")
        except KeyError as bug:
            delay, shown = wait_after(bug, what="sampling", log=log, backoff=backoff, fixed_s=5.0)
    assert delay == 5.0 and shown.startswith("KeyError") and "Traceback" in caplog.text


def test_the_page_says_an_outage_in_one_line_and_a_timer_stays_quiet(monkeypatch):
    from odpo.app.ui import shared

    shown = []
    monkeypatch.setattr(shared.gr, "Warning", shown.append)

    def vote():
        raise _db_error("connection refused")

    shared.guarded(outputs=1)(vote)()  # raises nothing: the browser never sees a traceback
    assert shown == ["The database is unreachable: your vote was not recorded. Try again in a moment."]
    shared.guarded(outputs=1, ticking=True)(vote)()
    assert len(shown) == 1  # a timer says nothing through an outage: the next vote will
    shared.guarded(outputs=1, ticking=True)(lambda: (_ for _ in ()).throw(KeyError("bug")))()
    assert shown[-1] == shared.INTERNAL_ERROR


def test_the_dashboard_and_the_label_chip_say_why_training_paused_and_the_disk_space(database, tmp_path):
    """The trainer's pause report (a control row) is what the dashboard's trainer line and the label
    page's chip show, while it is fresh; the dashboard also shows the data disk's free space."""
    import time

    from odpo.app.services.status import PAUSED, trainer_state, update_chip
    from odpo.app.ui.dashboard import state_markdown
    from tests.test_admin_service import admin_service

    line = "disk full: 12 MB free in /data/runs/default/adapters, a version needs about 80 MB"
    with database.sessions.begin() as s:
        store.set_control(s, key=store.TRAIN_FAULT_KEY, value={"what": "disk", "line": line,
                                                               "retry_at": time.time() + 8, "at": time.time()})
    with database.sessions() as s:
        state = trainer_state(s, run="default")
        stale = trainer_state(s, run="default", now=time.time() + 3600)  # a report from a trainer long gone
    assert state.state == PAUSED and state.detail == f"training paused: {line}" and stale.state != PAUSED
    assert update_chip(until_update=3, paused=False, trainer=state) == f"training paused: {line}"
    admin = admin_service(database)
    admin.data_dir = tmp_path
    markdown = state_markdown(admin.dashboard())
    assert f"**training paused: {line}**" in markdown.splitlines()[0]
    assert " MB free on the data disk; " in markdown
