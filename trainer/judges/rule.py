"""Rule judges: instant, deterministic preferences for demos, tests and learning benchmarks.

    rule:shorter          fewer characters wins          rule:longer         more characters wins
    rule:contains:<word>  the response containing <word> (case-insensitive) wins
    rule:avoid:<word>     the response without <word> wins
    rule:regex:<pattern>  the response matching <pattern> (re.search) wins
    rule:length:<n>       the word count closer to <n> wins (a target length to learn)
    rule:random[:<seed>]  a reproducible coin flip (the noise floor of a benchmark)
    rule:say_the_early    the response that says "the" earlier (in characters) wins; never saying
                          it loses
    rule:finished_and_short  a response that ends its sentence beats one cut off mid-sentence;
                          between two of the same kind the shorter wins
    rule:on_topic         the response that takes up more of the prompt's own content words, and
                          sooner, wins: a preference about what is said, not how

Every rule says both_bad when both responses are empty and tie when it cannot separate them.
Rules only look at content, never at position, so they are order-free.

The last two label the learning benchmark (`bench learn`); they were `py:` plugins inside the
harness once, and are built in so the product never imports it. A learning benchmark needs a
preference whose effect shows inside the generation length (a pure length rule does not once both
samples hit max_new_tokens) and that decides most pairs (a tie is a label spent without a training
signal, since odpo does not train on ties by default).
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Callable, Sequence

from odpo.trainer.judges import JudgeError, Verdict, check_batch

# A rule maps (prompt, a, b) to a signed preference: > 0 a wins, < 0 b wins, 0 tie.
Rule = Callable[[str, str, str], float]
RULE_NAMES = ("shorter", "longer", "contains:<word>", "avoid:<word>", "regex:<pattern>", "length:<n>",
              "random[:<seed>]", "say_the_early", "finished_and_short", "on_topic")

_THE = re.compile(r"\bthe\b", re.IGNORECASE)
_ENDS = re.compile(r"[.!?](\s*[\"')\]]*)?\s*$")  # a sentence end, maybe inside closing quotes/brackets


def _sign(difference: float) -> float:
    return float((difference > 0) - (difference < 0))


def _first_the(text: str) -> float:
    match = _THE.search(text)
    return float(match.start()) if match else math.inf


def say_the_early(_prompt: str, a: str, b: str) -> float:
    """The response that says "the" earlier (in characters) wins; one that never does loses.

    Graded, so nearly every pair of different responses is decided, and the best a policy can do
    is to open with "The": a style a 135M model picks up within a few DPO steps, visible in the
    first token whatever max_new_tokens is."""
    pa, pb = _first_the(a), _first_the(b)
    return 0.0 if pa == pb else _sign(pb - pa)  # compared first: inf - inf would be nan


def finished_and_short(_prompt: str, a: str, b: str) -> float:
    """A response that ends a sentence beats one cut off mid-sentence; between two of the same kind
    the shorter wins.

    Ending a sentence stands in for finish_reason "stop" (rules see text only). Needs a generation
    length where some answers end (e.g. --max-new-tokens 96 or more)."""
    a, b = a.strip(), b.strip()
    ends_a, ends_b = bool(_ENDS.search(a)), bool(_ENDS.search(b))
    if ends_a != ends_b:
        return 1.0 if ends_a else -1.0
    return _sign(len(b) - len(a))


_WORD = re.compile(r"[a-z][a-z'-]{3,}")
_STOPWORDS = frozenset("""about after again also because been before being between both could does doing down
during each from have having here into itself just more most much only other over same should some such than
that their them then there these they this those through under until very what when where which while will
with would your yours write tell give make explain describe please""".split())


def _topic_score(prompt: str, text: str) -> float:
    """How much of the prompt's content (its words of four letters or more, stopwords aside) the
    text takes up, each word weighted by how soon it first appears: 1 in the first ten words,
    halving every ten words after. Graded, so two different answers seldom tie."""
    keywords = set(_WORD.findall(prompt.lower())) - _STOPWORDS
    words = [w.strip("'-") for w in _WORD.findall(text.lower())]
    first = {}
    for i, word in enumerate(words):
        first.setdefault(word, i)
    return sum(0.5 ** (first[k] // 10) for k in keywords if k in first)


def on_topic(prompt: str, a: str, b: str) -> float:
    """The response that takes up more of the prompt's own content words, and sooner, wins.

    A content preference for the learning benchmark, beside the two about form: it depends on the
    prompt (no one style satisfies it), and the base often drifts off topic within 64 tokens."""
    return _sign(_topic_score(prompt, a) - _topic_score(prompt, b))


# Rules that take no argument, by name.
_PLAIN: dict[str, Rule] = {
    "shorter": lambda _p, a, b: float(len(b.strip()) - len(a.strip())),
    "longer": lambda _p, a, b: float(len(a.strip()) - len(b.strip())),
    "say_the_early": say_the_early,
    "finished_and_short": finished_and_short,
    "on_topic": on_topic,
}


def _has(word: str) -> Rule:
    needle = word.casefold()
    return lambda _p, a, b: float(needle in a.casefold()) - float(needle in b.casefold())


def _closer_to(target: int) -> Rule:
    return lambda _p, a, b: float(abs(len(b.split()) - target) - abs(len(a.split()) - target))


def _coin(seed: str) -> Rule:
    def rule(prompt: str, a: str, b: str) -> float:
        if a == b:
            return 0.0
        low, high = sorted((a, b))  # sorted, so swapping a and b flips the answer, not the coin
        digest = hashlib.sha256("\x00".join((seed, prompt, low, high)).encode()).digest()
        winner = low if digest[0] % 2 == 0 else high
        return 1.0 if winner == a else -1.0

    return rule


def build_rule(name: str) -> Rule:
    """The rule a name selects; a JudgeError listing the valid names otherwise."""
    if name in _PLAIN:
        return _PLAIN[name]
    head, _, arg = name.partition(":")
    if head == "contains" and arg:
        return _has(arg)
    if head == "avoid" and arg:
        has = _has(arg)
        return lambda p, a, b: -has(p, a, b)
    if head == "regex" and arg:
        try:
            pattern = re.compile(arg)
        except re.error as exc:
            raise JudgeError(f"rule:regex: invalid pattern {arg!r}: {exc}") from None
        return lambda _p, a, b: float(bool(pattern.search(a))) - float(bool(pattern.search(b)))
    if head == "length" and arg.isdigit():
        return _closer_to(int(arg))
    if head == "random":
        return _coin(arg)
    raise JudgeError(f"unknown rule {name!r}; rules: {', '.join(RULE_NAMES)}")


class RuleJudge:
    """A judge made of one rule."""

    order_free = True

    def __init__(self, name: str, *, spec: str | None = None) -> None:
        self.rule = build_rule(name)
        self.spec = spec or f"rule:{name}"

    def judge(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, responses_a, responses_b)
        return [self._one(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b, strict=True)]

    def _one(self, prompt: str, a: str, b: str) -> Verdict:
        if not a.strip() and not b.strip():
            return Verdict("both_bad", p_a=0.5)
        score = self.rule(prompt, a, b)
        if score == 0:
            return Verdict("tie", p_a=0.5)
        return Verdict("a", p_a=1.0) if score > 0 else Verdict("b", p_a=0.0)

    def close(self) -> None:
        """Nothing to release."""
