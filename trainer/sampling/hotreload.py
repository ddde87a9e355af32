"""Hot reload: serve the newest committed adapter version without reloading the base model.

The `adapters` row is the commit point (DESIGN.md): the watcher only follows rows, so it never
sees a half-written directory. A swap copies the new LoRA tensors into the ones already attached
(`trainer.policy.checkpoint.load_adapter_into`), under the same lock generation holds, so a batch is
always sampled from exactly one version. Version 0 is the base policy: the LoRA B matrices are
zeroed, which makes every LoRA delta (B @ A) exactly zero, so generation never needs a special
path for it.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from odpo.db import store
from odpo.db.engine import Database
from odpo.db.models import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadResult:
    """One completed swap, as recorded in the `reloads` table."""

    from_version: int
    to_version: int
    swap_ms: float
    commit_to_serving_ms: float
    retired_pairs: int


@dataclass(frozen=True)
class _Target:
    version: int
    path: Optional[str]
    created_at: Optional[dt.datetime]


def zero_lora(peft_model: Any, adapter_name: str = "default") -> None:
    """Make the serving adapter the identity (version 0 = the base policy) in place; another
    adapter (an eval reference, trainer/evaluation/blind_pairs.py) is left as it is."""
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if f"lora_B.{adapter_name}." in name or name.endswith(f"lora_embedding_B.{adapter_name}"):
                param.zero_()


def load_version_into(peft_model: Any, *, version: int, path: Optional[str], base_dir: Optional[Path]) -> None:
    """Copy adapter `version` into the attached LoRA tensors (no new modules, no base reload)."""
    if version == 0 or path is None:
        zero_lora(peft_model)
        return
    from odpo.trainer.policy.checkpoint import AdapterLoadError, load_adapter_into  # the trainer owns the format

    where = resolve_adapter_path(path, base_dir)
    try:
        load_adapter_into(peft_model, where)
    except AdapterLoadError:
        if not (where / "adapter_config.json").is_file():
            raise
        reshape_adapter(peft_model, where)  # e.g. the trainer was restarted with another --lora-r
        load_adapter_into(peft_model, where)


def reshape_adapter(peft_model: Any, path: Path, *, adapter_name: str = "default") -> None:
    """Replace the live LoRA modules with ones shaped like the version at `path` (rank, alpha,
    targets). Only the small adapter tensors are rebuilt; the base weights stay where they are."""
    from odpo.trainer.policy.checkpoint import read_lora_settings
    from odpo.trainer.policy.lora import peft_config

    settings = read_lora_settings(path)
    log.warning("adapter %s has another LoRA shape (r=%d, alpha=%s); rebuilding the live adapter",
                path, settings.r, settings.alpha)
    peft_model.delete_adapter(adapter_name)
    peft_model.add_adapter(adapter_name, peft_config(settings))
    peft_model.set_adapter(adapter_name)
    peft_model.eval()
    # load_adapter_into caches its key -> parameter map on the model; those parameters are gone now
    from odpo.trainer.policy import checkpoint

    vars(peft_model).pop(getattr(checkpoint, "_PARAM_MAP_ATTR", ""), None)


def resolve_adapter_path(path: str, base_dir: Optional[Path]) -> Path:
    """Rows may hold paths relative to the data directory, so a data dir can be moved."""
    p = Path(path)
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


class ReloadWatcher:
    """Polls for a newer (or rolled-back-to) committed version and swaps it in.

    `swap_wanted` is set while a swap waits for the model lock; the sampler passes it to
    `generate(should_stop=...)`, so a running batch yields within one decode step and the new
    version is serving well inside the 2 s budget.
    """

    def __init__(self, *, db: Database, peft_model: Any, lock: threading.Lock, run: str = "default",
                 max_staleness: int = 1, base_dir: Optional[Path] = None, serving_version: int = 0) -> None:
        self.db = db
        self.model = peft_model
        self.lock = lock
        self.run = run
        self.max_staleness = max_staleness
        self.base_dir = base_dir
        self.serving_version = serving_version
        self._serving_path: Optional[str] = None
        self.swap_wanted = threading.Event()
        self.last: Optional[ReloadResult] = None
        self.last_error: Optional[str] = None

    def latest(self) -> _Target:
        """The version that should be serving: the newest committed, not rolled back (0 = base)."""
        with self.db.sessions() as s:
            row = store.latest_adapter(s, run=self.run)
            if row is None:
                return _Target(0, None, None)
            return _Target(row.version, row.path, row.created_at)

    def load_initial(self) -> int:
        """At start-up: serve whatever is committed now (no Reload row, nothing was serving)."""
        target = self.latest()
        with self.lock:
            load_version_into(self.model, version=target.version, path=target.path, base_dir=self.base_dir)
            self.serving_version, self._serving_path = target.version, target.path
        log.info("serving adapter v%d", target.version)
        return target.version

    def poll_once(self) -> Optional[ReloadResult]:
        """Swap if the committed version differs from the serving one; None when nothing changed."""
        noticed = utcnow()
        target = self.latest()
        if target.version == self.serving_version:
            return None
        self.swap_wanted.set()
        try:
            with self.lock:
                started = time.perf_counter()
                self._swap(target)
                swap_ms = (time.perf_counter() - started) * 1000
                previous, self.serving_version, self._serving_path = self.serving_version, target.version, target.path
        finally:
            self.swap_wanted.clear()
        result = self._record(previous, target, swap_ms=swap_ms, noticed=noticed)
        self.last, self.last_error = result, None
        log.info("hot reload v%d -> v%d: swap %.0f ms, commit-to-serving %.0f ms, %d stale pairs retired",
                 previous, target.version, swap_ms, result.commit_to_serving_ms, result.retired_pairs)
        return result

    def _swap(self, target: _Target) -> None:
        """Load `target`; if that fails half-way, put the serving version back before raising, so
        the weights always match the version stamped on new samples."""
        try:
            load_version_into(self.model, version=target.version, path=target.path, base_dir=self.base_dir)
        except Exception:
            load_version_into(self.model, version=self.serving_version, path=self._serving_path,
                              base_dir=self.base_dir)
            raise

    def _record(self, previous: int, target: _Target, *, swap_ms: float, noticed: dt.datetime) -> ReloadResult:
        """Retire pairs labelers should no longer see and log the reload, in one transaction.

        Commit-to-serving is measured from the adapter row's creation; a rollback has no commit
        time of its own, so it is measured from when this watcher noticed it.
        """
        from odpo.db.store import retire_pairs_newer_than

        forward = target.version > previous and target.created_at is not None
        since = target.created_at if forward else noticed
        latency_ms = max((utcnow() - since).total_seconds() * 1000, 0.0)
        with self.db.sessions.begin() as s:
            retired = store.retire_stale_pairs(s, current_version=target.version,
                                               max_staleness=self.max_staleness)
            if not forward:  # pairs from versions that were rolled back are not this policy's
                retired += retire_pairs_newer_than(s, version=target.version)
            store.record_reload(s, version=target.version, swap_ms=swap_ms, commit_to_serving_ms=latency_ms,
                                retired_pairs=retired)
        return ReloadResult(from_version=previous, to_version=target.version, swap_ms=swap_ms,
                            commit_to_serving_ms=latency_ms, retired_pairs=retired)
