"""Alembic migrations: fresh databases, in-place upgrade of a pre-Alembic release's database, locking,
atomic failure, and the errors a user can meet. Every test runs on SQLite and, when
ODPO_TEST_DATABASE_URL is set (tests/with-postgres, `make test`), on PostgreSQL."""
from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from odpo.db import store
from odpo.db.engine import Database, DatabaseError, make_engine
from odpo.db.migrations import (
    LEGACY_TABLE,
    SCRIPTS,
    alembic_config,
    current_revision,
    head_revision,
    migrate,
    migration_transaction,
    schema_tables,
)
from odpo.db.models import Base
from tests.concurrency import run_in_threads

PRE_ALEMBIC = Path(__file__).resolve().parent / "pre_alembic"
TEST_REVISION = "9001"  # a revision these tests add on top of the real ones, in a copy of the folder


def all_revisions() -> list[str]:
    """Every revision odpo ships, oldest first (more are added as the schema grows)."""
    return [s.revision for s in reversed(list(ScriptDirectory.from_config(alembic_config()).walk_revisions()))]


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def restore_pre_alembic_dump(url: str) -> None:
    """Recreate the database that the release before Alembic made (tests/pre_alembic/make_dumps.py)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        with sqlite3.connect(parsed.database) as conn:
            conn.executescript((PRE_ALEMBIC / "sqlite.sql").read_text())
        return
    import psycopg

    with psycopg.connect(parsed.set(drivername="postgresql").render_as_string(hide_password=False)) as conn:
        conn.execute((PRE_ALEMBIC / "postgresql.sql").read_text())  # one script: simple query protocol


def all_rows(engine: Engine, columns: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Every table's rows (sorted) by column name; with `columns`, only those tables and columns
    (what an older schema had, so later revisions may add tables and columns around them)."""
    meta = MetaData()
    meta.reflect(engine)
    out = {}
    with engine.connect() as conn:
        for name, table in meta.tables.items():
            if name in (LEGACY_TABLE, "alembic_version") or (columns is not None and name not in columns):
                continue
            names = [c for c in (columns[name] if columns else table.columns.keys()) if c in table.columns]
            rows = sorted(map(tuple, conn.execute(select(*(table.c[c] for c in names)))))
            out[name] = {"columns": names, "rows": rows}
    return out


def model_drift(engine: Engine) -> list:
    """What autogenerate would write to make the database match db/models.py: empty when it matches."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def revision_of(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return current_revision(conn)


def test_fresh_database_gets_every_revision_and_matches_the_models(engine):
    revisions = all_revisions()
    assert revisions[:2] == ["0001", "0002"]  # the baseline, then the pre-Alembic table goes
    assert migrate(engine) == revisions
    assert revision_of(engine) == head_revision() == revisions[-1]
    assert model_drift(engine) == []
    assert LEGACY_TABLE not in schema_tables(engine)
    assert migrate(engine) == []


def named_rows(engine: Engine, table: str) -> dict[int, dict]:
    """A table's rows by id, each as {column: value}."""
    meta = MetaData()
    meta.reflect(engine, only=[table])
    with engine.connect() as conn:
        return {row.id: dict(row._mapping) for row in conn.execute(select(meta.tables[table]))}


CONSUMED = ("consumed_version", "consumed_step")  # labels' one-consumption columns, moved to label_uses by 0003


def test_database_of_the_release_before_alembic_is_upgraded_in_place(db_url):
    restore_pre_alembic_dump(db_url)
    old = make_engine(db_url)
    before = all_rows(old)
    consumed = {lid: (r["consumed_version"], r["consumed_step"]) for lid, r in named_rows(old, "labels").items()}
    assert LEGACY_TABLE in schema_tables(old) and revision_of(old) is None
    assert len(before["labels"]["rows"]) == 4 and len(before["adapters"]["rows"]) == 1
    kept = [c for c in before["labels"]["columns"] if c not in CONSUMED]
    before["labels"] = all_rows(old, {"labels": kept})["labels"]
    old.dispose()

    db = Database(db_url)  # what every odpo process does on start
    try:
        assert revision_of(db.engine) == head_revision()
        assert LEGACY_TABLE not in schema_tables(db.engine)
        # every row of every old table, unchanged (labels: all but the columns 0003 moved into the ledger)
        assert all_rows(db.engine, {name: t["columns"] for name, t in before.items()}) == before
        with db.sessions() as s:  # the consumption moved into the ledger of the run of the version that made it
            assert store.label_uses(s, run="default") == {i: c for i, c in consumed.items() if c[0] is not None}
            assert store.run_head(s, run="default") == 1
        assert {i: r["uses"] for i, r in named_rows(db.engine, "labels").items()} == {1: 1, 2: 1, 3: 0, 4: 0}
        assert model_drift(db.engine) == []  # the same schema a fresh database gets
        with db.sessions.begin() as s:  # and today's store works on it: the 4th pair is still queued
            assert store.latest_adapter(s).version == 1
            claim = store.claim_next_pair(s, labeler="grace")
            label = store.record_label(s, assignment_id=claim.assignment_id, labeler="grace", choice="b")
            assert [t.label_id for t in store.unconsumed_labels(s, limit=10)] == [label.id]  # 4: a judge, overridden
        assert claim.pair_id == 4 and label.id == 5  # ids go on after the old rows (PostgreSQL sequences)
    finally:
        db.close()


def test_0003_gives_each_consumed_label_to_the_run_that_consumed_it(engine):
    """Two runs in a 0002 database: a label goes to the run whose (live) version consumed it; a
    stale skip at v0 (no adapter row) to "default" when there are several runs; heads are the
    newest live versions. Downgrading puts the one-consumption columns back."""
    with migration_transaction(engine) as conn:
        command.upgrade(alembic_config(conn), "0002")
    now = "2026-11-30 10:00:00"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO prompts (id, text, text_hash, source, tags, held_out, times_sampled, "
                          "created_at) VALUES (1, 'p', 'h', 'import', '[]', false, 0, :now)"), {"now": now})
        conn.execute(text("INSERT INTO samples (id, prompt_id, adapter_version, text, tokens, finish_reason, params, "
                          "gen_seconds, created_at) VALUES (1, 1, 0, 'a', 1, 'stop', '{}', 0, :now), "
                          "(2, 1, 0, 'b', 1, 'stop', '{}', 0, :now)"), {"now": now})
        conn.execute(text("INSERT INTO pairs (id, prompt_id, sample_a_id, sample_b_id, created_version, status, "
                          "labels_wanted, claims, purpose, created_at) VALUES (1, 1, 1, 2, 0, 'labeled', 1, 1, "
                          "'train', :now)"), {"now": now})
        for lid, version, step in ((1, 1, 1), (2, 2, 2), (3, 7, 3), (4, 0, -1), (5, None, None)):
            conn.execute(text("INSERT INTO labels (id, pair_id, choice, labeler, source, answered_at, "
                              "consumed_version, consumed_step, undone) VALUES (:id, 1, 'a', 'ann', 'human', :now, "
                              ":v, :s, false)"), {"id": lid, "now": now, "v": version, "s": step})
        for aid, run, version, rolled_back in ((1, "default", 1, False), (2, "default", 2, True),
                                               (3, "other", 2, False), (4, "other", 7, False)):
            conn.execute(text("INSERT INTO adapters (id, run, version, path, parent, step, rolled_back, created_at, "
                              "metrics) VALUES (:id, :run, :v, 'x', NULL, 1, :rb, :now, '{}')"),
                         {"id": aid, "run": run, "v": version, "rb": rolled_back, "now": now})
    assert migrate(engine) == all_revisions()[2:]
    factory = Database.__new__(Database)  # the store on this engine, without migrating again
    from odpo.db.engine import session_factory

    factory.sessions = session_factory(engine)
    with factory.sessions() as s:
        assert store.label_uses(s, run="default") == {1: (1, 1), 4: (0, -1)}
        assert store.label_uses(s, run="other") == {2: (2, 2), 3: (7, 3)}  # v2 of "other" is the live one
        assert (store.run_head(s, run="default"), store.run_head(s, run="other")) == (1, 7)
        assert {i: r["uses"] for i, r in named_rows(engine, "labels").items()} == {1: 1, 2: 1, 3: 1, 4: 1, 5: 0}
    with migration_transaction(engine) as conn:
        command.downgrade(alembic_config(conn), "0002")
    assert {i: (r["consumed_version"], r["consumed_step"]) for i, r in named_rows(engine, "labels").items()} == \
        {1: (1, 1), 2: (2, 2), 3: (7, 3), 4: (0, -1), 5: (None, None)}


def test_processes_starting_together_migrate_once(db_url):
    # The file exists, as after `odpo init` or once `odpo up` has opened it: the race under test is
    # over the schema, not over creating a SQLite file.
    make_engine(db_url).dispose()
    results: list[list[str]] = []
    together = threading.Barrier(4)

    def start(_name: str) -> None:
        eng = make_engine(db_url)  # an engine each, as separate processes have
        try:
            together.wait(timeout=60)
            results.append(migrate(eng))
        finally:
            eng.dispose()

    assert run_in_threads(start, [str(i) for i in range(4)], timeout=120) == []
    assert sorted(results) == [[], [], [], all_revisions()]


def test_downgrade_to_the_baseline_gives_the_old_release_its_table_back(engine):
    migrate(engine)
    with migration_transaction(engine) as conn:
        command.downgrade(alembic_config(conn), "0001")
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT name FROM {LEGACY_TABLE}")).scalars().all() == ["m001_initial"]
    assert migrate(engine) == all_revisions()[1:]
    with migration_transaction(engine) as conn:
        command.downgrade(alembic_config(conn), "base")
    assert schema_tables(engine) == {"alembic_version"}
    assert migrate(engine) == all_revisions()


def test_database_from_a_newer_odpo_is_one_clear_error(db_url, engine):
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(DatabaseError) as err:
        Database(db_url)
    assert "revision 9999" in str(err.value) and "newer odpo" in str(err.value) and "\n" not in str(err.value)


def scripts_with(tmp_path: Path, upgrade: str) -> Path:
    """A copy of odpo's revisions plus TEST_REVISION on top, whose upgrade() is `upgrade` (indented source)."""
    scripts = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, scripts, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    (scripts / "versions" / f"{TEST_REVISION}_test.py").write_text(
        f'import sqlalchemy as sa\nfrom alembic import op\n\nrevision = "{TEST_REVISION}"\n'
        f'down_revision = "{head_revision()}"\nbranch_labels = None\ndepends_on = None\n\n\n'
        f"def upgrade():\n{upgrade}\n\n\ndef downgrade():\n    pass\n")
    return scripts


def test_a_failing_revision_leaves_the_schema_as_it_was(engine, tmp_path):
    migrate(engine)
    scripts = scripts_with(tmp_path, '    op.create_table("scratch", sa.Column("id", sa.Integer, primary_key=True))\n'
                                     '    op.add_column("labelers", sa.Column("email", sa.String(200)))\n'
                                     '    raise RuntimeError("the revision failed halfway")')
    with pytest.raises(RuntimeError, match="halfway"):
        migrate(engine, scripts=scripts)
    assert revision_of(engine) == head_revision()
    assert "scratch" not in schema_tables(engine)
    assert "email" not in {c["name"] for c in inspect(engine).get_columns("labelers")}


def test_a_batch_revision_rebuilds_a_referenced_table_with_its_rows(db_url, tmp_path):
    """SQLite alters a table by rebuilding it; prompts is referenced by samples and pairs, and the
    foreign keys (on in odpo's SQLite) must hold again at commit, with every row kept."""
    restore_pre_alembic_dump(db_url)
    eng = make_engine(db_url)
    try:
        migrate(eng)
        before = all_rows(eng)
        # SQLite could add this column in place: "always" forces the rebuild any ALTER COLUMN needs.
        scripts = scripts_with(tmp_path, '    mode = "always" if op.get_bind().dialect.name == "sqlite" else "auto"\n'
                                         '    with op.batch_alter_table("prompts", recreate=mode) as batch:\n'
                                         '        batch.add_column(sa.Column("language", sa.String(20)))')
        assert migrate(eng, scripts=scripts) == [TEST_REVISION]
        assert all_rows(eng, {name: t["columns"] for name, t in before.items()}) == before
        assert "language" in {c["name"] for c in inspect(eng).get_columns("prompts")}
        if eng.dialect.name == "sqlite":
            with eng.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on for the pool
    finally:
        eng.dispose()


def test_a_revision_that_breaks_references_is_rolled_back(db_url, tmp_path):
    """SQLite's foreign keys are off while a revision runs (for table rebuilds): a check at COMMIT
    stands in for them. PostgreSQL's constraints refuse the DELETE itself."""
    restore_pre_alembic_dump(db_url)
    eng = make_engine(db_url)
    try:
        migrate(eng)
        scripts = scripts_with(tmp_path, '    op.execute("DELETE FROM prompts WHERE id = 1")')
        with pytest.raises((DatabaseError, IntegrityError)) as err:
            migrate(eng, scripts=scripts)
        if eng.dialect.name == "sqlite":
            assert "broken foreign key" in str(err.value) and "\n" not in str(err.value)
        assert revision_of(eng) == head_revision()
        with eng.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM prompts WHERE id = 1")).scalar() == 1
    finally:
        eng.dispose()
