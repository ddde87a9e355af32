"""`odpo serve` wiring: database, policy model + LoRA, sampler threads, then the web app.

The model is loaded once; the sampler and the reload watcher share it under one lock. The web UI
is optional (`--headless`, or a build without app/ui.py): the sampler keeps the queue full either
way, so judges and scripts can label through the database alone.
"""
from __future__ import annotations

import importlib.util
import logging
import signal
import threading
from typing import Any, Optional

from odpo.app.config import CommonConfig
from odpo.app.context import AppContext, ServeConfig
from odpo.db import store
from odpo.db.engine import Database

log = logging.getLogger(__name__)


def load_policy(common: CommonConfig, cfg: ServeConfig, db: Database) -> tuple[Any, Any]:
    """The base model with a LoRA adapter shaped like the latest committed version (its
    adapter_config.json), or like a fresh trainer adapter when none is committed yet."""
    from odpo.trainer.checkpoint import read_lora_settings
    from odpo.trainer.hotreload import resolve_adapter_path
    from odpo.trainer.lora import LoraSettings, attach_lora
    from odpo.trainer.models import ModelConfig, load_model_and_tokenizer

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


def build_sampler(common: CommonConfig, cfg: ServeConfig, db: Database, *, model: Any, tokenizer: Any) -> Any:
    """A Sampler for `model` (a PeftModel) configured from ServeConfig; not started."""
    from odpo.trainer.generation import SamplingParams
    from odpo.trainer.models import pick_device_dtype
    from odpo.trainer.sampler import Sampler, SamplerSettings

    _, _, autocast_dtype = pick_device_dtype(cfg.device, cfg.dtype)
    settings = SamplerSettings(
        run=cfg.run, queue_size=cfg.queue_size, prompts_per_batch=cfg.prompts_per_batch,
        max_staleness=cfg.max_staleness, overlap=cfg.overlap, poll_s=cfg.reload_poll_s,
        params=SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              seed=cfg.seed),
        autocast_dtype=autocast_dtype if cfg.sample_autocast else None,
        cache_implementation=None if cfg.kv_cache == "dynamic" else cfg.kv_cache,
        base_dir=common.data_dir, nice=cfg.sampler_nice)
    return Sampler(db=db, model=model, tokenizer=tokenizer, settings=settings)


def run_serve(common: CommonConfig, cfg: ServeConfig, *, admins: Optional[set[str]] = None) -> None:
    """Run until Ctrl-C / SIGTERM: sampler + reload watcher, and the web app unless headless."""
    db = common.open_db()
    sampler = None
    previous = _sigterm_as_interrupt()
    try:
        model, tokenizer = load_policy(common, cfg, db)
        sampler = build_sampler(common, cfg, db, model=model, tokenizer=tokenizer)
        sampler.start()
        ctx = AppContext(common=common, db=db, config=cfg, sampler=sampler, admins=set(admins or ()))
        if cfg.headless:
            log.info("headless: sampling into %s without a web app", common.db_url)
            _wait_until_interrupted()
        elif not ui_available():
            log.warning("this build has no web UI (app/ui.py); running headless")
            _wait_until_interrupted()
        else:
            _launch_ui(ctx)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        if sampler is not None:
            sampler.stop()
        _restore_sigterm(previous)
        db.close()


def ui_available() -> bool:
    return importlib.util.find_spec("odpo.app.ui") is not None


def _launch_ui(ctx: AppContext) -> None:
    """Blocks in gradio's own loop; it turns Ctrl-C (and our SIGTERM) into a clean server close."""
    from odpo.app.ui import build_app, launch_kwargs

    cfg = ctx.config
    demo = build_app(ctx)
    log.info("odpo is serving on http://%s:%d", cfg.host, cfg.port)
    demo.launch(server_name=cfg.host, server_port=cfg.port, prevent_thread_lock=False, **launch_kwargs(ctx))


def _wait_until_interrupted() -> None:
    forever = threading.Event()
    while not forever.wait(1.0):
        pass


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _sigterm_as_interrupt() -> Any:
    """`odpo up` and service managers stop us with SIGTERM: treat it like Ctrl-C so the sampler
    stops between decode steps and the web server closes its socket."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
