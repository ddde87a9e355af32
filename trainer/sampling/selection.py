"""Which two of a prompt's K candidates a person sees: the pair selectors.

Labels are the scarce resource, so the sampler can draw K completions per prompt in its one
batched call (`--candidates K`) and show the pair a label teaches most:

- random: two at random (K = 2 is today's pair).
- margin: the largest gap in the policy's implicit reward beta*(log pi - log ref), computed with the
  trainer's own scoring (trainer/training/rewards.py): the pair the policy already ranks most
  apart, best-vs-worst as in RLHFlow's iterative DPO (there with a reward model).
- uncertain: the smallest gap: where the policy cannot tell (Muldrew et al. 2024 select by the
  policy's implicit-reward certainty).
- diverse: the largest token-level distance, so the two answers differ and a tie is less likely.
- judge-uncertain: a judge compares every pair of candidates in both orders; people see the pair
  it is least sure of (or whose orders disagree); the pair it is surest of can be labeled by the
  judge itself (`auto_label_confident`).

At version 0 the policy is the reference, every margin is 0, and margin/uncertain fall back to
random. The candidates not shown stay stored with their pair (never trained: only labels train).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from odpo.trainer.options import SCORING_SELECTORS, SELECTORS


@dataclass(frozen=True)
class Pick:
    """The pair to show (indices into the candidates), each candidate's score when the selector
    scored them, and a confident judge verdict on another pair to auto-label."""

    a: int
    b: int
    scores: Optional[list[float]] = None
    auto: Optional[tuple[int, int, str, float]] = None  # (i, j, "a"/"b", confidence) of pair (i, j)


@dataclass
class Selector:
    """Picks a pair per prompt. `score` (margin selectors) maps (prompts, candidates) to per-candidate
    implicit rewards; `judge` (judge-uncertain) is a pairwise judge; `version` is the serving one."""

    name: str = "random"
    seed: Optional[int] = None
    score: Optional[Callable[[Sequence[Any], Sequence[Sequence[Any]]], list[list[float]]]] = None
    judge: Any = None
    auto_label_confident: Optional[float] = None  # judge confidence at or above which it labels itself
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if self.name not in SELECTORS:
            raise ValueError(f"selector must be one of {', '.join(SELECTORS)}, got {self.name!r}")
        self.rng = random.Random(self.seed)

    @property
    def scores_candidates(self) -> bool:
        """margin / uncertain score every candidate with the policy: the generate call records the
        policy's log-probs for them (trainer/training/rewards.py), which saves a forward."""
        return self.name in SCORING_SELECTORS and self.score is not None

    def pick(self, prompts: Sequence[Any], candidates: Sequence[Sequence[Any]], *, version: int) -> list[Pick]:
        if self.name == "random" or all(len(c) == 2 for c in candidates):
            return [self._random(len(c)) for c in candidates]
        if self.name in SCORING_SELECTORS:
            if version == 0 or self.score is None:
                return [self._random(len(c)) for c in candidates]
            scores = self.score(prompts, candidates)
            return [by_margin(s, largest=self.name == "margin") for s in scores]
        if self.name == "diverse":
            return [most_distant([c.token_ids for c in cands]) for cands in candidates]
        return [self._by_judge(p, c) for p, c in zip(prompts, candidates, strict=True)]

    def _random(self, k: int) -> Pick:
        a, b = self.rng.sample(range(k), 2)
        return Pick(min(a, b), max(a, b))

    def _by_judge(self, prompt: Any, cands: Sequence[Any]) -> Pick:
        verdicts = judge_all_pairs(self.judge, prompt, [c.text for c in cands])
        least = min(verdicts, key=lambda v: (v.sure, v.i, v.j))
        auto = None
        if self.auto_label_confident is not None:
            most = max((v for v in verdicts if (v.i, v.j) != (least.i, least.j)), key=lambda v: v.sure, default=None)
            if most is not None and most.sure >= self.auto_label_confident and most.choice in ("a", "b"):
                auto = (most.i, most.j, most.choice, most.sure)
        return Pick(least.i, least.j, auto=auto)


def by_margin(scores: Sequence[float], *, largest: bool) -> Pick:
    """The pair of candidates whose scores are furthest apart (largest) or closest (not largest);
    ties broken by the lower indices, so a fixed input gives a fixed pair."""
    pairs = list(itertools.combinations(range(len(scores)), 2))
    gap = {p: abs(scores[p[0]] - scores[p[1]]) for p in pairs}
    best = max(pairs, key=lambda p: (gap[p], -p[0], -p[1])) if largest else min(pairs, key=lambda p: (gap[p], p))
    return Pick(best[0], best[1], scores=list(scores))


def most_distant(token_ids: Sequence[Sequence[int]]) -> Pick:
    """The pair with the largest normalised token edit distance (0 = same tokens, 1 = nothing alike)."""
    pairs = list(itertools.combinations(range(len(token_ids)), 2))
    dist = {p: token_distance(token_ids[p[0]], token_ids[p[1]]) for p in pairs}
    best = max(pairs, key=lambda p: (dist[p], -p[0], -p[1]))
    return Pick(best[0], best[1])


def token_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Levenshtein distance over token ids, divided by the longer length."""
    if not a and not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1] / max(len(a), len(b))


@dataclass(frozen=True)
class PairVerdict:
    i: int
    j: int
    choice: str  # "a" (candidate i) / "b" (candidate j) / "tie" / "both_bad": the two orders' consensus
    sure: float  # 0.5 + half the agreement: 1.0 both orders confident and agreeing, 0.5 split or unsure


def judge_all_pairs(judge: Any, prompt: Any, texts: Sequence[str]) -> list[PairVerdict]:
    """Every pair of candidates judged in both orders (one batched call): how sure the judge is of
    each, with a disagreement between the orders counted as not sure at all."""
    pairs = list(itertools.combinations(range(len(texts)), 2))
    firsts = [texts[i] for i, j in pairs] + [texts[j] for i, j in pairs]
    seconds = [texts[j] for i, j in pairs] + [texts[i] for i, j in pairs]
    verdicts = judge.judge([prompt] * len(firsts), firsts, seconds)
    out = []
    for k, (i, j) in enumerate(pairs):
        fwd, back = verdicts[k], verdicts[k + len(pairs)]
        p_fwd, p_back = _prob_first(fwd), 1.0 - _prob_first(back)  # both: P(candidate i is better)
        if (p_fwd - 0.5) * (p_back - 0.5) < 0:  # the orders disagree: position, not content, decided
            out.append(PairVerdict(i, j, "tie", 0.5))
            continue
        p = (p_fwd + p_back) / 2
        choice = "a" if p > 0.5 else "b" if p < 0.5 else "tie"
        out.append(PairVerdict(i, j, choice, 0.5 + abs(p - 0.5)))
    return out


def _prob_first(verdict: Any) -> float:
    """P(the first response is better) from a judge's Verdict: its own probability when it has one,
    else from its choice and confidence."""
    if verdict.p_a is not None:
        return float(verdict.p_a)
    conf = verdict.confidence if verdict.confidence is not None else 1.0
    if verdict.choice == "a":
        return 0.5 + conf / 2
    if verdict.choice == "b":
        return 0.5 - conf / 2
    return 0.5
