"""Make the dumps of databases created by the last odpo release before Alembic (sqlite.sql, postgresql.sql).

They let tests/test_migrations.py prove that today's code upgrades such a database in place. The
release's own code makes them, taken from git (`git archive`), so nothing of today's schema leaks
in. Run from the repository root; PostgreSQL comes from tests/with-postgres:

    tests/with-postgres .venv/bin/python tests/pre_alembic/make_dumps.py

The dumps are committed; this script is only rerun if they have to be made again. The release is
8b66a49, whose hand-made migrations kept the `_odpo_migrations` table.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RELEASE = "8b66a49"

# Runs inside the release's code: one row or more in every table, through the release's store API.
FILL = r'''
import datetime as dt, sys
from odpo.db import store
from odpo.db.engine import Database
from odpo.db.models import Labeler

assert sys.argv[2] in __import__("odpo.db").db.__file__, "the release's code must be the one imported"
db = Database(sys.argv[1])
with db.sessions.begin() as s:
    store.add_prompts(s, prompts=[store.NewPrompt(text=f"Name a colour, {i}", tags=("colours",)) for i in range(4)]
                      + [store.NewPrompt(text="Held-out prompt", source="starter", held_out=True)])
    s.add(Labeler(name="ada", is_admin=True))
sample = lambda text: store.NewSample(text=text, tokens=2, finish_reason="stop", params={"temperature": 0.8},
                                      gen_seconds=0.25)
with db.sessions.begin() as s:
    for p in store.pick_prompts_for_sampling(s, n=4):
        store.add_pair(s, prompt_id=p.id, version=0, a=sample(f"red {p.id}"), b=sample(f"blue {p.id}"))
labels = []
for choice in ("a", "b", "tie"):
    with db.sessions.begin() as s:
        claim = store.claim_next_pair(s, labeler="ada")
        labels.append(store.record_label(s, assignment_id=claim.assignment_id, labeler="ada", choice=choice).id)
with db.sessions.begin() as s:
    store.add_direct_label(s, pair_id=1, labeler="rule-judge", choice="b", source="judge:rule:short", confidence=0.75)
    step = store.record_train_step(s, run="default", step=1, version=1, label_ids=labels[:2],
                                   metrics={"loss": 0.69, "reward_accuracy": 0.5, "kl": 0.01})
    store.commit_adapter_version(s, run="default", version=1, path="runs/default/adapters/v1", parent=0, step=1,
                                 label_steps={labels[0]: 1, labels[1]: 1}, metrics={"loss": 0.69},
                                 step_ids=[step.id])
    store.record_eval(s, version_a=1, version_b=0, judge="rule:short", n=10, wins=6, losses=3, ties=1,
                      win_rate=0.65, ci_low=0.36, ci_high=0.86, details={"prompts": 10})
    store.record_reload(s, version=1, swap_ms=12.5, commit_to_serving_ms=340.0, retired_pairs=1)
    store.set_control(s, key="training", value={"paused": False})
db.close()
'''


def release_tree(dest: Path) -> Path:
    """The release's `odpo` and `odpo.db` packages, laid out as an importable folder."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", RELEASE, "odpo/__init__.py", "db"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "db").rename(dest / "odpo" / "db")
    return dest


def fill(url: str, tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-c", FILL, url, str(tree)], check=True, env=env, cwd=tree)


def dump_sqlite(tree: Path, work: Path) -> str:
    path = work / "odpo.sqlite3"
    fill(f"sqlite:///{path}", tree)
    with sqlite3.connect(path) as conn:
        return "\n".join(conn.iterdump()) + "\n"


def dump_postgresql(tree: Path, url: str) -> str:
    fill(url, tree)
    parsed = make_url(url)
    host = parsed.query.get("host") or parsed.host or "localhost"
    out = subprocess.run(["pg_dump", "--no-owner", "--no-privileges", "--inserts", "-h", host, "-U",
                          parsed.username or "postgres", parsed.database], check=True, capture_output=True, text=True)
    # psql meta-commands (\restrict ...) are not SQL: the tests run the dump through the driver.
    return "".join(line for line in out.stdout.splitlines(keepends=True) if not line.startswith("\\"))


def main() -> None:
    url = os.environ.get("ODPO_TEST_DATABASE_URL")
    if not url:
        sys.exit("run under tests/with-postgres, which provides ODPO_TEST_DATABASE_URL")
    with tempfile.TemporaryDirectory() as tmp:
        tree = release_tree(Path(tmp))
        header = f"-- Made by odpo {RELEASE} (before Alembic) with tests/pre_alembic/make_dumps.py\n"
        (HERE / "sqlite.sql").write_text(header + dump_sqlite(tree, Path(tmp)))
        (HERE / "postgresql.sql").write_text(header + dump_postgresql(tree, url))


if __name__ == "__main__":
    main()
