"""Engine and session factories: nothing is created at import time, callers own their engine."""
from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from odpo.db.errors import OdpoError
from odpo.db.settings import masked_url
from odpo.db.transient import classify

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option that makes a SQLite transaction BEGIN IMMEDIATE (see `_begin_sqlite`).
IMMEDIATE = "odpo_begin_immediate"


class DatabaseError(OdpoError, RuntimeError):
    """A database that cannot be opened or reached, with a one-line message for the CLI."""


def _configure_sqlite(dbapi_conn, _record) -> None:
    # WAL lets the sampler, trainer and UI read while one of them writes; the busy timeout makes a
    # writer wait for the lock instead of failing; foreign keys are off by default in SQLite.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _begin_sqlite(conn: Connection) -> None:
    """Open transactions that asked for it with BEGIN IMMEDIATE: the write lock comes first.

    SQLAlchemy's documented pysqlite recipe (a "begin" hook that emits BEGIN itself), applied only
    to connections with the IMMEDIATE option. Without it the driver opens a deferred transaction
    at the first write, so a transaction that reads and then writes on what it read can interleave
    with another writer (or fail with "database is locked" when its snapshot went stale). Other
    transactions keep the driver's behaviour: reads never queue behind the writer.
    """
    if conn.get_execution_options().get(IMMEDIATE):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Create an engine for any SQLAlchemy URL and check that it connects.

    Raises DatabaseError with a readable message (bad URL, missing driver, unreachable server,
    unwritable SQLite directory) so no caller has to show a traceback.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseError(f"invalid database URL {masked_url(url)!r}: {exc}") from None
    kwargs: dict = {"echo": echo, "future": True}
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        _prepare_sqlite_path(parsed.database)
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        raise DatabaseError(f"cannot use database {parsed.render_as_string()}: {exc}") from None
    if is_sqlite:
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_sqlite)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (OperationalError, SQLAlchemyError) as exc:
        engine.dispose()
        first = str(exc.orig if hasattr(exc, "orig") else exc).splitlines()[0]
        error = DatabaseError(f"cannot connect to database {parsed.render_as_string()}: {first}")
        error.transient = classify(exc).transient  # refused while restarting: wait; bad password: stop
        raise error from None
    if is_sqlite:
        _private_sqlite_files(parsed.database)
    return engine


def _private_sqlite_files(database: str | None) -> None:
    """The database file (and its WAL and shared-memory files, which SQLite creates with the main
    file's mode) readable and writable by this user only: it holds every label and name."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    for suffix in ("", "-wal", "-shm"):
        path = Path(database + suffix).expanduser()
        try:
            if path.exists() and path.stat().st_mode & 0o077:
                path.chmod(0o600)
        except OSError:  # not ours: the owner decides
            pass


def _prepare_sqlite_path(database: str | None) -> None:
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    parent = Path(database).expanduser().resolve().parent
    try:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new directory is this user's alone
    except OSError as exc:
        raise DatabaseError(f"cannot create the database directory {parent}: {exc.strerror}") from None
    if Path(database).is_dir():
        raise DatabaseError(f"database path {database} is a directory, not a file")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit, so returned rows stay readable."""
    return sessionmaker(engine, expire_on_commit=False)


class Database:
    """An engine plus its session factories, migrated on open: what every process holds one of.

    `sessions` for reads and simple writes; `writes` for transactions that read and then write on
    what they read (votes, undo, claims, version commits, rollbacks): on SQLite they begin
    IMMEDIATE, so they run one at a time; on PostgreSQL they are plain transactions and the
    conditional UPDATEs inside them (row count checked) do the serialising.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        from odpo.db.migrations import migrate  # local: keeps engine.py importable on its own

        self.url = url
        self.engine = make_engine(url, echo=echo)
        try:
            migrate(self.engine)
        except SQLAlchemyError as exc:
            self.engine.dispose()
            first = str(getattr(exc, "orig", exc)).splitlines()[0]
            raise DatabaseError(f"cannot prepare the schema in {masked_url(url)}: {first}") from None
        self.sessions = session_factory(self.engine)
        self.writes = session_factory(self.engine.execution_options(**{IMMEDIATE: True}))

    def close(self) -> None:
        self.engine.dispose()
