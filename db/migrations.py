"""Tiny schema migrations in the spirit of simonw/llm: an ordered list of functions, applied once.

Each migration runs in its own transaction and records its name in `_odpo_migrations`, so every
process can call `migrate()` on start and only the first does work. A new schema change is a new
function appended to MIGRATIONS; released migrations are never edited.
"""
from __future__ import annotations

import logging
from typing import Callable

from sqlalchemy import Column, Connection, DateTime, Engine, MetaData, String, Table, inspect, select
from sqlalchemy.exc import SQLAlchemyError

from odpo.db.models import Base, utcnow

log = logging.getLogger(__name__)

_meta = MetaData()
_applied = Table(
    "_odpo_migrations", _meta, Column("name", String(200), primary_key=True), Column("applied_at", DateTime)
)


def m001_initial(conn: Connection) -> None:
    """The v1 schema (all tables of db.models as first released)."""
    Base.metadata.create_all(conn, checkfirst=True)


MIGRATIONS: list[tuple[str, Callable[[Connection], None]]] = [
    ("m001_initial", m001_initial),
]


def migrate(engine: Engine) -> list[str]:
    """Apply pending migrations; returns the names applied now (empty when up to date)."""
    _meta.create_all(engine, checkfirst=True)
    applied_now: list[str] = []
    for name, fn in MIGRATIONS:
        try:
            if _apply(engine, name, fn):
                applied_now.append(name)
        except SQLAlchemyError:
            # Another process starting at the same moment may have applied it first; that is fine.
            if not _is_applied(engine, name):
                raise
    return applied_now


def _apply(engine: Engine, name: str, fn: Callable[[Connection], None]) -> bool:
    with engine.begin() as conn:
        if conn.execute(select(_applied.c.name).where(_applied.c.name == name)).first():
            return False
        fn(conn)
        conn.execute(_applied.insert().values(name=name, applied_at=utcnow()))
    log.info("applied migration %s", name)
    return True


def _is_applied(engine: Engine, name: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(_applied.c.name).where(_applied.c.name == name)).first() is not None


def schema_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())
