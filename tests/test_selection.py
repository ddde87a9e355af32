"""Candidates and pair selection (trainer/sampling/selection.py): each selector picks the expected
pair on fixed inputs, the sampler stores every candidate and trains only the pair's two, and the
margin the sampler ranks by is the one a DPO step computes for the same pair."""
from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from odpo.db import store
from odpo.db.models import Pair, Sample
from odpo.trainer.judges import Verdict
from odpo.trainer.options import LoraSettings
from odpo.trainer.policy.loading import load_model_and_tokenizer
from odpo.trainer.policy.lora import attach_lora
from odpo.trainer.sampling.generation import Generated, SamplingParams
from odpo.trainer.sampling.sampler import Sampler, SamplerSettings
from odpo.trainer.sampling.selection import Selector, by_margin, judge_all_pairs, most_distant, token_distance
from odpo.trainer.training.rewards import implicit_rewards
from odpo.trainer.training.step import dpo_step, make_optimizer
from odpo.trainer.training.train_config import TrainConfig
from tests.model_fixtures import tiny_model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- selectors on fixed inputs -------------------------------------------------------------------


def test_margin_picks_the_widest_gap_and_uncertain_the_narrowest():
    rewards = [0.30, -1.20, 0.25, 2.00]
    assert (by_margin(rewards, largest=True).a, by_margin(rewards, largest=True).b) == (1, 3)  # -1.2 vs 2.0
    assert (by_margin(rewards, largest=False).a, by_margin(rewards, largest=False).b) == (0, 2)  # 0.30 vs 0.25
    assert by_margin(rewards, largest=True).scores == rewards
    tied = by_margin([1.0, 1.0, 1.0], largest=False)
    assert (tied.a, tied.b) == (0, 1)  # ties go to the lowest indices: a fixed input, a fixed pair


def test_diverse_picks_the_two_most_different_token_sequences():
    ids = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 8, 7, 6, 5], [1, 2, 3, 4]]
    assert token_distance([1, 2, 3], [1, 2, 3]) == 0.0 and token_distance([1, 2], [3, 4]) == 1.0
    assert token_distance([1, 2, 3, 4], [1, 2, 3, 5]) == 0.25
    pick = most_distant(ids)
    assert (pick.a, pick.b) == (0, 2)


class _Judge:
    """Prefers the longer answer, sure in proportion to the length gap; position-biased on a tie."""

    spec = "py:test"

    def judge(self, prompts, a, b):
        out = []
        for x, y in zip(a, b, strict=True):
            gap = (len(x) - len(y)) / 10
            out.append(Verdict("a", 0.6) if gap == 0 else Verdict("a" if gap > 0 else "b", min(1.0, abs(gap))))
        return out


def test_judge_uncertain_shows_the_pair_the_judge_is_least_sure_of_and_labels_the_surest():
    texts = ["aaaa", "aaaaaaaaaaaaaa", "aaaa", "a"]  # 0 and 2 tie (its two orders disagree: position bias)
    verdicts = {(v.i, v.j): v for v in judge_all_pairs(_Judge(), "q", texts)}
    assert verdicts[(0, 2)].sure == 0.5 and verdicts[(0, 2)].choice == "tie"
    assert verdicts[(1, 3)].choice == "a" and verdicts[(1, 3)].sure == 1.0
    cands = [Generated(text=t, tokens=len(t), finish_reason="stop", seconds=0.0) for t in texts]
    pick = Selector("judge-uncertain", judge=_Judge(), auto_label_confident=0.9).pick(["q"], [cands], version=3)[0]
    assert (pick.a, pick.b) == (0, 2) and pick.auto == (0, 1, "b", 1.0)


def test_margin_selectors_fall_back_to_random_at_the_base():
    calls = []
    selector = Selector("margin", seed=1, score=lambda p, c: calls.append(1) or [[0.0] * 4])
    cands = [[Generated(text=str(i), tokens=1, finish_reason="stop", seconds=0.0) for i in range(4)]]
    assert selector.pick(["q"], cands, version=0)[0].scores is None and not calls  # v0: policy == reference
    assert selector.pick(["q"], cands, version=1)[0].scores == [0.0] * 4 and calls == [1]
    with pytest.raises(ValueError, match="selector must be one of"):
        Selector("best")


# -- the sampler stores every candidate, trains the pair -----------------------------------------


@pytest.fixture
def tiny_policy(tiny_model_dir, tmp_path):
    model, tok = load_model_and_tokenizer(tiny_model_config(tiny_model_dir, tmp_path))
    torch.manual_seed(3)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter: the policy differs from the reference
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return peft_model.eval(), tok


def test_k_candidates_are_stored_and_only_the_shown_pair_trains(database, tiny_policy):
    model, tok = tiny_policy
    with database.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=f"Tell me about the river {i}.") for i in range(3)])
    selector = Selector("diverse", seed=0)
    sampler = Sampler(db=database, model=model, tokenizer=tok, settings=SamplerSettings(
        queue_size=3, prompts_per_batch=3, candidates=4, selector=selector,
        params=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=6, seed=0)))
    assert sampler.step() == 3
    with database.sessions.begin() as s:
        pairs = s.scalars(select(Pair)).all()
        assert [p.selector for p in pairs] == ["diverse"] * 3
        for pair in pairs:
            unshown = s.scalars(select(Sample).where(Sample.candidate_of == pair.id)).all()
            assert len(unshown) == 2  # K = 4: two shown, two kept
            shown = {pair.sample_a_id, pair.sample_b_id}
            assert not shown & {u.id for u in unshown} and all(u.token_ids for u in unshown)
        claim = store.claim_next_pair(s, labeler="ann")
        store.record_label(s, assignment_id=claim.assignment_id, labeler="ann", choice="a")
        waiting = store.unconsumed_labels(s, run="default", limit=10)
        trained = store.sampled_ids(s, label_ids=[lb.label_id for lb in waiting])
        pair = s.get(Pair, claim.pair_id)
        a, b = s.get(Sample, pair.sample_a_id), s.get(Sample, pair.sample_b_id)
        (ids,) = trained.values()
        assert (list(ids.chosen_ids), list(ids.rejected_ids)) == (a.token_ids, b.token_ids)


@pytest.mark.parametrize("recorded", [False, True], ids=["forward", "from-generate"])
def test_the_sampler_margin_is_the_dpo_steps_margin(tiny_policy, tmp_path, recorded):
    """The implicit reward the margin selectors rank by equals what a DPO step reports for that
    pair (LoRA dropout 0, so the step's train-mode forward is the sampler's eval-mode one), whether
    the policy's log-probs come from a forward or from the generate call that drew the candidates."""
    model, tok = tiny_policy
    prompts = ["The cat looks at the green hill.", "My teacher answers the long question."]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)
    from odpo.trainer.sampling.generation import generate

    cands = generate(model, tok, prompts, params=params, n_per_prompt=4, record_logps=recorded)
    assert all((c.logp is not None) == recorded for cs in cands for c in cs)
    cfg = TrainConfig(model="tiny", batch_size=1, lr=1e-6, beta=0.1, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    rewards = implicit_rewards(model, tok, prompts, cands, cfg)
    assert [len(r) for r in rewards] == [4, 4]
    pick = by_margin(rewards[1], largest=True)
    example = _pair_example(prompts[1], cands[1][pick.a], cands[1][pick.b])
    metrics = dpo_step(model=model, tokenizer=tok, optimizer=make_optimizer(model, cfg), examples=[example], cfg=cfg)
    assert metrics["reward_margin"] == pytest.approx(rewards[1][pick.a] - rewards[1][pick.b], abs=1e-5)
    assert abs(metrics["reward_margin"]) > 1e-3  # the policy is not the reference: a real margin


def test_generate_records_the_log_probs_a_forward_computes(tiny_policy, monkeypatch):
    """Rows that stop early (a seventh of the vocabulary made end-of-text here) and rows cut at the
    budget, an odd K, temperature and top-p on: each candidate's recorded log-prob equals the
    trainer's forward over its prompt and token ids (eos included, padding not), and the rewards
    from it equal the forward's; the recorded path runs one forward (the reference) instead of two."""
    import dataclasses

    from odpo.trainer.sampling import generation
    from odpo.trainer.training import rewards

    model, tok = tiny_policy
    monkeypatch.setattr(generation, "_eos_ids", lambda m, t: list(range(0, model.config.vocab_size, 7)))
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=6, seed=1)
    prompts = ["Where does the river go?", "Name a colour."]
    cands = generation.generate(model, tok, prompts, params=params, n_per_prompt=3, record_logps=True)
    lengths = {len(c.token_ids) for cs in cands for c in cs}
    assert len(lengths) > 1 and {c.finish_reason for cs in cands for c in cs} == {"stop", "length"}
    cfg = TrainConfig(model="tiny", beta=0.1)
    forwards = []
    original = rewards._logps
    monkeypatch.setattr(rewards, "_logps", lambda *a, **k: forwards.append(k["reference"]) or original(*a, **k))
    recorded = implicit_rewards(model, tok, prompts, cands, cfg)
    assert forwards == [True]  # only the reference's forward
    plain = [[dataclasses.replace(c, logp=None) for c in cs] for cs in cands]
    computed = implicit_rewards(model, tok, prompts, plain, cfg)
    assert forwards == [True, False, True]
    for r, c in zip(recorded, computed, strict=True):
        assert r == pytest.approx(c, abs=1e-5)
    simpo = TrainConfig(model="tiny", loss_type="simpo")  # length-normalised and reference-free: no forward
    simpo_recorded = implicit_rewards(model, tok, prompts, cands, simpo)
    assert forwards == [True, False, True]
    for r, c in zip(simpo_recorded, implicit_rewards(model, tok, prompts, plain, simpo), strict=True):
        assert r == pytest.approx(c, abs=1e-5)
    short = TrainConfig(model="tiny", max_completion_tokens=2)  # the trainer would cut the answers: a forward
    implicit_rewards(model, tok, prompts, cands, short)
    assert forwards == [True, False, True, False, False, True]


def test_only_the_scoring_selectors_ask_generate_for_log_probs():
    score = lambda p, c: [[0.0] * len(x) for x in c]  # noqa: E731
    assert Selector("margin", score=score).scores_candidates and Selector("uncertain", score=score).scores_candidates
    assert not Selector("margin").scores_candidates and not Selector("diverse").scores_candidates


def _pair_example(prompt, a: Generated, b: Generated):
    from odpo.trainer.policy.batching import PairExample

    return PairExample(prompt=prompt, chosen=a.text, rejected=b.text, prompt_ids=a.prompt_token_ids,
                       chosen_ids=a.token_ids, rejected_ids=b.token_ids, chosen_finish=a.finish_reason,
                       rejected_finish=b.finish_reason)


def test_the_dashboard_counts_ties_and_both_bad_per_selector_and_version(database):
    from odpo.app.ui.dashboard import selector_table
    from tests.db_helpers import sample

    with database.sessions.begin() as s:
        store.add_prompts(s, prompts=[store.NewPrompt(text=f"p{i}") for i in range(6)])
        for i, (selector, version, choice) in enumerate([("diverse", 1, "a"), ("diverse", 1, "tie"),
                                                         ("diverse", 2, "both_bad"), (None, 1, "b"),
                                                         (None, 1, "tie"), ("margin", 1, "a")]):
            pair = store.add_pair(s, prompt_id=i + 1, version=version, a=sample("x"), b=sample("y"),
                                  selector=selector)
            store.add_direct_label(s, pair_id=pair.id, labeler="ann", choice=choice, source="human")
        rows = {(r["selector"], r["version"]): r for r in store.choices_by_selector(s)}
    assert rows[("diverse", 1)]["labels"] == 2 and rows[("diverse", 1)]["tie_rate"] == 0.5
    assert rows[("diverse", 2)]["both_bad_rate"] == 1.0 and rows[("margin", 1)]["undecided_rate"] == 0.0
    assert rows[("random", 1)]["undecided_rate"] == 0.5  # pairs from before selectors count as random
    table = selector_table({"selectors": list(rows.values())})
    assert list(table.columns) == ["selector", "version", "labels", "tie", "both bad", "undecided"]
    assert table.iloc[0]["undecided"] == "50%"
