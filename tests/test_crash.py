"""kill -9 the real `odpo train` process at its worst moments; no label may be lost or doubled.

The product has no test hooks: tests/fault_injection.py starts the normal CLI in the child after
wrapping three of odpo's functions so the child announces a moment and sleeps there: mid-step
(gradients computed, no optimizer step yet), mid-save (v<N>.tmp written, not renamed) and between
the rename and the DB commit (a v<N>/ with no row). The test kills the process right after such a
line, restarts it, and at the end checks that every label was trained into exactly one committed
version and that every row points at its own complete directory.
"""
from __future__ import annotations

import importlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from odpo.db import store
from odpo.db.models import Adapter, Label, TrainStep
from odpo.trainer.policy import checkpoint as ckpt
from tests.db_helpers import label_all, make_pairs
from tests.fault_injection import MOMENTS, announcement

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 180  # generous: a process start imports torch+transformers+peft, slow on a busy 2-core box
N_LABELS = 40
BATCH = 4


class TrainerProcess:
    """`odpo train` in a subprocess, with its log lines readable as they come. `pause` ({moment:
    seconds}) runs it through tests/fault_injection.py, which sleeps at those moments."""

    def __init__(self, args: list[str], env: dict[str, str], pause: dict[str, float] | None = None) -> None:
        self.lines: list[str] = []
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        entry = ["-m", "odpo"]
        if pause:
            entry = ["-m", "tests.fault_injection", *(f"--pause={m}={s}" for m, s in pause.items()), "--"]
        self.proc = subprocess.Popen([sys.executable, *entry, *args],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, needle: str, *, count: int = 1) -> None:
        """Block until `needle` has appeared in `count` log lines (after an announcement the process
        is sleeping at that moment)."""
        deadline, seen = time.monotonic() + WAIT_S, sum(needle in ln for ln in self.lines)
        while seen < count:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"timed out waiting for {needle!r}:\n{self.log()}") from None
            if line is None:
                raise AssertionError(f"trainer exited before {needle!r}:\n{self.log()}")
            self.lines.append(line)
            seen += needle in line

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def finish(self) -> int:
        code = self.proc.wait(timeout=WAIT_S)
        while True:
            line = self._queue.get(timeout=10)
            if line is None:
                return code
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines[-60:])


@pytest.fixture
def crash_setup(common_config, database, tiny_model_dir):
    make_pairs(database, N_LABELS)
    ids = label_all(database, "alice", "a")
    assert len(ids) == N_LABELS
    args = ["--data-dir", str(common_config.data_dir), "--db", common_config.db_url, "train",
            "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32", "--batch-size", str(BATCH),
            "--lora-r", "4", "--poll-seconds", "0.1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return args, env, common_config.adapters_dir()


def _rows(database) -> dict[int, Adapter]:
    with database.sessions() as s:
        return {a.version: a for a in s.scalars(select(Adapter))}


def _assert_committed_state_consistent(database, adapters: Path) -> None:
    """What must hold after ANY kill: rows point at complete, matching dirs; labels of a version
    are exactly the labels its directory says it was trained on; no label in two committed steps."""
    rows = _rows(database)
    with database.sessions() as s:
        uses = store.label_uses(s, run="default")  # the run's ledger: label id -> (version, step)
        steps = [st for st in s.scalars(select(TrainStep)) if st.committed]
    for version, row in rows.items():
        assert ckpt.committed_dir_problem(row.path) is None, ckpt.committed_dir_problem(row.path)
        assert Path(row.path) == adapters / f"v{version}"
        state_ids = set(ckpt.read_trainer_state(Path(row.path))["label_ids"])
        assert state_ids == {lid for lid, (v, _) in uses.items() if v == version}, version
    assert sorted(rows) == list(range(1, len(rows) + 1))
    assert all(rows[v].parent == v - 1 for v in rows)
    trained = [lid for st in steps for lid in st.label_ids]
    assert len(trained) == len(set(trained)), "a label was trained into two committed steps"
    by_label = {lid: (st.version, st.step) for st in steps for lid in st.label_ids}
    assert uses == by_label


def test_kill9_at_any_moment_loses_and_doubles_nothing(crash_setup, database):
    args, env, adapters = crash_setup

    # 1. killed between the rename of v3/ and its DB commit: a complete-looking dir with no row
    proc = TrainerProcess(args, env, pause={"commit": 0.5})
    proc.wait_for(announcement("commit"), count=3)
    proc.kill9()
    assert sorted(_rows(database)) == [1, 2]
    assert ckpt.is_complete_version_dir(adapters / "v3"), "the pause should have left an orphan v3/"
    _assert_committed_state_consistent(database, adapters)

    # 2. killed mid-save: v<N>.tmp half published; the orphan v3/ must be replaced, never read
    proc = TrainerProcess(args, env, pause={"save": 0.5})
    proc.wait_for(announcement("save"), count=2)
    proc.kill9()
    assert sorted(_rows(database)) == [1, 2, 3]
    assert (adapters / "v4.tmp").is_dir()
    _assert_committed_state_consistent(database, adapters)

    # 3. killed mid-step: gradients computed, optimizer not stepped, nothing written
    proc = TrainerProcess(args, env, pause={"step": 0.5})
    proc.wait_for(announcement("step"), count=2)
    proc.kill9()
    assert not (adapters / "v4.tmp").exists(), "start must clean leftover .tmp dirs"
    _assert_committed_state_consistent(database, adapters)
    committed_so_far = len(_rows(database))

    # 4. killed without warning shortly after a step, wherever it happens to be
    proc = TrainerProcess(args, env)
    proc.wait_for("| loss ", count=1)
    time.sleep(0.05)
    proc.kill9()
    _assert_committed_state_consistent(database, adapters)

    # 5. a clean run trains what is left and exits when idle
    proc = TrainerProcess([*args, "--exit-when-idle", "0.5"], env)
    assert proc.finish() == 0, proc.log()
    _assert_committed_state_consistent(database, adapters)
    rows = _rows(database)
    assert len(rows) == N_LABELS // BATCH and len(rows) > committed_so_far
    with database.sessions() as s:
        assert set(store.label_uses(s, run="default")) == set(s.scalars(select(Label.id)))
    names = sorted(p.name for p in adapters.iterdir())
    assert names == sorted(f"v{v}" for v in rows), names


def test_fault_injection_wraps_real_functions_and_the_product_has_no_test_hooks():
    """The pauses above wrap functions that exist; nothing in the product reads a test variable."""
    for moment in MOMENTS.values():
        owner = importlib.import_module(moment.module)
        for part in moment.attr.split("."):
            owner = getattr(owner, part)
        assert callable(owner), moment
    for folder in ("app", "trainer", "db"):
        for path in (REPO / folder).rglob("*.py"):
            assert "ODPO_TEST" not in path.read_text(), f"{path} reads a test hook variable"
