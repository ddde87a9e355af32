"""The learn table's head-to-head maths (bench/learn_h2h.py) on fixed inputs: the paired bootstrap,
arms judged prompt by prompt (symmetric), labels to a target, and how the table reports them."""
from __future__ import annotations

import math

import pytest

from odpo.bench.learn_h2h import (
    annotate,
    annotate_self_ties,
    head_to_head,
    labels_to,
    paired_bootstrap,
    point_scores,
    self_tie_share,
)
from odpo.trainer.judges import load_judge


def test_the_paired_bootstrap_gives_a_known_interval():
    assert paired_bootstrap([[1.0] * 10, [1.0] * 5]) == (1.0, 1.0, 1.0)  # no spread, no interval
    assert paired_bootstrap([[0.5] * 40]) == (0.5, 0.5, 0.5)
    # 0/1 scores, half and half, n = 400: the bootstrap interval of a mean is the normal one,
    # 0.5 +- 1.96 * sqrt(0.25 / 400) = 0.5 +- 0.049, to within the resampling noise
    rate, low, high = paired_bootstrap([[1.0, 0.0] * 100, [0.0, 1.0] * 100])
    half = 1.96 * math.sqrt(0.25 / 400)
    assert rate == 0.5 and low == pytest.approx(0.5 - half, abs=0.01) and high == pytest.approx(0.5 + half, abs=0.01)
    assert paired_bootstrap([[1.0, 0.0] * 100, [0.0, 1.0] * 100]) == (rate, low, high)  # fixed seed: repeatable
    with pytest.raises(ValueError, match="no scores"):
        paired_bootstrap([[]])


def _point(labels, answers, prompts=None):
    return {"labels": labels, "prompt_ids": list(range(len(answers))), "answers": answers,
            "prompts": prompts or ["q"] * len(answers), "win_rate": None}


def _arm(mode, seed, *points, rule="rule:shorter"):
    return {"rule": rule, "loss": "sigmoid", "mode": mode, "seed": seed, "curve": list(points), "labels_used": 8,
            "choices": {"a": 3, "b": 2, "tie": 3}}


def test_head_to_head_is_symmetric_and_pools_seeds():
    judge = load_judge("rule:shorter")
    a = _point(8, ["x", "xxxx", "xx", "xxx"])
    b = _point(8, ["xx", "xx", "xx", "x"])
    assert point_scores(judge, a, b) == [1.0, 0.0, 0.5, 0.0]
    assert point_scores(judge, b, a) == [0.0, 1.0, 0.5, 1.0]  # A vs B = 1 - B vs A, prompt by prompt
    assert point_scores(judge, a, _point(8, ["x"] * 3)) is None  # other prompts: not paired
    arms = [_arm("online", 0, a), _arm("offline", 0, b), _arm("online", 1, _point(8, ["x", "x"])),
            _arm("offline", 1, _point(8, ["xx", "xx"]))]
    (pair,) = head_to_head(arms, {"rule:shorter": judge})
    assert (pair["a"], pair["b"], pair["labels"], pair["n"], pair["seeds"]) == ("online", "offline", 8, 6, ["0", "1"])
    assert pair["win_rate"] == pytest.approx((1 + 0 + 0.5 + 0 + 1 + 1) / 6)
    assert pair["low"] <= pair["win_rate"] <= pair["high"]


def test_labels_to_a_target_interpolates_the_pooled_curve():
    curve = [{"labels": 50, "win_rate": 0.7}, {"labels": 100, "win_rate": 0.9}, {"labels": 150, "win_rate": 0.95}]
    assert labels_to(curve, 0.8) == pytest.approx(75.0)  # halfway from 0.7 at 50 to 0.9 at 100
    assert labels_to(curve, 0.9) == 100.0
    assert labels_to(curve, 0.6) == pytest.approx(25.0)  # from 0.5 at 0 labels
    assert labels_to(curve, 0.99) is None
    cell = {"curve": curve}
    annotate(cell, [_arm("online", 0), _arm("online", 1)])
    assert cell["labels_to_0.8"] == pytest.approx(75.0) and cell["labels_to_0.9"] == 100.0
    assert cell["decisive_share"] == pytest.approx(10 / 16)


def test_self_ties_judge_an_arms_two_answers_to_a_repeated_prompt():
    judge = load_judge("rule:say_the_early")
    # prompts 7 and 9 were answered twice (two sampling seeds), 8 once: two pairs, one a tie
    point = {"labels": 50, "prompt_ids": [7, 8, 9, 7, 9], "prompts": ["q"] * 5,
             "answers": ["The cat.", "Hi.", "A dog, the end.", "The hat.", "The dog."]}
    assert self_tie_share(judge, point) == (1, 2)  # (7: both open with "The") tie, (9) decided
    assert self_tie_share(judge, {**point, "prompt_ids": [1, 2, 3, 4, 5]}) is None  # nothing repeated
    assert self_tie_share(judge, {**point, "answers": []}) is None
    other = {**point, "answers": ["The a", "x", "The b", "The c", "The d"]}  # both pairs tie
    cell = {"curve": [{"labels": 50}, {"labels": 100}]}
    annotate_self_ties(cell, [_arm("online", 0, point), _arm("online", 1, other)], judge)
    assert cell["curve"][0]["self_tie_share"] == pytest.approx(3 / 4) and cell["curve"][0]["self_tie_pairs"] == 4
    assert cell["curve"][1]["self_tie_share"] is None and cell["curve"][1]["self_tie_pairs"] == 0
