"""Where odpo keeps its data: one data directory (SQLite file, model cache, runs/) and a DB URL.

Resolution order for both: explicit argument (CLI flag) > environment variable > default, so a
process started by `odpo up` and one started by hand agree on the same database.
"""
from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

log = logging.getLogger(__name__)

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


def masked_url(url: str) -> str:
    """The URL with its password replaced by ***, for anything printed, logged or shown: a
    database password never reaches a terminal, a log file or a page."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by this user only (0700), or tighten an existing one of
    ours that others may read: it holds the labels database, the adapters and the users file."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            path.chmod(0o700)
            log.info("made %s private to its owner (0700)", path)
    except OSError as exc:  # not ours, or a filesystem without modes: say so, keep going
        log.warning("could not make %s private: %s", path, exc.strerror)
    return path
