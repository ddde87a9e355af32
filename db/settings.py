"""Where odpo keeps its data: one data directory (SQLite file, model cache, runs/) and a DB URL.

Resolution order for both: explicit argument (CLI flag) > environment variable > default, so a
process started by `odpo up` and one started by hand agree on the same database.
"""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "ODPO_DATA_DIR"
DB_URL_ENV = "ODPO_DB_URL"
DEFAULT_DATA_DIR = "odpo-data"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory as an absolute path (not created here: callers create what they write)."""
    raw = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(raw).expanduser().resolve()


def resolve_db_url(db_url: str | None = None, *, data_dir: Path) -> str:
    """Any SQLAlchemy URL; the default is a SQLite file inside the data directory."""
    url = db_url or os.environ.get(DB_URL_ENV)
    if url:
        return url
    return f"sqlite:///{data_dir / 'odpo.sqlite3'}"
