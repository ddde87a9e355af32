"""What the LM judges (hf:, openai:) share: the prompt template and the both-orders debiasing.

An LM asked "A or B?" prefers one position regardless of content (small models strongly so). Each
pair is therefore asked twice, a-first and b-first, and the two answers are combined: a judge that
only ever says "the first one" ends up at P(a better) = 0.5 and says tie or abstains instead of
inventing a preference.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Sequence

from odpo.trainer.judges import JudgeError, Verdict, abstain, check_batch

PLACEHOLDERS = ("prompt", "response_a", "response_b")
_PLACEHOLDER_RE = re.compile(r"\{(prompt|response_a|response_b)\}")
DEFAULT_TEMPLATE_NAME = "default_prompt.txt"

# P(the response shown first is better) per row; None when the judge gave no usable answer.
FirstScorer = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[Optional[float]]]


def load_template(path: Optional[Path] = None) -> str:
    """The judge prompt: the packaged default, or a user file with {prompt}, {response_a} and
    {response_b} placeholders (other braces are left alone, so JSON examples are fine)."""
    if path is None:
        return resources.files("odpo.trainer.judges").joinpath(DEFAULT_TEMPLATE_NAME).read_text(encoding="utf-8")
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JudgeError(f"cannot read judge template {path}: {exc}") from None
    missing = [name for name in PLACEHOLDERS if "{" + name + "}" not in text]
    if missing:
        raise JudgeError(f"judge template {path} lacks the placeholder(s) "
                         + ", ".join("{" + m + "}" for m in missing))
    return text


def fill_template(template: str, *, prompt: str, first: str, second: str, max_chars: int) -> str:
    """One pass of substitution, so a response that itself contains "{response_b}" stays text."""
    values = {"prompt": _clip(prompt, max_chars), "response_a": _clip(first, max_chars),
              "response_b": _clip(second, max_chars)}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


def _clip(text: str, max_chars: int) -> str:
    """Very long responses are cut (marked) so one runaway sample cannot blow the judge's context."""
    return text if len(text) <= max_chars else text[:max_chars] + " [...]"


def combine_orders(p_ab: Optional[float], p_ba: Optional[float], *, abstain_threshold: float,
                   tie_margin: float) -> Verdict:
    """Merge P(first better) from the a-first ask (p_ab) and the b-first ask (p_ba).

    Seen from a, the asks say p1 = p_ab and p2 = 1 - p_ba. When they point different ways by more
    than `abstain_threshold` the judge is following position, not content: abstain. Otherwise
    P(a better) = (p1 + p2) / 2, a tie within `tie_margin` of 0.5.
    """
    if p_ab is None or p_ba is None:
        return abstain("the judge gave no A/B answer in " + ("both orders" if p_ab is p_ba else "one order"))
    p1, p2 = float(p_ab), 1.0 - float(p_ba)
    if (p1 - 0.5) * (p2 - 0.5) < 0 and abs(p1 - p2) > abstain_threshold:
        return Verdict("abstain", confidence=0.0, p_a=(p1 + p2) / 2,
                       reason=f"orders disagree (P(a) {p1:.2f} a-first vs {p2:.2f} b-first)")
    p_a = (p1 + p2) / 2
    if abs(p_a - 0.5) < tie_margin:
        return Verdict("tie", confidence=1.0 - 2.0 * abs(p_a - 0.5), p_a=p_a)
    return Verdict("a" if p_a > 0.5 else "b", confidence=max(p_a, 1.0 - p_a), p_a=p_a)


def judge_both_orders(score_first: FirstScorer, prompts: Sequence[str], responses_a: Sequence[str],
                      responses_b: Sequence[str], *, abstain_threshold: float,
                      tie_margin: float) -> list[Verdict]:
    """Ask every pair a-first and b-first in ONE batched scorer call, then combine per pair."""
    check_batch(prompts, responses_a, responses_b)
    n = len(prompts)
    if n == 0:
        return []
    firsts = list(responses_a) + list(responses_b)
    seconds = list(responses_b) + list(responses_a)
    scores = score_first(list(prompts) * 2, firsts, seconds)
    if len(scores) != 2 * n:
        raise RuntimeError(f"scorer returned {len(scores)} scores for {2 * n} rows")
    return [combine_orders(scores[i], scores[n + i], abstain_threshold=abstain_threshold,
                           tie_margin=tie_margin) for i in range(n)]


class BothOrdersJudge:
    """Shared `judge()` of the LM judges (hf:, openai:): each asks "is the first response better?"
    through `score_first` and is asked in both orders, so a position bias cancels out."""

    options: "object"

    def score_first(self, prompts: Sequence[str], firsts: Sequence[str],
                    seconds: Sequence[str]) -> list[Optional[float]]:
        raise NotImplementedError

    def judge(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str]) -> list[Verdict]:
        return judge_both_orders(self.score_first, prompts, responses_a, responses_b,
                                 abstain_threshold=self.options.abstain_threshold,
                                 tie_margin=self.options.tie_margin)
