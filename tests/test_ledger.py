"""The race-free, per-run ledger (issue 10, findings 1-3), on SQLite and PostgreSQL.

1. Simultaneous votes on one claim (threads, and processes on SQLite) give one label and one
   "already answered"; two clients of one labeler never both hold (and answer) one claim.
2. A rollback that lands between the trainer's parent check and its commit makes the commit
   refused (HeadMoved); the trainer reloads the head and replays. Commits and rollbacks racing
   leave one consistent line; an undo racing a commit for one label: exactly one of them wins.
3. Runs sharing one database each train every label once; a rollback releases only its own run's.

Every outcome asserted here is independent of how the scheduler interleaves the threads.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import threading
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select

from odpo.app.config import ServeConfig
from odpo.app.services.labeling import LabelService
from odpo.app.ui.slots import LabelSlots, SlotBook
from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError
from odpo.db.models import Adapter, Label, LabelUse, TrainStep
from tests.concurrency import run_in_threads
from tests.db_helpers import label_all, make_pairs

# The trainer tests import torch and the model code inside the fixture, so the processes that
# test_two_processes_voting_on_one_claim_give_one_label spawns (they import this module) start fast.


def service(database) -> LabelService:
    return LabelService(db=database, config=ServeConfig())


def labels_per_pair(database) -> Counter:
    with database.sessions() as s:
        return Counter(s.scalars(select(Label.pair_id).where(Label.undone.is_(False))))


def outcome(exc: BaseException | None) -> str:
    """'ok', 'already answered', 'moved' or the unexpected error's text."""
    if exc is None:
        return "ok"
    if isinstance(exc, store.AlreadyAnswered):
        return "already answered"
    if isinstance(exc, store.ClaimMoved):
        return "moved"
    return f"{type(exc).__name__}: {exc}"


# --- 1. votes ------------------------------------------------------------------------------------


def test_simultaneous_votes_on_one_claim_give_one_label(database):
    """20 claims, 4 threads voting on each at once (a double click, a retried request, two tabs)."""
    rounds, voters = 20, 4
    make_pairs(database, rounds)
    svc = service(database)
    results: list[str] = []
    for _ in range(rounds):
        view = svc.current_pair(labeler="ann")
        start = threading.Barrier(voters, timeout=30)

        def vote(side: str, view=view, start=start) -> None:
            start.wait()
            try:
                svc.vote(labeler="ann", assignment_id=view.assignment_id, side=side)
                results.append("ok")
            except OdpoError as exc:
                results.append(outcome(exc))

        assert run_in_threads(vote, ["left", "right", "tie", "left"][:voters], timeout=60) == []
    counts = Counter(results)
    assert counts == {"ok": rounds, "already answered": rounds * (voters - 1)}, counts
    per_pair = labels_per_pair(database)
    assert len(per_pair) == rounds and set(per_pair.values()) == {1}


def _vote_in_process(url: str, assignment_ids: list[int], side: str, barrier: Any, out: Any) -> None:
    """One of two processes voting on the same claims at the same moments (spawned: no shared state)."""
    db = Database(url)
    svc = LabelService(db=db, config=ServeConfig())
    try:
        for aid in assignment_ids:
            barrier.wait(60)
            try:
                svc.vote(labeler="ann", assignment_id=aid, side=side)
                out.put("ok")
            except OdpoError as exc:
                out.put(outcome(exc))
    finally:
        db.close()


def test_two_processes_voting_on_one_claim_give_one_label(db_url, database):
    """SQLite's locks are per process: the same race between two processes, 10 claims."""
    if not db_url.startswith("sqlite"):
        pytest.skip("the thread test covers a server database; processes matter for SQLite's file locks")
    make_pairs(database, 10)
    svc = service(database)
    ids = []
    for _ in range(10):  # ten open claims held by one client, voted on by two processes
        ids.append(svc.next_pair(labeler="ann", exclude=ids).assignment_id)
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_vote_in_process, args=(db_url, ids, side, barrier, out)) for side in ("left", "right")]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in range(20)]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert Counter(results) == {"ok": 10, "already answered": 10}
    assert set(labels_per_pair(database).values()) == {1} and sum(labels_per_pair(database).values()) == 10


def test_an_undo_reopens_the_claim_once(database):
    """Two undos of one vote at once: one reopens it, the other finds nothing; then one new vote."""
    make_pairs(database, 3)
    svc = service(database)
    view = svc.current_pair(labeler="ann")
    svc.vote(labeler="ann", assignment_id=view.assignment_id, side="left")
    start = threading.Barrier(2, timeout=30)
    results: list[str] = []

    def undo(_name: str) -> None:
        start.wait()
        try:
            results.append(f"pair {svc.undo(labeler='ann').pair_id}")
        except OdpoError as exc:
            results.append(str(exc))

    assert run_in_threads(undo, ["a", "b"], timeout=60) == []
    assert sorted(r.split(":")[0] for r in results) == ["nothing to undo", f"pair {view.pair_id}"], results
    with database.sessions() as s:
        assert s.scalar(select(func.count(Label.id)).where(Label.undone.is_(False))) == 0
    svc.vote(labeler="ann", assignment_id=view.assignment_id, side="right")
    assert labels_per_pair(database) == {view.pair_id: 1}


# --- 1b. two clients of one labeler ------------------------------------------------------------------


def test_a_claim_shown_to_another_client_moves_there(database):
    """A second client (a reloaded page, a restarted script) gets the open pair back; the first
    one's vote on it is refused from then on, so the pair is answered once."""
    make_pairs(database, 3)
    svc = service(database)
    first = svc.current_pair(labeler="ann", client="tab-1")
    second = svc.current_pair(labeler="ann", client="tab-2")
    assert (second.assignment_id, second.left) == (first.assignment_id, first.left)  # the same pair, same sides
    with pytest.raises(store.ClaimMoved, match="another window or client"):
        svc.vote(labeler="ann", assignment_id=first.assignment_id, side="left", client="tab-1")
    svc.vote(labeler="ann", assignment_id=second.assignment_id, side="right", client="tab-2")
    with pytest.raises(store.AlreadyAnswered):
        svc.vote(labeler="ann", assignment_id=first.assignment_id, side="left", client="tab-1")
    assert labels_per_pair(database) == {first.pair_id: 1}


def test_two_clients_of_one_name_never_answer_one_claim(database):
    """Two scripts sharing a name, each asking for its pair and voting 25 times at once."""
    make_pairs(database, 60)
    svc = service(database)
    results: list[tuple[str, int, str]] = []
    start = threading.Barrier(2, timeout=30)

    def client(name: str) -> None:
        start.wait()
        for _ in range(25):
            view = svc.current_pair(labeler="ann", client=name)
            try:
                svc.vote(labeler="ann", assignment_id=view.assignment_id, side="left", client=name)
                results.append((name, view.assignment_id, "ok"))
            except OdpoError as exc:
                results.append((name, view.assignment_id, outcome(exc)))

    assert run_in_threads(client, ["script-1", "script-2"], timeout=120) == []
    accepted = [aid for _, aid, what in results if what == "ok"]
    assert len(accepted) == len(set(accepted)), "one claim answered by two clients"
    assert {what for *_, what in results} <= {"ok", "moved", "already answered"}
    per_pair = labels_per_pair(database)
    assert set(per_pair.values()) == {1} and sum(per_pair.values()) == len(accepted)


def test_two_pages_of_one_name_settle_on_different_pairs(database):
    """A second tab takes the first tab's two pairs; the first one notices on its next tick and
    labels new pairs; from then on both vote in parallel without refusing each other."""
    make_pairs(database, 50)
    slots, book = LabelSlots(service(database)), SlotBook()
    one, two = book.get("session-1"), book.get("session-2")
    slots.open(one, labeler="ann")
    taken = set(one.ids)
    slots.open(two, labeler="ann")
    assert set(two.ids) == taken  # a reload gets its pairs back
    with pytest.raises(store.ClaimMoved):
        slots.vote(one, labeler="ann", side="left", reason=None)
    slots.refresh(one, labeler="ann")
    assert not set(one.ids) & taken and None not in one.ids
    start = threading.Barrier(2, timeout=30)

    def page(key: str) -> None:
        st = book.get(key)
        start.wait()
        for _ in range(20):
            slots.vote(st, labeler="ann", side="right", reason=None)

    assert run_in_threads(page, ["session-1", "session-2"], timeout=120) == []
    per_pair = labels_per_pair(database)
    assert sum(per_pair.values()) == 40 and set(per_pair.values()) == {1}


# --- 2. commits against rollbacks ------------------------------------------------------------------


def commit(database, *, run: str, version: int, parent: int, label_ids=()) -> Adapter:
    with database.writes.begin() as s:
        return store.commit_adapter_version(s, run=run, version=version, path=f"/{run}/v{version}", parent=parent,
                                            step=version, label_steps={i: version for i in label_ids}, metrics={})


def test_a_commit_on_a_parent_that_is_no_longer_the_head_is_refused(database):
    make_pairs(database, 3)
    ids = label_all(database, "ann")
    commit(database, run="default", version=1, parent=0, label_ids=ids[:1])
    commit(database, run="default", version=2, parent=1, label_ids=ids[1:2])
    with database.writes.begin() as s:
        store.rollback_to(s, version=1)
    with pytest.raises(store.HeadMoved, match="at v1 now, not v2"):
        commit(database, run="default", version=3, parent=2, label_ids=ids[2:])
    with database.sessions() as s:
        assert store.run_head(s) == 1 and store.get_adapter(s, version=3) is None
        assert store.label_uses(s) == {ids[0]: (1, 1)}  # the refused commit wrote nothing
    commit(database, run="default", version=3, parent=1, label_ids=ids[1:])


def test_commits_and_rollbacks_racing_leave_one_consistent_line(database):
    """10 rounds of: commit vN on the head, then at once a rollback to the base and a commit of
    vN+1 on vN. Whichever comes second is refused (HeadMoved) or builds on the first's result;
    never a live version on top of a rolled-back one, never a released label left in the ledger."""
    make_pairs(database, 6)
    label_all(database, "ann")
    outcomes: Counter = Counter()
    for _ in range(10):
        with database.sessions() as s:
            n = store.next_version_number(s)
            free = [t.label_id for t in store.unconsumed_labels(s, limit=100)]
        commit(database, run="default", version=n, parent=store_head(database), label_ids=free[:2])
        start = threading.Barrier(2, timeout=30)

        def act(what: str, n=n, free=free[2:], start=start) -> None:
            start.wait()
            try:
                with database.writes.begin() as s:
                    if what == "rollback":
                        store.rollback_to(s, version=0)
                    else:
                        store.commit_adapter_version(s, run="default", version=n + 1, path=f"/v{n + 1}", parent=n,
                                                     step=n + 1, label_steps=dict.fromkeys(free, n + 1), metrics={})
                outcomes[what] += 1
            except store.HeadMoved:
                outcomes[f"{what} refused"] += 1

        assert run_in_threads(act, ["rollback", "commit"], timeout=60) == []
        assert_line_consistent(database, "default")
    assert outcomes["rollback"] + outcomes["rollback refused"] == 10
    assert outcomes["commit"] + outcomes["commit refused"] == 10


def store_head(database, run: str = "default") -> int:
    with database.sessions() as s:
        return store.run_head(s, run=run)


def assert_line_consistent(database, run: str) -> None:
    """The head is the newest live version, each live version's parent is live (or the base), and
    the ledger holds only labels of live versions."""
    with database.sessions() as s:
        rows = {a.version: a for a in store.list_versions(s, run=run)}
        live = {v for v, a in rows.items() if not a.rolled_back}
        assert store.run_head(s, run=run) == max(live, default=0)
        assert all((rows[v].parent or 0) in live | {0} for v in live), rows
        assert {v for v, _ in store.label_uses(s, run=run).values()} <= live | {0}
        uses = Counter(s.scalars(select(LabelUse.label_id)))
        assert {lb.id: lb.uses for lb in s.scalars(select(Label))} == {i: uses.get(i, 0) for i in
                                                                         s.scalars(select(Label.id))}


def test_an_undo_and_a_commit_racing_for_one_label_never_both_win(database):
    """10 labels, each undone by its labeler while a version consuming it commits: either the undo
    is refused ('too late') or the commit is (LabelsRetracted); never a trained, undone vote."""
    make_pairs(database, 10)
    label_all(database, "ann")
    wins: Counter = Counter()
    for version in range(1, 11):
        with database.sessions() as s:
            label = store.last_undoable_label(s, labeler="ann")
        start = threading.Barrier(2, timeout=30)

        def act(what: str, lid=label.id, version=version, start=start) -> None:
            start.wait()
            try:
                with database.writes.begin() as s:
                    if what == "undo":
                        store.undo_label(s, label_id=lid, labeler="ann")
                    else:
                        store.commit_adapter_version(s, run="default", version=version, path=f"/v{version}",
                                                     parent=store.run_head(s), step=version,
                                                     label_steps={lid: version}, metrics={})
                wins[what] += 1
            except (store.LabelsRetracted, store.HeadMoved):
                pass
            except store.StoreError as exc:
                assert "too late to undo" in str(exc), exc

        assert run_in_threads(act, ["undo", "commit"], timeout=60) == []
    assert wins["undo"] + wins["commit"] == 10, wins
    with database.sessions() as s:
        trained_undone = s.scalar(select(func.count()).select_from(LabelUse).join(Label, Label.id == LabelUse.label_id)
                                  .where(Label.undone.is_(True)))
    assert trained_undone == 0
    assert_line_consistent(database, "default")


# --- 2b and 3. the trainer --------------------------------------------------------------------------


@pytest.fixture
def trainer_for(database, tmp_path, tiny_model_dir):
    """trainer_for(run, **config) -> a started DPOTrainer on `run`, closed after the test."""
    from odpo.trainer.training.loop import DPOTrainer
    from tests.test_train_loop import _config

    trainers: list[DPOTrainer] = []

    def build(run: str = "default", **overrides) -> DPOTrainer:
        trainer = DPOTrainer(_config(tiny_model_dir, run=run, **overrides), db=database,
                             adapters_dir=tmp_path / "runs" / run / "adapters", model_cache_dir=tmp_path / "models")
        trainer.start()
        trainers.append(trainer)
        return trainer

    yield build
    for trainer in trainers:
        trainer.close()


def steps_of_live_versions(database, run: str) -> dict[int, tuple[int, int]]:
    """label id -> (version, step) from the committed steps of `run`'s live versions."""
    with database.sessions() as s:
        live = {a.version for a in store.list_versions(s, run=run) if not a.rolled_back}
        steps = s.scalars(select(TrainStep).where(TrainStep.run == run, TrainStep.committed.is_(True))).all()
    return {lid: (st.version, st.step) for st in steps if st.version in live for lid in st.label_ids}


def test_a_rollback_before_the_commit_makes_the_trainer_replay(trainer_for, database, monkeypatch, one_torch_thread):
    """v1, v2 committed; while v3 trains on v2, an admin rolls back to v1. The commit of v3 must be
    refused (it would put v2's labels, released by the rollback, into the weights twice) and the
    trainer must go on from v1, retraining v2's labels and v3's once each."""
    make_pairs(database, 12)
    ids = label_all(database, "alice")
    trainer = trainer_for(max_steps=2)
    assert trainer.run().versions == [1, 2]
    real = store.commit_adapter_version
    refused: list[int] = []

    def rollback_first(session, **kwargs):
        if not refused:  # the admin's rollback lands after the trainer chose its parent (v2)
            refused.append(kwargs["version"])
            with database.writes.begin() as other:
                assert store.rollback_to(other, version=1) == 4
        return real(session, **kwargs)

    monkeypatch.setattr(store, "commit_adapter_version", rollback_first)
    trainer.cfg = dataclasses.replace(trainer.cfg, max_steps=None)  # now: train until idle
    new = trainer.run().versions[2:]
    assert refused == [3] and trainer.version == new[-1]
    with database.sessions() as s:
        rows = {a.version: a for a in store.list_versions(s)}
        uses = store.label_uses(s)
    assert rows[3].parent != 2, "v3 was committed on the rolled-back v2"
    assert rows[2].rolled_back and all(not rows[v].rolled_back for v in new)
    assert [rows[v].parent for v in new] == [1, *new[:-1]]  # one line on from v1
    assert sorted(uses) == sorted(ids) and uses == steps_of_live_versions(database, "default")
    assert_line_consistent(database, "default")


def test_two_runs_on_one_database_each_train_every_label_once(trainer_for, database, one_torch_thread):
    """Two trainers, runs "a" and "b", on the same 12 labels at the same time: each run trains each
    label once, neither dies at a commit; rolling back "a" leaves "b" alone."""
    make_pairs(database, 12)
    ids = label_all(database, "alice")
    trainers = {run: trainer_for(run) for run in ("a", "b")}
    start = threading.Barrier(2, timeout=60)
    stats: dict[str, Any] = {}

    def train(run: str) -> None:
        start.wait()
        stats[run] = trainers[run].run()

    assert run_in_threads(train, ["a", "b"], timeout=300) == []
    for run in ("a", "b"):
        assert stats[run].versions == [1, 2, 3] and stats[run].exit_reason == "idle"
        with database.sessions() as s:
            uses = store.label_uses(s, run=run)
            assert store.count_unconsumed(s, run=run) == 0
            assert store.status_counts(s, run=run)["trained_labels"] == 12
        assert sorted(uses) == sorted(ids) and uses == steps_of_live_versions(database, run)
    with database.writes.begin() as s:
        assert store.rollback_to(s, version=1, run="a") == 8
    with database.sessions() as s:
        assert len(store.label_uses(s, run="a")) == 4 and store.count_unconsumed(s, run="a") == 8
        assert store.label_uses(s, run="b") == steps_of_live_versions(database, "b")
        assert store.count_unconsumed(s, run="b") == 0 and store.status_counts(s, run="b")["unconsumed_trainable"] == 0
    for run in ("a", "b"):
        assert_line_consistent(database, run)


def test_rollback_of_one_run_releases_only_its_own_labels(database):
    make_pairs(database, 4)
    ids = label_all(database, "ann")
    for run in ("a", "b"):
        commit(database, run=run, version=1, parent=0, label_ids=ids[:2])
        commit(database, run=run, version=2, parent=1, label_ids=ids[2:])
    with database.writes.begin() as s:
        assert store.rollback_to(s, version=0, run="a") == 4
    with database.sessions() as s:
        assert store.label_uses(s, run="a") == {} and store.run_head(s, run="a") == 0
        assert store.label_uses(s, run="b") == {ids[0]: (1, 1), ids[1]: (1, 1), ids[2]: (2, 2), ids[3]: (2, 2)}
        assert [t.label_id for t in store.unconsumed_labels(s, limit=10, run="a")] == ids
        assert store.unconsumed_labels(s, limit=10, run="b") == []
        assert {lb.id: lb.uses for lb in s.scalars(select(Label))} == dict.fromkeys(ids, 1)
    with database.writes.begin() as s, pytest.raises(store.StoreError, match="too late to undo"):
        store.undo_label(s, label_id=ids[0], labeler="ann")  # run "b" trained it: too late
    for run in ("a", "b"):
        assert_line_consistent(database, run)
