"""Arms of the learn table against each other, and how many labels each needs to reach a target.

Head to head, paired: every arm evaluates its policy at each curve point on the same held-out
prompts with the same sampling seed (bench/learn.py `evaluate`, which keeps the answers), so two
arms of one rule, loss and seed are compared prompt by prompt with the rule judge, without
sampling again. A prompt scores 1 (A's answer wins), 0.5 (tie) or 0. Pooled over seeds, the win
rate is the mean, and its 95 % interval a paired bootstrap: prompts are resampled within each seed
(the seeds stay as they ran), the same resample for both arms, because they answered the same
prompts. That is why a head-to-head has more power than comparing two rates against the base.

Self-ties: held-out prompts come up more than once in an evaluation, each time with its own sampling
seed, so an arm's two answers to one prompt are two fresh samples of its policy; the share the rule
calls a tie (or both bad) is how much of the next labeling budget that policy would spend on pairs
that teach nothing, measured without sampling again.

Labels to a target: the first point of the pooled vs-base curve at or above the target win rate,
interpolated linearly from the point before (with 0 labels at 0.5, the base against itself).
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Any, Optional, Sequence

from odpo.bench.learn_table import split_label

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 2000
TARGET_RATES = (0.8, 0.9)


def paired_bootstrap(groups: Sequence[Sequence[float]], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the scores pooled over groups (seeds), the interval by resampling each
    group's items with replacement (stratified by group), percentile method, fixed RNG seed."""
    flat = [x for g in groups for x in g]
    if not flat:
        raise ValueError("no scores to pool")
    mean = sum(flat) / len(flat)
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        total = 0.0
        for g in groups:
            total += sum(g[rng.randrange(len(g))] for _ in range(len(g)))
        means.append(total / len(flat))
    means.sort()
    tail = (1 - level) / 2
    return mean, means[int(tail * resamples)], means[min(resamples - 1, int((1 - tail) * resamples))]


def point_scores(judge: Any, a: dict[str, Any], b: dict[str, Any]) -> Optional[list[float]]:
    """A's answer against B's, prompt by prompt (1 / 0.5 / 0; an abstention drops the prompt from
    both); None when either point has no answers or they answered other prompts."""
    if not a.get("answers") or not b.get("answers") or a.get("prompt_ids") != b.get("prompt_ids"):
        return None
    prompts = a.get("prompts") or [""] * len(a["answers"])
    verdicts = judge.judge(prompts, a["answers"], b["answers"])
    if not getattr(judge, "order_free", False):
        swapped = judge.judge(prompts, b["answers"], a["answers"])
        verdicts = [(v, s.swapped()) for v, s in zip(verdicts, swapped, strict=True)]
    else:
        verdicts = [(v, v) for v in verdicts]
    out = []
    for first, second in verdicts:
        scores = [_score(first), _score(second)]
        if None not in scores:
            out.append(sum(scores) / 2)
    return out


def _score(verdict: Any) -> Optional[float]:
    return {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}.get(verdict.choice)


def head_to_head(arms: Sequence[dict[str, Any]], judges: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pair of modes of one rule and loss, at every curve point both reached, pooled over the
    seeds both ran: mode A's win rate over mode B with its paired bootstrap interval."""
    by_key: dict[tuple, dict[str, list[list[float]]]] = {}
    for rule, loss in dict.fromkeys((a["rule"], a["loss"]) for a in arms):
        mine = [a for a in arms if (a["rule"], a["loss"]) == (rule, loss)]
        modes = sorted(dict.fromkeys(a["mode"] for a in mine), key=_rank)
        for mode_a, mode_b in itertools.combinations(modes, 2):
            for seed in sorted({a["seed"] for a in mine}):
                arm_a = next((a for a in mine if (a["mode"], a["seed"]) == (mode_a, seed)), None)
                arm_b = next((a for a in mine if (a["mode"], a["seed"]) == (mode_b, seed)), None)
                if arm_a is None or arm_b is None:
                    continue
                points_b = {p["labels"]: p for p in arm_b.get("curve", [])}
                for pa in arm_a.get("curve", []):
                    pb = points_b.get(pa["labels"])
                    scores = None if pb is None else point_scores(judges[rule], pa, pb)
                    if scores:
                        key = (rule, loss, mode_a, mode_b, pa["labels"])
                        by_key.setdefault(key, {}).setdefault(str(seed), []).append(scores)
    out = []
    for (rule, loss, mode_a, mode_b, labels), seeds in by_key.items():
        groups = [g for lists in seeds.values() for g in lists]
        rate, low, high = paired_bootstrap(groups)
        out.append({"rule": rule, "loss": loss, "a": mode_a, "b": mode_b, "labels": labels, "win_rate": rate,
                    "low": low, "high": high, "n": sum(len(g) for g in groups), "seeds": sorted(seeds, key=int),
                    "interval": f"paired bootstrap, {BOOTSTRAP_RESAMPLES} resamples within seeds"})
    return out


def _rank(name: str) -> tuple[int, int, str]:
    """Pairs read as the more on-policy arm against the less (selectors, online, iterative,
    offline) and, within a mode, the arm with more passes against the one with fewer."""
    mode, passes = split_label(name)
    return ({"online": 1, "iterative": 2, "offline": 3}.get(mode, 0), -passes, name)


def labels_to(curve: Sequence[dict[str, Any]], target: float) -> Optional[float]:
    """Labels at which the pooled vs-base curve first reaches `target` (linear between points,
    starting from 0 labels at 0.5); None if it never does within the budget."""
    previous = (0, 0.5)
    for point in curve:
        rate = point.get("win_rate")
        if rate is None:
            continue
        if rate >= target:
            (x0, y0), (x1, y1) = previous, (point["labels"], rate)
            return float(x1) if y1 == y0 else x0 + (target - y0) * (x1 - x0) / (y1 - y0)
        previous = (point["labels"], rate)
    return None


def annotate(cell: dict[str, Any], arms: Sequence[dict[str, Any]]) -> None:
    """A cell's labels to each target rate, and its decisive-label share (A or B of all labels)."""
    for target in TARGET_RATES:
        cell[f"labels_to_{target}"] = labels_to(cell.get("curve", []), target)
    used = sum(a.get("labels_used", 0) for a in arms)
    decided = sum(int((a.get("choices") or {}).get(k, 0)) for a in arms for k in ("a", "b"))
    cell["decisive_share"] = decided / used if used else None


def self_tie_share(judge: Any, point: dict[str, Any]) -> Optional[tuple[int, int]]:
    """(ties, pairs): of the prompts a curve point answered twice, how many the judge calls a tie
    or both bad; None without repeated prompts or answers."""
    first: dict[Any, int] = {}
    pairs: list[tuple[int, int]] = []
    for i, pid in enumerate(point.get("prompt_ids") or []):
        if pid in first:
            pairs.append((first.pop(pid), i))
        else:
            first[pid] = i
    answers = point.get("answers") or []
    if not pairs or len(answers) != len(point["prompt_ids"]):
        return None
    prompts = point.get("prompts") or [""] * len(answers)
    verdicts = judge.judge([prompts[i] for i, _ in pairs], [answers[i] for i, _ in pairs],
                           [answers[j] for _, j in pairs])
    return sum(v.choice in ("tie", "both_bad") for v in verdicts), len(pairs)


def annotate_self_ties(cell: dict[str, Any], arms: Sequence[dict[str, Any]], judge: Any) -> None:
    """Each point of a cell's curve gains `self_tie_share`, pooled over the cell's seeds."""
    for point in cell.get("curve", []):
        counts = [self_tie_share(judge, p) for a in arms for p in a.get("curve", []) if p["labels"] == point["labels"]]
        counts = [c for c in counts if c]
        pairs = sum(n for _, n in counts)
        point["self_tie_share"] = sum(t for t, _ in counts) / pairs if pairs else None
        point["self_tie_pairs"] = pairs
