"""The background DPO trainer: poll labels, take steps, commit versions, follow rollbacks.

Read top to bottom: `start` loads the model and resumes from the latest committed version; `run` loops
`train_available` until a limit is reached; each step records its metrics at once and joins `pending`; every
`save_every` steps `commit_pending` writes the version directory and, in ONE transaction, moves the run's head
from the parent to it, inserts the adapters row and writes the labels into the run's ledger. A kill at any
moment therefore replays exactly the uncommitted steps' labels and never trains a label twice into one run; a
rollback that lands while a version trains makes its commit refused, and the steps replay from the new head.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from sqlalchemy import select

from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError
from odpo.db.models import Adapter
from odpo.db.transient import classify, is_transient
from odpo.trainer.policy import checkpoint as ckpt
from odpo.trainer.training import distributed, tracking
from odpo.trainer.training.modes import make_mode
from odpo.trainer.training.on_policy import drop_length_cut, training_examples
from odpo.trainer.training.pauses import FaultPause
from odpo.trainer.training.records import PendingStep, TrainerStats, format_step_line, mean_metrics
from odpo.trainer.training.step import dpo_step
from odpo.trainer.training.train_config import TrainConfig

log = logging.getLogger(__name__)

PAUSE_KEY = "train.paused"


class TrainerBusyError(OdpoError):
    """Another `odpo train` holds this run; two trainers would race for the same labels."""


StepCallback = Callable[[int, int, dict[str, float]], None]


class DPOTrainer:
    """One trainer per run and process. Not thread-safe except `request_stop`. Under `accelerate
    launch` it is rank 0's (`dist`): it mirrors every weight change to the followers."""

    def __init__(self, cfg: TrainConfig, *, db: Database, adapters_dir: Path, model_cache_dir: Path,
                 on_step: Optional[StepCallback] = None, dist: Optional[distributed.Distributed] = None) -> None:
        self.cfg, self.db, self.dist = cfg, db, dist
        self.adapters_dir, self.model_cache_dir = Path(adapters_dir), Path(model_cache_dir)
        self.on_step = on_step
        self.model: Any = None
        self.tokenizer: Any = None
        self.optimizer: Any = None
        self.version = 0  # the committed version the weights started from (the next one's parent)
        self.step = 0  # optimizer steps in this version's lineage
        self.pending: list[PendingStep] = []
        self.pending_version: Optional[int] = None
        self.stats = TrainerStats()
        self._stop = threading.Event()
        self._lock_file: Any = None
        self._autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self._autocast_dtype: Any = None
        self._eval_judge: Any = None  # built once in start() when cfg.eval_every asks for evals
        self.base_answers: Any = None  # the base's eval answers, kept between auto-evals (start())
        self.tracker = tracking.Tracker()  # --report-to's backends, opened by start()
        self._excluded: dict[str, dict[str, Any]] = {}  # --min-labeler-agreement's last verdict, for its log
        self.mode = make_mode(self)  # online / iterative / offline (trainer/training/modes.py)
        self.pause = FaultPause(db, run=cfg.run, stop=self._stop)  # transient faults: wait, then go on

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, *, model: Any = None, tokenizer: Any = None) -> None:
        """Lock the run, load the base model (unless given: a plain, non-PEFT causal LM; tests pass a
        tiny one to skip loading), clean the adapters dir, resume."""
        import torch

        from odpo.trainer.policy.loading import autocast_context, load_model_and_tokenizer, pick_device_dtype

        self._acquire_lock()
        self.tracker = tracking.trainer_tracker(self.cfg, run_dir=self.adapters_dir.parent, dist=self.dist)
        torch.manual_seed(self.cfg.seed)
        if self.cfg.eval_every:  # before the model: a bad judge spec fails in seconds, not after loading
            from odpo.trainer.evaluation.win_rate import BaseAnswers
            from odpo.trainer.judges import load_judge

            self._eval_judge, self.base_answers = load_judge(self.cfg.eval_judge), BaseAnswers()
        if model is None:
            model, tokenizer = load_model_and_tokenizer(self.cfg.model_config(self.model_cache_dir))
        device, _, autocast_dtype = pick_device_dtype(self.cfg.device, self.cfg.dtype)
        self._autocast = lambda: autocast_context(device, autocast_dtype)
        self._autocast_dtype = autocast_dtype
        self.tokenizer = tokenizer
        with self.db.sessions() as s:
            committed = list(s.scalars(select(Adapter.version).where(Adapter.run == self.cfg.run)))
            latest = store.latest_adapter(s, run=self.cfg.run)
        ckpt.clean_adapters_dir(self.adapters_dir, committed=committed)
        self.model = self._attach(model, latest)
        self._load_version(latest)
        self._publish_config()
        log.info("trainer ready on run %r at v%d (step %d); %s", self.cfg.run, self.version, self.step,
                 "fresh adapter" if latest is None else f"resumed from {latest.path}")

    def _publish_config(self) -> None:
        """Tell other processes through the database, the only data channel, how many labels make
        the next version (the UI's counter) and the loss the sampler's margin selectors score with."""
        keys = ("batch_size", "save_every", "sources", "run", "loss_type", "beta", "max_prompt_tokens",
                "max_completion_tokens")
        value = {k: getattr(self.cfg, k) for k in keys}
        if self.cfg.mode != "online":  # a round makes one version of round_labels labels
            value.update(mode=self.cfg.mode, round_labels=self.cfg.round_labels, epochs=self.cfg.epochs)
        with self.db.sessions.begin() as s:
            store.set_control(s, key="train.config", value=value)

    def _attach(self, base: Any, latest: Optional[Adapter]) -> Any:
        """Wrap the base in LoRA shaped like the latest version (its adapter_config.json is the
        truth), or like the config for a fresh start."""
        from odpo.trainer.policy.lora import attach_lora

        settings = self.cfg.lora
        if latest is not None:
            settings = ckpt.read_lora_settings(self._checked_path(latest))
            want, got = self.cfg.lora, settings
            if (want.r, want.alpha, want.dropout) != (got.r, got.alpha, got.dropout):
                log.warning("resuming v%d with its own LoRA shape (r=%d alpha=%s dropout=%s), not the "
                            "command line's", latest.version, got.r, got.alpha, got.dropout)
        model = attach_lora(base, settings)
        distributed.lead(self.dist, model, settings)  # followers attach the same shape; DDP wraps
        return model

    def close(self) -> None:
        self.tracker.close()
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def request_stop(self) -> None:
        """Ask `run` to finish after the current step (signal handlers call this)."""
        self._stop.set()

    def _acquire_lock(self) -> None:
        run_dir = self.adapters_dir.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / "train.lock", "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: one trainer per run is then the user's promise
            self._lock_file = handle
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise TrainerBusyError(f"another `odpo train` is already training run {self.cfg.run!r} "
                                   f"(lock {run_dir / 'train.lock'}); stop it first") from None
        self._lock_file = handle

    # --- versions ----------------------------------------------------------------------------

    def _checked_path(self, row: Adapter) -> Path:
        problem = ckpt.committed_dir_problem(row.path)
        if problem:
            raise ckpt.AdapterLoadError(f"committed version v{row.version} is unusable: {problem}")
        return Path(row.path)

    def _load_version(self, row: Optional[Adapter]) -> None:
        """Make the live adapter and optimizer exactly those of `row` (None = version 0)."""
        self.pending, self.pending_version = [], None
        self.mode.reset()
        path = None if row is None else self._checked_path(row)
        distributed.mirror_load(self.dist, path)
        self.optimizer = distributed.restore_weights(self.model, self.cfg, path)
        self.version, self.step = (0, 0) if row is None else (row.version, row.step)

    def sync_with_db(self, *, force: bool = False) -> bool:
        """Follow a rollback: if the latest committed version is not the one we hold (or `force`:
        our pending steps must go anyway), drop pending steps (their labels were never consumed,
        they replay) and load that version. True if it reloaded."""
        with self.db.sessions() as s:
            latest = store.latest_adapter(s, run=self.cfg.run)
        latest_version = latest.version if latest is not None else 0
        if latest_version == self.version and not force:
            return False
        if latest_version != self.version:
            log.warning("latest committed version is v%d but the trainer holds v%d (rollback?): reloading v%d",
                        latest_version, self.version, latest_version)
        self._load_version(latest)
        self.stats.reloads += 1
        return True

    def commit_pending(self) -> Optional[int]:
        """Write the pending steps as a new version and commit it; returns its number (or None)."""
        if not self.pending:
            return None
        version, parent = self.pending_version, self.version
        label_steps = self.mode.ledger_steps(self.pending)  # label -> step, for the ledger
        state = {"run": self.cfg.run, "version": version, "parent": parent, "step": self.step,
                 "steps": [p.step for p in self.pending], "label_ids": sorted(label_steps),
                 "hyperparameters": self.cfg.hyperparameters(),
                 "hyperparameter_hash": self.cfg.hyperparameter_hash(), "created_at": time.time()}
        ckpt.check_room(self.model, self.optimizer, self.adapters_dir)
        path = ckpt.write_version(model=self.model, optimizer=self.optimizer, adapters_dir=self.adapters_dir,
                                  version=version, state=state)
        try:
            self._commit_row(version=version, parent=parent, path=path, label_steps=label_steps)
        except (store.HeadMoved, store.LabelsRetracted) as exc:
            # HeadMoved: a rollback (or another trainer) moved the run's head off our parent.
            # LabelsRetracted: the weights hold a taken-back vote. Either way the steps are thrown
            # away, the head is loaded again and their labels replay on top of it.
            ckpt.remove_version_dir(path)
            log.warning("not committing v%d: %s; replaying its %d step(s) from the run's head", version, exc,
                        len(self.pending))
            self.sync_with_db(force=True)
            return None
        except BaseException as exc:
            if not is_transient(exc):  # a transient fault may hide a commit that happened: the head says
                ckpt.remove_version_dir(path)
            raise
        self.version, self.pending, self.pending_version = version, [], None
        self.stats.versions.append(version)
        self.tracker.version(self.step, version)
        log.info("committed v%d (parent v%d, step %d, %d labels) -> %s", version, parent, self.step,
                 len(label_steps), path)
        return version

    def _commit_row(self, *, version: int, parent: int, path: Path, label_steps: dict[int, int]) -> None:
        metrics = mean_metrics([p.metrics for p in self.pending])
        metrics.update(labels=len(label_steps), steps=len(self.pending), **self.mode.commit_metrics())
        with self.db.writes.begin() as s:  # the store moves the run's head from parent, or raises HeadMoved
            store.commit_adapter_version(s, run=self.cfg.run, version=version, path=str(path), parent=parent,
                                         step=self.step, label_steps=label_steps, metrics=metrics,
                                         step_ids=[p.row_id for p in self.pending])

    # --- steps -------------------------------------------------------------------------------

    def paused(self) -> bool:
        with self.db.sessions() as s:
            value = store.get_control(s, key=PAUSE_KEY)
        return bool(value and value.get("paused"))

    def next_batch(self) -> Optional[list[store.TrainingLabel]]:
        """The oldest `batch_size` trainable labels not already in a pending step, or None.

        Labels of too-stale pairs are marked skipped (and counted) on the way, never trained.
        """
        need = self.cfg.batch_size
        taken = {lid for p in self.pending for lid in p.label_ids}
        while True:
            with self.db.sessions() as s:
                rows = store.unconsumed_labels(s, limit=need + len(taken), run=self.cfg.run,
                                               sources=self.cfg.sources, exclude_labelers=self.excluded_labelers(s))
            fresh = [r for r in rows if r.label_id not in taken]
            if drop_length_cut(self.db, fresh, length_cut=self.cfg.length_cut, version=self.version,
                               run=self.cfg.run):
                continue  # --length-cut drop marked some skipped (trainer/training/on_policy.py): fetch again
            stale = [r.label_id for r in fresh if self._is_stale(r)]
            if not stale:
                return fresh[:need] if len(fresh) >= need else None
            with self.db.writes.begin() as s:
                n = store.skip_stale_labels(s, label_ids=stale, version=self.version, run=self.cfg.run)
            self.stats.stale_skipped += n
            log.info("skipped %d label(s) of pairs more than %d versions older than v%d (%d so far)",
                     n, self.cfg.max_staleness_train, self.version, self.stats.stale_skipped)

    def excluded_labelers(self, session: Any) -> list[str]:
        """Whose labels a read leaves out (--min-labeler-agreement), asked afresh on every read so a
        person whose agreement recovers is let back in; a newly excluded person is logged once."""
        if self.cfg.min_labeler_agreement is None:
            return []
        self._excluded = store.excluded_labelers(session, min_agreement=self.cfg.min_labeler_agreement,
                                                 min_n=self.cfg.agreement_min_n, known=self._excluded)
        return sorted(self._excluded)

    def _is_stale(self, label: store.TrainingLabel) -> bool:
        limit = self.cfg.max_staleness_train
        return limit is not None and self.version - label.pair_version > limit

    def train_available(self) -> bool:
        """One iteration: follow rollbacks, honour the pause switch, train one batch if there is
        one, commit when `save_every` steps are pending. True when a step was taken."""
        self.sync_with_db()
        if self.paused():
            return False
        labels = self.next_batch()
        if labels is None:
            return False
        self.take_step(labels, lag=sum(self.version - lb.pair_version for lb in labels) / len(labels))
        if len(self.pending) >= self.cfg.save_every:
            self.auto_eval(self.commit_pending())
        return True

    def take_step(self, labels: list[store.TrainingLabel], *, lag: float) -> None:
        """One DPO step on `labels` towards the pending version, recorded at once (uncommitted)."""
        if self.pending_version is None:
            with self.db.sessions() as s:
                self.pending_version = store.next_version_number(s, run=self.cfg.run)
        examples = training_examples(self.db, labels)  # the sampled ids, exactly (trainer/training/on_policy.py)
        distributed.mirror_step(self.dist, examples, step=self.step + 1)
        metrics = dpo_step(model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer, examples=examples,
                           cfg=self.cfg, autocast=self._autocast, dist=self.dist,  # a stop skips later passes,
                           should_stop=None if self.dist else self._stop.is_set)  # alike in every process or none
        metrics["version_lag"] = lag
        self.step += 1
        ids = [lb.label_id for lb in labels]
        with self.db.sessions.begin() as s:
            row = store.record_train_step(s, run=self.cfg.run, step=self.step, version=self.pending_version,
                                          label_ids=ids, metrics=metrics)
        self.pending.append(PendingStep(step=self.step, row_id=row.id, label_ids=ids, metrics=metrics))
        self.stats.steps += 1
        log.info(format_step_line(self.step, self.pending_version, metrics))
        self.tracker.step(self.step, metrics)
        if self.on_step is not None:
            self.on_step(self.step, self.pending_version, metrics)

    def auto_eval(self, version: Optional[int]) -> None:
        """Every `eval_every` versions, the win rate of the version just committed against the base,
        on held-out prompts, into `evals` (the dashboard plots it). The weights hold exactly that
        version now, so nothing is loaded; an eval problem is logged and training goes on."""
        if version is None or self._eval_judge is None:
            return
        from dataclasses import replace

        from odpo.trainer.evaluation.win_rate import DEFAULT_PARAMS, maybe_auto_eval

        params = replace(DEFAULT_PARAMS, max_new_tokens=self.cfg.eval_max_new_tokens)
        result = maybe_auto_eval(self.db, policy=self.model, tokenizer=self.tokenizer, version=version, params=params,
                                 every=self.cfg.eval_every, judge=self._eval_judge, n=self.cfg.eval_n, run=self.cfg.run,
                                 autocast_dtype=self._autocast_dtype, base_answers=self.base_answers)
        self.tracker.win_rate(result, step=self.step)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> TrainerStats:
        """Train until max_steps / until_version / exit_when_idle / request_stop (offline: until the
        dataset is trained); pending steps are committed on the way out, so a clean exit never
        throws work away (except half an iterative round, which replays whole)."""
        idle_since = time.monotonic()
        while True:
            reason = self._limit_reached()
            if reason:
                break
            try:
                if self.pause.what == "disk":  # spend no step while there is still no room to save it
                    ckpt.check_room(self.model, self.optimizer, self.adapters_dir)
                stepped = self.mode.iterate()
            except Exception as exc:  # noqa: BLE001 - a transient fault pauses; anything else stops
                if not is_transient(exc):
                    raise
                self.pause.wait(classify(exc))
                self._after_fault()
                continue
            self.pause.resumed()
            if stepped:
                idle_since = time.monotonic()
                continue
            idle_limit = self.cfg.exit_when_idle
            if idle_limit is None and self.mode.done():
                reason = "done"
                break
            if idle_limit is not None and time.monotonic() - idle_since >= idle_limit:
                reason = "idle"
                break
            distributed.heartbeat(self.dist)
            self._stop.wait(self.cfg.poll_seconds)
        self.mode.before_exit(reason)  # iterative: an unfinished round is dropped, never committed
        committed = self.commit_pending()
        if reason != "stopped":  # a stop request wants out now, not after an eval
            self.auto_eval(committed)
        self.stats.exit_reason = reason
        log.info("trainer exiting (%s) at v%d after %d step(s) in this process", reason, self.version,
                 self.stats.steps)
        return self.stats

    def _after_fault(self) -> None:
        """Follow the run's head again once the fault may have cleared: pending steps go (their labels
        replay), a commit the fault hid is loaded if it happened, else its directory goes."""
        pending, version = len(self.pending), self.pending_version
        try:
            self.sync_with_db(force=True)
        except Exception as exc:  # noqa: BLE001 - not yet: the run loop pauses again
            if not is_transient(exc):
                raise
            return
        if version is not None and self.version != version:
            self.stats.steps -= pending  # they replay: --max-steps counts steps that made a version
            self.pause.drop_uncommitted(self.adapters_dir, version)

    def _limit_reached(self) -> str:
        cfg = self.cfg
        if self._stop.is_set():
            return "stopped"
        if cfg.max_steps is not None and self.stats.steps >= cfg.max_steps:
            return "max_steps"
        if cfg.until_version is not None and self.version >= cfg.until_version:
            return "until_version"
        return ""
