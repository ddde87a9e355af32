"""The on-policy sampler: keeps `queue_size` pairs from the serving policy ready for labelers.

Two daemon threads in `odpo sample`. The sampler thread takes typed-prompt requests first, then
the least recently used training prompts, samples two responses per prompt in one batched call and
stores a queued pair stamped with the serving adapter version; it pauses while the queue is full.
The watcher thread (`trainer.sampling.hotreload.ReloadWatcher`, or a vLLM backend) follows the committed
versions and gives back pairs whose claims expired (closed browser tabs).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from odpo.db import store
from odpo.db.engine import Database
from odpo.db.models import Prompt
from odpo.db.transient import Backoff, wait_after
from odpo.trainer.evaluation.blind_pairs import EvalCadence, interleave, reference_adapter, with_references
from odpo.trainer.priority import lower_thread_priority
from odpo.trainer.sampling.batch_pairs import pick_pairs, store_batch
from odpo.trainer.sampling.generation import (
    Generated,
    GenerationInterrupted,
    SamplingParams,
    generate,
    stop_inside_forward,
)
from odpo.trainer.sampling.hotreload import ReloadWatcher
from odpo.trainer.sampling.samples import stored_sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSettings:
    """What `odpo serve` passes down (app.context.ServeConfig maps onto this; trainer can't import app)."""

    run: str = "default"
    queue_size: int = 8
    prompts_per_batch: int = 8
    max_staleness: int = 1
    overlap: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    poll_s: float = 0.5
    release_every_s: float = 15.0
    error_backoff_s: float = 5.0
    # A running batch gives way to a hot reload (the 2 s budget), except after this many in a row:
    # a trainer working through a backlog of labels can commit faster than a batch takes.
    max_interrupts_in_a_row: int = 3
    autocast_dtype: Optional[torch.dtype] = None
    cache_implementation: Optional[str] = None
    base_dir: Optional[Path] = None  # resolves relative adapter paths (the data directory)
    ramp_up: bool = False  # `odpo serve`: start with batches of 1, 2, 4, … prompts (first pair sooner)
    nice: int = 0  # added to the sampler thread's nice value: labelers' requests go first (trainer/priority.py)
    human_eval_share: float = 0.0  # this share of the queued pairs are blind eval pairs vs the base (human_eval.py)
    human_eval_reference: int = 0  # the version eval pairs compare against (0 = the base)
    worker: str = "serve"  # this sampler's name: it claims typed-prompt requests under it (sample_requests)
    candidates: int = 2  # completions drawn per prompt; the selector shows two (trainer/sampling/selection.py)
    selector: Any = None  # a selection.Selector; None: the first two
    request_stale_s: float = 300.0  # another worker's claim on a typed prompt older than this was abandoned


@dataclass(frozen=True)
class _Job:
    prompt_id: int
    text: str | list[dict[str, str]]  # Prompt.conditioning(): the text, or the whole conversation
    purpose: str = "train"
    requested_by: Optional[str] = None
    request_id: Optional[int] = None  # the typed-prompt request this job serves


class Sampler:
    """Implements app.context.SamplerHandle (request_typed, state) for the UI.

    `step()` and `watcher.poll_once()` do one unit of work synchronously (what the threads loop
    over), so tests drive the sampler without timing races.
    """

    def __init__(self, *, db: Database, model: Any, tokenizer: Any, settings: SamplerSettings,
                 backend: Any = None) -> None:
        """`backend` None: sample with `model` in this process (transformers). Otherwise an object
        with ReloadWatcher's attributes and `generate`'s contract (trainer/sampling/vllm_backend.py), which
        then both follows versions and samples; `model` is unused."""
        self.db, self.model, self.tokenizer, self.settings = db, model, tokenizer, settings
        self.backend = backend
        self.lock = backend.lock if backend is not None else threading.Lock()  # the version switch's lock
        self.watcher = backend if backend is not None else ReloadWatcher(
            db=db, peft_model=model, lock=self.lock, run=settings.run, max_staleness=settings.max_staleness,
            base_dir=settings.base_dir)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=10)
        self._batch_index = 0
        self._interrupted_streak = 0
        self._warned_no_prompts = False
        self._warned_no_held_out = False
        self.eval_cadence = EvalCadence(settings.human_eval_share, seed=settings.params.seed)
        self.generating = False
        self.queue = 0
        self.pairs_made = 0
        self.interrupted_batches = 0
        self.nul_stripped = 0  # samples whose text held NUL characters (PostgreSQL text cannot store them)
        self.auto_labels = 0  # pairs a confident judge labeled among the candidates (selector judge-uncertain)
        self.last_batch_seconds: Optional[float] = None
        self.last_error: Optional[str] = None
        self._fault_backoff = Backoff()  # transient faults: 1 s doubling to 30 s, jittered

    # --- SamplerHandle -----------------------------------------------------------------------

    def request_typed(self, *, prompt_id: int, labeler: str) -> None:
        """Sample this prompt in the next batch, as a pair only `labeler` is offered. The request
        goes through the database, as every worker's do (any worker may serve it)."""
        with self.db.sessions.begin() as s:
            store.add_sample_request(s, prompt_id=prompt_id, labeler=labeler)
        self._wake.set()

    def state(self) -> dict:
        recent_pairs = sum(n for n, _ in self._recent)
        recent_seconds = sum(s for _, s in self._recent)
        last = self.watcher.last
        return {
            "serving_version": self.watcher.serving_version,
            "queue": self.queue,
            "queue_size": self.settings.queue_size,
            "generating": self.generating,
            "last_batch_seconds": self.last_batch_seconds,
            "pairs_per_minute": 60.0 * recent_pairs / recent_seconds if recent_seconds else None,
            "last_error": self.last_error or self.watcher.last_error,
            "swap_ms": last.swap_ms if last else None,
            "commit_to_serving_ms": last.commit_to_serving_ms if last else None,
            "typed_pending": self._typed_pending(),
            "pairs_made": self.pairs_made,
            "interrupted_batches": self.interrupted_batches,
            "nul_stripped": self.nul_stripped,
            "no_prompts": self._warned_no_prompts,  # the page says to import some
        }

    # --- one unit of work --------------------------------------------------------------------

    def step(self) -> int:
        """Generate one batch if there is work (typed requests, or room in the queue); returns the
        number of pairs stored (0 when idle, full, or the batch gave way to a reload)."""
        jobs = self._next_jobs()
        if not jobs:
            return 0
        params = self._batch_params()
        try:
            outputs, version, seconds, picks = self._generate(jobs, params)
        except GenerationInterrupted:
            self._requeue_typed(jobs)
            if not self._stop.is_set():
                self.interrupted_batches += 1
                self._interrupted_streak += 1
                log.info("batch of %d prompts gave way to a hot reload", len(jobs))
            return 0
        except BaseException:
            self._requeue_typed(jobs)
            raise
        self._interrupted_streak = 0
        self._store(jobs, outputs, picks, version=version, params=params)
        self._recent.append((len(jobs), seconds))
        self.last_batch_seconds, self.last_error = seconds, None
        self.pairs_made += len(jobs)
        return len(jobs)

    def _next_jobs(self) -> list[_Job]:
        """Typed prompts first, then least-recently-sampled training prompts to fill the queue."""
        jobs = self._take_typed(self.settings.prompts_per_batch)
        with self.db.sessions.begin() as s:
            self.queue = store.count_pairs(s, status="queued", purpose="train")
            room = min(self.settings.queue_size - self.queue, self._batch_limit() - len(jobs))
            if room > 0:
                jobs += self._fill(s, room, exclude=[j.prompt_id for j in jobs])
        return jobs

    def _fill(self, s: Any, room: int, *, exclude: list[int]) -> list[_Job]:
        """Jobs for `room` queue slots: a held-out prompt for each slot the eval cadence marks (once
        a trained version serves: the reference is the base), least recently sampled training
        prompts for the others, in slot order."""
        due = self.settings.human_eval_share and self.watcher.serving_version > self.settings.human_eval_reference
        flags = self.eval_cadence.plan(room) if due else []
        held_out = store.pick_held_out_prompts(s, n=sum(flags))
        evals = [_Job(prompt_id=p.id, text=p.conditioning(), purpose="eval") for p in held_out]
        if sum(flags):  # warn once per run of misses, not once per due eval pair
            if not evals and not self._warned_no_held_out:
                log.warning("no held-out prompts for blind eval pairs: import some with --held-out 0.1")
            self._warned_no_held_out = not evals
        rows = store.pick_prompts_for_sampling(s, n=room - len(evals), exclude_ids=exclude) if room > len(evals) else []
        if room > len(evals):
            if not rows and not self._warned_no_prompts:
                log.warning("no training prompts to sample: import some (odpo prompts import FILE)")
            self._warned_no_prompts = not rows
        return interleave(flags, [_Job(prompt_id=p.id, text=p.conditioning()) for p in rows], evals)

    def _batch_limit(self) -> int:
        """Prompts in the next batch: `prompts_per_batch`, except with `ramp_up` while the process
        starts with an empty queue, when batches grow 1, 2, 4, … (pairs made so far + 1). A batch is stored
        only when all its rows are done, and on CPU 8 prompts took ~1.8x as long as 1, so the first
        pair comes in about half the time; every sample is still drawn with the same parameters."""
        ppb = self.settings.prompts_per_batch
        if not self.settings.ramp_up or self.queue > 0:
            return ppb
        return max(1, min(ppb, self.pairs_made + 1))

    def _take_typed(self, limit: int) -> list[_Job]:
        """Claim up to `limit` typed-prompt requests (oldest first) from the database."""
        with self.db.sessions.begin() as s:
            claimed = store.claim_sample_requests(s, worker=self.settings.worker, limit=limit,
                                                  stale_after_s=self.settings.request_stale_s)
            prompts = {c.id: s.get(Prompt, c.prompt_id) for c in claimed}
            gone = [c.id for c in claimed if prompts[c.id] is None]
            if gone:
                log.warning("typed prompt(s) of request(s) %s no longer exist; dropped", gone)
                store.finish_sample_requests(s, ids=gone, worker=self.settings.worker)
            return [_Job(prompt_id=c.prompt_id, text=prompts[c.id].conditioning(), purpose="typed",
                         requested_by=c.labeler, request_id=c.id) for c in claimed if prompts[c.id] is not None]

    def _requeue_typed(self, jobs: list[_Job]) -> None:
        ids = [j.request_id for j in jobs if j.request_id is not None]
        if ids:
            with self.db.sessions.begin() as s:
                store.release_sample_requests(s, worker=self.settings.worker, ids=ids)

    def _typed_pending(self) -> int:
        with self.db.sessions() as s:
            return store.count_sample_requests(s, state="pending")

    def _batch_params(self) -> SamplingParams:
        """The configured params; a configured seed is offset per batch (reproducible, yet no two
        batches draw the same random numbers)."""
        params = self.settings.params
        self._batch_index += 1
        if params.seed is None:
            return params
        return dataclasses.replace(params, seed=params.seed + self._batch_index - 1)

    def _generate(self, jobs: list[_Job], params: SamplingParams) -> tuple[list[list[Generated]], int, float, list]:
        """One batched call under the model lock, and the selector's pick of each prompt's pair (its
        scores come from the same weights); the version is read under the same lock, so the stamp
        on every sample is the version that produced it."""
        # A batch gives way to a pending swap, unless several in a row already did (no starvation
        # when versions arrive faster than a batch takes).
        allow_reload = self._interrupted_streak < self.settings.max_interrupts_in_a_row

        def should_stop() -> bool:
            return self._stop.is_set() or (allow_reload and self.watcher.swap_wanted.is_set())

        if self.backend is not None:
            return self._generate_remote(jobs, params, should_stop)
        with self.lock, stop_inside_forward(self.model, self._stop):
            version = self.watcher.serving_version
            self.generating = True
            started = time.perf_counter()
            try:
                outputs = generate(
                    self.model, self.tokenizer, [j.text for j in jobs], params=params,
                    n_per_prompt=self.settings.candidates,
                    autocast_dtype=self.settings.autocast_dtype,
                    cache_implementation=self.settings.cache_implementation, should_stop=should_stop,
                    record_logps=bool(self.settings.selector and self.settings.selector.scores_candidates))
                outputs = self._with_references(jobs, outputs, params=params, version=version, should_stop=should_stop)
                picks = pick_pairs(self.settings.selector, jobs, outputs, version=version)
            finally:
                self.generating = False
        return outputs, version, time.perf_counter() - started, picks

    def _generate_remote(self, jobs: list[_Job], params: SamplingParams,
                         should_stop: Any) -> tuple[list[list[Generated]], int, float, list]:
        """The backend samples under its serving version's name, so the stamp is that version.
        Versions are loaded into the servers while they keep sampling; only the switch of the
        serving name waits for the running batch."""
        with self.lock:  # a version switch waits for this batch: the stamp is exact
            version = self.watcher.serving_version
            self.generating = True
            started = time.perf_counter()
            try:
                outputs = self.backend.generate([j.text for j in jobs], params=params,
                                                n_per_prompt=self.settings.candidates, should_stop=should_stop)
                picks = pick_pairs(self.settings.selector, jobs, outputs, version=version)
            finally:
                self.generating = False
        return outputs, version, time.perf_counter() - started, picks

    def _with_references(self, jobs: list[_Job], outputs: list[list[Generated]], *, params: SamplingParams,
                         version: int, should_stop: Any) -> list[list[Generated]]:
        """Eval jobs: one policy sample and the reference's answer (the base, or the version set by
        `human_eval_reference`; a sampler serving that reference or older makes none)."""
        ref = self.settings.human_eval_reference
        at = [i for i, job in enumerate(jobs) if job.purpose == "eval"] if version > ref else []
        adapter = reference_adapter(self.model, self.db, run=self.settings.run, version=ref,
                                    base_dir=self.settings.base_dir) if ref and at else None
        return with_references(self.model, self.tokenizer, outputs, at=at, texts=[jobs[i].text for i in at],
                               params=params, adapter=adapter, autocast_dtype=self.settings.autocast_dtype,
                               cache_implementation=self.settings.cache_implementation, should_stop=should_stop)

    def _store(self, jobs: list[_Job], outputs: list[list[Generated]], picks: list, *, version: int,
               params: SamplingParams) -> None:
        """Store the pairs (trainer/sampling/batch_pairs.py); if a swap landed between generating and
        storing, the staleness rule applies to them at once, exactly as to the pairs already queued."""
        with self.db.sessions.begin() as s:
            self.auto_labels += store_batch(s, jobs, outputs, picks, version=version, params=params,
                                            settings=self.settings,
                                            selector=self.settings.selector, eval_side=self.eval_cadence.policy_side,
                                            new_sample=self._new_sample)
            store.finish_sample_requests(s, ids=[j.request_id for j in jobs if j.request_id is not None],
                                         worker=self.settings.worker)
            serving = self.watcher.serving_version
            if serving != version:
                store.retire_stale_pairs(s, current_version=serving, max_staleness=self.settings.max_staleness)
            self.queue = store.count_pairs(s, status="queued", purpose="train")
        log.debug("stored %d pairs from v%d", len(jobs), version)

    def _new_sample(self, g: Generated, *, params: dict) -> store.NewSample:
        """stored_sample, with the NUL-stripped samples counted for the worker's state."""
        self.nul_stripped += "\x00" in g.text
        return stored_sample(g, params=params)

    # --- threads -----------------------------------------------------------------------------

    def start(self) -> None:
        """Serve the committed version, then run the sampler and watcher threads (daemons)."""
        self.watcher.load_initial()
        self._stop.clear()
        self._threads = [threading.Thread(target=self._sample_loop, name="odpo-sampler", daemon=True),
                         threading.Thread(target=self._watch_loop, name="odpo-reload-watcher", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask both threads to finish; a running batch is cut short at its next decode step."""
        self._stop.set()  # a running generate() returns at its next decode step
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        if self.backend is not None:
            self.backend.close()

    def _sample_loop(self) -> None:
        niced = False
        while not self._stop.is_set():
            if not niced and self._time_to_yield():
                niced = self._lower_priority()
            if self.watcher.swap_wanted.is_set():  # let the watcher take the lock first
                self._stop.wait(0.01)
                continue
            try:
                made = self.step()
            except Exception as exc:  # noqa: BLE001 - a bad batch must not kill the sampler
                self._stop.wait(self._failed("sampling", exc))
                continue
            self._fault_backoff.reset()
            if not made:
                self._wake.wait(self.settings.poll_s)
                self._wake.clear()

    def _failed(self, what: str, exc: Exception) -> float:
        """Seconds to wait after a failed unit of work (db/transient.py wait_after: a transient fault in
        one line with a growing delay, a bug with its traceback)."""
        delay, self.last_error = wait_after(exc, what=what, log=log, backoff=self._fault_backoff,
                                            fixed_s=self.settings.error_backoff_s)
        return delay

    def _time_to_yield(self) -> bool:
        """When the thread lowers its priority: at once, except with `ramp_up` while the first pair
        is wanted (no vote waits on the sampler then; nice 0 work had slowed that batch twofold)."""
        return not self.settings.ramp_up or self.pairs_made > 0 or self.queue > 0

    def _lower_priority(self) -> bool:
        """Lower this thread's priority once (settings.nice); True: done or not wanted."""
        if self.settings.nice:
            lower_thread_priority(self.settings.nice)
        return True

    def _watch_loop(self) -> None:
        next_release = 0.0
        while not self._stop.is_set():
            try:
                self.watcher.poll_once()
                with self.db.sessions() as s:  # fresh for the UI even while a long batch runs
                    self.queue = store.count_pairs(s, status="queued", purpose="train")
                if time.monotonic() >= next_release:
                    with self.db.sessions.begin() as s:
                        released = store.release_expired(s)
                    if released:
                        log.info("gave back %d pairs whose claims expired", released)
                    next_release = time.monotonic() + self.settings.release_every_s
            except Exception as exc:  # noqa: BLE001 - keep serving the old version, try again
                self.watcher.last_error = f"reload failed: {type(exc).__name__}: {exc}"
                self._stop.wait(self._failed("hot reload", exc))
                continue
            self._stop.wait(self.settings.poll_s)
