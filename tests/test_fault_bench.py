"""`odpo bench faults` in a short form: one real `odpo up` on the tiny model, its database pulled away
for a few seconds while the judge-driven loop runs; it must reach a further version afterwards,
with no traceback in its log and the ledger's invariants intact. (The full bench: every scenario on
SQLite and PostgreSQL, results in docs/benchmarks.md.)"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from odpo.app.cli import cli
from odpo.bench.fault_env import ThrowawayPostgres


@pytest.mark.timeout(600)
def test_a_database_outage_under_a_running_loop_is_ridden_out(tiny_model_dir, tmp_path):
    database = "postgresql" if ThrowawayPostgres.missing() is None else "sqlite"
    if database == "sqlite":
        print(f"faults bench on SQLite only: {ThrowawayPostgres.missing()}")
    out = tmp_path / "results"
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path / "data"), "bench", "faults", "--quick",
                                      "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32",
                                      "--threads", "1", "--scenarios", "db_outage", "--databases", database,
                                      "--outage", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "faults-quick.json").read_text())["metrics"]["scenarios"]
    assert row["status"] == "resumed" and row["up_alive"], row
    assert row["versions"][1] > row["versions"][0]
    assert row["tracebacks"] == 0 and row["violations"] == {} and row["up_gave_up"] == []


@pytest.mark.skipif(ThrowawayPostgres.missing() is not None, reason="no PostgreSQL binaries here")
def test_the_bench_postgres_restarts_and_answers_again():
    """db_restart's `pg_ctl restart` returns (the restarted server holds none of our pipes) and the
    database answers afterwards."""
    import sqlalchemy as sa

    pg = ThrowawayPostgres()
    try:
        pg.create()
        pg.restart()
        engine = sa.create_engine(pg.url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
        engine.dispose()
    finally:
        pg.remove()
