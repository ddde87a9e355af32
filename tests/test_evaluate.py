"""Evaluation: the interval maths, both-orders scoring, one-base-copy generation of two versions,
the stored result, the trainer's auto-eval hook and `odpo eval` (tiny model and the real one)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from odpo.app.cli import cli
from odpo.db import store
from odpo.trainer.evaluation.win_rate import (
    BaseAnswers,
    EvalError,
    maybe_auto_eval,
    pair_scores,
    run_eval,
    tally,
    wilson_interval,
)
from odpo.trainer.judges import load_judge
from odpo.trainer.sampling.generation import SamplingParams, generate
from tests.test_export import commit_version, perturb

torch.set_num_threads(1)

HELD_OUT = ["The cat looks at the green hill.", "My teacher writes to her best friend.",
            "The river waits near the open window.", "A small robot answers the long question."]
FAST = SamplingParams(temperature=0.9, top_p=1.0, max_new_tokens=12, seed=3)


def add_held_out(db, texts=HELD_OUT) -> None:
    with db.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=t, held_out=True) for t in texts])
        store.add_prompts(s, prompts=[store.NewPrompt(text="a training prompt")])


def test_wilson_interval_against_hand_computed_values():
    # 8 of 10 (z = 1.96): the textbook Wilson interval is (0.4902, 0.9433).
    w = wilson_interval(8, 2, 0)
    assert (w.rate, round(w.low, 4), round(w.high, 4)) == (0.8, 0.4902, 0.9433)
    # ties count half: 7 wins, 2 ties, 1 loss is the same 0.8 of 10
    t = wilson_interval(7, 1, 2)
    assert (t.rate, t.low, t.high, t.n) == (0.8, w.low, w.high, 10)
    assert wilson_interval(0, 0, 5).rate == 0.5 and wilson_interval(3, 0, 0).high == 1.0
    with pytest.raises(EvalError, match="abstained on all"):
        wilson_interval(0, 0, 0)


class CountingJudge:
    def __init__(self, spec):
        self.inner, self.calls = load_judge(spec), 0
        self.spec, self.order_free = self.inner.spec, self.inner.order_free

    def judge(self, prompts, a, b):
        self.calls += 1
        return self.inner.judge(prompts, a, b)


def test_pair_scores_asks_position_dependent_judges_in_both_orders():
    prompts, a, b = ["p1", "p2", "p3"], ["short", "a long answer", "same"], ["a long answer", "short", "same"]
    biased = CountingJudge("py:tests.rules:always_first")
    scores = pair_scores(biased, prompts, a, b)
    assert biased.calls == 2 and scores == [0.5, 0.5, 0.5]  # position bias cancels into ties
    win_rate, abstained = tally(scores)
    assert (win_rate.ties, win_rate.rate, abstained) == (3, 0.5, 0)
    rule = CountingJudge("rule:shorter")
    assert pair_scores(rule, prompts, a, b) == [1.0, 0.0, 0.5] and rule.calls == 1
    flaky = CountingJudge("py:tests.rules:boom_on_question")
    assert pair_scores(flaky, ["ok", "why?"], ["x", "x"], ["yy", "yy"]) == [1.0, None]
    assert tally([1.0, None])[1] == 1
    with pytest.raises(EvalError, match="abstained on all 2 pairs.*--abstain-threshold 1"):
        tally([None, None])


@pytest.fixture
def two_versions(database, tiny_model_dir, tmp_path):
    """v1 and v2 with identical weights, v3 different; the policy holds v3 at the end."""
    from odpo.trainer.policy.loading import load_model_and_tokenizer
    from odpo.trainer.policy.lora import LoraSettings, attach_lora
    from tests.model_fixtures import tiny_model_config

    model, tokenizer = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))
    torch.manual_seed(0)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    adapters = tmp_path / "data" / "runs" / "default" / "adapters"
    perturb(peft_model, 1)
    for version in (1, 2):
        commit_version(database, policy=peft_model, adapters_dir=adapters, version=version,
                       model_spec=str(tiny_model_dir), parent=version - 1)
    perturb(peft_model, 2)
    commit_version(database, policy=peft_model, adapters_dir=adapters, version=3,
                   model_spec=str(tiny_model_dir), parent=2)
    peft_model.eval()
    add_held_out(database)
    return peft_model, tokenizer


def test_identical_versions_tie_exactly(database, two_versions):
    policy, tokenizer = two_versions
    result = run_eval(database, policy=policy, tokenizer=tokenizer, version_a=2, version_b=1,
                      judge="rule:shorter", n=6, params=FAST)
    w = result.win_rate
    assert (w.n, w.ties, w.rate) == (6, 6, 0.5) and result.eval_id is not None
    assert result.details["prompt_ids"][4:] == result.details["prompt_ids"][:2]  # 4 prompts, cycled


def test_eval_generates_each_version_from_one_base_copy(database, two_versions):
    policy, tokenizer = two_versions  # holds v3
    result = run_eval(database, policy=policy, tokenizer=tokenizer, version_a=3, version_b=0,
                      judge="rule:longer", n=4, params=FAST, holds=3)
    with_adapter = [g[0].text for g in generate(policy, tokenizer, HELD_OUT, params=FAST)]
    with policy.disable_adapter():
        base = [g[0].text for g in generate(policy, tokenizer, HELD_OUT, params=FAST)]
    examples = result.details["examples"]
    assert [e["a"] for e in examples] == with_adapter[:3] and [e["b"] for e in examples] == base[:3]
    assert with_adapter != base
    w = result.win_rate
    expected = [1.0 if len(a.strip()) > len(b.strip()) else 0.0 if len(a.strip()) < len(b.strip()) else 0.5
                for a, b in zip(with_adapter, base, strict=True)]
    assert result.details["scores"] == expected and w.n == 4
    with database.sessions() as s:
        row = store.list_evals(s)[-1]
    assert (row.version_a, row.version_b, row.judge, row.n, row.win_rate) == (3, 0, "rule:longer", 4, w.rate)
    assert row.ci_low <= row.win_rate <= row.ci_high and row.details["interval"] == "wilson"


def test_eval_loads_what_it_needs_whatever_the_policy_holds(database, two_versions):
    policy, tokenizer = two_versions  # holds v3; v1 == v2 != v3
    first = run_eval(database, policy=policy, tokenizer=tokenizer, version_a=3, version_b=1,
                     judge="rule:shorter", n=4, params=FAST, holds=3)
    # now the policy holds v1: say so; v3 must be loaded for A, and v1 again for B
    again = run_eval(database, policy=policy, tokenizer=tokenizer, version_a=3, version_b=1,
                     judge="rule:shorter", n=4, params=FAST, holds=1)
    assert first.details["examples"] == again.details["examples"]
    assert first.details["scores"] == again.details["scores"]


def test_base_answers_are_drawn_once_per_seeded_request(database, two_versions, monkeypatch):
    from dataclasses import replace

    from odpo.trainer.evaluation import win_rate as evaluate

    policy, tokenizer = two_versions  # holds v3
    kwargs = dict(policy=policy, tokenizer=tokenizer, version_a=3, version_b=0, judge="rule:longer", n=4,
                  holds=3, record=False)
    plain = run_eval(database, params=FAST, **kwargs)
    calls, real = [], evaluate.policy_answers
    monkeypatch.setattr(evaluate, "policy_answers", lambda *a, **k: calls.append(k["version"]) or real(*a, **k))
    kept = BaseAnswers()
    first = run_eval(database, params=FAST, base_answers=kept, **kwargs)
    second = run_eval(database, params=FAST, base_answers=kept, **kwargs)
    assert calls == [3, 0, 3] and kept.reused == 1  # the base answered once
    assert first.details["examples"] == second.details["examples"] == plain.details["examples"]
    assert first.details["scores"] == second.details["scores"] == plain.details["scores"]
    calls.clear()
    run_eval(database, params=replace(FAST, seed=FAST.seed + 1), base_answers=kept, **kwargs)
    run_eval(database, params=replace(FAST, max_new_tokens=6), base_answers=kept, **kwargs)
    assert calls == [3, 0, 3, 0]  # another seed or length is another request
    calls.clear()
    for _ in range(2):  # unseeded answers are meant to differ: never kept
        run_eval(database, params=replace(FAST, seed=None), base_answers=kept, **kwargs)
    assert calls == [3, 0, 3, 0] and kept.reused == 1
    small = BaseAnswers(limit=1)
    small.get(["a"], FAST, None, lambda: ["x"])
    small.get(["b"], FAST, None, lambda: ["y"])
    assert small.get(["a"], FAST, None, lambda: ["fresh"]) == ["fresh"]  # the oldest went first


def test_eval_errors(database, two_versions, tmp_path):
    policy, tokenizer = two_versions
    with pytest.raises(EvalError, match="same policy"):
        run_eval(database, policy=policy, tokenizer=tokenizer, version_a=1, version_b=1, judge="rule:shorter")
    with pytest.raises(EvalError, match=r"no adapter version v9 in run 'default' \(versions: v1, v2, v3\)"):
        run_eval(database, policy=policy, tokenizer=tokenizer, version_a=9, version_b=0, judge="rule:shorter")


def test_maybe_auto_eval_for_the_trainer(database, two_versions, caplog):
    policy, tokenizer = two_versions
    policy.train()
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    judge = load_judge("rule:shorter")
    kwargs = dict(policy=policy, tokenizer=tokenizer, every=3, judge=judge, n=4, params=FAST)
    assert maybe_auto_eval(database, version=2, **kwargs) is None
    result = maybe_auto_eval(database, version=3, **kwargs)
    assert result is not None and (result.version_a, result.version_b, result.win_rate.n) == (3, 0, 4)
    assert maybe_auto_eval(database, version=3, **kwargs) is None  # already evaluated by this judge
    assert policy.training  # the trainer's mode is restored
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters() if "lora_" in n)
    assert maybe_auto_eval(database, version=3, **{**kwargs, "every": 0}) is None


def test_maybe_auto_eval_never_stops_training(database, policy):
    peft_model, tokenizer = policy  # no held-out prompts at all
    assert maybe_auto_eval(database, policy=peft_model, tokenizer=tokenizer, version=1, every=1,
                           judge="rule:shorter", n=2, params=FAST) is None


def test_cli_eval_on_the_tiny_model(common_config, database, two_versions):
    base = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "eval"]
    runner = CliRunner()
    args = ["--judge", "rule:shorter", "--n", "4", "--max-new-tokens", "8", "--device", "cpu", "--dtype", "fp32"]
    ok = runner.invoke(cli, [*base, "--a", "v3", "--b", "base", *args, "--json"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["a"] == 3 and summary["b"] == 0 and summary["n"] == 4
    assert summary["low"] <= summary["rate"] <= summary["high"]
    text = runner.invoke(cli, [*base, "--a", "latest", "--b", "v1", *args])
    assert text.exit_code == 0 and "v3 vs v1, judge rule:shorter: win rate" in text.output and "n=4" in text.output
    for bad, message in [(["--a", "v9"], "no adapter version v9"), (["--a", "base"], "both name v0"),
                         (["--a", "seven"], "cannot read version 'seven'"),
                         (["--judge", "nonsense"], "unknown judge spec")]:
        result = runner.invoke(cli, [*base, *args, *bad])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


@pytest.fixture
def policy(tiny_model_dir, tmp_path):
    from odpo.trainer.policy.loading import load_model_and_tokenizer
    from odpo.trainer.policy.lora import LoraSettings, attach_lora
    from tests.model_fixtures import tiny_model_config

    model, tokenizer = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path / "models"))
    return attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)), tokenizer


@pytest.mark.default_model
def test_odpo_eval_on_the_default_model(common_config, database, default_model_cache_dir, tmp_path):
    """`odpo eval` end to end on SmolLM2-135M: a trained-looking v1 against the base, rule judge."""
    from odpo.trainer.policy.loading import ModelConfig, load_model_and_tokenizer
    from odpo.trainer.policy.lora import LoraSettings, attach_lora

    common_config.data_dir.mkdir(parents=True, exist_ok=True)
    (common_config.data_dir / "models").symlink_to(default_model_cache_dir, target_is_directory=True)
    model, _ = load_model_and_tokenizer(ModelConfig(cache_dir=default_model_cache_dir, device="cpu"))
    peft_model = attach_lora(model, LoraSettings())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)
    commit_version(database, policy=peft_model, adapters_dir=common_config.adapters_dir(), version=1,
                   model_spec="smollm2-135m")
    add_held_out(database, ["What is the capital of France?", "Give me one tip for better sleep.",
                            "Name three primary colours.", "Write one sentence about the sea."])
    result = CliRunner().invoke(cli, ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url,
                                      "eval", "--a", "v1", "--b", "base", "--judge", "rule:shorter", "--n", "8",
                                      "--max-new-tokens", "32"])
    assert result.exit_code == 0, result.output
    assert "v1 vs base, judge rule:shorter: win rate" in result.output and "n=8" in result.output
    with database.sessions() as s:
        row = store.list_evals(s)[-1]
    assert row.n + row.details["abstained"] == 8 and 0.0 <= row.ci_low <= row.win_rate <= row.ci_high <= 1.0
    assert row.ci_high - row.ci_low > 0.2  # n=8 cannot give a narrow interval


def test_two_runs_head_to_head_is_symmetric(database, two_versions, tmp_path, tiny_model_dir):
    """`odpo eval --a r1:v1 --b default:v3`: versions of two runs on one base, each answering with
    its own adapter; swapping A and B gives 1 - the win rate (ties count half)."""
    policy, tokenizer = two_versions  # holds default:v3
    other = tmp_path / "data" / "runs" / "r1" / "adapters"
    perturb(policy, 7)  # r1's v1: other weights than any version of the default run
    commit_version(database, policy=policy, adapters_dir=other, version=1, model_spec=str(tiny_model_dir),
                   run="r1")
    kwargs = dict(policy=policy, tokenizer=tokenizer, judge="rule:longer", n=4, params=FAST, record=False,
                  base_dir=tmp_path / "data")
    ab = run_eval(database, version_a=1, version_b=3, run="r1", run_b="default", holds=("r1", 1), **kwargs)
    ba = run_eval(database, version_a=3, version_b=1, run="default", run_b="r1", holds=("r1", 1), **kwargs)
    assert ab.win_rate.n == ba.win_rate.n == 4
    assert ab.win_rate.rate == pytest.approx(1 - ba.win_rate.rate)
    assert (ab.win_rate.wins, ab.win_rate.ties) == (ba.win_rate.losses, ba.win_rate.ties)
    assert ab.details["run_b"] == "default" and ab.details["examples"][0]["a"] == ba.details["examples"][0]["b"]
    with pytest.raises(EvalError, match="same policy"):
        run_eval(database, version_a=1, version_b=1, run="r1", run_b="r1", **kwargs)
