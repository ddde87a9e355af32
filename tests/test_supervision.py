"""Supervision and fault containment: `odpo up` restarts crashed children with backoff, gives up on
one that keeps failing (one line), reports its children to the dashboard and takes them down
when killed, even by SIGKILL; a judge stopped by SIGTERM hands its claims back at once; serve's
sampler gives up a batch mid-prefill when stopped; the two findings that were tracebacks
(one --db shared by two data dirs, a data dir that cannot be created) are one line.

Also home of the py: plugins these tests run in `odpo judge` child processes (`hang`)."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.concurrency import wait_until

REPO = Path(__file__).resolve().parents[1]
_RELEASE_HUNG = threading.Event()  # set at the end of a test that leaves hung plugin calls behind


def hang(prompt: str, a: str, b: str) -> str:
    """A py: plugin that never answers (until the test lets it go)."""
    _RELEASE_HUNG.wait(600)
    return "a"


# -- the Supervisor, with scripted children ----------------------------------------------------

SCRIPT = """
import os, sys, time
marker, mode = sys.argv[1], sys.argv[2]
runs = int(open(marker).read()) + 1 if os.path.exists(marker) else 1
open(marker, "w").write(str(runs))
print(f"run {runs}", flush=True)
if mode == "crash-once":
    sys.exit(3 if runs == 1 else 0)
if mode == "always-crash":
    sys.exit(1)
if mode == "same-error":
    print("Error: model path /nowhere does not exist", flush=True)
    sys.exit(1)
if mode == "transient-4" and runs <= 4:
    print("Error: database unreachable: connection refused", flush=True)
    sys.exit(75)
time.sleep(120)
"""


def scripted(tmp_path, specs, **kwargs):
    """A Supervisor whose children run SCRIPT (a marker file per child counts its runs)."""
    from odpo.app.up import Supervisor

    class Scripted(Supervisor):
        def command(self, spec):
            return [sys.executable, "-c", SCRIPT, str(tmp_path / f"{spec.name}.runs"), *spec.args]

    out = io.StringIO()
    reports: list[dict] = []
    sup = Scripted(specs, grace_s=5, out=out, report=lambda state: reports.append(state), **kwargs)
    return sup, out, reports


def child_report(reports, name):
    return [c for r in reports for c in r["children"] if c["name"] == name]


@pytest.mark.timeout(120)
def test_a_crashed_child_is_restarted_and_the_restart_is_logged_and_reported(tmp_path):
    from odpo.app.up import ChildSpec, RestartPolicy

    sup, out, reports = scripted(tmp_path, [ChildSpec("serve", ("sleep",)), ChildSpec("train", ("crash-once",),
                                                                                        finishes=True)],
                                 restart=RestartPolicy(first_delay_s=0.2))
    assert sup.run() == 0  # the restarted train finished: up is done
    text = out.getvalue()
    assert "[up] train exited with code 3; restarting it in 0.2 s (attempt 1 of 5: crashed)" in text, text
    assert re.search(r"^\[up\] restarted train \(pid \d+, restart 1\)$", text, re.M), text
    assert "[train] run 2" in text and "[up] train finished; stopping serve" in text
    assert (tmp_path / "serve.runs").read_text() == "1"  # serve was left alone
    trains = child_report(reports, "train")
    assert any(c["state"] == "restarting" and c["last_exit"] == 3 for c in trains)
    assert trains[-1]["state"] == "finished" and trains[-1]["restarts"] == 1
    assert reports[-1]["state"] == "stopped" and reports[-1]["pid"] == os.getpid()


@pytest.mark.timeout(120)
def test_a_child_that_keeps_crashing_gets_growing_delays_then_is_given_up_in_one_line(tmp_path):
    from odpo.app.up import ChildSpec, RestartPolicy

    sup, out, reports = scripted(tmp_path, [ChildSpec("serve", ("sleep",), essential=True),
                                            ChildSpec("train", ("always-crash",), finishes=True)],
                                 restart=RestartPolicy(max_restarts=2, first_delay_s=0.3))
    started = time.monotonic()
    assert sup.run() == 1  # a trainer `up` was asked to finish (--until-version) cannot: up ends
    text = out.getvalue()
    assert "restarting it in 0.3 s (attempt 1 of 2" in text and "restarting it in 0.6 s (attempt 2 of 2" in text
    assert time.monotonic() - started >= 0.9  # the backoff was waited, not just printed
    assert ("[up] giving up on train (exited with code 1; it failed 3 times in a row, each within 60 s of "
            "starting); stopping serve") in text
    assert (tmp_path / "train.runs").read_text() == "3"
    assert child_report(reports, "train")[-1]["state"] == "given up"


@pytest.mark.timeout(120)
def test_a_child_stopped_by_a_transient_fault_is_restarted_and_never_given_up(tmp_path):
    """Exit status 75 (the database away, a full disk): restarted after a growing delay, never
    counted, even with restarts off; the trainer being down never takes serve with it."""
    from odpo.app.up import ChildSpec, RestartPolicy

    sup, out, reports = scripted(tmp_path, [ChildSpec("serve", ("sleep",), essential=True),
                                            ChildSpec("train", ("transient-4",))],
                                 restart=RestartPolicy(max_restarts=0, first_delay_s=0.1))
    result = {}
    runner = threading.Thread(target=lambda: result.update(code=sup.run()))
    runner.start()
    try:
        wait_until(lambda: "[train] run 5" in out.getvalue(), 60, poll=0.1)
        text = out.getvalue()
        assert text.count("transient: database unreachable: connection refused; restarting it in") == 4, text
        assert "giving up" not in text
        assert any(c["state"] == "waiting" for c in child_report(reports, "train"))
        assert (tmp_path / "serve.runs").read_text() == "1"
    finally:
        sup.request_stop("SIGTERM")
        runner.join(30)
    assert result["code"] == 143


def _give_up_on_one(tmp_path, children, *, restart, name: str) -> tuple[str, list, int]:
    """Run `children` under up until it gives up on `name`; serve must still be running then.
    Returns up's output at that moment, its reports and its exit code once stopped."""
    sup, out, reports = scripted(tmp_path, children, restart=restart)
    result = {}
    runner = threading.Thread(target=lambda: result.update(code=sup.run()))
    runner.start()
    try:
        wait_until(lambda: f"giving up on {name}" in out.getvalue(), 60, poll=0.1)
        serve = next(c for c in sup._running if c.spec.name == "serve")
        assert serve.state == "running" and serve.proc.poll() is None
        said = out.getvalue()
    finally:
        sup.request_stop("SIGTERM")
        runner.join(30)
    return said, reports, result["code"]


@pytest.mark.timeout(120)
def test_giving_up_on_the_trainer_leaves_serve_serving(tmp_path):
    from odpo.app.up import ChildSpec, RestartPolicy

    said, _, code = _give_up_on_one(tmp_path, [ChildSpec("serve", ("sleep",), essential=True),
                                               ChildSpec("train", ("same-error",))],
                                    restart=RestartPolicy(first_delay_s=0.1), name="train")
    assert "the same error twice: model path /nowhere does not exist); the others keep running" in said
    assert code == 143


@pytest.mark.timeout(120)
def test_the_same_one_line_error_twice_is_given_up_at_once(tmp_path):
    from odpo.app.up import ChildSpec, RestartPolicy

    sup, out, _ = scripted(tmp_path, [ChildSpec("serve", ("same-error",), essential=True)],
                           restart=RestartPolicy(first_delay_s=0.1))
    assert sup.run() == 1
    assert ("[up] giving up on serve (exited with code 1; the same error twice: model path /nowhere does not "
            "exist); stopping nothing") in out.getvalue()
    assert (tmp_path / "serve.runs").read_text() == "2"


@pytest.mark.timeout(120)
def test_giving_up_on_the_judge_leaves_the_others_running(tmp_path):
    from odpo.app.up import ChildSpec, RestartPolicy

    said, reports, code = _give_up_on_one(tmp_path, [ChildSpec("serve", ("sleep",)),
                                                     ChildSpec("judge", ("always-crash",))],
                                          restart=RestartPolicy(max_restarts=1, first_delay_s=0.1), name="judge")
    assert "the others keep running" in said and code == 143
    assert {c["name"]: c["state"] for c in reports[-1]["children"]} == {"serve": "stopped", "judge": "given up"}


# -- a real `odpo up` on the tiny model ----------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is gone for our purposes
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
@pytest.mark.timeout(400)
def test_up_restarts_a_killed_child_reports_it_and_takes_everything_down_when_killed(tiny_model_dir, tmp_path):
    from odpo.db import store
    from odpo.db.engine import Database
    from tests.test_up import UpProcess, tiny_args

    data = tmp_path / "data"
    up = UpProcess(data, *tiny_args(tiny_model_dir), "--judge", "py:tests.rules:prefer_shorter", "--auto-label",
                   "--restart-delay", "0.5")
    try:
        up.wait_for(r"^\[train\] .*trainer ready", 240)
        first = up.children()
        os.kill(first["train"], signal.SIGKILL)
        up.wait_for(r"^\[up\] train was killed by SIGKILL; restarting it in 0\.5 s", 60)
        up.wait_for(r"^\[up\] restarted train \(pid \d+, restart 1\)", 60)
        up.wait_for(r"trainer ready", 0)
        pids = up.children()
        assert pids["train"] != first["train"] and pids["serve"] == first["serve"]
        db = Database(f"sqlite:///{data / 'odpo.sqlite3'}")

        def report() -> dict:
            with db.sessions() as s:
                return store.get_control(s, key=store.up_state_key("default"))

        def train_of(state: dict) -> dict:
            return next(c for c in state["children"] if c["name"] == "train")

        try:  # up writes its report after it logs the restart: wait for the report, not the log line
            wait_until(lambda: train_of(report())["pid"] == pids["train"], 30, poll=0.2)
            state = report()
        finally:
            db.close()
        train = train_of(state)
        assert (train["pid"], train["restarts"], train["last_exit"]) == (pids["train"], 1, -9), state
        assert state["pid"] == up.proc.pid and state["state"] == "running"

        up.proc.kill()  # no clean-up by up: the kernel's parent-death signal must do it
        wait_until(lambda: not any(_alive(p) for p in pids.values()), 90, poll=0.2)
    finally:
        up.kill()


# -- the judge: SIGTERM hands the claims back at once ---------------------------------------------

@pytest.mark.timeout(200)
def test_a_judge_stopped_by_sigterm_hands_its_claims_back_at_once(common_config, database):
    from sqlalchemy import select

    from odpo.db.models import Assignment, Pair
    from tests.test_judge_worker import add_text_pairs, length_pairs

    add_text_pairs(database, length_pairs(4))
    labeler = "judge:py:tests.test_supervision:hang"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "odpo", "-v", "--data-dir", str(common_config.data_dir), "--db",
                             common_config.db_url, "judge", "--judge", "py:tests.test_supervision:hang",
                             "--batch-size", "4", "--judge-timeout", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)

    def open_claims() -> int:
        with database.sessions() as s:
            return len(s.scalars(select(Assignment).where(Assignment.labeler == labeler,
                                                          Assignment.state == "open")).all())

    try:
        wait_until(lambda: open_claims() == 4 or proc.poll() is not None, 120, poll=0.2)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert open_claims() == 0, out
    with database.sessions() as s:
        assert [(p.status, p.claims) for p in s.scalars(select(Pair))] == [("queued", 0)] * 4
    assert "handed 4 claimed pairs back to the queue" in out


# -- serve: the sampler stops inside a batch's prefill -------------------------------------------

@pytest.mark.timeout(120)
def test_stopping_the_sampler_interrupts_a_batch_between_layer_blocks(database, tiny_model_and_tokenizer,
                                                                      one_torch_thread):
    """The prompt prefill is one forward pass (30+ s for a full batch of the default model on a
    loaded 2-core machine), past any decode-step check: no layer may run once stop is asked."""
    from tests.test_sampler import add_prompts, make_sampler, pairs

    add_prompts(database)
    sampler = make_sampler(database, *tiny_model_and_tokenizer)
    layers = [m for m in sampler.model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert len(layers) == 2
    entered, go_on = threading.Event(), threading.Event()
    ran_after_stop: list[str] = []

    def gate(_module, _args):  # the first layer of the first forward waits for the test
        if not entered.is_set():
            entered.set()
            go_on.wait(60)

    def count(module, _args, _output):
        if go_on.is_set():  # the gated first layer holds everything back until then
            ran_after_stop.append(type(module).__name__)

    handles = [layers[0].register_forward_pre_hook(gate)] + [m.register_forward_hook(count) for m in layers]
    result = {}
    worker = threading.Thread(target=lambda: result.update(made=sampler.step()))
    worker.start()
    try:
        assert entered.wait(60)
        sampler.stop(timeout=0)  # what serve does on SIGTERM (no threads were started here)
        go_on.set()
        worker.join(60)
    finally:
        go_on.set()
        for handle in handles:
            handle.remove()
    assert result == {"made": 0} and ran_after_stop == []
    assert pairs(database) == []


# -- errors that were tracebacks ---------------------------------------------------------------

@pytest.mark.timeout(120)
def test_two_processes_publishing_one_control_key_at_once_both_succeed(database):
    """Two trainers on one --db (two data dirs) publish `train.config` as they start: both read
    "no row" and both inserted, and the second died with IntegrityError on control.key."""
    from odpo.db import store

    first = database.sessions()
    first.begin()
    store.set_control(first, key="train.config", value={"by": "first"})  # row written, not committed
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with database.sessions.begin() as s:
                store.set_control(s, key="train.config", value={"by": "second"})
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    worker = threading.Thread(target=second)
    worker.start()
    time.sleep(1.0)  # let it read "no row" and queue behind the first writer
    first.commit()
    first.close()
    worker.join(60)
    assert not worker.is_alive() and errors == []
    with database.sessions() as s:
        assert store.get_control(s, key="train.config") == {"by": "second"}


def test_a_data_dir_that_cannot_be_created_is_one_line(tmp_path):
    from click.testing import CliRunner

    from odpo.app.cli import cli

    (tmp_path / "a-file").write_text("not a directory")
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path / "a-file" / "data"), "init"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output == f"Error: Not a directory: {tmp_path / 'a-file' / 'data'}\n"


def test_a_port_in_use_is_one_line_before_anything_loads(tmp_path):
    import socket

    from click.testing import CliRunner

    from odpo.app.cli import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path / "data"), "up", "--port", str(port),
                                          "--model", str(tmp_path / "no-model-needed-yet")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.endswith(f"Error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                  "(another odpo serve?): pick another --port\n"), result.output


@pytest.mark.timeout(120)
def test_a_missing_model_path_is_one_line(tmp_path):
    from click.testing import CliRunner

    from odpo.app.cli import cli

    missing = tmp_path / "no-such-model"
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path / "data"), "train", "--model", str(missing),
                                      "--device", "cpu"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().splitlines()[-1] == f"Error: model path {missing} does not exist"


# -- the dashboard -------------------------------------------------------------------------------

def test_the_dashboard_shows_ups_children_from_its_report(database):
    from odpo.app.ui.dashboard import state_markdown
    from odpo.app.up import database_report
    from tests.test_admin_service import admin_service

    report = database_report(database, run="default")
    report({"pid": 4242, "state": "running", "at": time.time() - 120, "children": [
        {"name": "serve", "pid": 11, "state": "running", "restarts": 0, "last_exit": None, "last_error": ""},
        {"name": "train", "pid": 12, "state": "restarting", "restarts": 2, "last_exit": -9, "last_error": ""},
        {"name": "judge", "pid": 13, "state": "given up", "restarts": 5, "last_exit": 1,
         "last_error": "cannot import plugin module '<b>x</b>'"}]})
    md = state_markdown(admin_service(database).dashboard())
    line = next(x for x in md.split("\n\n") if x.startswith("**Processes**"))
    assert "odpo up (pid 4242) running, reported 2 min ago — **no longer reporting** (killed?)" in line
    assert "serve running (pid 11)" in line
    assert "**train restarting (pid 12, restarted 2×, last exit code -9)**" in line
    assert "**judge given up (pid 13, restarted 5×, last exit code 1, cannot import plugin module " \
           "&#x27;&lt;b&gt;x&lt;/b&gt;&#x27;)**" in line
