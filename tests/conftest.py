"""Shared fixtures. Tests never touch the network: the hub is forced offline before anything
imports transformers."""
from __future__ import annotations

import os
import uuid

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.model_fixtures"]

TEST_DB_ENV = "ODPO_TEST_DATABASE_URL"


def _db_params() -> list:
    params = [pytest.param("sqlite", id="sqlite")]
    if os.environ.get(TEST_DB_ENV):
        params.append(pytest.param("external", id="external-db", marks=pytest.mark.postgres))
    return params


def pytest_configure(config) -> None:
    """Under pytest-xdist every worker is one process on a shared CPU: one torch thread each, or
    the workers' thread pools spin against each other (measured 3-30x slower steps on 2 cores)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(params=_db_params())
def db_url(request, tmp_path) -> str:
    """A fresh database per test: a SQLite file, and ODPO_TEST_DATABASE_URL (e.g. PostgreSQL) when set,
    in its own schema-less database reset by dropping odpo's tables (one database per xdist worker,
    so two workers never drop each other's tables)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'odpo.sqlite3'}"
    url = _worker_database(os.environ[TEST_DB_ENV], os.environ.get("PYTEST_XDIST_WORKER"))
    _drop_all(url)
    return url


def _worker_database(url: str, worker: str | None) -> str:
    """`url` itself outside xdist; else `<database>_<worker>` on the same server, created once."""
    if not worker:
        return url
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(url)
    name = f"{base.database}_{worker}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is None:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


def _drop_all(url: str) -> None:
    from sqlalchemy import MetaData, create_engine

    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine)
    meta.drop_all(engine)
    engine.dispose()


@pytest.fixture
def database(db_url):
    from odpo.db.engine import Database

    db = Database(db_url)
    yield db
    db.close()


@pytest.fixture
def common_config(tmp_path, db_url):
    from odpo.app.config import CommonConfig

    return CommonConfig.resolve(data_dir=str(tmp_path / "data"), db_url=db_url)


@pytest.fixture
def unique_name() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def one_torch_thread():
    """Tiny ops on a shared 2-core machine: one thread, or the threads spin against each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
