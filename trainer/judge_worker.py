"""The judge worker behind `odpo judge`: labels pairs with a judge, side by side with people.

Three modes:
  queue    (default) claim queued pairs through the same store.claim_next_pair/record_label path
           people use, so a judge and a person never get the same pair; `fraction` < 1 leaves a
           deterministic share of pairs (by pair id) to people.
  skipped  pairs people only skipped get a judge label after all (store.add_direct_label).
  shadow   pairs people already labeled get a judge label too, for agreement statistics only
           (the trainer lets a person's label override a judge's on the same pair).

A judge never blocks the queue. When it abstains on a queued pair, the claim is handed back at
once (release_assignment), so the pair goes to people; the judge's assignment row keeps it from
claiming that pair again. In skipped/shadow mode an abstention is stored as the judge's "skip", so
the pair is not judged again after a restart. If the judge fails (endpoint down, broken plugin),
its open claims are handed back before the error propagates.
Labels carry labeler = source = "judge:<spec>" and the judge's confidence.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError
from odpo.trainer.judges import Judge, Verdict, judge_labeler_name

log = logging.getLogger(__name__)


class JudgeWorkerError(OdpoError):
    """Invalid worker options."""


@dataclass(frozen=True)
class JudgeWorkerConfig:
    fraction: float = 1.0
    only_skipped: bool = False
    shadow: bool = False
    batch_size: int = 8
    poll_seconds: float = 5.0
    max_labels: Optional[int] = None
    exit_when_idle: Optional[float] = None
    claim_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        checks = [(0.0 < self.fraction <= 1.0, "fraction must be in (0, 1]"),
                  (not (self.only_skipped and self.shadow), "choose one of --only-skipped and --shadow"),
                  (self.fraction == 1.0 or self.mode == "queue",
                   "--fraction applies to queued pairs only, not with --only-skipped or --shadow"),
                  (self.batch_size >= 1, "batch size must be >= 1"),
                  (self.poll_seconds >= 0, "poll seconds must be >= 0"),
                  (self.max_labels is None or self.max_labels >= 1, "max labels must be >= 1"),
                  (self.exit_when_idle is None or self.exit_when_idle >= 0, "exit-when-idle must be >= 0"),
                  (self.claim_timeout_s > 0, "claim timeout must be > 0")]
        for ok, message in checks:
            if not ok:
                raise JudgeWorkerError(message)

    @property
    def mode(self) -> str:
        return "skipped" if self.only_skipped else "shadow" if self.shadow else "queue"


@dataclass
class WorkerStats:
    labeled: int = 0
    abstained: int = 0
    passed: int = 0  # queued pairs outside `fraction`, left to people
    choices: dict[str, int] = field(default_factory=dict)
    judge_seconds: float = 0.0

    def count(self, verdict: Verdict) -> None:
        self.choices[verdict.choice] = self.choices.get(verdict.choice, 0) + 1
        if verdict.choice == "abstain":
            self.abstained += 1
        else:
            self.labeled += 1

    def as_dict(self) -> dict:
        return asdict(self)


def in_fraction(pair_id: int, fraction: float) -> bool:
    """A stable coin per pair, so restarts and several workers agree on which pairs are the judge's."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"odpo-pair-{pair_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def run_judge_worker(db: Database, judge: Judge, *, config: JudgeWorkerConfig,
                     stop: Optional[threading.Event] = None) -> WorkerStats:
    """Label until `stop` is set, `max_labels` labels are stored, or nothing came for
    `exit_when_idle` seconds. Safe to run in a thread (`odpo up --judge`) or a process."""
    stats, stop = WorkerStats(), stop or threading.Event()
    labeler = judge_labeler_name(judge.spec)
    idle_since = time.monotonic()
    log.info("judge %s labeling in %s mode as %r", judge.spec, config.mode, labeler)
    while not stop.is_set():
        remaining = None if config.max_labels is None else config.max_labels - stats.labeled
        if remaining is not None and remaining <= 0:
            break
        limit = config.batch_size if remaining is None else min(config.batch_size, remaining)
        handled = judge_batch(db, judge, config=config, stats=stats, labeler=labeler, limit=limit)
        if handled:
            idle_since = time.monotonic()
            continue
        idle = time.monotonic() - idle_since
        if config.exit_when_idle is not None and idle >= config.exit_when_idle:
            break
        wait = config.poll_seconds
        if config.exit_when_idle is not None:
            wait = min(wait, max(config.exit_when_idle - idle, 0.0))
        stop.wait(wait)
    log.info("judge %s stopped: %s", judge.spec, stats.as_dict())
    return stats


def judge_batch(db: Database, judge: Judge, *, config: JudgeWorkerConfig, stats: WorkerStats, labeler: str,
                limit: int) -> int:
    """One round: up to `limit` pairs judged and stored. Returns how many pairs it handled."""
    if config.mode == "queue":
        return _judge_queue(db, judge, config=config, stats=stats, labeler=labeler, limit=limit)
    with db.sessions() as s:
        pairs = store.judge_candidates(s, labeler=labeler, mode=config.mode, limit=limit)
    if not pairs:
        return 0
    verdicts = _timed_judge(judge, stats, [p.prompt for p in pairs], [p.a for p in pairs], [p.b for p in pairs])
    with db.sessions.begin() as s:
        for pair, verdict in zip(pairs, verdicts, strict=True):
            choice = "skip" if verdict.choice == "abstain" else verdict.choice
            store.add_direct_label(s, pair_id=pair.pair_id, labeler=labeler, choice=choice, source=labeler,
                                   confidence=verdict.confidence)
            stats.count(verdict)
    return len(pairs)


def _claim(db: Database, *, config: JudgeWorkerConfig, stats: WorkerStats, labeler: str,
           limit: int) -> tuple[list[store.ClaimedPair], int]:
    """Claim up to `limit` pairs of the judge's fraction; pairs outside it are handed straight back."""
    with db.sessions.begin() as s:
        store.release_expired(s)
    claims: list[store.ClaimedPair] = []
    handled = 0
    while len(claims) < limit:
        with db.sessions.begin() as s:
            claimed = store.claim_next_pair(s, labeler=labeler, timeout_s=config.claim_timeout_s)
            if claimed is not None and not in_fraction(claimed.pair_id, config.fraction):
                store.release_assignment(s, assignment_id=claimed.assignment_id, labeler=labeler)
                stats.passed += 1
                handled += 1
                continue
        if claimed is None:
            break
        claims.append(claimed)
    return claims, handled + len(claims)


def _judge_queue(db: Database, judge: Judge, *, config: JudgeWorkerConfig, stats: WorkerStats, labeler: str,
                 limit: int) -> int:
    claims, handled = _claim(db, config=config, stats=stats, labeler=labeler, limit=limit)
    if not claims:
        return handled
    # ClaimedPair shows the pair left/right; the judge gets it as a/b so its choice is absolute.
    a_texts = [c.left if c.shown_left == "a" else c.right for c in claims]
    b_texts = [c.right if c.shown_left == "a" else c.left for c in claims]
    try:
        verdicts = _timed_judge(judge, stats, [c.prompt for c in claims], a_texts, b_texts)
    except BaseException:
        _release_all(db, claims, labeler)
        raise
    for claimed, verdict in zip(claims, verdicts, strict=True):
        with db.sessions.begin() as s:
            if verdict.choice == "abstain":
                store.release_assignment(s, assignment_id=claimed.assignment_id, labeler=labeler)
                stats.count(verdict)
                continue
            try:
                store.record_label(s, assignment_id=claimed.assignment_id, labeler=labeler, choice=verdict.choice,
                                   source=labeler, confidence=verdict.confidence, reason=verdict.reason or None)
            except store.StoreError as exc:  # the claim expired while judging: the pair went back
                log.warning("judge %s: pair %d not labeled: %s", judge.spec, claimed.pair_id, exc)
                continue
        stats.count(verdict)
    return handled


def _release_all(db: Database, claims: list[store.ClaimedPair], labeler: str) -> None:
    with db.sessions.begin() as s:
        for claimed in claims:
            store.release_assignment(s, assignment_id=claimed.assignment_id, labeler=labeler)


def _timed_judge(judge: Judge, stats: WorkerStats, prompts: list[str], a: list[str], b: list[str]) -> list[Verdict]:
    started = time.perf_counter()
    verdicts = judge.judge(prompts, a, b)
    seconds = time.perf_counter() - started
    stats.judge_seconds += seconds
    if len(verdicts) != len(prompts):
        raise RuntimeError(f"judge {judge.spec} returned {len(verdicts)} verdicts for {len(prompts)} pairs")
    log.info("judge %s: %d pairs in %.2fs (%.1f pairs/s)", judge.spec, len(prompts), seconds,
             len(prompts) / max(seconds, 1e-9))
    return verdicts
