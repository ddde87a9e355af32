"""`odpo up`'s process supervisor: run serve, train (and a judge) as child processes, one log.

Children are plain `odpo` commands (the same interpreter, --data-dir and --db), so each can also
be run, stopped and restarted on its own. The supervisor never restarts a child silently: when one
exits, it reports the exit code and stops the rest. Each child runs in its own process group, so a
terminal's Ctrl-C reaches only the supervisor, which then stops every child exactly once
(SIGTERM, then SIGKILL after a grace period) and leaves no orphans behind.
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
from pathlib import Path
from typing import IO, Callable, Optional, Sequence

log = logging.getLogger(__name__)

# `python -c` rather than `-m app.cli`: app/cli.py has no __main__ block, and this works whether
# or not the `odpo` script is on PATH.
_ENTRY = "from odpo.app.cli import main; main()"


@dataclass(frozen=True)
class ChildSpec:
    """One child: its name (the log prefix) and the odpo arguments after the global options."""

    name: str
    args: tuple[str, ...]
    finishes: bool = False  # True when its exit 0 means "done" (train with --max-steps), not a failure
    uses_torch: bool = True  # gets a share of the CPU threads (see threads_per_child)
    nice: int = 0  # background children (train, judge) yield the CPU to serve (trainer/priority.py)


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen
    reader: Optional[threading.Thread] = None


class Supervisor:
    """Starts children, streams their output with "[name] " prefixes, stops them all together."""

    def __init__(self, children: Sequence[ChildSpec], *, global_args: Sequence[str] = (), grace_s: float = 15.0,
                 out: Optional[IO[str]] = None) -> None:
        self.children = list(children)
        self.global_args = list(global_args)
        self.grace_s = grace_s
        self.out = out or sys.stdout
        self._running: list[_Child] = []
        self._write_lock = threading.RLock()  # re-entrant: a signal handler may emit mid-write
        self._stop = threading.Event()
        self._stop_reason = ""

    def command(self, spec: ChildSpec) -> list[str]:
        return [sys.executable, "-c", _ENTRY, *self.global_args, *spec.args]

    def run(self) -> int:
        """Run until a child exits or a signal arrives; return the process's exit code."""
        previous = self._install_signal_handlers()
        try:
            self._start_all()
            return self._watch()
        finally:
            self.stop_all()
            self._restore(previous)

    def request_stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason
        self._stop.set()

    def _start_all(self) -> None:
        # Spawn every child before any reader thread exists: forking a multi-threaded process is
        # where subprocess' pre-exec work can deadlock.
        threads = threads_per_child(self.children)
        for spec in self.children:
            proc = subprocess.Popen(self.command(spec), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=_child_env(threads if spec.uses_torch else None),
                                    process_group=0, preexec_fn=_preexec(spec.nice), text=True, errors="replace",
                                    bufsize=1)
            self._running.append(_Child(spec=spec, proc=proc))
            note = f", {threads} CPU thread(s)" if threads and spec.uses_torch else ""
            note += f", nice +{spec.nice}" if spec.nice else ""
            self._emit(f"[up] started {spec.name} (pid {proc.pid}{note}): odpo {shlex.join(spec.args)}")
        for child in self._running:
            child.reader = threading.Thread(target=self._pump, args=(child,), name=f"odpo-up-{child.spec.name}",
                                            daemon=True)
            child.reader.start()

    def _pump(self, child: _Child) -> None:
        prefix = f"[{child.spec.name}] "
        assert child.proc.stdout is not None
        for line in child.proc.stdout:
            self._emit(prefix + line.rstrip("\n"))

    def _emit(self, line: str) -> None:
        with self._write_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def _watch(self) -> int:
        while not self._stop.wait(0.2):
            for child in self._running:
                code = child.proc.poll()
                if code is None:
                    continue
                if child.reader is not None:
                    child.reader.join(2.0)  # its last lines first
                return self._child_exited(child, code)
        self._emit(f"[up] {self._stop_reason}: stopping {', '.join(c.spec.name for c in self._running)}")
        return 130 if self._stop_reason == "SIGINT" else 143

    def _child_exited(self, child: _Child, code: int) -> int:
        others = [c.spec.name for c in self._running if c is not child and c.proc.poll() is None]
        if code == 0 and child.spec.finishes:
            self._emit(f"[up] {child.spec.name} finished; stopping {', '.join(others) or 'nothing'}")
            return 0
        self._emit(f"[up] {child.spec.name} exited with code {code}; stopping {', '.join(others) or 'nothing'} "
                   f"(nothing is restarted automatically)")
        return code if code > 0 else 1

    def stop_all(self) -> None:
        """SIGTERM every live child's process group, wait up to grace_s, then SIGKILL the rest."""
        live = [c for c in self._running if c.proc.poll() is None]
        for child in live:
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in live:
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self._emit(f"[up] {child.spec.name} did not stop within {self.grace_s:.0f}s; killing it")
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait()
        for child in self._running:  # leftovers of a group whose leader already exited
            _signal_group(child.proc, signal.SIGKILL)
            if child.reader is not None:
                child.reader.join(2.0)

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


def threads_per_child(children: Sequence[ChildSpec]) -> Optional[int]:
    """Split the CPU cores between the children that run models, unless the user set
    OMP_NUM_THREADS. Each torch process otherwise starts one thread per core, and on a small
    machine serve and train then spin against each other: measured 3-30x slower decode steps on
    2 cores, versus one thread each."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    heavy = sum(1 for c in children if c.uses_torch)
    if not heavy:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // heavy)


def _child_env(threads: Optional[int] = None) -> dict[str, str]:
    """Children import this very checkout, log unbuffered and line by line."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _preexec(nice: int) -> Optional[Callable[[], None]]:
    """What a child runs between fork and exec: die with the supervisor, lower its priority."""
    from odpo.trainer.priority import lower_process_priority

    die_with_parent = _die_with_parent_hook()
    if not nice:
        return die_with_parent

    def hook() -> None:
        if die_with_parent is not None:
            die_with_parent()
        lower_process_priority(nice)

    return hook


def _die_with_parent_hook() -> Optional[Callable[[], None]]:
    """Linux: a child gets SIGTERM if the supervisor dies without cleaning up (kill -9)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def die_with_parent() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    return die_with_parent

