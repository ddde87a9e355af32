"""Dashboard data and admin actions for the web UI, as plain data (no gradio here).

Admin rights are checked HERE, not only by hiding the Admin tab: a hidden tab is not a security
boundary, and every admin call can also arrive over the HTTP API.
"""
from __future__ import annotations

import datetime as dt
import importlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, Optional

from odpo.app.config import ServeConfig
from odpo.app.services import typed_prompts as typed
from odpo.app.services.accounts import AuthConfig
from odpo.app.services.exposure import insecure_banner
from odpo.app.services.human_eval import human_win_rates
from odpo.app.services.labeler_quality import labeler_quality
from odpo.app.services.labeling import LabelService, load_guidelines
from odpo.app.services.status import disk_free, trainer_state
from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError
from odpo.db.models import utcnow

log = logging.getLogger(__name__)

PAUSE_KEY = "train.paused"
HOURS_SHOWN = 48
GUIDELINES_KEY = "guidelines"  # the control row an admin's guidelines live in (over --guidelines)
MAX_GUIDELINES_CHARS = 20_000


class AdminError(OdpoError):
    """An admin action refused or failed in a way the admin can fix."""


class NotAdminError(AdminError):
    """The signed-in user is not listed as admin in the users file."""


class AdminService:
    def __init__(self, *, db: Database, config: ServeConfig, labels: LabelService,
                 auth: Optional[AuthConfig] = None, extra_admins: frozenset[str] = frozenset(),
                 data_dir: Optional[Path] = None) -> None:
        self.db, self.config, self.labels, self.auth = db, config, labels, auth
        self.extra_admins = set(extra_admins)
        self.data_dir = data_dir  # adapter rows may hold paths relative to it

    # -- who may ------------------------------------------------------------------------------
    def is_admin(self, username: Optional[str]) -> bool:
        """Without auth everyone who can open the page is trusted (it binds to 127.0.0.1 by
        default); with auth only users marked admin (or ctx.admins) are."""
        if self.auth is None:
            return True
        return bool(username) and (self.auth.is_admin(username) or username in self.extra_admins)

    def require_admin(self, username: Optional[str]) -> None:
        if not self.is_admin(username):
            raise NotAdminError("admins only: ask an admin to mark you `admin = true` in the users file")

    # -- dashboard ----------------------------------------------------------------------------
    def dashboard(self, *, username: Optional[str] = None) -> dict[str, Any]:
        """Every series and table the Dashboard tab shows, in one read transaction. Where the
        processes run (hosts, pids, vLLM URLs, judge endpoints) is for admins only."""
        run = self.config.run
        with self.db.sessions() as s:
            data = {
                "train": store.train_series(s, run=run),
                "evals": store.eval_series(s),
                "human_evals": human_win_rates(s),
                "labels_per_hour": store.labels_per_hour(s, since=utcnow() - dt.timedelta(hours=HOURS_SHOWN)),
                "labelers": store.labeler_stats(s),
                "agreement": store.judge_agreement(s),
                "labeler_quality": labeler_quality(s),
                "selectors": store.choices_by_selector(s),
                "last_step": store.last_train_step(s, run=run),
                "status": store.status_counts(s, run=run),
                "paused": _paused(s),
                "train_progress": store.get_control(s, key=store.TRAIN_PROGRESS_KEY),
                "trainer": trainer_state(s, run=run),
                "processes": store.get_control(s, key=store.up_state_key(run)),
                "judges": list(store.controls_with_prefix(s, prefix=store.JUDGE_STATE_PREFIX).values()),
            }
        data["now"] = time.time()  # the reports carry wall-clock times: their age is shown
        data["disk_free_bytes"] = disk_free(self.data_dir) if self.data_dir is not None else None
        data["sampler"] = self.labels.sampler_state()
        data["warning"] = insecure_banner(host=self.config.host, port=self.config.port, auth_on=self.auth is not None,
                                          insecure_no_auth=self.config.insecure_no_auth)
        if not self.is_admin(username):
            data["processes"], data["judges"] = None, []
            data["sampler"].pop("workers", None)
        return data

    # -- actions --------------------------------------------------------------------------------
    def import_prompts(self, *, username: Optional[str], filename: str = "", path: Optional[Path] = None,
                       data: Optional[bytes] = None, held_out_fraction: float = 0.0) -> store.ImportResult:
        """Parse an uploaded prompt file (`path`, or its bytes as `data`) and store it in one
        transaction (all or nothing). Admin rights are checked FIRST: a non-admin's upload is never
        opened; an admin's is read only up to import_limits.MAX_PROMPT_FILE_BYTES."""
        from odpo.app.services.import_limits import MAX_PROMPT_FILE_BYTES, size_text
        from odpo.app.services.prompt_files import PromptFileError, parse_prompt_bytes, read_prompt_file
        from odpo.app.services.prompts import import_prompt_records

        self.require_admin(username)
        if not 0.0 <= held_out_fraction < 1.0:
            raise AdminError("held-out fraction must be in [0, 1)")
        if (path is None) == (data is None):
            raise AdminError("choose a prompt file first")
        name = Path(filename or (path.name if path is not None else "") or "upload.txt").name
        if data is not None and len(data) > MAX_PROMPT_FILE_BYTES:
            raise AdminError(f"{name}: the file is {size_text(len(data))}, over the limit of "
                             f"{size_text(MAX_PROMPT_FILE_BYTES)} for one import; split it into smaller files")
        try:
            records = (read_prompt_file(Path(path), name=name) if path is not None
                       else parse_prompt_bytes(data or b"", name=name, suffix=Path(name).suffix.lower()))
        except PromptFileError as exc:  # may not subclass OdpoError yet: translate explicitly
            raise AdminError(str(exc)) from None
        result = import_prompt_records(self.db, records, held_out_fraction=held_out_fraction)
        log.info("%s imported %s: %d added, %d duplicates", username or "admin", name, result.added,
                 result.duplicates)
        return result

    def set_paused(self, *, username: Optional[str], paused: bool) -> bool:
        self.require_admin(username)
        with self.db.sessions.begin() as s:
            store.set_control(s, key=PAUSE_KEY, value={"paused": bool(paused), "by": username or "admin"})
        log.info("training %s by %s", "paused" if paused else "resumed", username or "admin")
        return bool(paused)

    def is_paused(self) -> bool:
        with self.db.sessions() as s:
            return _paused(s)

    def versions(self) -> list[dict[str, Any]]:
        with self.db.sessions() as s:
            return store.adapter_versions(s, run=self.config.run)

    def rollback(self, *, username: Optional[str], version: int, retire_newer: bool = True) -> dict[str, int]:
        """Serve and train from `version` again (the sampler notices the new latest row); queued
        pairs sampled by the discarded versions are retired so nobody labels them."""
        self.require_admin(username)
        version = int(version)
        with self.db.sessions.begin() as s:
            released = store.rollback_to(s, version=version, run=self.config.run)
            retired = store.retire_pairs_newer_than(s, version=version) if retire_newer else 0
        log.warning("rollback to v%d by %s: %d labels released, %d pairs retired", version,
                    username or "admin", released, retired)
        return {"version": version, "released_labels": released, "retired_pairs": retired}

    def retire_queue(self, *, username: Optional[str]) -> int:
        self.require_admin(username)
        with self.db.sessions.begin() as s:
            return store.retire_queue(s)

    # -- labeler quality and guidelines ------------------------------------------------------------
    def mark_gold(self, *, username: Optional[str], pair_id: Any, choice: str) -> dict[str, Any]:
        """Set a pair's gold answer (a or b, in pair terms as stored, not the side anyone saw it on);
        people's agreement with gold answers is on the dashboard and can gate training."""
        self.require_admin(username)
        try:
            pid = int(str(pair_id).strip())
        except ValueError:
            raise AdminError(f"pair id must be a whole number, got {str(pair_id)[:40]!r}") from None
        choice = str(choice or "").strip().lower()
        try:
            with self.db.sessions.begin() as s:
                store.set_gold(s, pair_id=pid, choice=choice, by=username or "admin")
        except store.StoreError as exc:
            raise AdminError(str(exc)) from None
        log.info("gold answer of pair %d set to %s by %s", pid, choice, username or "admin")
        return {"pair_id": pid, "choice": choice}

    def get_guidelines(self) -> str:
        """The guidelines the Label tab shows: an admin's (stored), else --guidelines, else built-in."""
        with self.db.sessions() as s:
            stored = store.get_control(s, key=GUIDELINES_KEY) or {}
        text = str(stored.get("text") or "").strip()
        return text or load_guidelines(self.config.guidelines)

    def set_guidelines(self, *, username: Optional[str], text: Optional[str]) -> str:
        """Store new guidelines (one upsert: the last save wins whole); empty text goes back to
        the configured ones. Pages show them from their next load."""
        self.require_admin(username)
        clean = (text or "").strip()
        if len(clean) > MAX_GUIDELINES_CHARS:
            raise AdminError(f"guidelines can have at most {MAX_GUIDELINES_CHARS:,} characters "
                             f"(got {len(clean):,}); nothing was saved")
        with self.db.sessions.begin() as s:
            store.set_control(s, key=GUIDELINES_KEY, value={"text": clean, "by": username or "admin"})
        log.info("guidelines %s by %s", "updated" if clean else "reset", username or "admin")
        return self.get_guidelines()

    # -- typed prompts --------------------------------------------------------------------------
    def typed_prompts(self, *, username: Optional[str]) -> list[dict[str, Any]]:
        """Typed prompts waiting for promotion (their text is a labeler's: admins only)."""
        self.require_admin(username)
        return typed.waiting(self.db)

    def promote_prompts(self, *, username: Optional[str], ids: list[int]) -> int:
        """Let typed prompts join the shared pool, the judges and training (app/services/typed_prompts.py)."""
        self.require_admin(username)
        moved = typed.promote(self.db, ids=ids)
        log.info("%s promoted %d typed prompt(s): %s", username or "admin", moved, ids)
        return moved

    # -- exports --------------------------------------------------------------------------------
    def export_available(self) -> bool:
        return importlib.util.find_spec("odpo.trainer.export.exporters") is not None

    def export(self, *, username: Optional[str], fmt: str, out_dir: Path) -> Path:
        """Write an export file via trainer/export/exporters.py (when that feature is installed)."""
        self.require_admin(username)
        if not self.export_available():
            raise AdminError("exports are not available in this version of odpo (trainer/export/exporters.py missing)")
        module = importlib.import_module("odpo.trainer.export.exporters")
        fn = getattr(module, "export_for_ui", None)
        if fn is None:
            raise AdminError("this odpo's trainer/export/exporters.py has no export_for_ui(); use `odpo export`")
        out_dir.mkdir(parents=True, exist_ok=True)
        return Path(fn(db=self.db, fmt=fmt, out_dir=out_dir, run=self.config.run, base_dir=self.data_dir))


def _paused(s) -> bool:
    return bool((store.get_control(s, key=PAUSE_KEY) or {}).get("paused", False))
