"""`odpo up`'s process supervisor: run serve, train (and a judge) as child processes, one log.

Children are plain `odpo` commands (the same interpreter, --data-dir and --db), so each can also
be run, stopped and restarted on its own. A child that crashes is restarted with exponential
backoff and the log says so; one that keeps crashing soon after it starts (or fails twice with
the same one-line error, which only the user can fix) is given up on with one line. A child that
stops on a transient fault (exit status 75: the database away, a full disk) is restarted after a
capped backoff and never counted: `up` supervises for hours, not seconds. Giving up on serve (or
on a trainer `up` was asked to finish) stops everything with that child's exit code; giving up on
any other child leaves the rest running: labelers keep labeling while the trainer is down, and
the dashboard says why. A child that exits 0 on its own is done: train with
--max-steps/--until-version ends `up` with 0, any other is not restarted.

Each child runs in its own process group, so a terminal's Ctrl-C reaches only the supervisor,
which then stops every child exactly once (SIGTERM, then SIGKILL after a grace period). If the
supervisor itself is killed (even by SIGKILL) the children get SIGTERM from the kernel (Linux
PR_SET_PDEATHSIG), so nothing is left behind. The children's state (pid, restarts, last exit
code) goes to the database through `report`, for the dashboard.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Optional, Sequence

from odpo.app.spawn import child_env, preexec_hook, threads_per_child
from odpo.app.user_errors import EXIT_TRANSIENT

log = logging.getLogger(__name__)

# `python -c` rather than `-m odpo`: works whether or not the `odpo` script is on PATH.
_ENTRY = "from odpo.app.cli import main; main()"
HEARTBEAT_S = 10.0  # the dashboard shows how old the report is; a dead `up` stops refreshing it

__all__ = ["ChildSpec", "RestartPolicy", "Supervisor", "threads_per_child"]


@dataclass(frozen=True)
class ChildSpec:
    """One child: its name (the log prefix) and the odpo arguments after the global options."""

    name: str
    args: tuple[str, ...]
    finishes: bool = False  # True when its exit 0 means "done" (train with --max-steps), not a failure
    uses_torch: bool = True  # gets a share of the CPU threads (see threads_per_child)
    nice: int = 0  # background children (train, judge) yield the CPU to serve (trainer/priority.py)
    essential: bool = False  # giving up on it stops `up`: serve only (labelers keep their page otherwise)


@dataclass(frozen=True)
class RestartPolicy:
    """Restart a crashed child after first_delay_s, doubling per crash in a row up to max_delay_s;
    give up after max_restarts restarts that each crashed within stable_s of starting (0: never
    restart). A child that ran stable_s before crashing starts a fresh count."""

    max_restarts: int = 5
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_s: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(failures - 1, 0))


@dataclass(frozen=True)
class _Decision:
    give_up: bool
    reason: str
    delay_s: float = 0.0


@dataclass
class Child:
    """A child's current process and what the dashboard shows about it."""

    spec: ChildSpec
    proc: Optional[subprocess.Popen] = None
    reader: Optional[threading.Thread] = None
    state: str = "starting"  # running, restarting, exited, finished, given up, stopped
    restarts: int = 0
    failures: int = 0  # crashes in a row, each soon after its start
    last_exit: Optional[int] = None
    last_error: str = ""  # the one-line error of the last crash, when the child printed one
    last_line: str = ""
    started_at: float = 0.0
    restart_at: Optional[float] = None
    transient_streak: int = 0  # transient stops in a row (their own backoff, never a give-up)

    def started(self, proc: subprocess.Popen) -> None:
        if self.proc is not None:
            self.restarts += 1
        self.proc, self.state, self.started_at, self.restart_at = proc, "running", time.monotonic(), None
        self.last_line = ""

    def crashed(self, code: int, now: float, policy: RestartPolicy) -> _Decision:
        """Count a crash and decide: restart (after a delay) or give up. A child that stopped on a
        transient fault (exit status EXIT_TRANSIENT: a database or server away, a full disk) is
        restarted after a backoff and never counted: only the user can fix a fatal error, but
        time fixes a transient one."""
        self.last_exit = code
        error = self.last_line[len("Error: "):] if self.last_line.startswith("Error: ") else ""
        if code == EXIT_TRANSIENT:
            self.last_error, self.transient_streak = error, self.transient_streak + 1
            delay = policy.delay(self.transient_streak)
            self.state, self.restart_at = "waiting", now + delay
            return _Decision(False, f"transient: {error or 'a fault that waiting fixes'}", delay)
        self.transient_streak = 0
        quick = now - self.started_at < policy.stable_s
        repeated = quick and bool(error) and error == self.last_error
        self.last_error = error
        self.failures = self.failures + 1 if quick else 1
        if repeated:
            return _Decision(True, f"the same error twice: {error}")
        if policy.max_restarts == 0:
            return _Decision(True, "restarts are off" + (f": {error}" if error else ""))
        if self.failures > policy.max_restarts:
            return _Decision(True, f"it failed {self.failures} times in a row, each within "
                                   f"{policy.stable_s:.0f} s of starting" + (f": {error}" if error else ""))
        self.state, self.restart_at = "restarting", now + policy.delay(self.failures)
        return _Decision(False, error or "crashed", policy.delay(self.failures))

    def snapshot(self) -> dict[str, Any]:
        return {"name": self.spec.name, "pid": None if self.proc is None else self.proc.pid, "state": self.state,
                "restarts": self.restarts, "last_exit": self.last_exit, "last_error": self.last_error[:300]}


def describe_exit(code: int) -> str:
    """"exited with code 3" or "was killed by SIGKILL" (Popen reports a signal as -signum)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def database_report(db: Any, *, run: str) -> Callable[[dict[str, Any]], None]:
    """A Supervisor `report` that upserts the state into the run's control row (the database is
    the only channel between odpo's processes; the dashboard reads it from there)."""
    from odpo.db import store

    key = store.up_state_key(run)

    def report(state: dict[str, Any]) -> None:
        with db.sessions.begin() as s:
            store.set_control(s, key=key, value=state)

    return report


@dataclass(frozen=True)
class _Outcome:
    """Why the watch loop ended, and the exit code `up` returns."""

    code: int


class Supervisor:
    """Starts children, streams their output with "[name] " prefixes, restarts crashed ones, stops
    them all together."""

    def __init__(self, children: Sequence[ChildSpec], *, global_args: Sequence[str] = (), grace_s: float = 15.0,
                 out: Optional[IO[str]] = None, restart: Optional[RestartPolicy] = None,
                 report: Optional[Callable[[dict[str, Any]], None]] = None,
                 env: Optional[dict[str, str]] = None) -> None:
        self.children = list(children)
        self.global_args = list(global_args)
        self.env = dict(env or {})  # for every child, outside argv (the database URL)
        self.grace_s = grace_s
        self.out = out or sys.stdout
        self.restart = restart or RestartPolicy()
        self.report = report
        self._running: list[Child] = [Child(spec=spec) for spec in self.children]
        self._threads = threads_per_child(self.children)
        self._write_lock = threading.RLock()  # re-entrant: a signal handler may emit mid-write
        self._stop = threading.Event()
        self._stop_reason = ""
        self._state = "starting"
        self._reported_at = 0.0
        self._report_failed = False

    def command(self, spec: ChildSpec) -> list[str]:
        return [sys.executable, "-c", _ENTRY, *self.global_args, *spec.args]

    def run(self) -> int:
        """Run until the work is done, a child is given up on, or a signal arrives; return the
        process's exit code. Children are spawned from this thread only: the kernel's
        parent-death signal fires when the thread that forked a child ends."""
        previous = self._install_signal_handlers()
        try:
            for child in self._running:
                self._spawn(child)
            self._state = "running"
            self._publish()
            return self._watch()
        finally:
            self._state = "stopping"
            self.stop_all()
            self._state = "stopped"
            self._publish()
            self._restore(previous)

    def request_stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason
        self._stop.set()

    # -- children -------------------------------------------------------------------------------
    def _spawn(self, child: Child) -> None:
        spec = child.spec
        env = child_env(self._threads if spec.uses_torch else None, extra=self.env)
        proc = subprocess.Popen(self.command(spec), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env,
                                process_group=0, preexec_fn=preexec_hook(spec.nice, parent=os.getpid()), text=True,
                                errors="replace", bufsize=1)
        first = child.proc is None
        child.started(proc)
        note = f", {self._threads} CPU thread(s)" if self._threads and spec.uses_torch else ""
        note += f", nice +{spec.nice}" if spec.nice else ""
        if first:
            self._emit(f"[up] started {spec.name} (pid {proc.pid}{note}): odpo {shlex.join(spec.args)}")
        else:
            self._emit(f"[up] restarted {spec.name} (pid {proc.pid}, restart {child.restarts})")
        child.reader = threading.Thread(target=self._pump, args=(child, proc), name=f"odpo-up-{spec.name}",
                                        daemon=True)
        child.reader.start()

    def _pump(self, child: Child, proc: subprocess.Popen) -> None:
        prefix = f"[{child.spec.name}] "
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.strip():
                child.last_line = line
            self._emit(prefix + line)

    def _emit(self, line: str) -> None:
        with self._write_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def _watch(self) -> int:
        while not self._stop.wait(0.2):
            outcome = self._tick(time.monotonic())
            if outcome is not None:
                return outcome.code
            if not any(c.state in ("running", "restarting", "waiting") for c in self._running):
                self._emit("[up] every child has stopped by itself; nothing left to run")
                return 0
            if time.monotonic() - self._reported_at >= HEARTBEAT_S:
                self._publish()
        live = ", ".join(c.spec.name for c in self._running if c.state == "running") or "nothing"
        self._emit(f"[up] {self._stop_reason}: stopping {live}")
        return 130 if self._stop_reason == "SIGINT" else 143

    def _tick(self, now: float) -> Optional[_Outcome]:
        """One look at every child: handle exits, start the restarts that are due."""
        for child in self._running:
            if child.state == "running":
                assert child.proc is not None
                code = child.proc.poll()
                if code is not None:
                    if child.reader is not None:
                        child.reader.join(2.0)  # its last lines first
                    outcome = self._child_exited(child, code, now)
                    self._publish()
                    if outcome is not None:
                        return outcome
            elif child.state in ("restarting", "waiting") and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)
                self._publish()
        return None

    def _child_exited(self, child: Child, code: int, now: float) -> Optional[_Outcome]:
        name, why = child.spec.name, describe_exit(code)
        if code == 0:
            if child.spec.finishes:
                child.state = "finished"
                self._emit(f"[up] {name} finished; stopping {self._others(child)}")
                return _Outcome(0)
            child.state = "exited"
            self._emit(f"[up] {name} exited with code 0 by itself; not restarting it")
            return None
        decision = child.crashed(code, now, self.restart)
        if decision.give_up:
            return self._give_up(child, code, f"{why}; {decision.reason}")
        if child.state == "waiting":
            self._emit(f"[up] {name} {why}; {decision.reason}; restarting it in {decision.delay_s:.0f} s")
        else:
            self._emit(f"[up] {name} {why}; restarting it in {decision.delay_s:.1f} s "
                       f"(attempt {child.failures} of {self.restart.max_restarts}: {decision.reason})")
        return None

    def _give_up(self, child: Child, code: int, why: str) -> Optional[_Outcome]:
        """Give up on one child. Only serve (the page people label on), a job `up` was asked to
        finish (train with --max-steps/--until-version), or any child with restarts off (fail fast,
        as asked) takes the rest down: a trainer that cannot run leaves labelers labeling, and the
        dashboard says why."""
        child.state = "given up"
        if child.spec.essential or child.spec.finishes or self.restart.max_restarts == 0:
            self._emit(f"[up] giving up on {child.spec.name} ({why}); stopping {self._others(child)}")
            return _Outcome(code if code > 0 else 1)
        self._emit(f"[up] giving up on {child.spec.name} ({why}); the others keep running")
        return None

    def _others(self, child: Child) -> str:
        return ", ".join(c.spec.name for c in self._running if c is not child and c.state == "running") or "nothing"

    def stop_all(self) -> None:
        """SIGTERM every live child's process group, wait up to grace_s, then SIGKILL the rest;
        one line says how long each took (what --grace has to cover)."""
        for child in self._running:
            if child.state in ("restarting", "waiting"):
                child.state = "stopped"
        live = [c for c in self._running if c.proc is not None and c.proc.poll() is None]
        for child in live:
            _signal_group(child.proc, signal.SIGTERM)
        started = time.monotonic()
        took = self._wait_for(live, started + self.grace_s)
        for child in live:
            if child.spec.name not in took:
                self._emit(f"[up] {child.spec.name} did not stop within {self.grace_s:.0f}s; killing it")
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait()
                took[child.spec.name] = time.monotonic() - started
            child.last_exit = child.proc.returncode
            if child.state == "running":
                child.state = "stopped"
        for child in self._running:  # leftovers of a group whose leader already exited
            if child.proc is not None:
                _signal_group(child.proc, signal.SIGKILL)
            if child.reader is not None:
                child.reader.join(2.0)
        if took:
            self._emit("[up] stopped " + ", ".join(f"{name} in {s:.1f} s" for name, s in took.items()))

    @staticmethod
    def _wait_for(children: list[Child], deadline: float) -> dict[str, float]:
        """Seconds until each child exited, for those that did before the deadline."""
        started, took = time.monotonic(), {}
        while len(took) < len(children) and time.monotonic() < deadline:
            for child in children:
                if child.spec.name not in took and child.proc.poll() is not None:
                    took[child.spec.name] = time.monotonic() - started
            time.sleep(0.05)
        return took

    # -- reporting --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """What the dashboard shows: up's own pid and state, and every child's."""
        return {"pid": os.getpid(), "state": self._state, "at": time.time(),
                "children": [c.snapshot() for c in self._running]}

    def _publish(self) -> None:
        self._reported_at = time.monotonic()
        if self.report is None:
            return
        try:
            self.report(self.snapshot())
        except Exception as exc:  # noqa: BLE001 - a busy database must not take the supervisor down
            if not self._report_failed:
                self._emit(f"[up] could not report the children's state to the database: {exc}")
            self._report_failed = True

    # -- signals ------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict[int, object]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._stop.is_set():  # a second Ctrl-C: no more waiting for graceful exits
            self._emit("[up] stopping now")
            for child in self._running:
                if child.proc is not None:
                    _signal_group(child.proc, signal.SIGKILL)
            return
        self.request_stop(signal.Signals(signum).name)

    @staticmethod
    def _restore(previous: dict[int, object]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
