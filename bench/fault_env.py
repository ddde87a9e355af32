"""The ground the fault bench pulls from under `odpo up`: a PostgreSQL it can stop and restart, a
small data disk it can fill, and an OpenAI-compatible judge endpoint it can make hang.

All of it is the bench's own and thrown away afterwards: a PostgreSQL cluster made with initdb in a
temporary directory (a Unix socket only, as the tests' tests/with-postgres does), a tmpfs mounted
for the data directory (or, where mounting is not permitted, writes failing with ENOSPC injected
into the odpo children through a sitecustomize on their PYTHONPATH: named as such in the result),
and a stub judge on 127.0.0.1 that prefers the shorter answer, or never answers while it hangs.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

PG_BINDIR = Path(os.environ.get("ODPO_PG_BINDIR", "/usr/lib/postgresql/15/bin"))


class ThrowawayPostgres:
    """initdb + pg_ctl in a temporary directory (run as the `postgres` user when we are root,
    because PostgreSQL refuses root); start, stop for an outage, restart."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="odpo-faults-pg-"))
        self.as_server = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_server:
            shutil.chown(self.dir, "postgres")

    @staticmethod
    def missing() -> Optional[str]:
        """Why there is no PostgreSQL to run here (None: there is)."""
        return None if (PG_BINDIR / "initdb").exists() else f"no PostgreSQL 15 binaries in {PG_BINDIR}"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://odpo@/odpo?host={self.dir}"

    def _pg(self, *args: str, check: bool = True) -> None:
        subprocess.run([*self.as_server, *args], check=check, capture_output=True, timeout=120)

    def create(self) -> None:
        self._pg(str(PG_BINDIR / "initdb"), "-D", str(self.dir / "data"), "-U", "odpo", "-A", "trust", "-E", "UTF8",
                 "--no-locale")
        self.start()
        subprocess.run([str(PG_BINDIR / "createdb"), "-h", str(self.dir), "-U", "odpo", "odpo"], check=True,
                       capture_output=True, timeout=60)

    def start(self) -> None:
        self._pg(str(PG_BINDIR / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-w",
                 "-t", "60", "-o", f"-c listen_addresses= -k {self.dir} -c fsync=off", "start")

    def stop(self) -> None:
        self._pg(str(PG_BINDIR / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop", check=False)

    def restart(self) -> None:
        # -l: the restarted server must not inherit our captured stdout, or waiting for it never ends
        self._pg(str(PG_BINDIR / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-m",
                 "fast", "-w", "-t", "60", "-o", f"-c listen_addresses= -k {self.dir} -c fsync=off", "restart")

    def remove(self) -> None:
        self._pg(str(PG_BINDIR / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


class SmallDisk:
    """A data directory on a filesystem the bench can fill: a tmpfs of `megabytes` when mounting is
    permitted, else the ordinary disk with ENOSPC injected into the children's writes."""

    def __init__(self, path: Path, *, megabytes: int) -> None:
        self.path, self.megabytes = Path(path), megabytes
        self.path.mkdir(parents=True, exist_ok=True)
        self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(self.path)],
                                      capture_output=True).returncode == 0
        self.injector = None if self.mounted else _enospc_injector(self.path)
        self.filler = self.path / ".odpo-bench-filler"

    @property
    def how(self) -> str:
        return (f"a {self.megabytes} MB tmpfs filled to the brim" if self.mounted
                else "ENOSPC injected into writes under the data dir (tmpfs mount not permitted here)")

    def child_env(self) -> dict[str, str]:
        """What the odpo children need to see the injected fault (nothing on a real small disk)."""
        return {} if self.injector is None else {"PYTHONPATH": str(self.injector)}

    def fill(self) -> None:
        """Leave almost no room: the next adapter version cannot be written."""
        if self.mounted:
            free = shutil.disk_usage(self.path).free
            with open(self.filler, "wb") as fh:
                fh.truncate(0)
                fh.write(b"\0" * max(0, free - (256 << 10)))
        else:
            self.filler.write_text("full")

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)

    def release(self) -> None:
        self.empty()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        if self.injector is not None:
            shutil.rmtree(self.injector, ignore_errors=True)


_INJECTOR = '''
import builtins, errno, os
_real_open = builtins.open
_FULL = {full!r}
def _open(file, mode="r", *args, **kwargs):
    if ("w" in mode or "a" in mode) and os.path.exists(_FULL) and str(file).startswith({root!r}) \\
            and not str(file).endswith(".odpo-bench-filler"):
        raise OSError(errno.ENOSPC, "No space left on device (injected by odpo bench faults)", str(file))
    return _real_open(file, mode, *args, **kwargs)
builtins.open = _open
'''


def _enospc_injector(root: Path) -> Path:
    """A sitecustomize that fails writes under `root` with ENOSPC while the filler file exists."""
    where = Path(tempfile.mkdtemp(prefix="odpo-faults-enospc-"))
    (where / "sitecustomize.py").write_text(_INJECTOR.format(full=str(root / ".odpo-bench-filler"), root=str(root)))
    return where


class StubJudge:
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1 that prefers the shorter of the
    two responses in odpo's judge prompt; while `hang` is set it accepts requests and never answers."""

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.answered = 0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                while judge.hang.is_set():
                    time.sleep(0.2)
                letter = _shorter(body)
                judge.answered += 1
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": letter},
                                                 "finish_reason": "stop"}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the judge gave up on a hung request (its timeout): nobody is left to answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def spec(self) -> str:
        return f"openai:stub@http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.hang.clear()
        self.server.shutdown()


def _shorter(body: dict[str, Any]) -> str:
    text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    found = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\nWhich response", text, re.S)
    if not found:
        return "A"
    return "A" if len(found.group(1)) <= len(found.group(2)) else "B"
