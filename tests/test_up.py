"""`odpo up` as a real subprocess on the tiny model: serve + train + a py: judge reach v2 and exit 0;
Ctrl-C stops every child (no orphans); a dying child stops the others with its exit code; and the
command lines `up` builds for its children."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from odpo.app.cli import cli

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
STARTED = re.compile(r"^\[up\] (?:re)?started (\w+) \(pid (\d+)")  # the latest pid of each child wins


class UpProcess:
    """`odpo up ...` with its output collected line by line in a thread (a full pipe would block it)."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        env.pop("OMP_NUM_THREADS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "odpo", "--data-dir", str(data_dir), "up", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output()}")
            time.sleep(0.1)

    def children(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for m in map(STARTED.match, self.lines) if m}

    def output(self) -> str:
        """Everything the run printed (a busy judge can log hundreds of lines before serve's last)."""
        return "\n".join(self.lines)

    def run_to_end(self, timeout: float) -> tuple[int, str]:
        """Wait for `up` to exit on its own; its exit code and output (whatever remains is killed)."""
        try:
            code = self.proc.wait(timeout=timeout)
            self.reader.join(5)
        finally:
            self.kill()
        return code, self.output()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for pid in self.children().values():
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def tiny_args(model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--headless", "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "8",
            "--batch-size", "3", "--train-args", "--poll-seconds 0.2", "--judge-args", "--poll-seconds 0.2"]


def gone(pid: int) -> bool:
    """True when neither the process nor anything in its process group is left."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(300)
def test_up_trains_to_v2_with_an_auto_labeling_judge_and_exits_0(tiny_model_dir, tmp_path):
    """The default layout: serve (no model) + one `odpo sample` worker + train + judge."""
    data = tmp_path / "data"
    args = [a for a in tiny_args(tiny_model_dir) if a != "--headless"]
    up = UpProcess(data, *args, "--port", str(free_port()), "--judge", "py:tests.rules:prefer_shorter",
                   "--auto-label", "--max-steps", "2")
    code, out = up.run_to_end(240)
    assert code == 0, out
    assert set(up.children()) == {"serve", "sample", "train", "judge"}
    assert all(gone(pid) for pid in up.children().values())
    assert "[up] train finished" in out
    assert re.search(r"^\[train\] .*committed v2", out, re.M)
    assert re.search(r"^\[sample\] .*serving adapter v0", out, re.M), out  # (v2 may land after up stopped it)
    assert not re.search(r"^\[serve\] .*serving adapter", out, re.M), out  # serve holds no model
    status = CliRunner().invoke(cli, ["--data-dir", str(data), "status", "--json"])
    assert '"latest_version": 2' in status.output


@pytest.mark.timeout(300)
def test_ctrl_c_stops_every_child(tiny_model_dir, tmp_path):
    up = UpProcess(tmp_path / "data", *tiny_args(tiny_model_dir), "--judge", "py:tests.rules:prefer_shorter",
                   "--auto-label")
    try:
        up.wait_for(r"^\[serve\] .*serving adapter v0", 200)
        up.wait_for(r"^\[train\] .*trainer ready", 200)
        pids = up.children()
        assert set(pids) == {"serve", "train", "judge"} and not any(gone(p) for p in pids.values())
        up.proc.send_signal(signal.SIGINT)
        code = up.proc.wait(timeout=60)
        up.reader.join(5)
    finally:
        up.kill()
    assert code == 130, up.output()
    assert all(gone(pid) for pid in pids.values()), up.output()
    assert "[up] SIGINT: stopping" in up.output()


@pytest.mark.timeout(60)
def test_with_restarts_off_a_dying_child_stops_the_others_and_up_fails_with_its_code(tmp_path):
    from odpo.app.up import ChildSpec, RestartPolicy, Supervisor

    out = tmp_path / "log.txt"
    script = "import time, sys; print('hello', flush=True); time.sleep(float(sys.argv[1])); sys.exit(int(sys.argv[2]))"

    class Scripted(Supervisor):
        def command(self, spec):
            return [sys.executable, "-c", script, *spec.args]

    with out.open("w") as fh:
        sup = Scripted([ChildSpec("serve", ("60", "0")), ChildSpec("train", ("0.5", "3"))], grace_s=5, out=fh,
                       restart=RestartPolicy(max_restarts=0))
        started = time.monotonic()
        code = sup.run()
    text = out.read_text()
    assert code == 3 and time.monotonic() - started < 20
    assert "[serve] hello" in text and "[train] hello" in text
    assert "[up] giving up on train (exited with code 3; restarts are off); stopping serve" in text
    assert all(c.proc.poll() is not None for c in sup._running)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice values as Linux reports them")
def test_background_children_run_at_a_lower_priority(tmp_path):
    from odpo.app.up import ChildSpec, Supervisor

    class Scripted(Supervisor):
        def command(self, spec):  # train lingers, so serve has printed before train's exit stops it
            return [sys.executable, "-c", "import os, sys, time; print('nice', os.nice(0), flush=True); "
                    "time.sleep(float(sys.argv[1]))", *spec.args]

    out = tmp_path / "log.txt"
    with out.open("w") as fh:
        sup = Scripted([ChildSpec("serve", ("60",)), ChildSpec("train", ("5",), finishes=True, nice=5)],
                       grace_s=5, out=fh)
        assert sup.run() == 0
    mine = os.nice(0)
    text = out.read_text()
    assert f"[serve] nice {mine}" in text and f"[train] nice {min(19, mine + 5)}" in text
    assert "nice +5" in text  # the start line says so


def test_up_passes_options_to_its_children():
    from odpo.app.cli.serve import up_children

    options = {name: None for name in ("batch_size", "save_every", "max_steps", "until_version")}
    options.update(model="m", run="default", device="cpu", dtype="auto", load_in_4bit=False, seed=0, host="0.0.0.0",
                   port=7860, headless=True, queue_size=8, prompts_per_batch=8, temperature=0.7, top_p=0.95,
                   max_new_tokens=96, max_staleness=1, overlap=1, claim_timeout_s=600.0, guidelines=None,
                   auth_file=None, show_judge_after_vote=False, admins=("ann",), kv_cache="dynamic",
                   sample_autocast=False, sampler_nice=10, judge_spec="rule:shorter", auto_label=False,
                   no_train=False, train_args="--beta 0.2", judge_args="", max_steps=5, background_nice=7,
                   inline_sampler=False, workers=1, backend="hf", vllm_urls="")
    serve_child, train_child, judge_child = up_children(options)
    assert serve_child.args == ("serve", "--model", "m", "--device", "cpu", "--temperature", "0.7",
                                "--host", "0.0.0.0", "--headless", "--admin", "ann")
    # only what differs from the defaults, in train's own option order, then the raw extras
    assert train_child.args[0] == "train" and train_child.args[-2:] == ("--beta", "0.2")
    assert _pairs(train_child.args[1:-2]) == {("--model", "m"), ("--device", "cpu"), ("--max-steps", "5")}
    assert train_child.finishes
    assert judge_child.args == ("judge", "--judge", "rule:shorter", "--shadow")  # no --auto-label: agreement only
    assert not judge_child.uses_torch
    assert (serve_child.nice, train_child.nice, judge_child.nice) == (0, 7, 7)  # background work yields to serve

    # without --headless / --inline-sampler: serve holds no model and workers sample
    options.update(headless=False, workers=2)
    serve_child, *workers, train_child, judge_child = up_children(options)
    assert serve_child.args == ("serve", "--host", "0.0.0.0", "--admin", "ann")  # model and sampling: workers
    assert not serve_child.uses_torch
    assert [w.name for w in workers] == ["sample1", "sample2"]
    assert workers[0].args == ("sample", "--model", "m", "--device", "cpu", "--temperature", "0.7")
    assert workers[0].uses_torch and workers[0].nice == 0  # the worker lowers its own sampler thread


def _pairs(args: tuple[str, ...]) -> set[tuple[str, str]]:
    assert len(args) % 2 == 0
    return set(zip(args[0::2], args[1::2], strict=True))


def test_auto_label_needs_a_judge(tmp_path):
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "up", "--auto-label"])
    assert result.exit_code == 2 and "--auto-label needs --judge" in result.output


@pytest.mark.timeout(300)
def test_serve_holds_no_model_a_sample_worker_fills_the_queue_and_both_stop_on_sigterm(tiny_model_dir, tmp_path):
    import json
    import urllib.request

    port = free_port()
    data = tmp_path / "data"
    assert CliRunner().invoke(cli, ["--data-dir", str(data), "init"]).exit_code == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    odpo = [sys.executable, "-m", "odpo", "--data-dir", str(data)]
    serve = subprocess.Popen([*odpo, "serve", "--port", str(port)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    worker = subprocess.Popen([*odpo, "sample", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32",
                               "--max-new-tokens", "8", "--queue-size", "5", "--name", "w1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    procs = (serve, worker)
    try:
        deadline = time.monotonic() + 200
        while True:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert page.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        while True:
            status = json.loads(CliRunner().invoke(cli, ["--data-dir", str(data), "status", "--json"]).output)
            if status["pairs"]["queued"] == 5:
                break
            assert time.monotonic() < deadline
            time.sleep(0.5)
        maps = Path(f"/proc/{serve.pid}/maps").read_text()
        assert "libtorch" not in maps and "libtorch" in Path(f"/proc/{worker.pid}/maps").read_text()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
        assert time.monotonic() - stopping < 15  # well inside `up`'s default grace (--grace 30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    from odpo.db import store
    from odpo.db.engine import Database

    db = Database(f"sqlite:///{data / 'odpo.sqlite3'}")
    with db.sessions() as s:
        assert store.get_control(s, key=store.WORKER_PREFIX + "w1")["phase"] == "stopped"
        assert store.sampler_workers(s, max_age_s=60) == []  # a stopped worker is not counted
    db.close()
