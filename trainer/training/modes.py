"""The training modes of `odpo train --mode`: one trainer (train_loop.DPOTrainer), one ledger.

- online (default): stream labels as they come, a version every `save_every` steps
  (DPOTrainer.train_available).
- iterative: rounds. The sampler keeps serving the head version v while labels come in (the trainer
  publishes nothing meanwhile); once `round_labels` trainable labels of pairs sampled AT v exist that
  this run has not used, the trainer takes the oldest `round_labels` of them, trains `epochs` passes
  over exactly those in batches of `batch_size`, and commits ONE version: the next round's v. Labels
  of pairs sampled at older versions are never part of a round (they stay unused). A stop or crash
  mid-round commits nothing; the round replays from the head on the next start.
- offline: an imported dataset (`odpo import dataset`, labels with source "dataset:<name>"). A job
  is the dataset labels this run has not used, trained `epochs` passes in batches of `batch_size`,
  committed every `save_every` steps and at its end. Each commit records the job's progress in the
  version's metrics (offline_* keys) and a label enters the ledger with the first version that
  trained it, so a restart (or a rollback into the job) resumes from the head at the same step.

Both planned modes train a LabelPlan: pass 1 in label order, later passes in an order shuffled by
(seed, pass), so the plan is the same in every process that rebuilds it.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from odpo.db import store

if TYPE_CHECKING:
    from odpo.trainer.training.loop import DPOTrainer
    from odpo.trainer.training.records import PendingStep

log = logging.getLogger(__name__)

PROGRESS_KEY = store.TRAIN_PROGRESS_KEY  # control row: what a round / offline job is at, for status and dashboard


@dataclass(frozen=True)
class LabelPlan:
    """A fixed set of labels trained `epochs` times in batches of `batch_size`."""

    label_ids: tuple[int, ...]
    epochs: int
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.label_ids) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def batch(self, index: int) -> tuple[int, list[int]]:
        """(1-based epoch, label ids) of step `index` (0-based) of the plan."""
        epoch, j = divmod(index, self.steps_per_epoch)
        order = list(self.label_ids)
        if epoch:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return epoch + 1, order[j * self.batch_size:(j + 1) * self.batch_size]


def progress_line(progress: Optional[dict[str, Any]]) -> str:
    """One line for status and the dashboard: "round 3: 17/32 labels" or "offline: step 40/120"."""
    if not progress:
        return ""
    if progress.get("mode") == "iterative":
        return (f"round {progress['round']}: {progress['labels']}/{progress['needed']} labels"
                + (" (training)" if progress.get("training") else ""))
    if progress.get("mode") == "offline":
        return f"offline: step {progress['done']}/{progress['steps']} (epoch {progress['epoch']}/{progress['epochs']})"
    return ""


class OnlineMode:
    """Today's streaming loop, unchanged."""

    name = "online"

    def __init__(self, trainer: DPOTrainer) -> None:
        self.trainer = trainer

    def reset(self) -> None:
        """Nothing is planned ahead online."""

    def iterate(self) -> bool:
        return self.trainer.train_available()

    def done(self) -> bool:
        return False

    def ledger_steps(self, pending: list[PendingStep]) -> dict[int, int]:
        return {lid: p.step for p in pending for lid in p.label_ids}

    def commit_metrics(self) -> dict[str, Any]:
        return {}

    def before_exit(self, reason: str) -> None:
        """Pending steps are committed on the way out."""


class PlannedMode(OnlineMode):
    """What iterative and offline share: train a LabelPlan one step per call, commit by `_due`."""

    def __init__(self, trainer: DPOTrainer) -> None:
        super().__init__(trainer)
        self.plan: Optional[LabelPlan] = None
        self.labels: dict[int, store.TrainingLabel] = {}
        self.pos = 0  # steps of the plan taken (committed + pending)
        self.meta: dict[str, Any] = {}
        self._published: Optional[dict[str, Any]] = None

    def reset(self) -> None:
        """The weights were (re)loaded: the plan is rebuilt from the head on the next call."""
        self.plan, self.labels, self.pos, self.meta = None, {}, 0, {}

    def iterate(self) -> bool:
        t = self.trainer
        t.sync_with_db()
        if t.paused():
            return False
        if self.plan is None and not self._make_plan():
            return False
        assert self.plan is not None
        epoch, ids = self.plan.batch(self.pos)
        self.meta["epoch"] = epoch
        t.take_step([self.labels[i] for i in ids], lag=self._lag(ids))
        self.pos += 1
        self._publish(training=True)
        finished = self.pos >= self.plan.total_steps
        if finished or self._due():
            t.auto_eval(t.commit_pending())
            if finished and t.pending == []:
                self.reset()
        return True

    def _make_plan(self) -> bool:
        raise NotImplementedError

    def _due(self) -> bool:
        return False

    def _lag(self, ids: list[int]) -> float:
        return 0.0

    def _head_metrics(self) -> dict[str, Any]:
        t = self.trainer
        if t.version == 0:
            return {}
        with t.db.sessions() as s:
            row = store.get_adapter(s, version=t.version, run=t.cfg.run)
        return dict(row.metrics or {}) if row is not None else {}

    def _labels_by_id(self, ids: list[int]) -> dict[int, store.TrainingLabel]:
        t = self.trainer
        with t.db.sessions() as s:
            rows = store.trainable_labels(s, run=t.cfg.run, sources=t.cfg.sources, unused=False, label_ids=ids)
        return {r.label_id: r for r in rows}

    def _publish(self, **state: Any) -> None:
        """Write the progress row only when it changed (the loop polls every poll_seconds)."""
        value = dict(self._progress(), run=self.trainer.cfg.run, mode=self.name, **state)
        if value == self._published:
            return
        with self.trainer.db.sessions.begin() as s:
            store.set_control(s, key=PROGRESS_KEY, value=value)
        self._published = value
        log.info("%s", progress_line(value))

    def _progress(self) -> dict[str, Any]:
        raise NotImplementedError


class IterativeMode(PlannedMode):
    name = "iterative"

    def _make_plan(self) -> bool:
        from odpo.trainer.training.on_policy import drop_length_cut  # torch: not for the dashboard's progress_line

        t = self.trainer
        need = t.cfg.round_labels
        round_no = int(self._head_metrics().get("round", 0)) + 1
        while True:
            with t.db.sessions() as s:
                found = store.trainable_labels(s, run=t.cfg.run, sources=t.cfg.sources, pair_version=t.version,
                                               limit=need, exclude_labelers=t.excluded_labelers(s))
            if not drop_length_cut(t.db, found, length_cut=t.cfg.length_cut, version=t.version, run=t.cfg.run):
                break
        self.meta = {"round": round_no, "labels": len(found), "version": t.version}
        if len(found) < need:
            self._publish(training=False)
            return False
        ids = tuple(r.label_id for r in found)
        self.plan = LabelPlan(label_ids=ids, epochs=t.cfg.epochs, batch_size=t.cfg.batch_size,
                              seed=t.cfg.seed + t.version)
        self.labels, self.pos = {r.label_id: r for r in found}, 0
        log.info("round %d: training %d label(s) of pairs sampled at v%d, %d epoch(s), %d step(s)", round_no,
                 len(ids), t.version, t.cfg.epochs, self.plan.total_steps)
        return True

    def _progress(self) -> dict[str, Any]:
        return {"round": self.meta.get("round", 0), "labels": self.meta.get("labels", 0),
                "needed": self.trainer.cfg.round_labels, "version": self.meta.get("version", 0)}

    def commit_metrics(self) -> dict[str, Any]:
        if self.plan is None:
            return {}
        return {"round": self.meta["round"], "round_labels": len(self.plan.label_ids), "epochs": self.plan.epochs}

    def before_exit(self, reason: str) -> None:
        """A round is one version or nothing: an interrupted round is dropped and replays next start."""
        t = self.trainer
        if t.pending:
            log.warning("round %d interrupted (%s) after %d of %d step(s): nothing committed; its labels "
                        "train again from v%d at the next start", self.meta.get("round", 0), reason, self.pos,
                        self.plan.total_steps if self.plan else 0, t.version)
            t.pending, t.pending_version = [], None
            self.reset()


class OfflineMode(PlannedMode):
    name = "offline"

    def __init__(self, trainer: DPOTrainer) -> None:
        super().__init__(trainer)
        self._idle = False

    def done(self) -> bool:
        return self._idle

    def _make_plan(self) -> bool:
        t = self.trainer
        head = self._head_metrics()
        if "offline_base" in head and int(head["offline_done"]) < int(head["offline_steps"]) and self._resume(head):
            return True
        with t.db.sessions() as s:
            found = store.trainable_labels(s, run=t.cfg.run, sources="dataset")
        self._idle = not found
        if not found:
            return False
        ids = tuple(r.label_id for r in found)
        self.plan = LabelPlan(label_ids=ids, epochs=t.cfg.epochs, batch_size=t.cfg.batch_size, seed=t.cfg.seed)
        self.labels, self.pos = {r.label_id: r for r in found}, 0
        self.meta = {"base": t.version, "epoch": 1}
        log.info("offline: %d imported label(s), %d epoch(s) in batches of %d: %d step(s) from v%d", len(ids),
                 self.plan.epochs, self.plan.batch_size, self.plan.total_steps, t.version)
        return True

    def _resume(self, head: dict[str, Any]) -> bool:
        """Rebuild the job the head version is part of: its committed labels (in the ledger since
        the job's base version) and the rest of its labels (unused, not newer than its last)."""
        t = self.trainer
        base, last = int(head["offline_base"]), int(head["offline_last_label"])
        with t.db.sessions() as s:
            ids = set(store.trained_since(s, run=t.cfg.run, after_version=base, sources="dataset"))
            ids.update(r.label_id for r in store.trainable_labels(s, run=t.cfg.run, sources="dataset",
                                                                  max_label_id=last))
        if len(ids) != int(head["offline_labels"]):
            log.warning("offline job of v%d had %d labels, %d are left to rebuild it", base,
                        int(head["offline_labels"]), len(ids))
        self.plan = LabelPlan(label_ids=tuple(sorted(ids)), epochs=int(head["offline_epochs"]),
                              batch_size=int(head["offline_batch_size"]), seed=t.cfg.seed)
        self.labels = self._labels_by_id(sorted(ids))
        self.pos = min(int(head["offline_done"]), self.plan.total_steps)
        self.meta = {"base": base, "epoch": int(head.get("offline_epoch", 1))}
        if self.pos >= self.plan.total_steps or not ids:
            self.reset()  # nothing of it is left to train: a new job starts from the unused labels
            return False
        log.info("offline: resuming the job started at v%d at step %d of %d", base, self.pos, self.plan.total_steps)
        return True

    def _due(self) -> bool:
        return len(self.trainer.pending) >= self.trainer.cfg.save_every

    def ledger_steps(self, pending: list[PendingStep]) -> dict[int, int]:
        """A label enters the ledger with the first version that trained it (later epochs repeat it)."""
        steps: dict[int, int] = {}
        for p in pending:
            for lid in p.label_ids:
                steps.setdefault(lid, p.step)
        t = self.trainer
        with t.db.sessions() as s:
            used = store.used_by_run(s, run=t.cfg.run, label_ids=list(steps))
        return {lid: step for lid, step in steps.items() if lid not in used}

    def commit_metrics(self) -> dict[str, Any]:
        if self.plan is None:
            return {}
        return {"offline_base": self.meta["base"], "offline_labels": len(self.plan.label_ids),
                "offline_last_label": max(self.plan.label_ids), "offline_epochs": self.plan.epochs,
                "offline_batch_size": self.plan.batch_size, "offline_steps": self.plan.total_steps,
                "offline_done": self.pos, "offline_epoch": self.meta.get("epoch", 1)}

    def _progress(self) -> dict[str, Any]:
        plan = self.plan
        return {"done": self.pos, "steps": plan.total_steps if plan else 0, "epoch": self.meta.get("epoch", 0),
                "epochs": plan.epochs if plan else self.trainer.cfg.epochs}


MODE_CLASSES = {"online": OnlineMode, "iterative": IterativeMode, "offline": OfflineMode}


def make_mode(trainer: DPOTrainer) -> OnlineMode:
    """The mode object of `trainer.cfg.mode` (validated by TrainConfig)."""
    return MODE_CLASSES[trainer.cfg.mode](trainer)
