"""`odpo serve` wiring: database, the web app, and (only with --inline-sampler / --headless) a
sampler thread.

By default serve holds no model: `odpo sample` workers fill the queue and serve reads their
heartbeats through `WorkerLink` (app/services/sampler_link.py). With an inline sampler, the model
is loaded once and the sampler and the reload watcher share it under one lock.

Inline start-up order (the first pair in seconds): the model loads in a thread that starts the
sampler the moment it is ready; the main thread builds the web app once that happened, or at once
when the model must be converted first (minutes), or after UI_HEAD_START_S. Until the sampler
runs, the app talks to a `StartingSampler`, which tells the page what it waits for (converting the
model on a first run, loading it) and keeps typed prompts for the real sampler.
"""
from __future__ import annotations

import errno
import importlib.util
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from odpo.app.config import CommonConfig, ServeConfig
from odpo.app.lifecycle import (
    ignore_sigterm_while_stopping,
    restore_sigterm,
    sigterm_as_interrupt,
    wait_until_interrupted,
)
from odpo.app.sampler_worker import build_sampler, load_policy, needs_conversion
from odpo.app.services.accounts import AuthConfig
from odpo.app.services.exports import ExportStore
from odpo.app.services.exposure import sign_in_for
from odpo.app.services.labeling import SamplerHandle
from odpo.app.services.sampler_link import WorkerLink
from odpo.app.services.signin import LoginThrottle, SessionBook
from odpo.app.services.status import CONVERTING, FAILED, LOADING, SAMPLING
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
    exports: ExportStore = field(default_factory=ExportStore)  # admin exports awaiting download
    auth: Optional[AuthConfig] = None  # the sign-in accounts (None: no sign-in)
    throttle: LoginThrottle = field(default_factory=LoginThrottle)  # back-off after failed sign-ins
    sessions: Optional[SessionBook] = None  # when sign-in sessions began (made with the app)

    @property
    def admins(self) -> set[str]:
        """Names given admin rights on the command line (--admin), besides the users file's."""
        return set(self.config.admins)


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


def run_serve(common: CommonConfig, cfg: ServeConfig) -> None:
    """Run until Ctrl-C / SIGTERM: the web app, and the sampler when it is inline (or headless).

    Without an inline sampler serve holds no model: pairs come from `odpo sample` workers, typed
    prompts go to them as request rows, and the page shows what the workers report
    (app/services/sampler_link.py). Inline, the model loads in a background thread with a head
    start on the web app (module docstring). Stopping takes about a second: gradio closes its
    server, an inline sampler gives up its batch between two layer blocks and its threads are
    joined. The CLI then ends the process with `exit_now`."""
    web = not cfg.headless and ui_available()
    auth = None
    if web:
        auth = sign_in_for(host=cfg.host, port=cfg.port, auth_file=cfg.auth_file, data_dir=common.data_dir,
                           insecure_no_auth=cfg.insecure_no_auth)
        check_listen_address(cfg.host, cfg.port)  # in one line, before a minute of model loading
    if not web and not cfg.inline_sampler:
        raise ServeError("this build has no web UI (odpo.app.ui): run `odpo sample` for sampling")
    db = common.open_db()
    handle: Any = StartingSampler() if cfg.inline_sampler else WorkerLink(db, run=cfg.run)
    ctx = AppContext(common=common, db=db, config=cfg, sampler=handle, auth=auth)
    previous = sigterm_as_interrupt()
    loader = _ModelLoader(common, cfg, db, handle) if cfg.inline_sampler else None
    demo = None
    try:
        if loader is not None:
            loader.start()
        if web:
            if loader is not None:
                loader.wait_ready(UI_HEAD_START_S)
            if loader is None or loader.error is None:  # a model that cannot load fails fast
                demo = _launch_ui(ctx)
        else:
            log.info("headless: sampling into %s without a web app", common.shown_db_url)
        if loader is not None:
            loader.wait()  # re-raises a failed load: serve exits, as before the web app came first
        if demo is not None:
            demo.block_thread()  # gradio turns Ctrl-C (and our SIGTERM) into a clean server close
        else:
            wait_until_interrupted()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        ignore_sigterm_while_stopping(previous)
        if demo is not None:
            demo.close()
        handle.close(timeout=STOP_TIMEOUT_S)
        ctx.exports.close()
        restore_sigterm(previous)
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
