"""The trainer's pause on a transient fault: a database that went away, a full disk.

Why pause instead of crash: a crash restarts the process, which reloads the model, and under
`odpo up` a crash loop used to take the web app down with it. Waiting in place costs nothing:
the trainer says why in one line (and in the `train.fault` control row the dashboard and the
label page read, when the database is up), waits with capped exponential backoff, and then
follows the run's head again: pending steps are dropped and replay (their labels were never
consumed), and a commit whose outcome the outage hid is found committed or not by the head itself.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

from odpo.db import store
from odpo.db.transient import Backoff, Fault
from odpo.trainer.policy import checkpoint as ckpt

log = logging.getLogger(__name__)


class FaultPause:
    """Waits out transient faults for one trainer: `wait(fault)` sleeps the next backoff delay
    (woken early by `stop`), `resumed()` clears the report after the first good iteration."""

    def __init__(self, db: Any, *, run: str, stop: threading.Event) -> None:
        self.db, self.run, self.stop = db, run, stop
        self.backoff = Backoff()
        self.paused = False
        self.what: Optional[str] = None  # what the fault is while paused: database, disk, ...

    def wait(self, fault: Fault) -> None:
        delay = self.backoff.next_delay()
        log.warning("training paused: %s; retrying in %.0f s", fault.line, delay)
        self._report({"what": fault.what, "line": fault.line, "retry_at": time.time() + delay, "at": time.time()})
        self.paused, self.what = True, fault.what
        self.stop.wait(delay)

    def resumed(self) -> None:
        if not self.paused:
            return
        self.paused, self.what = False, None
        self.backoff.reset()
        log.warning("training resumed")
        self._report({})

    def drop_uncommitted(self, adapters_dir: Path, version: int) -> None:
        """The version whose commit the fault interrupted did not make it (the head says so): its
        directory goes, so no `v<N>/` without a row outlives the outage (it would be rewritten by
        the replay, but a stop before then would leave it)."""
        with self.db.sessions() as s:
            if store.get_adapter(s, run=self.run, version=version) is not None:
                return
        path = Path(adapters_dir) / f"v{version}"
        if path.is_dir():
            log.info("removing %s: its commit did not happen before the fault", path)
            ckpt.remove_version_dir(path)

    def _report(self, value: dict[str, Any]) -> None:
        """Best effort: while the database is the fault, the log line is the report."""
        try:
            with self.db.sessions.begin() as s:
                store.set_control(s, key=store.TRAIN_FAULT_KEY, value=value)
        except Exception as exc:  # noqa: BLE001 - the database may be what is down
            log.debug("could not report the pause: %s", exc)
