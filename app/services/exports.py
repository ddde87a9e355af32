"""Admin exports waiting to be downloaded: where they lie, who may fetch them, when they go.

Why not hand the file to Gradio (gr.File): Gradio then copies it into its cache and serves it at
`/gradio_api/file=<path>` to ANY signed-in user who learns the URL, and the temp directory the
export was written to stays behind. Here each export lives in its own directory under one odpo
temp root that Gradio never serves; the web app downloads it through `/odpo/export/<token>`
(app/ui/admin.py), which checks that the requester is the admin who made it. A token is
unguessable, lives `ttl_s`, and its directory is deleted when it expires (timer), when the same
admin exports again, and when the store closes (serve's shutdown, or the process exiting).
"""
from __future__ import annotations

import atexit
import logging
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

EXPORT_TTL_S = 600.0
ROOT_PREFIX = "odpo-exports-"


@dataclass(frozen=True)
class Export:
    token: str
    path: Path  # the file to send
    owner: Optional[str]  # who made it (None when auth is off: anyone who can open the page)
    expires_at: float


class ExportStore:
    """Thread-safe registry of pending exports. Nothing touches the disk before the first export."""

    def __init__(self, *, parent: Optional[Path] = None, ttl_s: float = EXPORT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.parent, self.ttl_s, self._clock = parent, ttl_s, clock
        self._lock = threading.Lock()
        self._root: Optional[Path] = None
        self._exports: dict[str, Export] = {}
        self._timer: Optional[threading.Timer] = None
        self._closed = False

    @property
    def root(self) -> Optional[Path]:
        return self._root

    def new_dir(self) -> Path:
        """A fresh directory to write one export into (under the store's root)."""
        with self._lock:
            if self._root is None:
                self._root, self._closed = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=self.parent)), False
                atexit.register(self.close)  # also on an exit that skips serve's finally
            return Path(tempfile.mkdtemp(prefix="export-", dir=self._root))

    def add(self, path: Path, *, owner: Optional[str]) -> Export:
        """Register a written export; the same owner's previous exports are deleted (replaced)."""
        with self._lock:
            stale = [t for t, e in self._exports.items() if e.owner == owner]
            for token in stale:
                self._remove(token)
            entry = Export(token=secrets.token_urlsafe(24), path=Path(path), owner=owner,
                           expires_at=self._clock() + self.ttl_s)
            self._exports[entry.token] = entry
            self._schedule()
        self.purge()
        return entry

    def discard_dir(self, directory: Path) -> None:
        """Remove a directory from new_dir() whose export failed."""
        shutil.rmtree(directory, ignore_errors=True)

    def get(self, token: str) -> Optional[Export]:
        """The live export for `token`, or None (unknown or expired)."""
        self.purge()
        with self._lock:
            return self._exports.get(token or "")

    def purge(self) -> int:
        """Delete expired exports; returns how many went."""
        now = self._clock()
        with self._lock:
            expired = [t for t, e in self._exports.items() if e.expires_at <= now]
            for token in expired:
                self._remove(token)
        return len(expired)

    def close(self) -> None:
        """Delete every export and the root (idempotent)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._exports.clear()
            root, self._root, self._closed = self._root, None, True
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
            log.debug("removed export directory %s", root)

    def _remove(self, token: str) -> None:
        """Caller holds the lock. Deletes the export's own directory (a child of the root)."""
        entry = self._exports.pop(token, None)
        if entry is None or self._root is None:
            return
        directory = entry.path.parent
        while directory.parent != self._root and self._root in directory.parents:
            directory = directory.parent
        if directory.parent == self._root:
            shutil.rmtree(directory, ignore_errors=True)

    def _schedule(self) -> None:
        """Caller holds the lock: one daemon timer purges at the next expiry."""
        if self._timer is not None or self._closed:
            return

        def fire() -> None:
            with self._lock:
                self._timer = None
            self.purge()
            with self._lock:
                if self._exports:
                    self._schedule()

        self._timer = threading.Timer(self.ttl_s + 1.0, fire)
        self._timer.daemon = True
        self._timer.start()


def export_gguf_zip(db: object, *, out_dir: Path, run: str, data_dir: Path) -> Path:
    """The latest version's LoRA as a llama.cpp adapter GGUF plus its Ollama Modelfile, zipped into
    one download (trainer/export/gguf.py; `odpo export gguf` does the same, and `--merged`)."""
    from odpo.trainer.export.gguf import export_gguf

    folder = export_gguf(db, out=Path(out_dir) / "odpo-gguf", run=run, merged=False,  # type: ignore[arg-type]
                         cache_dir=Path(data_dir) / "models", base_dir=Path(data_dir)).parent
    name = next(folder.glob("*.gguf")).stem
    return Path(shutil.make_archive(str(Path(out_dir) / name), "zip", root_dir=folder))
