"""The suite's own machinery: what keeps it inside its time budget must keep working.

Expensive fixtures (the wheel build) and tests that use both cores (accelerate's two processes)
rely on `pytest.mark.xdist_group` keeping their tests on one worker under
`--dist loadgroup`. When the pytest / pytest-xdist pair stops honouring it (pytest 9.2 with
xdist 3.8 did), nothing fails: every worker quietly starts its own copy and the suite slows by
minutes. This test notices instead.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

GROUPED = '''
import os
import pytest

pytestmark = pytest.mark.xdist_group("one")


@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    with open(os.environ["WORKERS_FILE"], "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "none") + "\\n")
'''
UNGROUPED = '''
import time
import pytest


@pytest.mark.parametrize("i", range(6))
def test_free(i):
    time.sleep(0.05)
'''


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_free.py").write_text(UNGROUPED)
    workers = tmp_path / "workers.txt"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
                          "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "WORKERS_FILE": str(workers)})
    assert out.returncode == 0, out.stdout + out.stderr
    seen = workers.read_text().split()
    assert len(seen) == 6 and len(set(seen)) == 1, f"one group ran on {sorted(set(seen))}"
