"""Prompt import and listing for the CLI and the Admin tab: each call is one transaction, so an
import with one bad file writes nothing."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

from odpo.app.config import CommonConfig
from odpo.db import store
from odpo.db.engine import Database

log = logging.getLogger(__name__)


def import_prompt_records(db: Database, records: Iterable, *, held_out_fraction: float) -> store.ImportResult:
    """Store PromptRecords in ONE transaction; held-out membership is a stable hash of the text."""
    from odpo.app.services.prompt_files import held_out_split

    new = [store.NewPrompt(text=r.text, source=r.source, tags=tuple(r.tags), context=r.context_messages,
                           held_out=held_out_split(r.text, held_out_fraction, r.context_messages)
                           if held_out_fraction else False)
           for r in records]
    with db.sessions.begin() as s:
        return store.add_prompts(s, prompts=new)


def ensure_initialised(cfg: CommonConfig, *, starter: bool = True, held_out_fraction: float = 0.1) -> int:
    """Create the database; on an empty one import the bundled starter prompts. Returns how many
    were added (0 when prompts already exist), so re-running is harmless."""
    from odpo.app.services.prompt_files import read_starter_prompts

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    db = cfg.open_db()
    try:
        with db.sessions() as s:
            total, _ = store.count_prompts(s)
        if total or not starter:
            return 0
        result = import_prompt_records(db, read_starter_prompts(), held_out_fraction=held_out_fraction)
        log.info("imported %d starter prompts (%d held out)", result.added, result.held_out)
        return result.added
    finally:
        db.close()


def import_prompt_files(cfg: CommonConfig, files: Sequence[Path], *, held_out_fraction: float,
                        max_chars: int) -> store.ImportResult:
    """Parse every file first (a bad one raises before anything is written), then store all."""
    from odpo.app.services.prompt_files import read_prompt_file

    records = [rec for f in files for rec in read_prompt_file(f, max_chars=max_chars)]
    db = cfg.open_db()
    try:
        return import_prompt_records(db, records, held_out_fraction=held_out_fraction)
    finally:
        db.close()


def list_prompts(cfg: CommonConfig, *, limit: int, offset: int, held_out: Optional[bool]) -> list:
    """Stored prompts, oldest first, optionally only the held-out or only the training ones."""
    db = cfg.open_db()
    try:
        with db.sessions() as s:
            return store.list_prompts(s, limit=limit, offset=offset, held_out=held_out)
    finally:
        db.close()
