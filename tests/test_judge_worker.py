"""The judge worker: queue claims shared with people, abstain hand-back, fraction, skipped/shadow
modes, agreement statistics, failure clean-up and the `odpo judge` command."""
from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from odpo.app.cli import cli
from odpo.db import store
from odpo.db.models import Label, Pair
from odpo.trainer.judges import JudgeUnreachableError, judge_labeler_name, load_judge
from odpo.trainer.judges.worker import (
    JudgeWorkerConfig,
    JudgeWorkerError,
    in_fraction,
    judge_state_key,
    run_judge_worker,
)
from tests.concurrency import wait_until
from tests.db_helpers import rows, sample

ONCE = dict(exit_when_idle=0.0, poll_seconds=0.0)
SHORTER = "judge:rule:shorter"


def add_text_pairs(db, rows: list[tuple[str, str, str]]) -> list[int]:
    """(prompt, a, b) triples as queued pairs, in order."""
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=p) for p, _, _ in rows])
    ids = []
    with db.sessions.begin() as s:
        by_text = {p.text: p.id for p in store.list_prompts(s, limit=10_000)}
        for prompt, a, b in rows:
            ids.append(store.add_pair(s, prompt_id=by_text[prompt], version=0, a=sample(a), b=sample(b)).id)
    return ids


def length_pairs(n: int, *, question_every: int = 0) -> list[tuple[str, str, str]]:
    """Pair i: a is shorter when i is even, b when odd; every `question_every`-th prompt ends in '?'."""
    rows = []
    for i in range(n):
        q = "?" if question_every and i % question_every == 0 else "."
        short, long = f"short {i}", f"a much longer answer number {i}"
        rows.append((f"prompt {i}{q}", short, long) if i % 2 == 0 else (f"prompt {i}{q}", long, short))
    return rows


def labels(db, **where) -> list[Label]:
    return rows(db, Label, **where)


def test_queue_mode_labels_every_pair_with_absolute_choices(database):
    ids = add_text_pairs(database, length_pairs(6))
    stats = run_judge_worker(database, load_judge("rule:shorter"), config=JudgeWorkerConfig(batch_size=4, **ONCE))
    assert stats.labeled == 6 and stats.abstained == 0
    got = labels(database)
    assert [lb.pair_id for lb in got] == ids
    assert [lb.choice for lb in got] == ["a", "b"] * 3  # regardless of the random left/right
    assert {lb.labeler for lb in got} == {lb.source for lb in got} == {SHORTER}
    assert all(lb.judge_confidence == 1.0 for lb in got)
    with database.sessions() as s:
        assert store.count_pairs(s, status="labeled") == 6
        trainable = store.unconsumed_labels(s, limit=100, sources="judge")
        assert len(trainable) == 6 and all(t.chosen.startswith("short") for t in trainable)
        assert store.unconsumed_labels(s, limit=100, sources="human") == []


def test_judge_never_takes_a_pair_a_person_holds(database):
    ids = add_text_pairs(database, length_pairs(3))
    with database.sessions.begin() as s:
        held = store.claim_next_pair(s, labeler="alice")
    run_judge_worker(database, load_judge("rule:shorter"), config=JudgeWorkerConfig(**ONCE))
    assert sorted(lb.pair_id for lb in labels(database)) == [i for i in ids if i != held.pair_id]
    with database.sessions.begin() as s:
        store.record_label(s, assignment_id=held.assignment_id, labeler="alice", choice="b")
    assert len(labels(database, labeler="alice")) == 1


def test_abstained_pairs_go_back_to_people_and_are_not_reclaimed(database):
    ids = add_text_pairs(database, length_pairs(6, question_every=3))  # pairs 0 and 3 are questions
    judge = load_judge("py:tests.rules:boom_on_question")
    stats = run_judge_worker(database, judge, config=JudgeWorkerConfig(**ONCE))
    assert stats.labeled == 4 and stats.abstained == 2
    with database.sessions() as s:
        rows = {p.id: p for p in s.scalars(select(Pair))}
    assert [rows[i].status for i in ids] == ["queued", "labeled", "labeled", "queued", "labeled", "labeled"]
    assert rows[ids[0]].claims == 0
    again = run_judge_worker(database, judge, config=JudgeWorkerConfig(**ONCE))
    assert again.labeled == again.abstained == 0
    with database.sessions.begin() as s:
        assert store.claim_next_pair(s, labeler="bob").pair_id == ids[0]


def test_fraction_leaves_a_stable_share_to_people(database):
    ids = add_text_pairs(database, length_pairs(40))
    stats = run_judge_worker(database, load_judge("rule:shorter"),
                             config=JudgeWorkerConfig(fraction=0.5, batch_size=8, **ONCE))
    mine = {i for i in ids if in_fraction(i, 0.5)}
    assert 10 <= len(mine) <= 30
    assert {lb.pair_id for lb in labels(database)} == mine
    assert stats.labeled == len(mine) and stats.passed == 40 - len(mine)
    with database.sessions() as s:
        assert store.count_pairs(s, status="queued") == 40 - len(mine)


def test_max_labels_and_stop_event(database):
    add_text_pairs(database, length_pairs(10))
    stats = run_judge_worker(database, load_judge("rule:shorter"),
                             config=JudgeWorkerConfig(max_labels=3, batch_size=2, **ONCE))
    assert stats.labeled == 3 and len(labels(database)) == 3
    stop = threading.Event()
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        stats=run_judge_worker(database, load_judge("rule:shorter"),
                               config=JudgeWorkerConfig(poll_seconds=30.0), stop=stop)))
    worker.start()
    for _ in range(200):
        if len(labels(database)) == 10:
            break
        worker.join(0.05)
    stop.set()
    worker.join(5)
    assert not worker.is_alive() and result["stats"].labeled == 7


def test_only_skipped_labels_what_people_skipped(database):
    ids = add_text_pairs(database, length_pairs(4))
    for choice in ("skip", "a", "skip"):
        with database.sessions.begin() as s:
            claimed = store.claim_next_pair(s, labeler="alice")
            store.record_label(s, assignment_id=claimed.assignment_id, labeler="alice", choice=choice)
    config = JudgeWorkerConfig(only_skipped=True, **ONCE)
    stats = run_judge_worker(database, load_judge("rule:shorter"), config=config)
    assert stats.labeled == 2
    judged = labels(database, labeler=SHORTER)
    assert [lb.pair_id for lb in judged] == [ids[0], ids[2]] and [lb.choice for lb in judged] == ["a", "a"]
    assert run_judge_worker(database, load_judge("rule:shorter"), config=config).labeled == 0
    with database.sessions() as s:
        assert store.count_pairs(s, status="queued") == 1  # the queue itself is untouched


def test_shadow_mode_and_agreement(database):
    ids = add_text_pairs(database, length_pairs(4))
    for choice in ("a", "a", "tie", "skip"):  # truth (shorter) is a, b, a, b
        with database.sessions.begin() as s:
            claimed = store.claim_next_pair(s, labeler="alice")
            store.record_label(s, assignment_id=claimed.assignment_id, labeler="alice", choice=choice)
    stats = run_judge_worker(database, load_judge("rule:shorter"), config=JudgeWorkerConfig(shadow=True, **ONCE))
    assert stats.labeled == 3
    assert [lb.pair_id for lb in labels(database, labeler=SHORTER)] == ids[:3]
    with database.sessions() as s:
        assert store.judge_agreement(s) == [{"judge": SHORTER, "n": 3, "agree": 1, "rate": pytest.approx(1 / 3)}]
        # people's labels win for training: the shadow labels are never trained on
        assert {t.source for t in store.unconsumed_labels(s, limit=100)} == {"human"}


def test_shadow_abstentions_are_recorded_as_skips(database):
    add_text_pairs(database, length_pairs(3, question_every=1))
    for _ in range(3):
        with database.sessions.begin() as s:
            claimed = store.claim_next_pair(s, labeler="alice")
            store.record_label(s, assignment_id=claimed.assignment_id, labeler="alice", choice="a")
    judge = load_judge("py:tests.rules:boom_on_question")
    config = JudgeWorkerConfig(shadow=True, **ONCE)
    assert run_judge_worker(database, judge, config=config).abstained == 3
    assert [lb.choice for lb in labels(database, source="judge:py:tests.rules:boom_on_question")] == ["skip"] * 3
    assert run_judge_worker(database, judge, config=config).abstained == 0  # not judged again
    with database.sessions() as s:
        assert store.judge_agreement(s) == []


class DownJudge:
    spec, order_free = "openai:m@http://127.0.0.1:9/v1", True

    def judge(self, prompts, a, b):
        raise JudgeUnreachableError("judge endpoint http://127.0.0.1:9/v1 is unreachable")

    def close(self):
        pass


def test_a_failing_judge_hands_its_claims_back(database):
    add_text_pairs(database, length_pairs(5))
    with pytest.raises(JudgeUnreachableError):
        run_judge_worker(database, DownJudge(), config=JudgeWorkerConfig(batch_size=3, **ONCE))
    with database.sessions() as s:
        pairs = list(s.scalars(select(Pair)))
    assert all(p.status == "queued" and p.claims == 0 for p in pairs)


HUNG = threading.Event()  # lets go of the plugin calls a timeout abandoned, at the end of a test


def hang_on_question(prompt: str, a: str, b: str) -> str:
    """A py: plugin that hangs on questions (until the test lets it go)."""
    if "?" in prompt:
        HUNG.wait(120)
    return "a" if len(a) < len(b) else "b"


@pytest.fixture
def release_hung():
    HUNG.clear()
    yield
    HUNG.set()


def queued_and_unclaimed(db) -> list[bool]:
    with db.sessions() as s:
        return [p.status == "queued" and p.claims == 0 for p in s.scalars(select(Pair).order_by(Pair.id))]


def test_a_judge_failing_on_every_pair_is_reported_and_its_pairs_wait_for_people(database, caplog):
    from odpo.app.ui.dashboard import state_markdown
    from tests.test_admin_service import admin_service

    ids = add_text_pairs(database, length_pairs(5))
    stop, result = threading.Event(), {}
    worker = threading.Thread(target=lambda: result.update(stats=run_judge_worker(
        database, load_judge("py:tests.rules:boom"), config=JudgeWorkerConfig(poll_seconds=0.05), stop=stop)))
    with caplog.at_level("ERROR", logger="odpo.trainer.judges.worker"):
        worker.start()
        try:
            wait_until(lambda: "failing" in state_markdown(admin_service(database).dashboard()), 60, poll=0.1)
            md = state_markdown(admin_service(database).dashboard())
        finally:
            stop.set()
            worker.join(30)
    assert "**Judge** — py:tests.rules:boom: failing" in md
    assert "**failing:** 5 pairs in a row failed; last: plugin raised RuntimeError: plugin exploded" in md
    assert [r.getMessage() for r in caplog.records] == [
        "judge py:tests.rules:boom is failing: 5 pairs in a row failed (last: plugin raised RuntimeError: "
        "plugin exploded); they are back in the queue for people"]
    stats = result["stats"]
    assert (stats.labeled, stats.abstained, stats.failed) == (0, 5, 5)
    assert queued_and_unclaimed(database) == [True] * 5
    with database.sessions.begin() as s:
        assert store.claim_next_pair(s, labeler="alice").pair_id == ids[0]  # people get them
    assert "stopped" in state_markdown(admin_service(database).dashboard())


@pytest.mark.timeout(120)
def test_a_hanging_py_judge_times_out_per_pair_and_goes_on(database, release_hung):
    from odpo.trainer.judges import JudgeOptions

    ids = add_text_pairs(database, length_pairs(6, question_every=3))  # pairs 0 and 3 hang
    judge = load_judge("py:tests.test_judge_worker:hang_on_question", JudgeOptions(timeout_s=0.5))
    stats = run_judge_worker(database, judge, config=JudgeWorkerConfig(batch_size=6, **ONCE))
    assert (stats.labeled, stats.failed) == (4, 2)
    assert sorted(lb.pair_id for lb in labels(database)) == [i for k, i in enumerate(ids) if k % 3]
    assert [queued_and_unclaimed(database)[k] for k in (0, 3)] == [True, True]
    assert judge.last_error == "plugin call took longer than 0.5s (--judge-timeout); abandoned"


@pytest.mark.timeout(120)
def test_a_py_judge_with_too_many_hung_calls_stops_and_hands_everything_back(database, release_hung):
    from odpo.trainer.judges import JudgeOptions
    from odpo.trainer.judges.plugin import MAX_HUNG_CALLS, PluginError

    add_text_pairs(database, length_pairs(5, question_every=1))  # every pair hangs
    judge = load_judge("py:tests.test_judge_worker:hang_on_question", JudgeOptions(timeout_s=0.2))
    with pytest.raises(PluginError, match=f"{MAX_HUNG_CALLS} calls still running after --judge-timeout 0.2s"):
        run_judge_worker(database, judge, config=JudgeWorkerConfig(batch_size=5, **ONCE))
    assert queued_and_unclaimed(database) == [True] * 5
    with database.sessions() as s:
        assert store.get_control(s, key=judge_state_key(judge_labeler_name(judge.spec)))["state"] == "failed"


def test_a_restarted_judge_hands_back_the_claims_a_killed_run_left_open(database):
    ids = add_text_pairs(database, length_pairs(3))
    for _ in range(2):  # what a judge killed with SIGKILL mid-batch leaves behind
        with database.sessions.begin() as s:
            store.claim_next_pair(s, labeler=SHORTER)
    stats = run_judge_worker(database, load_judge("rule:shorter"), config=JudgeWorkerConfig(**ONCE))
    assert stats.labeled == 1 and [lb.pair_id for lb in labels(database)] == [ids[2]]
    assert queued_and_unclaimed(database) == [True, True, False]  # back with people at once
    with database.sessions.begin() as s:
        assert store.claim_next_pair(s, labeler="bob").pair_id == ids[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(shadow=True, only_skipped=True), "one of"), (dict(fraction=0.5, shadow=True), "queued pairs only"),
    (dict(fraction=0.0), "fraction"), (dict(batch_size=0), "batch size")])
def test_config_errors(kwargs, message):
    with pytest.raises(JudgeWorkerError, match=message):
        JudgeWorkerConfig(**kwargs)


def test_cli_judge(common_config, database):
    add_text_pairs(database, length_pairs(4))
    base = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "judge"]
    result = CliRunner().invoke(cli, [*base, "--judge", "py:tests.rules:prefer_shorter", "--exit-when-idle", "0",
                                      "--max-labels", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["labeled"] == 3 and summary["mode"] == "queue"
    assert len(labels(database, source="judge:py:tests.rules:prefer_shorter")) == 3
    bad = CliRunner().invoke(cli, [*base, "--judge", "gpt4", "--exit-when-idle", "0"])
    assert bad.exit_code == 1 and "Error: unknown judge spec 'gpt4'" in bad.output and "Traceback" not in bad.output
    both = CliRunner().invoke(cli, [*base, "--judge", "rule:shorter", "--shadow", "--only-skipped"])
    assert both.exit_code == 1 and "choose one of --only-skipped and --shadow" in both.output
