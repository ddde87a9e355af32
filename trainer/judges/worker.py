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
the pair is not judged again after a restart.

Failures are contained and said out loud. A pair the judge failed on (a py: plugin that raised or
timed out) is an abstention, so it goes back to people; after FAILING_AFTER failed pairs in a row
the worker logs one error line and reports itself "failing" in its control row (the dashboard
shows it), until a pair succeeds again. Every exit path hands the worker's open claims back at
once instead of after the claim timeout: a judge error, Ctrl-C, and SIGTERM (what `odpo up`
sends), which the worker turns into KeyboardInterrupt while it runs in the main thread.
Labels carry labeler = source = "judge:<spec>" and the judge's confidence.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError
from odpo.db.transient import retry_transient
from odpo.trainer.judges import Judge, Verdict, judge_labeler_name

log = logging.getLogger(__name__)

FAILING_AFTER = 3  # failed pairs in a row that make a judge "failing" (log line, dashboard)
REPORT_EVERY_S = 10.0
JUDGE_STATE_PREFIX = store.JUDGE_STATE_PREFIX


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
    failed: int = 0  # abstentions because the judge broke on the pair (counted in abstained too)
    passed: int = 0  # queued pairs outside `fraction`, left to people
    choices: dict[str, int] = field(default_factory=dict)
    judge_seconds: float = 0.0
    failed_in_a_row: int = 0
    last_error: str = ""

    def count(self, verdict: Verdict) -> None:
        self.choices[verdict.choice] = self.choices.get(verdict.choice, 0) + 1
        if verdict.choice == "abstain":
            self.abstained += 1
        else:
            self.labeled += 1
        if verdict.failed:
            self.failed += 1
            self.failed_in_a_row += 1
            self.last_error = verdict.reason
        else:
            self.failed_in_a_row = 0

    @property
    def failing(self) -> bool:
        return self.failed_in_a_row >= FAILING_AFTER

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("failed_in_a_row", "last_error")}


def judge_state_key(labeler: str) -> str:
    """The control row a judge worker reports in (a hash: labeler names can outgrow the key column)."""
    return JUDGE_STATE_PREFIX + hashlib.sha256(labeler.encode()).hexdigest()[:16]


class _Reporter:
    """The worker's state in its control row, for the dashboard (another process), and the log
    lines when it starts or stops failing."""

    def __init__(self, db: Database, judge: Judge, *, labeler: str, mode: str) -> None:
        self.db, self.spec, self.labeler, self.mode = db, judge.spec, labeler, mode
        self.key = judge_state_key(labeler)
        self.state, self.error, self.reported_at = "", "", 0.0

    def update(self, stats: WorkerStats, *, state: Optional[str] = None, error: str = "") -> None:
        state = state or ("failing" if stats.failing else "running")
        if state == "failing" and self.state != "failing":
            log.error("judge %s is failing: %d pairs in a row failed (last: %s); they are back in the queue "
                      "for people", self.spec, stats.failed_in_a_row, stats.last_error)
        elif state == "running" and self.state == "failing":
            log.warning("judge %s works again", self.spec)
        changed = (state, error) != (self.state, self.error)
        self.state, self.error = state, error
        if changed or time.monotonic() - self.reported_at >= REPORT_EVERY_S:
            self._write(stats)

    def _write(self, stats: WorkerStats) -> None:
        value = {"judge": self.spec, "labeler": self.labeler, "mode": self.mode, "pid": os.getpid(),
                 "state": self.state, "error": self.error[:300], "failed_in_a_row": stats.failed_in_a_row,
                 "last_failure": stats.last_error[:300], "labeled": stats.labeled, "abstained": stats.abstained,
                 "failed": stats.failed, "at": time.time()}
        try:
            with self.db.sessions.begin() as s:
                store.set_control(s, key=self.key, value=value)
            self.reported_at = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reporting must never stop the labeling
            log.warning("judge %s: could not report its state: %s", self.spec, exc)


def in_fraction(pair_id: int, fraction: float) -> bool:
    """A stable coin per pair, so restarts and several workers agree on which pairs are the judge's."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"odpo-pair-{pair_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def run_judge_worker(db: Database, judge: Judge, *, config: JudgeWorkerConfig,
                     stop: Optional[threading.Event] = None) -> WorkerStats:
    """Label until `stop` is set, `max_labels` labels are stored, or nothing came for
    `exit_when_idle` seconds. Safe to run in a thread (tests) or a process (`odpo judge`, where
    SIGTERM stops it like Ctrl-C). Its state goes to its control row; an error that stops it is
    recorded there ("failed") before it propagates."""
    stats, stop = WorkerStats(), stop or threading.Event()
    labeler = judge_labeler_name(judge.spec)
    reporter = _Reporter(db, judge, labeler=labeler, mode=config.mode)
    log.info("judge %s labeling in %s mode as %r", judge.spec, config.mode, labeler)
    if config.mode == "queue":
        _release_leftovers(db, judge, labeler)
    reporter.update(stats)
    try:
        with _sigterm_as_interrupt():
            _loop(db, judge, config=config, stats=stats, labeler=labeler, stop=stop, reporter=reporter)
    except KeyboardInterrupt:
        reporter.update(stats, state="stopped")
        raise
    except Exception as exc:
        reporter.update(stats, state="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    reporter.update(stats, state="stopped")
    log.info("judge %s stopped: %s", judge.spec, stats.as_dict())
    return stats


def _loop(db: Database, judge: Judge, *, config: JudgeWorkerConfig, stats: WorkerStats, labeler: str,
          stop: threading.Event, reporter: _Reporter) -> None:
    idle_since = time.monotonic()
    while not stop.is_set():
        remaining = None if config.max_labels is None else config.max_labels - stats.labeled
        if remaining is not None and remaining <= 0:
            break
        limit = config.batch_size if remaining is None else min(config.batch_size, remaining)
        def batch(n: int = limit) -> int:
            return judge_batch(db, judge, config=config, stats=stats, labeler=labeler, limit=n)

        handled = retry_transient(batch, what=f"judge {judge.spec}", log=log, should_stop=stop.is_set,
                                  sleep=stop.wait)
        if handled is None:  # stopped while waiting out a fault
            break
        reporter.update(stats)
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


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, SIGTERM raises KeyboardInterrupt like Ctrl-C, so the same clean-up
    (claims handed back) runs; the default action would end the process with its claims open
    until they expire (300 s)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def judge_batch(db: Database, judge: Judge, *, config: JudgeWorkerConfig, stats: WorkerStats, labeler: str,
                limit: int) -> int:
    """One round: up to `limit` pairs judged and stored. Returns how many pairs it handled."""
    if config.mode == "queue":
        return _judge_queue(db, judge, config=config, stats=stats, labeler=labeler, limit=limit)
    with db.sessions() as s:
        pairs = store.judge_candidates(s, labeler=labeler, mode=config.mode, limit=limit)
    if not pairs:
        return 0
    requests = judge_requests(db, [(p.pair_id, p.prompt) for p in pairs])
    verdicts = _timed_judge(judge, stats, requests, [p.a for p in pairs], [p.b for p in pairs])
    with db.sessions.begin() as s:
        for pair, verdict in zip(pairs, verdicts, strict=True):
            choice = "skip" if verdict.choice == "abstain" else verdict.choice
            store.add_direct_label(s, pair_id=pair.pair_id, labeler=labeler, choice=choice, source=labeler,
                                   confidence=verdict.confidence)
            stats.count(verdict)
    return len(pairs)


def _claim(db: Database, claims: list[store.ClaimedPair], *, config: JudgeWorkerConfig, stats: WorkerStats,
           labeler: str, limit: int) -> int:
    """Claim up to `limit` pairs of the judge's fraction into `claims` (each one appended before
    its transaction commits, so an interrupt never leaves a claim the caller does not know of);
    pairs outside the fraction are handed straight back. Returns how many pairs it handled."""
    with db.sessions.begin() as s:
        store.release_expired(s)
    handled = 0
    while len(claims) < limit:
        with db.sessions.begin() as s:
            claimed = store.claim_next_pair(s, labeler=labeler, timeout_s=config.claim_timeout_s)
            if claimed is None:
                break
            if not in_fraction(claimed.pair_id, config.fraction):
                store.release_assignment(s, assignment_id=claimed.assignment_id, labeler=labeler)
                stats.passed += 1
                handled += 1
                continue
            claims.append(claimed)
    return handled + len(claims)


def _judge_queue(db: Database, judge: Judge, *, config: JudgeWorkerConfig, stats: WorkerStats, labeler: str,
                 limit: int) -> int:
    claims: list[store.ClaimedPair] = []
    try:
        handled = _claim(db, claims, config=config, stats=stats, labeler=labeler, limit=limit)
        if claims:
            _judge_claims(db, judge, claims, stats=stats, labeler=labeler)
        return handled
    finally:
        _release_open(db, claims, labeler)  # whatever is still open: an error, Ctrl-C or SIGTERM


def _judge_claims(db: Database, judge: Judge, claims: list[store.ClaimedPair], *, stats: WorkerStats,
                  labeler: str) -> None:
    # ClaimedPair shows the pair left/right; the judge gets it as a/b so its choice is absolute.
    a_texts = [c.left if c.shown_left == "a" else c.right for c in claims]
    b_texts = [c.right if c.shown_left == "a" else c.left for c in claims]
    verdicts = _timed_judge(judge, stats, judge_requests(db, [(c.pair_id, c.prompt) for c in claims]), a_texts, b_texts)
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


def _release_leftovers(db: Database, judge: Judge, labeler: str) -> None:
    """Hand back the claims an earlier run of this judge left open: a judge killed with SIGKILL
    (a crash, the OOM killer) cannot clean up, and `odpo up` restarts it within seconds, long
    before those claims expire. (Two workers of one spec at once would hand back each other's
    claims here; the pairs then go back to the queue, nothing is labeled twice.)"""
    seen: list[int] = []
    with db.sessions.begin() as s:
        while (claim := store.oldest_open_claim(s, labeler=labeler, exclude=seen)) is not None:
            seen.append(claim.assignment_id)
            store.release_assignment(s, assignment_id=claim.assignment_id, labeler=labeler)
    released = len(seen)
    if released:
        log.warning("judge %s: handed back %d claims an earlier run left open", judge.spec, released)


def _release_open(db: Database, claims: list[store.ClaimedPair], labeler: str) -> None:
    """Hand back the claims not answered yet (release_assignment leaves answered ones alone)."""
    if not claims:
        return
    with db.sessions.begin() as s:
        released = sum(store.release_assignment(s, assignment_id=c.assignment_id, labeler=labeler) for c in claims)
    if released:
        log.info("handed %d claimed pairs back to the queue", released)


def judge_requests(db: Database, pairs: list[tuple[int, str]]) -> list[str]:
    """The request a judge reads for each (pair id, prompt text): the text, or for a conversation
    its whole transcript, so the judge weighs the answers against the earlier turns too."""
    with db.sessions() as s:
        conversations = store.pair_conversations(s, pair_ids=[pid for pid, _ in pairs])
    if not conversations:
        return [text for _, text in pairs]
    from odpo.trainer.policy.batching import transcript  # imports torch: a rule judge needs none otherwise

    return [transcript(conversations[pid]) if pid in conversations else text for pid, text in pairs]


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
