"""`odpo serve` wiring: database, policy model + LoRA, sampler threads, then the web app.

The model is loaded once; the sampler and the reload watcher share it under one lock. The web UI
is optional (`--headless`, or a build without app/ui.py): the sampler keeps the queue full either
way, so judges and scripts can label through the database alone.
"""
from __future__ import annotations

import errno
import importlib.util
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from odpo.app.config import CommonConfig, ServeConfig
from odpo.app.services.labeling import SamplerHandle
from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # the sampler threads stop within a layer block; this only bounds a stuck one


@dataclass
class AppContext:
    """What the web UI gets from the serve process: it never builds models or engines itself, so
    the UI is tested with a database and no sampler at all."""

    common: CommonConfig
    db: Database
    config: ServeConfig
    sampler: Optional[SamplerHandle] = None
    admins: set[str] = field(default_factory=set)


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
    """Run until Ctrl-C / SIGTERM: sampler + reload watcher, and the web app unless headless.

    Stopping takes about a second: gradio closes its server, the sampler gives up its batch
    between two layer blocks (trainer/sampler.py) and the threads are joined. The CLI then ends
    the process with `exit_now`."""
    if not cfg.headless and ui_available():
        check_listen_address(cfg.host, cfg.port)  # in one line, before a minute of model loading
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
        _ignore_sigterm_while_stopping(previous)
        if sampler is not None:
            sampler.stop(timeout=STOP_TIMEOUT_S)
        _restore_sigterm(previous)
        db.close()


class ServeError(OdpoError):
    """The web app cannot start where it was asked to (port taken, unknown host)."""


def check_listen_address(host: str, port: int) -> None:
    """Bind host:port once, as the web server will (SO_REUSEADDR, like uvicorn), and say in one
    line why that fails; gradio's own error is a traceback after the model has loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            hint = " (another odpo serve?): pick another --port" if exc.errno == errno.EADDRINUSE else ""
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None


def ui_available() -> bool:
    return importlib.util.find_spec("odpo.app.ui.app") is not None


def _launch_ui(ctx: AppContext) -> None:
    """Blocks in gradio's own loop; it turns Ctrl-C (and our SIGTERM) into a clean server close."""
    from odpo.app.ui.app import build_app, launch_kwargs

    cfg = ctx.config
    demo = build_app(ctx)
    log.info("odpo is serving on http://%s:%d", cfg.host, cfg.port)
    try:
        demo.launch(server_name=cfg.host, server_port=cfg.port, prevent_thread_lock=False, **launch_kwargs(ctx))
    except OSError as exc:  # the port was taken since check_listen_address
        raise ServeError(f"cannot listen on {cfg.host}:{cfg.port}: {str(exc).splitlines()[0]}") from None


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


def _ignore_sigterm_while_stopping(previous: Any) -> None:
    """A second SIGTERM (a service manager repeating itself) must not cut the clean-up short with
    a traceback; `odpo up` follows up with SIGKILL if we ever overrun its grace period."""
    if previous is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def exit_now(code: int = 0) -> None:
    """End the serve process at once, after its orderly shutdown (web server closed, sampler
    stopped, database closed), skipping the interpreter's own teardown.

    Measured with the default model on a loaded 2-core machine: run_serve returns 0.5-1 s after
    SIGTERM, then Python's finalisation (garbage-collecting ~700k objects of torch, transformers
    and gradio) took another 5-8 s, which is most of what made serve overrun `odpo up`'s grace.
    Nothing is lost by skipping it: atexit handlers still run and the streams are flushed."""
    import atexit
    import os
    import sys

    logging.shutdown()
    run_exit_functions = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_functions is not None:
        run_exit_functions()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to say anyway
            pass
    os._exit(code)
