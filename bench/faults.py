"""`odpo bench faults`: the ordinary faults of real machines under a running loop, and the ledger after.

Beside the chaos bench (kill -9 of odpo's own processes), this one pulls the ground away: the
database restarts, or is gone for a minute; the data disk fills up; a sampler worker stops beating
(SIGSTOP); the judge endpoint hangs. Each scenario runs its own `odpo up --judge ... --auto-label`
(the loop without people), waits for a first version, applies the fault, clears it, and then
needs one more version within the timeout: the time from clearing to that version is the time to
resume. After it, `up` must still be running (it gave up on nothing essential), its log is
searched for tracebacks, and the chaos bench's invariants hold (no label lost or trained twice,
versions contiguous, no version directory without a row, no leftover .tmp directory).

Databases: SQLite (an outage is a writer holding the database locked) and a throwaway PostgreSQL
the bench starts itself (stop / start, restart).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from odpo.app.config import CommonConfig
from odpo.bench.chaos_checks import check_all
from odpo.bench.common import BenchContext, BenchResult, Target
from odpo.bench.fault_env import SmallDisk, StubJudge, ThrowawayPostgres
from odpo.bench.workspace import Child, free_port, wait_http

log = logging.getLogger(__name__)

TARGETS = (Target("faults: scenarios that resumed", "resumed_share", ">=", 1.0),
           Target("faults: invariant violations", "violations", "<=", 0.0),
           Target("faults: tracebacks in the logs", "tracebacks", "<=", 0.0))
# seconds of each fault, seconds to wait for the next version after it clears
SIZES = {"quick": {"outage_s": 20.0, "resume_timeout_s": 240.0, "tokens": 16},
         "full": {"outage_s": 60.0, "resume_timeout_s": 600.0, "tokens": 32}}
SCENARIOS = ("db_restart", "db_outage", "disk_full", "worker_stall", "judge_hang")


@dataclass
class Scenario:
    """One fault under one `odpo up`: where it runs and how to apply and clear it."""

    name: str
    database: str  # sqlite or postgresql
    apply: Callable[[], None]
    clear: Callable[[], None]
    how: str = ""


def run(ctx: BenchContext, *, scenarios: tuple[str, ...] = (), databases: tuple[str, ...] = ("sqlite", "postgresql"),
        outage_s: Optional[float] = None) -> BenchResult:
    size = SIZES["quick" if ctx.quick else "full"]
    outage = outage_s or size["outage_s"]
    wanted = scenarios or SCENARIOS
    result = BenchResult(bench="faults", quick=ctx.quick,
                         params={"model": ctx.model, "scenarios": list(wanted), "databases": list(databases),
                                 "outage_s": outage, "resume_timeout_s": size["resume_timeout_s"],
                                 "app": "odpo up --judge <stub or rule> --auto-label, one up per scenario"})
    rows = []
    for database in databases:
        for name in wanted:
            if name == "db_restart" and database == "sqlite":
                continue  # SQLite has no server to restart: its outage is db_outage (a held lock)
            why = ThrowawayPostgres.missing() if database == "postgresql" else None
            rows.append({"scenario": name, "database": database, "status": "skipped", "why": why} if why else
                        _one(ctx, name, database, outage=outage, size=size))
    _fill(result, rows)
    result.check(TARGETS)
    return result


def _one(ctx: BenchContext, name: str, database: str, *, outage: float, size: dict[str, Any]) -> dict[str, Any]:
    log.info("fault scenario %s on %s", name, database)
    with ctx.scratch(f"faults-{name}") as cfg, contextlib.ExitStack() as undo:
        pg = disk = judge = None
        if database == "postgresql":
            pg = ThrowawayPostgres()
            undo.callback(pg.remove)
            pg.create()
            cfg = CommonConfig.resolve(data_dir=str(cfg.data_dir), db_url=pg.url)
        if name == "disk_full":  # the adapters' directory on a disk the bench can fill
            disk = SmallDisk(cfg.data_dir / "runs", megabytes=256)  # room for a few versions of the default model
            undo.callback(disk.release)
        if name == "judge_hang":
            judge = StubJudge()
            undo.callback(judge.close)
        return _drive(ctx, cfg, name, database, outage=outage, size=size, pg=pg, disk=disk, judge=judge)


def _drive(ctx: BenchContext, cfg: Any, name: str, database: str, *, outage: float, size: dict[str, Any],
           pg: Any, disk: Any, judge: Any) -> dict[str, Any]:
    port = free_port()
    args = _up_args(ctx, port, judge.spec if judge else "rule:shorter", size["tokens"])
    up = Child.start(cfg, args, log_path=cfg.data_dir.parent / "up.log", threads=ctx.threads,
                     extra_env=disk.child_env() if disk else None)
    row: dict[str, Any] = {"scenario": name, "database": database}
    try:
        wait_http(f"http://127.0.0.1:{port}/", timeout_s=600.0, child=up)
        first = _wait_version(cfg, at_least=1, timeout_s=600.0, up=up)
        scenario = _scenario(name, database, cfg=cfg, up=up, pg=pg, disk=disk, judge=judge)
        row["how"] = scenario.how
        scenario.apply()
        time.sleep(outage)
        scenario.clear()
        cleared = time.monotonic()
        resumed = _wait_version(cfg, at_least=first + 1, timeout_s=size["resume_timeout_s"], up=up)
        row.update(status="resumed" if resumed > first else "stuck", versions=[first, resumed],
                   resume_seconds=round(time.monotonic() - cleared, 1) if resumed > first else None,
                   up_alive=up.alive())
    except RuntimeError as exc:
        row.update(status="failed", why=str(exc).splitlines()[0][:300])
    finally:
        up.stop(grace_s=30.0)
    text = up.log_path.read_text(errors="replace")
    row["tracebacks"] = text.count("Traceback (most recent call last)")
    row["up_gave_up"] = [line for line in text.splitlines() if "[up] giving up on" in line][:3]
    db = cfg.open_db()
    try:
        with db.sessions() as s:
            checks = check_all(s, cfg.data_dir)
    finally:
        db.close()
    row["violations"] = {k: v["violations"] for k, v in checks.items() if v["violations"]}
    return row


def _scenario(name: str, database: str, *, cfg: Any, up: Child, pg: Any, disk: Any, judge: Any) -> Scenario:
    if name == "db_restart":
        return Scenario(name, database, apply=pg.restart, clear=lambda: None, how="pg_ctl restart -m fast")
    if name == "db_outage":
        if pg is not None:
            return Scenario(name, database, apply=pg.stop, clear=pg.start, how="PostgreSQL stopped, then started")
        lock = _SqliteLock(Path(cfg.data_dir) / "odpo.sqlite3")
        return Scenario(name, database, apply=lock.take, clear=lock.release,
                        how="another process holds the SQLite database locked (BEGIN EXCLUSIVE)")
    if name == "disk_full":
        return Scenario(name, database, apply=disk.fill, clear=disk.empty, how=disk.how)
    if name == "worker_stall":
        pid = _child_pid(up, "sample")
        return Scenario(name, database, apply=lambda: _signal(pid, signal.SIGSTOP),
                        clear=lambda: _signal(pid, signal.SIGCONT), how="the sampler worker SIGSTOPped (no heartbeat)")
    return Scenario(name, database, apply=judge.hang.set, clear=judge.hang.clear,
                    how="the OpenAI-compatible judge endpoint accepts requests and never answers")


class _SqliteLock:
    """An exclusive SQLite lock held by this process: every odpo writer waits, then fails
    ('database is locked') until it is released: SQLite's form of a database outage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: Optional[sqlite3.Connection] = None

    def take(self) -> None:
        self.conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()


def _up_args(ctx: BenchContext, port: int, judge: str, tokens: int) -> list[str]:
    return ["up", "--port", str(port), "--model", ctx.model, "--device", ctx.device, "--dtype", ctx.dtype,
            "--seed", str(ctx.seed), "--queue-size", "8", "--prompts-per-batch", "4", "--max-new-tokens", str(tokens),
            "--judge", judge, "--auto-label", "--batch-size", "4", "--grace", "10", "--restart-delay", "1",
            "--judge-args", "--judge-timeout 3 --judge-retries 0 --poll-seconds 0.5",
            "--train-args", f"--max-completion-tokens {tokens} --poll-seconds 0.5"]


def _wait_version(cfg: Any, *, at_least: int, timeout_s: float, up: Child) -> int:
    """The latest committed version once it reaches `at_least` (or whatever it is at the timeout)."""
    from odpo.db import store

    deadline, latest = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        if not up.alive():
            raise RuntimeError(f"odpo up exited with code {up.proc.returncode}:\n{up.tail()}")
        try:
            db = cfg.open_db()
            try:
                with db.sessions() as s:
                    row = store.latest_adapter(s, run="default")
                    latest = row.version if row else 0
            finally:
                db.close()
        except Exception:  # noqa: BLE001 - the database may be what is down right now
            pass
        if latest >= at_least:
            return latest
        time.sleep(1.0)
    return latest


def _child_pid(up: Child, role: str) -> int:
    import psutil

    for proc in psutil.Process(up.proc.pid).children():
        if role in proc.cmdline():
            return proc.pid
    raise RuntimeError(f"odpo up has no {role} child")


def _signal(pid: int, sig: int) -> None:
    import os

    os.kill(pid, sig)


def _fill(result: BenchResult, rows: list[dict[str, Any]]) -> None:
    ran = [r for r in rows if r.get("status") != "skipped"]
    resumed = [r for r in ran if r.get("status") == "resumed" and r.get("up_alive")]
    result.metrics = {"scenarios": rows, "resumed_share": len(resumed) / len(ran) if ran else None,
                      "violations": sum(sum(r.get("violations", {}).values()) for r in ran),
                      "tracebacks": sum(r.get("tracebacks", 0) for r in ran)}
    for r in rows:
        if r.get("status") == "skipped":
            result.row(f"{r['scenario']} on {r['database']}", f"skipped: {r['why']}")
            continue
        result.row(f"{r['scenario']} on {r['database']} ({r.get('how', '')})",
                   f"{r.get('status')}; resumed {r.get('resume_seconds')} s after the fault cleared; versions "
                   f"{r.get('versions')}; tracebacks {r.get('tracebacks')}; violations {r.get('violations')}")
