"""Alembic's entry point for odpo: runs the revisions in versions/ on one connection.

odpo itself calls Alembic with the connection it already holds, inside the locked transaction of
`odpo.db.migrations.migration_transaction`. From the `alembic` command line (developers writing a
revision) the database is `-x url=...`, else ODPO_DB_URL, else the default SQLite file, and it gets
the same locked transaction. `alembic upgrade head --sql` prints the DDL instead of running it.
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from odpo.db.engine import make_engine
from odpo.db.migrations import migration_transaction
from odpo.db.models import Base
from odpo.db.settings import resolve_data_dir, resolve_db_url


def _configure_and_run(connection: Connection) -> None:
    # render_as_batch: autogenerate writes ALTERs as batch operations, which SQLite needs (it
    # rebuilds the table); compare_type: a changed column type shows up in autogenerate too;
    # transactional_ddl: true on SQLite as well, since migration_transaction opened a real one.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True, transactional_ddl=True)
    with context.begin_transaction():  # a no-op inside odpo's own transaction: that one commits
        context.run_migrations()


def _command_line_url() -> str:
    return context.get_x_argument(as_dictionary=True).get("url") or resolve_db_url(data_dir=resolve_data_dir())


def run() -> None:
    if context.is_offline_mode():
        context.configure(url=_command_line_url(), target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    engine = make_engine(_command_line_url())
    try:
        with migration_transaction(engine) as conn:
            _configure_and_run(conn)
    finally:
        engine.dispose()


run()
