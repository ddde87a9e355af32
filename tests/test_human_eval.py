"""Blind human evaluation: eval pairs in the labeling queue, judgments in their own table, never
trained on or exported, undo, the cadence, the human win rate on the dashboard, the sampler hook
(tiny model) and `odpo eval --human`."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from odpo.app.cli import cli
from odpo.app.config import ServeConfig
from odpo.app.services.human_eval import human_win_rates
from odpo.app.services.labeling import LabelService
from odpo.app.ui.dashboard import dashboard_outputs, human_eval_table
from odpo.db import store
from odpo.db.models import HumanEval, Label, Pair, Sample
from odpo.trainer.evaluation.blind_pairs import EvalCadence, interleave
from odpo.trainer.evaluation.win_rate import wilson_interval
from odpo.trainer.export.exporters import dataset_rows
from tests.db_helpers import make_pairs, rows, sample
from tests.test_evaluate import two_versions  # noqa: F401 - a fixture, requested by name
from tests.test_sampler import add_prompts, commit, fill, make_sampler, write_adapter

HELD = ["Held out: what is a river?", "Held out: name a colour.", "Held out: count to three."]


def add_eval_pairs(db, n: int, *, version: int = 2, reference: int = 0, policy_side: str = "a") -> list[int]:
    """n eval pairs on held-out prompts: the policy's sample says 'P<i>', the reference's 'R<i>'."""
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=f"held out {i} {version}", held_out=True)
                                      for i in range(n)])
    with db.sessions.begin() as s:
        prompts = store.pick_held_out_prompts(s, n=n)
        return [store.add_eval_pair(s, prompt_id=p.id, version=version, reference_version=reference,
                                    policy=sample(f"P{i}"), reference=sample(f"R{i}"), policy_side=policy_side).id
                for i, p in enumerate(prompts)]


def service(db) -> LabelService:
    return LabelService(db=db, config=ServeConfig())


def vote_for(labels: LabelService, view, *, policy: bool, labeler: str = "ann") -> int:
    """Vote for the policy's side (text starts with P) or the other one; returns the label id."""
    side = "left" if view.left.startswith("P") == policy else "right"
    return labels.vote(labeler=labeler, assignment_id=view.assignment_id, side=side).label_id


def test_eval_votes_are_judgments_never_training_labels(database):
    make_pairs(database, 2, version=2)
    add_eval_pairs(database, 2, policy_side="b")
    labels = service(database)
    seen = []
    while (view := labels.next_pair(labeler="ann")) is not None:
        seen.append(view)
        vote_for(labels, view, policy=len(seen) % 2 == 1)
    assert len(seen) == 4  # people get eval pairs in the same queue, oldest first
    judgments = rows(database, HumanEval)
    eval_ids = {p.id for p in rows(database, Pair, purpose="eval")}
    assert {j.pair_id for j in judgments} == eval_ids
    assert sorted(j.outcome for j in judgments) == ["loss", "win"]
    assert {(j.version, j.reference_version, j.labeler) for j in judgments} == {(2, 0, "ann")}
    with database.sessions() as s:
        trainable = store.unconsumed_labels(s, limit=100)
        assert store.count_unconsumed(s) == 2
        assert {t.pair_id for t in trainable}.isdisjoint(eval_ids) and len(trainable) == 2
        assert store.labeled_pairs(s) and {p.pair_id for p in store.labeled_pairs(s)}.isdisjoint(eval_ids)
        judged = store.judge_candidates(s, labeler="judge:x", mode="shadow", limit=10)
    assert {r["pair_id"] for r in dataset_rows(database)}.isdisjoint(eval_ids)
    assert len(dataset_rows(database, sources="human")) == 2
    assert len(judged) == 4  # judges may still shadow them: agreement only, never training


def test_outcome_follows_the_policy_whatever_side_it_was_shown_on(database):
    add_eval_pairs(database, 3, policy_side="a")
    add_eval_pairs(database, 3, version=3, reference=1, policy_side="b")
    labels = service(database)
    choices = iter(["policy", "other", "tie", "both_bad", "skip", "policy"])
    while (view := labels.next_pair(labeler="bo")) is not None:
        pick = next(choices)
        if pick in ("policy", "other"):
            vote_for(labels, view, policy=pick == "policy", labeler="bo")
        else:
            labels.vote(labeler="bo", assignment_id=view.assignment_id, side=pick)
    got = sorted((j.version, j.reference_version, j.outcome) for j in rows(database, HumanEval))
    assert got == [(2, 0, "loss"), (2, 0, "tie"), (2, 0, "win"), (3, 1, "both_bad"), (3, 1, "win")]  # skip: none
    with database.sessions() as s:
        stamped = {(smp.text[0], smp.adapter_version) for smp in s.scalars(select(Sample))}
    assert stamped == {("P", 2), ("R", 0), ("P", 3), ("R", 1)}


def test_undo_takes_an_eval_vote_back_like_any_vote(database):
    [pair_id] = add_eval_pairs(database, 1)
    labels = service(database)
    view = labels.next_pair(labeler="cy")
    vote_for(labels, view, policy=True, labeler="cy")
    assert [j.outcome for j in rows(database, HumanEval)] == ["win"]
    again = labels.undo(labeler="cy")
    assert (again.pair_id, again.left) == (pair_id, view.left)  # same pair, same sides
    assert rows(database, HumanEval) == [] and [lbl.undone for lbl in rows(database, Label)] == [True]
    vote_for(labels, again, policy=False, labeler="cy")
    assert [j.outcome for j in rows(database, HumanEval)] == ["loss"]
    with pytest.raises(store.AlreadyAnswered):
        labels.vote(labeler="cy", assignment_id=again.assignment_id, side="left")
    assert len(rows(database, HumanEval)) == 1


def test_eval_pairs_look_like_training_pairs_and_judges_leave_them_to_people(database):
    make_pairs(database, 1, version=2)
    add_eval_pairs(database, 1)
    labels = service(database)
    first = labels.next_pair(labeler="di")
    second = labels.next_pair(labeler="di", exclude=[first.assignment_id])
    assert first is not None and second is not None and first.pair_id != second.pair_id
    a, b = first.to_dict(), second.to_dict()
    assert a.keys() == b.keys() and (a["version"], a["typed"]) == (b["version"], b["typed"]) == (2, False)
    assert {type(v) for v in a.values()} == {type(v) for v in b.values()}
    assert labels.counters().queue == 0  # both were claimed: eval pairs count in the queue like any
    add_eval_pairs(database, 1, version=4)
    with database.sessions.begin() as s:
        assert store.claim_next_pair(s, labeler="judge:rule:x") is None  # a judge never gets one


def test_rollback_retires_eval_pairs_of_newer_versions_but_staleness_does_not(database):
    old = add_eval_pairs(database, 1, version=1)
    newer = add_eval_pairs(database, 1, version=5)
    with database.sessions.begin() as s:
        assert store.retire_stale_pairs(s, current_version=9, max_staleness=1) == 0
        assert store.retire_pairs_newer_than(s, version=2) == 1
    status = {p.id: p.status for p in rows(database, Pair)}
    assert status[old[0]] == "queued" and status[newer[0]] == "retired"


def test_an_eval_pair_needs_two_policies(database):
    with database.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text="held", held_out=True)])
    with pytest.raises(store.StoreError, match="two different policies"):
        with database.sessions.begin() as s:
            store.add_eval_pair(s, prompt_id=1, version=2, reference_version=2, policy=sample("x"),
                                reference=sample("y"))
    assert rows(database, Pair) == [] and rows(database, Sample) == []


def test_cadence_is_deterministic_and_exact():
    five = EvalCadence(0.2)
    assert five.plan(15) == [False, False, False, False, True] * 3
    ten = EvalCadence(0.1)
    assert [i + 1 for i, f in enumerate(ten.plan(100)) if f] == list(range(10, 101, 10))
    assert sum(EvalCadence(0.29).plan(100)) == 29
    assert not any(EvalCadence(0.0).plan(50))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="share"):
            EvalCadence(bad)
    assert interleave([False, True, False], ["t1", "t2"], ["e1"]) == ["t1", "e1", "t2"]
    assert interleave([True, True], ["t1", "t2"], []) == ["t1", "t2"]  # no held-out prompt: training
    sides = {EvalCadence(0.5, seed=s).policy_side() for s in range(20)}
    assert sides == {"a", "b"}


def test_human_win_rate_per_version_on_the_dashboard(database):
    add_eval_pairs(database, 6)
    labels = service(database)
    for pick in ("policy", "policy", "policy", "other", "tie", "both_bad"):
        view = labels.next_pair(labeler="ed")
        if pick in ("policy", "other"):
            vote_for(labels, view, policy=pick == "policy", labeler="ed")
        else:
            labels.vote(labeler="ed", assignment_id=view.assignment_id, side=pick)
    with database.sessions() as s:
        [rate] = human_win_rates(s)
    expected = wilson_interval(3, 1, 2)
    assert (rate["version"], rate["vs"], rate["n"], rate["wins"], rate["losses"]) == (2, 0, 6, 3, 1)
    assert rate["win_rate"] == pytest.approx(4 / 6) and (rate["ci_low"], rate["ci_high"]) == (expected.low,
                                                                                               expected.high)
    data = {"train": [], "evals": [{"version": 2, "vs": 0, "judge": "rule:x", "win_rate": 0.4, "ci_low": 0.1,
                                    "ci_high": 0.7, "n": 10, "at": None}], "labels_per_hour": [], "labelers": [],
            "agreement": [], "status": {}, "human_evals": [rate]}
    win = dashboard_outputs({**data, "status": _status()})[5]
    series = sorted(zip(win["judge"], win["win_rate"], strict=True))
    assert series == [("human (n=6)", pytest.approx(4 / 6)), ("rule:x", 0.4)]
    table = human_eval_table(data)
    assert table.to_dict("records") == [{"version": "v2", "vs": "base", "human win rate": 0.667, "n": 6,
                                         "95% CI": f"[{expected.low:.2f}, {expected.high:.2f}]"}]


def _status() -> dict:
    return {"latest_version": 2, "unconsumed_trainable": 0, "prompts": 0, "held_out": 0, "pairs": {}, "labels": {}}


@pytest.mark.usefixtures("one_torch_thread")
def test_sampler_makes_every_kth_pair_an_eval_pair_against_the_base(database, tiny_model_and_tokenizer,
                                                                     tiny_model_dir, tmp_path):
    add_prompts(database, held_out=HELD)
    sampler = make_sampler(database, *tiny_model_and_tokenizer, max_staleness=0, human_eval_share=0.5)
    assert fill(sampler) == 4 and rows(database, Pair, purpose="eval") == []  # the base serves: no eval
    commit(database, write_adapter(tiny_model_dir, tmp_path / "v1", seed=1), 1)
    sampler.watcher.poll_once()  # v1 serves; the v0 pairs are retired as stale
    made = fill(sampler)
    evals = rows(database, Pair, purpose="eval")
    # batches of 2 until 4 training pairs wait (eval pairs come on top): pairs 2, 4 and 6 are eval pairs
    assert made == 7 and len(evals) == 3
    assert [p.purpose for p in rows(database, Pair) if p.created_version == 1] == ["train", "eval"] * 3 + ["train"]
    with database.sessions() as s:
        held = {p.id for p in store.held_out_prompts(s, limit=10)}
        train = [p for p in rows(database, Pair, purpose="train") if p.created_version == 1]
        for pair in evals:
            a, b = s.get(Sample, pair.sample_a_id), s.get(Sample, pair.sample_b_id)
            assert pair.created_version == 1 and sorted((a.adapter_version, b.adapter_version)) == [0, 1]
            assert a.prompt_token_ids == b.prompt_token_ids and pair.prompt_id in held
    assert len(train) == 4 and not held & {p.prompt_id for p in train}  # held-out prompts never train
    assert len({p.prompt_id for p in evals}) == 3  # least recently used held-out prompts


@pytest.mark.usefixtures("one_torch_thread")
def test_sampler_eval_pairs_against_an_earlier_version(database, tiny_model_and_tokenizer, tiny_model_dir, tmp_path):
    """--human-eval-reference 1: eval pairs answer with v1 (a second adapter, untouched by hot
    reloads), only once a newer version serves; greedy answers equal a fresh load of v1's."""
    from peft import PeftModel

    from odpo.trainer.policy.loading import load_model_and_tokenizer
    from odpo.trainer.sampling.generation import SamplingParams, generate
    from tests.model_fixtures import tiny_model_config

    add_prompts(database, held_out=HELD)
    v1 = write_adapter(tiny_model_dir, tmp_path / "v1", seed=1)
    commit(database, v1, 1)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    sampler = make_sampler(database, *tiny_model_and_tokenizer, max_staleness=0, human_eval_share=0.5,
                           human_eval_reference=1, params=greedy)
    sampler.watcher.load_initial()
    fill(sampler)
    assert rows(database, Pair, purpose="eval") == []  # the reference itself serves: nothing to compare
    for version in (2, 3):  # v3 swaps in over v2: the reference adapter must survive the reload
        commit(database, write_adapter(tiny_model_dir, tmp_path / f"v{version}", seed=version), version)
        sampler.watcher.poll_once()
        fill(sampler)
    evals = rows(database, Pair, purpose="eval")
    assert {p.created_version for p in evals} == {2, 3}
    fresh, tok = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "fresh"))
    reference = PeftModel.from_pretrained(fresh, str(v1)).eval()
    with database.sessions() as s:
        for pair in evals:
            a, b = s.get(Sample, pair.sample_a_id), s.get(Sample, pair.sample_b_id)
            ref = a if a.adapter_version == 1 else b
            assert sorted((a.adapter_version, b.adapter_version)) == [1, pair.created_version]
            [[expected]] = generate(reference, tok, [s.get(store_prompt(), pair.prompt_id).text], params=greedy)
            assert list(ref.token_ids) == list(expected.token_ids)


def store_prompt():
    from odpo.db.models import Prompt

    return Prompt


def test_queue_human_eval_on_the_tiny_model(common_config, database, two_versions):  # noqa: F811
    base = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "eval", "--human"]
    args = ["--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32", "--json"]
    runner = CliRunner()
    ok = runner.invoke(cli, [*base, "--n", "5", "--version", "v3", *args])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert (summary["queued"], summary["version"], summary["reference"]) == (5, 3, 0)
    evals = rows(database, Pair, purpose="eval")
    assert [p.id for p in evals] == summary["pair_ids"] and {p.status for p in evals} == {"queued"}
    with database.sessions() as s:
        versions = {tuple(sorted(s.get(Sample, i).adapter_version for i in (p.sample_a_id, p.sample_b_id)))
                    for p in evals}
    assert versions == {(0, 3)}
    ok = runner.invoke(cli, [*base, "--n", "2", "--version", "v3", "--reference", "v1", *args])
    assert ok.exit_code == 0 and json.loads(ok.stdout.strip().splitlines()[-1])["reference"] == 1
    for bad, message in [(["--version", "v3", "--reference", "v3"], "both name v3"),
                         (["--version", "v9"], "no adapter version v9")]:
        result = runner.invoke(cli, [*base, *bad, *args])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert len(rows(database, Pair, purpose="eval")) == 7  # a refused call queues nothing
    no_judge = runner.invoke(cli, [*base[:-1], "--n", "2"])
    assert no_judge.exit_code == 2 and "--judge SPEC is required" in no_judge.output


def test_share_is_checked_where_serve_takes_it(common_config):
    with pytest.raises(ValueError, match="human_eval_share"):
        ServeConfig(human_eval_share=1.0)
    result = CliRunner().invoke(cli, ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url,
                                      "serve", "--human-eval-share", "1.5"])
    assert result.exit_code == 2 and "--human-eval-share" in result.output


def test_up_passes_the_share_to_the_sampler_worker():
    from odpo.app.cli.serve import up_children

    options = {name: None for name in ("batch_size", "save_every", "max_steps", "until_version", "judge_spec")}
    options.update(no_train=True, auto_label=False, train_args="", judge_args="", background_nice=10,
                   human_eval_share=0.1, queue_size=8)
    serve_child, sample_child = up_children(options)
    assert sample_child.args == ("sample", "--human-eval-share", "0.1") and serve_child.args == ("serve",)
