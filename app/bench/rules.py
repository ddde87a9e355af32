"""Labeler rules for `odpo bench learn`, as py: judge plugins (`--rule py:odpo.app.bench.rules:NAME`).

A learning benchmark needs a preference whose effect shows inside the generation length (a length
rule does not once both samples hit max_new_tokens) and that decides most pairs (a tie is a label
spent without a training signal, since odpo does not train on ties by default).
"""
from __future__ import annotations

import math
import re

_THE = re.compile(r"\bthe\b", re.IGNORECASE)
_ENDS = re.compile(r"[.!?](\s*[\"')\]]*)?\s*$")


def _first_the(text: str) -> float:
    match = _THE.search(text)
    return float(match.start()) if match else math.inf


def say_the_early(prompt: str, a: str, b: str) -> str:
    """The response that says "the" earlier (in characters) wins; one that never does loses.

    Graded, so nearly every pair of different responses is decided, and the best a policy can do
    is to open with "The": a style a 135M model picks up within a few DPO steps, visible in the
    first token whatever max_new_tokens is.
    """
    pa, pb = _first_the(a), _first_the(b)
    if pa == pb:
        return "tie"
    return "a" if pa < pb else "b"


say_the_early.order_free = True  # type: ignore[attr-defined]


def finished_and_short(prompt: str, a: str, b: str) -> str:
    """A response that ends a sentence (a proxy for finish_reason "stop": py rules see text only)
    beats one cut off mid-sentence; between two of the same kind the shorter wins. Needs a
    generation length where some answers end (e.g. --max-new-tokens 96 or more)."""
    ea, eb = bool(_ENDS.search(a.strip())), bool(_ENDS.search(b.strip()))
    if ea != eb:
        return "a" if ea else "b"
    la, lb = len(a.strip()), len(b.strip())
    if la == lb:
        return "tie"
    return "a" if la < lb else "b"


finished_and_short.order_free = True  # type: ignore[attr-defined]
