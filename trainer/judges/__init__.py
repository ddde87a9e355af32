"""Pairwise judges: one interface for every way of deciding which of two responses is better.

A judge spec string picks the implementation (see `load_judge`):

    rule:<name>                 built-in rules for demos and benchmarks (trainer/judges/rule.py)
    py:package.module:function  a user plugin, function(prompt, a, b) -> choice or P(a better)
    hf:<model spec>             a local causal LM asked "A or B?", scored from next-token probabilities
    openai:<model>@<base_url>   any OpenAI-compatible chat-completions endpoint
    rm:<model spec>             a sequence-classification reward model scoring each response

Every judge is batched: ``judge(prompts, responses_a, responses_b) -> list[Verdict]``. LM judges
ask in both orders inside each call (position bias cancels); rules and reward models do not depend
on the order at all. ``order_free`` says which is which, so evaluation knows whether it must swap
the order itself (plugins) or can trust a single call.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Protocol, Sequence, runtime_checkable

from odpo.db.errors import OdpoError

VERDICT_CHOICES = ("a", "b", "tie", "both_bad", "abstain")
SPEC_KINDS = ("rule", "py", "hf", "openai", "rm")
LABELER_MAX_CHARS = 200  # labels.labeler is a VARCHAR(200)


class JudgeError(OdpoError):
    """A judge that cannot be built or used (bad spec, bad template, broken plugin)."""


class JudgeUnreachableError(JudgeError):
    """An HTTP judge endpoint that does not answer (after retries)."""


@dataclass(frozen=True)
class Verdict:
    """One decision. `confidence` is how sure the judge is of `choice` (0..1); `p_a` is its
    probability that response a is better when it has one; `reason` explains abstentions."""

    choice: str
    confidence: float = 1.0
    p_a: Optional[float] = None
    reason: str = ""
    failed: bool = False  # an abstention because the judge broke (raised, timed out), not because it was unsure

    def __post_init__(self) -> None:
        if self.choice not in VERDICT_CHOICES:
            raise ValueError(f"verdict choice must be one of {VERDICT_CHOICES}, got {self.choice!r}")
        object.__setattr__(self, "confidence", min(1.0, max(0.0, float(self.confidence))))

    def swapped(self) -> "Verdict":
        """The same verdict with a and b exchanged (for a call made with the order swapped)."""
        choice = {"a": "b", "b": "a"}.get(self.choice, self.choice)
        p_a = None if self.p_a is None else 1.0 - self.p_a
        return replace(self, choice=choice, p_a=p_a)


def abstain(reason: str, *, failed: bool = False) -> Verdict:
    return Verdict("abstain", confidence=0.0, reason=reason, failed=failed)


@runtime_checkable
class Judge(Protocol):
    """What every judge offers. `spec` is the string it was built from (it names the labels)."""

    spec: str
    order_free: bool

    def judge(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str]) -> list[Verdict]:
        """One verdict per (prompt, a, b) triple, in order."""

    def close(self) -> None:
        """Release models, HTTP clients."""


@dataclass(frozen=True)
class JudgeOptions:
    """Knobs shared by the judges; each judge reads the ones that concern it.

    abstain_threshold: LM judges abstain when the two orders point different ways and their
    P(a better) differ by more than this. tie_margin: |P(a better) - 0.5| below it is a tie.
    timeout_s: seconds per HTTP request (openai:) and per call of a py: plugin (`--judge-timeout`).
    """

    template: Optional[Path] = None
    cache_dir: Optional[Path] = None
    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool = False  # hf: judges: the judge model's linear layers in 4-bit NF4 (QLoRA's format)
    abstain_threshold: float = 0.5
    tie_margin: float = 0.05
    batch_size: int = 8
    max_response_chars: int = 4000
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 0.5
    concurrency: int = 8
    top_logprobs: int = 20
    max_consecutive_errors: int = 20

    def __post_init__(self) -> None:
        checks = [(0.0 <= self.abstain_threshold <= 1.0, "abstain_threshold must be in [0, 1]"),
                  (0.0 <= self.tie_margin < 0.5, "tie_margin must be in [0, 0.5)"),
                  (self.batch_size >= 1, "batch_size must be >= 1"),
                  (self.max_response_chars >= 1, "max_response_chars must be >= 1"),
                  (self.timeout_s > 0, "timeout_s must be > 0"),
                  (self.retries >= 0, "retries must be >= 0"),
                  (self.concurrency >= 1, "concurrency must be >= 1"),
                  (1 <= self.top_logprobs, "top_logprobs must be >= 1"),
                  (self.max_consecutive_errors >= 1, "max_consecutive_errors must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise JudgeError(message)


def split_spec(spec: str) -> tuple[str, str]:
    """'kind:rest' -> (kind, rest), with a message naming the valid kinds when it is not one."""
    kind, sep, rest = (spec or "").strip().partition(":")
    if not sep or kind not in SPEC_KINDS or not rest.strip():
        raise JudgeError(f"unknown judge spec {spec!r}: expected one of rule:<name>, py:module:function, "
                         "hf:<model>, openai:<model>@<base_url>, rm:<model>")
    return kind, rest.strip()


def load_judge(spec: str, options: Optional[JudgeOptions] = None) -> Judge:
    """Build the judge a spec names. Models load here (not at import), errors are JudgeErrors."""
    options = options or JudgeOptions()
    kind, rest = split_spec(spec)
    spec = f"{kind}:{rest}"
    if kind == "rule":
        from odpo.trainer.judges.rule import RuleJudge

        return RuleJudge(rest, spec=spec)
    if kind == "py":
        from odpo.trainer.judges.plugin import PluginJudge

        return PluginJudge.from_path(rest, spec=spec, options=options)
    if kind == "hf":
        from odpo.trainer.judges.hf import HFJudge

        return HFJudge.from_spec(rest, spec=spec, options=options)
    if kind == "openai":
        from odpo.trainer.judges.openai_judge import OpenAIJudge

        return OpenAIJudge.from_spec(rest, spec=spec, options=options)
    from odpo.trainer.judges.reward_model import RewardModelJudge

    return RewardModelJudge.from_spec(rest, spec=spec, options=options)


def judge_labeler_name(spec: str) -> str:
    """The labeler/source name of a judge's labels: "judge:<spec>", shortened with a hash when the
    spec (a long URL or path) would not fit the column."""
    name = f"judge:{spec}"
    if len(name) <= LABELER_MAX_CHARS:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[:LABELER_MAX_CHARS - 11]}~{digest}"


def check_batch(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> None:
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"judge needs equal-length inputs, got {len(prompts)} prompts, "
                         f"{len(responses_a)} a-responses and {len(responses_b)} b-responses")
