"""odpo imports only under `odpo.`: a user's own `app`, `db` or `trainer` module never shadows it.

Run the real console script from a directory whose app.py, db.py and trainer.py raise on import
(what a user's project may well hold), with a `py:` judge plugin beside them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from odpo.db.engine import Database
from odpo.db.models import Label
from tests.db_helpers import make_pairs, rows

ODPO = Path(sys.executable).parent / "odpo"


def _odpo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell has it
    env.update(HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([str(ODPO), "--data-dir", str(cwd / "data"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def hostile_dir(tmp_path: Path) -> Path:
    for name in ("app", "db", "trainer", "static"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    (tmp_path / "myjudge.py").write_text("def fn(prompt, a, b):\n    return 'a' if len(a) >= len(b) else 'b'\n")
    return tmp_path


@pytest.mark.skipif(not ODPO.exists(), reason=f"no console script at {ODPO} (install with pip install -e .)")
def test_init_status_and_a_py_judge_work_beside_users_app_db_trainer(hostile_dir):
    init = _odpo(hostile_dir, "init")
    assert init.returncode == 0, init.stderr
    assert "starter prompts imported" in init.stdout
    status = _odpo(hostile_dir, "status")
    assert status.returncode == 0, status.stderr
    assert "prompts:" in status.stdout

    db = Database(f"sqlite:///{hostile_dir / 'data' / 'odpo.sqlite3'}")
    try:
        make_pairs(db, 3)
        judged = _odpo(hostile_dir, "judge", "--judge", "py:myjudge:fn", "--max-labels", "3",
                       "--exit-when-idle", "1", "--poll-seconds", "0.2")
        assert judged.returncode == 0, judged.stderr
        labels = rows(db, Label)
    finally:
        db.close()
    assert len(labels) == 3
    assert {lab.source for lab in labels} == {"judge:py:myjudge:fn"}  # the plugin beside the user's app.py ran


@pytest.mark.skipif(not ODPO.exists(), reason=f"no console script at {ODPO} (install with pip install -e .)")
def test_an_old_bench_rules_spec_fails_in_one_line_naming_the_rule_judge(hostile_dir):
    (hostile_dir / "app.py").unlink()  # no module `app` at all: the spec cannot resolve
    _odpo(hostile_dir, "init", "--no-starter")
    out = _odpo(hostile_dir, "judge", "--judge", "py:app.bench.rules:say_the_early", "--max-labels", "1",
                "--exit-when-idle", "1")
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in out.stderr
    assert "rule:say_the_early" in lines[-1]


@pytest.mark.skipif(not ODPO.exists(), reason=f"no console script at {ODPO} (install with pip install -e .)")
def test_a_users_own_app_package_is_the_one_a_py_spec_names(tmp_path):
    """Before the `odpo.` namespace, `py:app.judges:fn` resolved to odpo's own `app` package."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "judges.py").write_text("def fn(prompt, a, b):\n    return 'b'\n")
    assert _odpo(tmp_path, "init", "--no-starter").returncode == 0
    db = Database(f"sqlite:///{tmp_path / 'data' / 'odpo.sqlite3'}")
    try:
        make_pairs(db, 2)
        out = _odpo(tmp_path, "judge", "--judge", "py:app.judges:fn", "--max-labels", "2", "--exit-when-idle", "1",
                    "--poll-seconds", "0.2")
        assert out.returncode == 0, out.stderr
        labels = rows(db, Label)
    finally:
        db.close()
    assert sorted(lab.choice for lab in labels) == ["b", "b"]
