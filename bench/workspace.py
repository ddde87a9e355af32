"""A scratch odpo data directory with prompts, and the odpo CLI as a child process: what the
benches that drive the real app (labelers, memory) need around it."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Sequence

from odpo.app.config import CommonConfig
from odpo.db.settings import DB_URL_ENV

log = logging.getLogger(__name__)

_ENTRY = "from odpo.app.cli import main; main()"  # as app/up.py starts its children


def import_starter_prompts(cfg: CommonConfig) -> int:
    """Starter prompts into the scratch database (10% held out, as `odpo up` does on first start)."""
    from odpo.app.services.prompts import ensure_initialised

    return ensure_initialised(cfg, starter=True, held_out_fraction=0.1)


def free_port() -> int:
    """A free loopback port (bound and released; the child binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def odpo_command(cfg: CommonConfig, args: Sequence[str]) -> list[str]:
    """The command line of an odpo child; its database URL travels in child_env (never argv)."""
    return [sys.executable, "-c", _ENTRY, "--data-dir", str(cfg.data_dir), *args]


def child_env(cfg: CommonConfig, threads: Optional[int] = None) -> dict[str, str]:
    """This checkout on the path, offline hub, unbuffered logs, the database URL (a password in
    argv would be visible to every user in `ps`); a thread count when asked."""
    env = dict(os.environ)
    env[DB_URL_ENV] = cfg.db_url
    root = str(Path(__file__).resolve().parents[1])  # the checkout holding bench/
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


@dataclass
class Child:
    """An odpo command running in its own process group (so stopping it stops its children)."""

    proc: subprocess.Popen
    log_path: Path
    _log: IO[bytes]

    @classmethod
    def start(cls, cfg: CommonConfig, args: Sequence[str], *, log_path: Path,
              threads: Optional[int] = None, extra_env: Optional[dict[str, str]] = None) -> "Child":
        """`extra_env` joins the child's environment (a PYTHONPATH entry goes in front of it)."""
        handle = open(log_path, "wb")
        env = child_env(cfg, threads)
        for key, value in (extra_env or {}).items():
            env[key] = os.pathsep.join([value, env[key]]) if key == "PYTHONPATH" and env.get(key) else value
        proc = subprocess.Popen(odpo_command(cfg, args), stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT, env=env, process_group=0)
        log.info("started odpo %s (pid %d), log %s", " ".join(args), proc.pid, log_path)
        return cls(proc=proc, log_path=log_path, _log=handle)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> Optional[int]:
        """SIGTERM the group, SIGKILL after `grace_s`; returns the exit code."""
        if self.alive():
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("odpo child %d did not stop in %.0fs; killing it", self.proc.pid, grace_s)
        _signal_group(self.proc.pid, signal.SIGKILL)  # leftovers of the group, if any
        code = self.proc.wait()
        self._log.close()
        return code

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_http(url: str, *, timeout_s: float, child: Optional[Child] = None) -> float:
    """Seconds until `url` answers 200; RuntimeError (with the child's log tail) if it never does."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if child is not None and not child.alive():
            raise RuntimeError(f"odpo exited with code {child.proc.returncode} before serving:\n{child.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s" + (f":\n{child.tail()}" if child else ""))
