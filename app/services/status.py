"""What `odpo status` reports, whether a trainer is alive, and what the labeling page waits for.

A service so the CLI stays a formatter; the dashboard reads the same counts through AdminService.

Trainer liveness: the trainer writes no heartbeat of its own, but `odpo up` reports its children
(with a wall-clock time) into the run's control row every 10 s, and a working trainer leaves
train_steps rows. The page's "Until next update" chip used to say "training…" whenever enough
labels were waiting, even with no trainer at all; `trainer_state` says what is known instead.
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from odpo.app.config import CommonConfig
from odpo.db import store
from odpo.db.models import TrainStep

UP_REPORT_FRESH_S = 60.0  # `up` reports every 10 s; an older report means `up` itself is gone
STEP_RECENT_S = 300.0  # without `up`: a train step this recent shows a trainer at work
TRAINER_CACHE_S = 2.0  # every page ticks once a second; one read serves them all for this long

RUNNING, STARTING, DOWN, UNKNOWN, PAUSED = "running", "starting", "down", "unknown", "paused"
FAULT_FRESH_S = 120.0  # a pause report older than its retry plus this is from a trainer long gone


def read_status(cfg: CommonConfig, *, run: str) -> dict[str, Any]:
    """The counts of one run and what its trainer is doing, in one read transaction, and the free
    space of the data directory (and of `runs/`, where versions are written, when it is another
    filesystem: a full adapters disk pauses training while the data disk looks fine)."""
    db = cfg.open_db()
    try:
        with db.sessions() as s:
            counts = store.status_counts(s, run=run)
            trainer = trainer_state(s, run=run)
    finally:
        db.close()
    runs = Path(cfg.data_dir) / "runs"
    own_disk = runs.is_dir() and runs.stat().st_dev != Path(cfg.data_dir).stat().st_dev
    return {**counts, "trainer": {"state": trainer.state, "detail": trainer.detail},
            "disk_free_bytes": disk_free(cfg.data_dir), "runs_disk_free_bytes": disk_free(runs) if own_disk else None}


def disk_free(path: Any) -> Optional[int]:
    """Free bytes on the filesystem of `path` (its nearest existing parent); None if unknown. A full
    data disk pauses training (trainer/training/pauses.py): the operator sees it coming here."""
    import shutil

    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


@dataclass(frozen=True)
class TrainerState:
    """`state`: running (up runs it, or it trained lately), starting (up is (re)starting it),
    down (up runs without one, or gave up on it), unknown (no up report and no recent step:
    a separately started `odpo train` may be waiting for labels, or nothing runs)."""

    state: str
    detail: str = ""


def trainer_state(session: Session, *, run: str, now: Optional[float] = None) -> TrainerState:
    """What the database says about the run's trainer (see the module docstring)."""
    now = time.time() if now is None else now
    fault = store.get_control(session, key=store.TRAIN_FAULT_KEY) or {}
    if fault.get("line") and now <= float(fault.get("retry_at") or 0) + FAULT_FRESH_S:
        return TrainerState(PAUSED, f"training paused: {fault['line']}")
    report = store.get_control(session, key=store.up_state_key(run))
    from_up = _from_up_report(report, now=now)
    if from_up is not None:
        return from_up
    last = session.scalar(select(func.max(TrainStep.created_at)).where(TrainStep.run == run))
    if last is not None:
        if _age_of(last, now) <= STEP_RECENT_S:
            return TrainerState(RUNNING, "a train step was recorded lately")
    return TrainerState(UNKNOWN, "no trainer seen: start `odpo train` (or use `odpo up`)")


def _age_of(created: dt.datetime, now: float) -> float:
    """Seconds from a naive-UTC database time to the epoch time `now`."""
    return now - created.replace(tzinfo=dt.timezone.utc).timestamp()


def _from_up_report(report: Optional[Mapping[str, Any]], *, now: float) -> Optional[TrainerState]:
    """The trainer's state from a fresh `odpo up` report; None when there is no fresh one."""
    if not report:
        return None
    at = report.get("at")
    if not isinstance(at, (int, float)) or now - float(at) > UP_REPORT_FRESH_S:
        return None
    if report.get("state") in ("stopping", "stopped"):
        return TrainerState(DOWN, "odpo up is stopping")
    children = [c for c in report.get("children") or [] if isinstance(c, dict) and c.get("name") == "train"]
    if not children:
        return TrainerState(DOWN, "odpo up runs without a trainer (--no-train)")
    child_state = str(children[0].get("state") or "")
    if child_state == "running":
        return TrainerState(RUNNING)
    if child_state in ("starting", "restarting"):
        return TrainerState(STARTING, f"the trainer is {child_state}")
    if child_state == "waiting":  # stopped on a transient fault; `up` starts it again after a backoff
        return TrainerState(PAUSED, f"training paused: {children[0].get('last_error') or 'waiting out a fault'}")
    return TrainerState(DOWN, f"the trainer {child_state or 'is not running'}")


class TrainerWatch:
    """`trainer_state` for the page's once-a-second ticks, read at most every TRAINER_CACHE_S."""

    def __init__(self, db: Any, *, run: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.db, self.run, self._clock = db, run, clock
        self._lock = threading.Lock()
        self._cached: Optional[tuple[float, TrainerState]] = None

    def get(self) -> TrainerState:
        with self._lock:
            if self._cached is not None and self._clock() - self._cached[0] < TRAINER_CACHE_S:
                return self._cached[1]
        with self.db.sessions() as s:
            state = trainer_state(s, run=self.run)
        with self._lock:
            self._cached = (self._clock(), state)
        return state


def update_chip(*, until_update: int, paused: bool, trainer: Optional[TrainerState]) -> str:
    """The "Until next update" chip's value, true to what the trainer does (None = not known)."""
    if paused:
        return "paused"
    if trainer is not None and trainer.state == DOWN:
        return "no trainer running"
    if trainer is not None and trainer.state == STARTING:
        return "trainer starting"
    if trainer is not None and trainer.state == PAUSED:
        return trainer.detail
    if until_update > 0:
        return f"{until_update} more label{'s' if until_update != 1 else ''}"
    if trainer is None or trainer.state == RUNNING:
        return "training…"
    return "waiting for a trainer"


# The sampler's start-up phases, as `odpo sample` (or an inline sampler) reports them in the
# sampler state ("phase"); NO_WORKER: serve sees no live sampler worker.
CONVERTING, LOADING, SAMPLING, FAILED = "converting", "loading", "sampling", "failed"
NO_WORKER = "no_worker"


def waiting_message(state: Mapping[str, Any]) -> tuple[str, str]:
    """(title, line): what an empty slot of the labeling page waits for, from the sampler state
    (`LabelService.sampler_state()`): the model converting or loading, the first pairs being
    sampled, no prompts, a sampler error, or (the usual case) new pairs on their way."""
    phase = state.get("phase")
    if phase == CONVERTING:
        return ("Converting the model (first run only, a minute or two)…",
                "The first pair appears here by itself once the model is converted and has sampled it.")
    if phase == LOADING:
        return "Loading the model…", "The first pair appears here by itself as soon as it is sampled."
    if phase == FAILED:
        return "The model failed to load", f"{state.get('last_error') or 'see the server log'}"
    if phase == NO_WORKER:
        return ("No sampler is running",
                "Pairs come from sampler workers: start one with `odpo sample` (`odpo up` starts one for you).")
    if state.get("last_error"):
        return "Sampling failed; retrying…", f"Last error: {state['last_error']}"
    if state.get("no_prompts"):
        return "No prompts to sample", "Import prompts in the Admin tab (or `odpo prompts import FILE`)."
    if state.get("pairs_made") == 0:  # a serving sampler that has not stored a pair yet
        return "Sampling the first pair…", "It appears here by itself as soon as it is ready."
    return "Sampling new pairs…", "The next pair appears here by itself as soon as it is ready."
