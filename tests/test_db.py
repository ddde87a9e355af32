"""The store's contracts: dedupe, LRU sampling, race-free claims, labels, undo, atomic commits."""
from __future__ import annotations

import datetime as dt
import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from odpo.db import store
from odpo.db.engine import Database, DatabaseError
from odpo.db.migrations import migrate, schema_tables
from odpo.db.models import Adapter, Label, Pair
from tests.db_helpers import label_all, make_pairs


def test_migrations_create_schema_once(database):
    assert {"prompts", "samples", "pairs", "labels", "adapters", "train_steps", "evals", "labelers",
            "assignments"} <= schema_tables(database.engine)
    assert migrate(database.engine) == []  # already applied on open


def test_sqlite_pragmas(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    db.close()


@pytest.mark.parametrize("url", ["nosuchdialect://x", "postgresql+psycopg://u:p@127.0.0.1:1/none",
                                 "not a url"])
def test_bad_database_url_is_one_clear_error(url):
    with pytest.raises(DatabaseError) as err:
        Database(url)
    assert "database" in str(err.value) and "\n" not in str(err.value)


def test_sqlite_path_that_is_a_directory(tmp_path):
    with pytest.raises(DatabaseError, match="directory"):
        Database(f"sqlite:///{tmp_path}")


def test_add_prompts_dedupes_by_normalised_text(database):
    with database.sessions.begin() as s:
        r = store.add_prompts(s, prompts=[store.NewPrompt(text="Hello  world"), store.NewPrompt(text="hello world"),
                                          store.NewPrompt(text="other", held_out=True)])
    assert (r.added, r.duplicates, r.held_out) == (2, 1, 1)
    with database.sessions.begin() as s:
        r2 = store.add_prompts(s, prompts=[store.NewPrompt(text="HELLO WORLD ")])
        assert (r2.added, r2.duplicates) == (0, 1)
        assert store.count_prompts(s) == (2, 1)


def test_pick_prompts_is_least_recently_used_and_skips_held_out(database):
    with database.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=f"p{i}", held_out=(i == 0)) for i in range(5)])
    seen = []
    for _ in range(4):
        with database.sessions.begin() as s:
            seen += [p.text for p in store.pick_prompts_for_sampling(s, n=2)]
    assert "p0" not in seen
    assert Counter(seen[:4]) == Counter(["p1", "p2", "p3", "p4"])  # every prompt before any repeat


def test_claim_label_maps_left_right_and_finishes_pair(database):
    [pair_id] = make_pairs(database, 1)
    with database.sessions.begin() as s:
        c = store.claim_next_pair(s, labeler="ann")
        assert c.pair_id == pair_id
        assert (c.left, c.right) == (("A0", "B0") if c.shown_left == "a" else ("B0", "A0"))
        assert store.claim_next_pair(s, labeler="bob") is None  # no overlap by default
        label = store.record_label(s, assignment_id=c.assignment_id, labeler="ann", choice="b", reason="clearer")
    with database.sessions() as s:
        row = s.get(Label, label.id)
        assert (row.choice, row.shown_left, row.labeler, row.reason) == ("b", c.shown_left, "ann", "clearer")
        assert row.shown_at is not None and row.answered_at >= row.shown_at
        assert s.get(Pair, pair_id).status == "labeled"


def test_record_label_refuses_bad_choice_and_foreign_assignment(database):
    make_pairs(database, 1)
    with database.sessions.begin() as s:
        c = store.claim_next_pair(s, labeler="ann")
    with database.sessions.begin() as s:
        with pytest.raises(store.StoreError, match="unknown choice"):
            store.record_label(s, assignment_id=c.assignment_id, labeler="ann", choice="left")
        with pytest.raises(store.StoreError, match="not assigned"):
            store.record_label(s, assignment_id=c.assignment_id, labeler="mallory", choice="a")
    with database.sessions() as s:
        assert s.scalar(select(func.count(Label.id))) == 0


def test_overlap_shows_pair_to_two_labelers_once_each(database):
    make_pairs(database, 1, labels_wanted=2)
    assert len(label_all(database, "ann")) == 1
    assert len(label_all(database, "ann")) == 0
    assert len(label_all(database, "bob")) == 1
    assert len(label_all(database, "cy")) == 0


def test_concurrent_claims_never_share_a_pair(database):
    make_pairs(database, 60)
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        mine = []
        try:
            while True:
                with database.sessions.begin() as s:
                    c = store.claim_next_pair(s, labeler=name)
                if c is None:
                    break
                mine.append(c.pair_id)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)
        got[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    claimed = [pid for ids in got.values() for pid in ids]
    assert len(claimed) == 60 and len(set(claimed)) == 60


def test_expired_claim_returns_to_queue(database):
    make_pairs(database, 1)
    with database.sessions.begin() as s:
        store.claim_next_pair(s, labeler="ann", timeout_s=1)
    with database.sessions.begin() as s:
        assert store.claim_next_pair(s, labeler="bob") is None
        assert store.release_expired(s, now=store_now() + dt.timedelta(seconds=5)) == 1
    with database.sessions.begin() as s:
        assert store.claim_next_pair(s, labeler="bob") is not None


def store_now() -> dt.datetime:
    from odpo.db.models import utcnow

    return utcnow()


def test_undo_reopens_pair_until_consumed(database):
    make_pairs(database, 2)
    [first, *_] = label_all(database, "ann", choice="a")
    with database.sessions.begin() as s:
        last = store.last_undoable_label(s, labeler="ann")
        again = store.undo_label(s, label_id=last.id, labeler="ann")
        assert again.pair_id == s.get(Label, last.id).pair_id
    with database.sessions.begin() as s:
        store.record_label(s, assignment_id=again.assignment_id, labeler="ann", choice="b")
        assert [t.label_id for t in store.unconsumed_labels(s, limit=10)] == [first, last.id + 1]
        store.commit_adapter_version(s, run="default", version=1, path="/x/v1", parent=None, step=1,
                                     label_steps={first: 1}, metrics={})
    with database.sessions.begin() as s:
        with pytest.raises(store.StoreError, match="already trained into v1"):
            store.undo_label(s, label_id=first, labeler="ann")


def test_unconsumed_labels_order_sources_and_human_override(database):
    make_pairs(database, 3)
    human = label_all(database, "ann", choice="b")
    with database.sessions.begin() as s:
        first_pair = s.get(Label, human[0]).pair_id
        store.add_direct_label(s, pair_id=first_pair, labeler="judge:rule:x", choice="a", source="judge:rule:x",
                               confidence=0.9)
        rows = store.unconsumed_labels(s, limit=10)
        assert [r.label_id for r in rows] == human  # judge label on a human pair is not trained
        assert all(r.chosen.startswith("B") and r.rejected.startswith("A") for r in rows)
        assert store.unconsumed_labels(s, limit=10, sources="judge") == []
        assert store.count_unconsumed(s, sources="human") == 3


def test_commit_is_atomic_and_refuses_double_consumption(database):
    make_pairs(database, 2)
    ids = label_all(database, "ann")
    with database.sessions.begin() as s:
        store.commit_adapter_version(s, run="default", version=1, path="/v1", parent=None, step=1,
                                     label_steps={ids[0]: 1}, metrics={"loss": 0.6})
    with pytest.raises(store.StoreError, match="already consumed"):
        with database.sessions.begin() as s:
            store.commit_adapter_version(s, run="default", version=2, path="/v2", parent=1, step=2,
                                         label_steps={ids[0]: 2, ids[1]: 2}, metrics={})
    with database.sessions() as s:
        assert store.latest_adapter(s).version == 1  # the failed commit left no row behind
        assert ids[1] not in store.label_uses(s, run="default")


def test_rollback_releases_labels_and_never_reuses_numbers(database):
    make_pairs(database, 2)
    ids = label_all(database, "ann")
    with database.sessions.begin() as s:
        for v, lid in ((1, ids[0]), (2, ids[1])):
            store.commit_adapter_version(s, run="default", version=v, path=f"/v{v}", parent=v - 1 or None,
                                         step=v, label_steps={lid: v}, metrics={})
    with database.sessions.begin() as s:
        assert store.rollback_to(s, version=1) == 1
    with database.sessions() as s:
        assert store.latest_adapter(s).version == 1
        assert store.next_version_number(s) == 3
        assert [r.label_id for r in store.unconsumed_labels(s, limit=5)] == [ids[1]]
    with database.sessions.begin() as s, pytest.raises(store.StoreError, match="no adapter version"):
        store.rollback_to(s, version=7)


def test_a_rolled_back_version_cannot_come_back(database):
    """v1, v2; back to v1; v3 retrains v2's label. Reviving v2 would train that label twice."""
    make_pairs(database, 2)
    ids = label_all(database, "ann")
    commit = dict(run="default", metrics={})
    with database.sessions.begin() as s:
        store.commit_adapter_version(s, version=1, path="/v1", parent=None, step=1, label_steps={ids[0]: 1}, **commit)
        store.commit_adapter_version(s, version=2, path="/v2", parent=1, step=2, label_steps={ids[1]: 2}, **commit)
    with database.sessions.begin() as s:
        store.rollback_to(s, version=1)
        store.commit_adapter_version(s, version=3, path="/v3", parent=1, step=2, label_steps={ids[1]: 2}, **commit)
    with database.sessions.begin() as s, pytest.raises(store.StoreError, match="v2 was itself rolled back"):
        store.rollback_to(s, version=2)
    with database.sessions.begin() as s:
        assert store.rollback_to(s, version=3) == 0  # the live version: nothing newer to release
    with database.sessions() as s:
        assert store.latest_adapter(s).version == 3 and store.label_uses(s, run="default")[ids[1]][0] == 3
        rolled = dict(s.execute(select(Adapter.version, Adapter.rolled_back)).all())
    assert rolled == {1: False, 2: True, 3: False}
    with database.sessions.begin() as s:
        assert store.rollback_to(s, version=0) == 2  # both labels back to training, every version retired
    with database.sessions() as s:
        assert store.latest_adapter(s) is None
        assert dict(s.execute(select(Adapter.version, Adapter.rolled_back)).all()) == {1: True, 2: True, 3: True}


def test_retire_stale_pairs_keeps_claimed_ones(database):
    make_pairs(database, 2, version=0)
    with database.sessions.begin() as s:
        store.claim_next_pair(s, labeler="ann")
    with database.sessions.begin() as s:
        assert store.retire_stale_pairs(s, current_version=2, max_staleness=1) == 1
        assert store.count_pairs(s, status="retired") == 1


def test_judge_label_on_a_pair_a_person_skipped_is_trained(database):
    make_pairs(database, 1)
    [skip_id] = label_all(database, "ann", choice="skip")
    with database.sessions.begin() as s:
        pair_id = s.get(Label, skip_id).pair_id
        judged = store.add_direct_label(s, pair_id=pair_id, labeler="judge:rule:shorter", choice="b",
                                        source="judge:rule:shorter")
        assert [r.label_id for r in store.unconsumed_labels(s, limit=5)] == [judged.id]
