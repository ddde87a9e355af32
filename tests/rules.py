"""Plugin judges for tests and demos: `--judge py:tests.rules:prefer_shorter` and friends.

Each shows one of the return forms a py: plugin may use (see trainer/judges/plugin.py).
"""
from __future__ import annotations


def prefer_shorter(prompt: str, a: str, b: str) -> str:
    """A choice string; ignores position, and says so, so evaluation asks it once per pair."""
    if len(a) == len(b):
        return "tie"
    return "a" if len(a) < len(b) else "b"


prefer_shorter.order_free = True  # type: ignore[attr-defined]


def prefer_longer_probability(prompt: str, a: str, b: str) -> float:
    """A probability that a is better (smooth in the length difference)."""
    return 0.5 + 0.5 * (len(a) - len(b)) / max(len(a), len(b), 1)


def always_first(prompt: str, a: str, b: str) -> str:
    """Pure position bias: whatever is shown first wins (evaluation must not count it as a win)."""
    return "a"


def boom(prompt: str, a: str, b: str) -> str:
    """A broken plugin."""
    raise RuntimeError("plugin exploded")


def boom_on_question(prompt: str, a: str, b: str) -> str:
    """Fails on some inputs only."""
    if "?" in prompt:
        raise ValueError("cannot judge questions")
    return prefer_shorter(prompt, a, b)


def garbage(prompt: str, a: str, b: str) -> object:
    """Returns nothing a judge understands."""
    return {"winner": "a"}


NOT_CALLABLE = 42
