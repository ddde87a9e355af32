"""`odpo sample`: a sampler worker, its own process. It fills the queue of pairs, hot-reloads
committed versions and serves typed-prompt requests, writing everything to the database: the only
channel to the web app, the trainer and other workers. Any number of workers can run, on any host
that reaches the database and the adapter directories.

Every HEARTBEAT_S the worker publishes its state (phase, serving version, pairs/min, errors, the
vLLM servers it uses) in a control row, `sampler.worker:<name>`; the web app and the dashboard read
those rows (app/services/sampler_link.py). The model loading and sampler building here are shared
with `odpo serve --inline-sampler`.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from odpo.app.config import CommonConfig, SampleConfig
from odpo.app.lifecycle import (
    ignore_sigterm_while_stopping,
    restore_sigterm,
    sigterm_as_interrupt,
    wait_until_interrupted,
)
from odpo.app.services.status import CONVERTING, FAILED, LOADING, SAMPLING
from odpo.db import store
from odpo.db.engine import Database
from odpo.db.transient import classify

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
STOP_TIMEOUT_S = 10.0


def load_policy(common: CommonConfig, cfg: SampleConfig, db: Database) -> tuple[Any, Any]:
    """The base model with a LoRA adapter shaped like the latest committed version (its
    adapter_config.json), or like a fresh trainer adapter when none is committed yet."""
    from odpo.trainer.policy.checkpoint import read_lora_settings
    from odpo.trainer.policy.loading import ModelConfig, load_model_and_tokenizer
    from odpo.trainer.policy.lora import LoraSettings, attach_lora
    from odpo.trainer.sampling.hotreload import resolve_adapter_path

    model_cfg = ModelConfig(spec=cfg.model, cache_dir=common.model_cache_dir, device=cfg.device, dtype=cfg.dtype,
                            load_in_4bit=cfg.load_in_4bit)
    model, tokenizer = load_model_and_tokenizer(model_cfg)
    with db.sessions() as s:
        latest = store.latest_adapter(s, run=cfg.run)
    settings = LoraSettings()
    if latest is not None:
        settings = read_lora_settings(resolve_adapter_path(latest.path, common.data_dir))
    peft_model = attach_lora(model, settings)
    peft_model.eval()
    return peft_model, tokenizer


def build_sampler(common: CommonConfig, cfg: SampleConfig, db: Database, *, model: Any, tokenizer: Any,
                  ramp_up: bool = False, backend: Any = None, worker: str = "serve") -> Any:
    """A Sampler for `model` (a PeftModel, or None with a `backend`) configured from SampleConfig;
    not started. `ramp_up`: the first batches grow from one prompt, so the first pair comes sooner.
    `worker` names it in its typed-prompt claims."""
    from odpo.trainer.policy.loading import pick_device_dtype
    from odpo.trainer.sampling.generation import SamplingParams
    from odpo.trainer.sampling.sampler import Sampler, SamplerSettings

    _, _, autocast_dtype = pick_device_dtype(cfg.device, cfg.dtype)
    settings = SamplerSettings(
        run=cfg.run, queue_size=cfg.queue_size, prompts_per_batch=cfg.prompts_per_batch,
        max_staleness=cfg.max_staleness, overlap=cfg.overlap, poll_s=cfg.reload_poll_s,
        params=SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              seed=cfg.seed),
        autocast_dtype=autocast_dtype if cfg.sample_autocast else None,
        cache_implementation=None if cfg.kv_cache == "dynamic" else cfg.kv_cache,
        base_dir=common.data_dir, nice=cfg.sampler_nice, human_eval_share=cfg.human_eval_share,
        human_eval_reference=cfg.human_eval_reference,
        ramp_up=ramp_up, worker=worker, candidates=cfg.candidates,
        selector=build_selector(cfg, db, model=model, tokenizer=tokenizer, backend=backend))
    return Sampler(db=db, model=model, tokenizer=tokenizer, settings=settings, backend=backend)


def build_selector(cfg: SampleConfig, db: Database, *, model: Any, tokenizer: Any, backend: Any = None) -> Any:
    """The pair selector of --candidates/--selector. Margin selectors score with the policy in this
    process; with a vLLM backend there is none here, and they fall back to random (said once)."""
    from odpo.trainer.options import AUTO_LABEL_SURENESS, SCORING_SELECTORS
    from odpo.trainer.sampling.selection import Selector

    score = None
    if cfg.selector in SCORING_SELECTORS:
        if backend is not None or model is None:
            log.warning("--selector %s scores with the policy in this process; the vllm backend has none here, "
                        "so pairs are picked at random", cfg.selector)
        else:
            from odpo.trainer.training.rewards import reward_scorer

            score = reward_scorer(db, model, tokenizer)
    judge = None
    if cfg.selector == "judge-uncertain":
        from odpo.trainer.judges import load_judge

        judge = load_judge(cfg.selector_judge)
    return Selector(name=cfg.selector, seed=cfg.seed, score=score, judge=judge,
                    auto_label_confident=AUTO_LABEL_SURENESS if cfg.auto_label_confident else None)


def needs_conversion(common: CommonConfig, cfg: SampleConfig) -> bool:
    """True when the model is a GGUF not converted yet (the first run's minute or two)."""
    try:
        from odpo.trainer.policy.gguf_cache import gguf_cache_path
        from odpo.trainer.policy.loading import resolve_model_spec

        source = resolve_model_spec(cfg.model)
        return source.kind == "gguf" and not gguf_cache_path(Path(source.location), common.model_cache_dir).is_dir()
    except Exception:  # noqa: BLE001 - the load itself reports a bad spec, in one line
        return False


class Heartbeat:
    """Publishes this worker's state every HEARTBEAT_S from a daemon thread; the last beat says
    "stopped" so the web app stops counting the worker at once."""

    def __init__(self, db: Database, *, name: str, info: dict[str, Any]) -> None:
        self.db, self.name, self.info = db, name, info
        self.phase, self.error = LOADING, None
        self.failing = False  # the last beat could not be written
        self.sampler: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="odpo-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def state(self) -> dict[str, Any]:
        sampler_state = dict(self.sampler.state()) if self.sampler is not None else {}
        servers = getattr(getattr(self.sampler, "backend", None), "servers_state", None)
        return {**self.info, **sampler_state, "phase": self.phase, "error": self.error,
                "last_error": sampler_state.get("last_error") or self.error,
                "servers": servers() if servers else [], "at": time.time()}

    def beat(self) -> None:
        """Write this worker's state; while the database is away, say so once (not every second)
        and once more when it is back."""
        try:
            with self.db.sessions.begin() as s:
                store.set_control(s, key=store.WORKER_PREFIX + self.name, value=self.state())
        except Exception as exc:  # noqa: BLE001 - a database hiccup must not stop sampling
            if not self.failing:
                log.warning("heartbeat not written (the web app shows this worker as gone meanwhile): %s",
                            classify(exc).line)
            self.failing = True
            return
        if self.failing:
            log.warning("heartbeat written again")
        self.failing = False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.phase = "stopped"
        self.beat()

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.beat()


def run_sample(common: CommonConfig, cfg: SampleConfig) -> None:
    """Run one worker until Ctrl-C / SIGTERM; its typed-prompt claims are handed back on exit."""
    import os
    import socket

    db = common.open_db()
    name = cfg.worker_name()
    beat = Heartbeat(db, name=name, info={"pid": os.getpid(), "host": socket.gethostname(), "backend": cfg.backend,
                                          "run": cfg.run})
    previous = sigterm_as_interrupt()
    sampler = None
    try:
        beat.phase = CONVERTING if needs_conversion(common, cfg) else LOADING
        beat.start()
        sampler = _start_sampler(common, cfg, db, name=name, beat=beat)
        log.info("sampler worker %s is sampling (%s backend)", name, cfg.backend)
        wait_until_interrupted()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        ignore_sigterm_while_stopping(previous)
        if sampler is not None:
            sampler.stop(timeout=STOP_TIMEOUT_S)
            _release_claims(db, name)
        beat.stop()
        restore_sigterm(previous)
        db.close()


def _start_sampler(common: CommonConfig, cfg: SampleConfig, db: Database, *, name: str, beat: Heartbeat) -> Any:
    try:
        if cfg.backend == "vllm":  # the servers hold the model; odpo renders prompts to exact ids
            model, tokenizer = None, load_tokenizer(common, cfg)
            backend = vllm_backend(common, cfg, db, tokenizer=tokenizer)
        else:
            (model, tokenizer), backend = load_policy(common, cfg, db), None
        sampler = build_sampler(common, cfg, db, model=model, tokenizer=tokenizer, ramp_up=True, backend=backend,
                                worker=name)
    except BaseException as exc:
        beat.phase, beat.error = FAILED, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        beat.beat()
        raise
    sampler.start()
    beat.sampler, beat.phase = sampler, SAMPLING
    beat.beat()
    return sampler


def _release_claims(db: Database, name: str) -> None:
    try:
        with db.sessions.begin() as s:
            released = store.release_sample_requests(s, worker=name)
        if released:
            log.info("handed back %d typed-prompt request(s)", released)
    except Exception as exc:  # noqa: BLE001 - they are taken over after the stale timeout anyway
        log.warning("could not hand back typed-prompt requests: %s", exc)


def load_tokenizer(common: CommonConfig, cfg: SampleConfig) -> Any:
    """The policy's tokenizer alone (vLLM samples; odpo still renders prompts to exact ids)."""
    from odpo.trainer.policy.loading import ModelConfig, load_tokenizer_only

    return load_tokenizer_only(ModelConfig(spec=cfg.model, cache_dir=common.model_cache_dir))


def vllm_backend(common: CommonConfig, cfg: SampleConfig, db: Database, *, tokenizer: Any) -> Any:
    from odpo.trainer.sampling.vllm_backend import VllmBackend

    return VllmBackend(db=db, urls=list(cfg.vllm_urls), run=cfg.run, tokenizer=tokenizer,
                       base_model=cfg.model, max_staleness=cfg.max_staleness, base_dir=Path(common.data_dir))
