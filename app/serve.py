"""`odpo serve` wiring: database, policy model + LoRA, sampler threads, and the web app.

The model is loaded once; the sampler and the reload watcher share it under one lock. The web UI
is optional (`--headless`, or a build without app/ui.py): the sampler keeps the queue full either
way, so judges and scripts can label through the database alone.

Start-up order (the first pair in seconds): the model loads in a thread that starts the sampler
the moment it is ready; the main thread builds the web app once that happened, or at once when the
model must be converted first (minutes), or after UI_HEAD_START_S. Until the sampler runs, the app
talks to a `StartingSampler`, which tells the page what it waits for (converting the model on a
first run, loading it) and keeps typed prompts for the real sampler.
"""
from __future__ import annotations

import errno
import importlib.util
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from odpo.app.config import CommonConfig, ServeConfig
from odpo.app.services.exports import ExportStore
from odpo.app.services.labeling import SamplerHandle
from odpo.app.services.status import CONVERTING, FAILED, LOADING, SAMPLING
from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError

log = logging.getLogger(__name__)

# The model gets this long a head start before the web app is built: both are mostly Python under
# one GIL, so building the page while torch imports slowed the model load (and the first pair) by
# seconds. A conversion (minutes) or a slow load brings the page up at once, saying what it waits for.
UI_HEAD_START_S = 20.0
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
    exports: ExportStore = field(default_factory=ExportStore)  # admin exports awaiting download


class StartingSampler:
    """The SamplerHandle the web app gets while the model is still loading; it forwards to the
    real Sampler once `start` hands one over. `state()["phase"]` is what the page shows in an
    empty slot (app/services/status.py `waiting_message`)."""

    def __init__(self, phase: str = LOADING) -> None:
        self._lock = threading.Lock()
        self._phase, self._error = phase, None
        self._sampler: Any = None
        self._typed: list[tuple[int, str]] = []
        self._closed = False

    def set_phase(self, phase: str, error: Optional[str] = None) -> None:
        with self._lock:
            self._phase, self._error = phase, error

    def start(self, sampler: Any) -> bool:
        """Start `sampler` and forward to it from now on; False (not started) after close()."""
        with self._lock:
            if self._closed:
                return False
            sampler.start()
            self._sampler, typed, self._typed = sampler, self._typed, []
            for prompt_id, labeler in typed:
                sampler.request_typed(prompt_id=prompt_id, labeler=labeler)
            return True

    def close(self, timeout: float) -> None:
        """Stop the sampler if one started; a later start() is refused (serve is stopping)."""
        with self._lock:
            self._closed, sampler = True, self._sampler
        if sampler is not None:
            sampler.stop(timeout=timeout)

    def request_typed(self, *, prompt_id: int, labeler: str) -> None:
        with self._lock:
            if self._sampler is None:
                self._typed.append((prompt_id, labeler))
                return
            sampler = self._sampler
        sampler.request_typed(prompt_id=prompt_id, labeler=labeler)

    def state(self) -> dict:
        with self._lock:
            sampler, phase, error, typed = self._sampler, self._phase, self._error, len(self._typed)
        if sampler is not None:
            return {**sampler.state(), "phase": SAMPLING}
        return {"phase": phase, "last_error": error, "generating": False, "typed_pending": typed,
                "pairs_made": 0}


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


def build_sampler(common: CommonConfig, cfg: ServeConfig, db: Database, *, model: Any, tokenizer: Any,
                  ramp_up: bool = False) -> Any:
    """A Sampler for `model` (a PeftModel) configured from ServeConfig; not started. `ramp_up`
    (serve): the first batches grow from one prompt, so the first pair comes sooner."""
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
        base_dir=common.data_dir, nice=cfg.sampler_nice, human_eval_share=cfg.human_eval_share,
        ramp_up=ramp_up)
    return Sampler(db=db, model=model, tokenizer=tokenizer, settings=settings)


def run_serve(common: CommonConfig, cfg: ServeConfig, *, admins: Optional[set[str]] = None) -> None:
    """Run until Ctrl-C / SIGTERM: sampler + reload watcher, and the web app unless headless.

    The model loads in a background thread, with a head start on the web app (module docstring).
    Stopping takes about a second: gradio closes its server, the sampler gives up its batch
    between two layer blocks (trainer/sampler.py) and the threads are joined. The CLI then ends
    the process with `exit_now`."""
    web = not cfg.headless and ui_available()
    if web:
        check_listen_address(cfg.host, cfg.port)  # in one line, before a minute of model loading
    db = common.open_db()
    handle = StartingSampler()
    ctx = AppContext(common=common, db=db, config=cfg, sampler=handle, admins=set(admins or ()))
    previous = _sigterm_as_interrupt()
    loader = _ModelLoader(common, cfg, db, handle)
    demo = None
    try:
        loader.start()
        if web:
            loader.wait_ready(UI_HEAD_START_S)
            if loader.error is None:  # a model that cannot load fails fast, with no web app to tear down
                demo = _launch_ui(ctx)
        elif cfg.headless:
            log.info("headless: sampling into %s without a web app", common.db_url)
        else:
            log.warning("this build has no web UI (app/ui.py); running headless")
        loader.wait()  # re-raises a failed load: serve exits, as before the web app came first
        if demo is not None:
            demo.block_thread()  # gradio turns Ctrl-C (and our SIGTERM) into a clean server close
        else:
            _wait_until_interrupted()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        _ignore_sigterm_while_stopping(previous)
        if demo is not None:
            demo.close()
        handle.close(timeout=STOP_TIMEOUT_S)
        ctx.exports.close()
        _restore_sigterm(previous)
        db.close()


class _ModelLoader:
    """Loads the policy in a daemon thread and starts the sampler as soon as it is ready, so the
    first pair is being sampled while the web app is still coming up."""

    def __init__(self, common: CommonConfig, cfg: ServeConfig, db: Database, handle: StartingSampler) -> None:
        self.common, self.cfg, self.db, self.handle = common, cfg, db, handle
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="odpo-model-loader", daemon=True)
        self._ready = threading.Event()  # sampling, converting or failed: time for the web app

    def start(self) -> None:
        self.thread.start()

    def wait_ready(self, limit_s: float) -> None:
        """Give the load a head start of up to `limit_s` (short waits, so a signal gets through)."""
        deadline = time.monotonic() + limit_s
        while not self._ready.wait(0.2) and time.monotonic() < deadline:
            pass

    def wait(self) -> None:
        """Join in short waits (a signal reaches the main thread meanwhile); re-raise a failure."""
        while self.thread.is_alive():
            self.thread.join(0.2)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            if needs_conversion(self.common, self.cfg):
                self.handle.set_phase(CONVERTING)
                log.info("converting the model once (first run): the page says so meanwhile")
                self._ready.set()
            model, tokenizer = load_policy(self.common, self.cfg, self.db)
            sampler = build_sampler(self.common, self.cfg, self.db, model=model, tokenizer=tokenizer, ramp_up=True)
            self.handle.start(sampler)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self.handle.set_phase(FAILED, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            self.error = exc
        finally:
            self._ready.set()


def needs_conversion(common: CommonConfig, cfg: ServeConfig) -> bool:
    """True when the model is a GGUF not converted yet (the first run's minute or two)."""
    try:
        from odpo.trainer.gguf_cache import gguf_cache_path
        from odpo.trainer.models import resolve_model_spec

        source = resolve_model_spec(cfg.model)
        return source.kind == "gguf" and not gguf_cache_path(Path(source.location), common.model_cache_dir).is_dir()
    except Exception:  # noqa: BLE001 - the load itself reports a bad spec, in one line
        return False


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


def _launch_ui(ctx: AppContext) -> Any:
    """Start the web app without blocking (the caller blocks in `demo.block_thread()`)."""
    from odpo.app.ui.app import build_app, launch_kwargs

    cfg = ctx.config
    demo = build_app(ctx)
    try:
        demo.launch(server_name=cfg.host, server_port=cfg.port, prevent_thread_lock=True, **launch_kwargs(ctx))
    except OSError as exc:  # the port was taken since check_listen_address
        raise ServeError(f"cannot listen on {cfg.host}:{cfg.port}: {str(exc).splitlines()[0]}") from None
    log.info("odpo is serving on http://%s:%d", cfg.host, cfg.port)
    return demo


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
