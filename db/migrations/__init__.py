"""Schema migrations with Alembic: every process calls `migrate()` on start, the first one does the work.

The revisions live in versions/ and run in one transaction that holds a database-wide lock
(SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so processes that start together take
turns, the later ones find the schema current, and an upgrade that fails leaves the schema as it was
(both backends have transactional DDL). A schema change is a new revision; released ones are never
edited. How to write one: README, "Development" (the `alembic` command reads [tool.alembic] in
pyproject.toml and runs env.py here).

Databases made before Alembic (the hand-made migrations, which kept a `_odpo_migrations` table) hold
exactly the baseline revision's schema: they are stamped at the baseline and upgraded from there.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect, text

from odpo.db.engine import DatabaseError

log = logging.getLogger(__name__)

BASELINE = "0001"  # the schema the hand-made migrations created (their m001_initial)
LEGACY_TABLE = "_odpo_migrations"
LEGACY_BASELINE = "m001_initial"
VERSION_TABLE = "alembic_version"  # Alembic's default name, so its own tools find it
# Key of the PostgreSQL advisory lock that serialises migrations: b"odpo" as an integer.
PG_LOCK_KEY = int.from_bytes(b"odpo", "big")
SCRIPTS = Path(__file__).resolve().parent  # env.py and versions/: Alembic's "script location"


def alembic_config(connection: Optional[Connection] = None, *, scripts: Path = SCRIPTS) -> Config:
    """Alembic's config built in code (no ini file at run time), pointing at this package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(scripts))
    if connection is not None:
        cfg.attributes["connection"] = connection  # env.py runs on it instead of opening its own
    return cfg


def head_revision() -> str:
    """The newest revision this code knows: the schema `migrate()` brings a database to."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> Optional[str]:
    """The revision a database is at; None for an empty database or one made before Alembic.

    Read with a plain SELECT rather than a MigrationContext, which logs its backend at INFO on
    every process start."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def migrate(engine: Engine, *, scripts: Path = SCRIPTS) -> list[str]:
    """Bring the schema to the head revision; returns the revisions applied now, oldest first.

    Raises DatabaseError when the database is at a revision this code does not know (a newer odpo
    upgraded it): running old code on a newer schema would fail in confusing places later.
    `scripts` is another revision folder, for tests only.
    """
    script = ScriptDirectory.from_config(alembic_config(scripts=scripts))
    head = script.get_current_head()
    with engine.connect() as conn:
        if current_revision(conn) == head:
            return []  # the usual case: no lock, no write
    with migration_transaction(engine) as conn:
        before = _adopt_pre_alembic(conn, script) or current_revision(conn)
        _check_known(script, before, head)
        if before == head:
            return []  # another process did it while we waited for the lock
        command.upgrade(alembic_config(conn, scripts=scripts), "head")
    applied = [s.revision for s in reversed(list(script.iterate_revisions(head, before or "base")))]
    log.info("database schema upgraded %s -> %s (%s)", before or "empty", head, ", ".join(applied))
    return applied


@contextmanager
def migration_transaction(engine: Engine) -> Iterator[Connection]:
    """One connection in one transaction that holds the database's migration lock; commits at the end.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: see `_sqlite_transaction`. Other
    backends get a plain transaction.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            with _sqlite_transaction(conn):
                yield conn
            return
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()


@contextmanager
def _sqlite_transaction(conn: Connection) -> Iterator[None]:
    """A real transaction that takes SQLite's write lock at once, for DDL, done SQLite's documented way.

    The driver opens transactions lazily and never for DDL, so it goes to autocommit and the
    transaction is opened by hand: BEGIN IMMEDIATE takes the write lock now (a second process waits
    on the busy timeout). A batch revision rebuilds a table (copy, drop, rename), which foreign keys
    would refuse halfway, so they are off around the transaction (the pragma does nothing inside one)
    and checked by hand before COMMIT.
    """
    conn.execution_options(isolation_level="AUTOCOMMIT")  # undone when the connection goes back to the pool
    foreign_keys = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
    conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                raise DatabaseError(f"a migration left {len(broken)} broken foreign key reference(s) "
                                    f"(first in table {broken[0][0]}); nothing was changed")
        except BaseException:
            if conn.connection.dbapi_connection.in_transaction:  # SQLite may have rolled back already
                conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")
    finally:
        conn.exec_driver_sql(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")


def _adopt_pre_alembic(conn: Connection, script: ScriptDirectory) -> Optional[str]:
    """Stamp a database made by the hand-made migrations at the baseline; returns it, or None."""
    tables = set(inspect(conn).get_table_names())
    if VERSION_TABLE in tables or LEGACY_TABLE not in tables:
        return None
    names = set(conn.execute(text(f"SELECT name FROM {LEGACY_TABLE}")).scalars())
    if LEGACY_BASELINE not in names:
        return None  # the old code never finished its first migration: upgrade from empty
    MigrationContext.configure(conn, opts={"transactional_ddl": True}).stamp(script, BASELINE)
    log.info("database made before Alembic (%s): stamped at revision %s", LEGACY_TABLE, BASELINE)
    return BASELINE


def _check_known(script: ScriptDirectory, revision: Optional[str], head: str) -> None:
    if revision is None:
        return
    try:
        script.get_revision(revision)
    except CommandError:
        raise DatabaseError(f"the database schema is at revision {revision}, which this odpo does not know "
                            f"(its newest is {head}): a newer odpo upgraded it, so run that one") from None


def schema_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())
