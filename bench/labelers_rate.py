"""The labelers bench's second part: does a sampler worker keep its pace while people use the app?

When the sampler was a thread of the web server, 20 labelers polling over HTTP cut it from 1.9
pairs/s to 0.18 (web requests and generation fought over one process). Now `odpo sample` is its
own process. This runs `odpo up --no-train` with a queue that never fills (so the worker samples
without pause), counts the pairs it stores in a window with nobody on the app, then again while N
labelers vote after `think_s` and, facing an empty queue, ask `/next_pair` again every second (as
the page's timer does), and reports both rates, their ratio (target: >= 0.8) and the CPU cores the
worker, the web app and this bench's own labeler threads used in each window (all on one machine).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from odpo.bench.common import BenchContext, BenchResult, Target
from odpo.bench.labeler_sim import LabelerStats, choose_side, run_labeler
from odpo.bench.workspace import Child, free_port, wait_http

log = logging.getLogger(__name__)

RATE_TARGET = Target("labelers: worker pairs/min with labelers polling / alone", "rate_ratio", ">=", 0.8)
PAGE_POLL_S = 1.0  # a labeler facing an empty queue asks again as often as the page's timer (app/ui/label.py)
NEVER_FULL = 100_000  # queue size: the worker never pauses for a full queue
START_TIMEOUT_S = 600.0


def measure_rate(ctx: BenchContext, result: BenchResult, *, labelers: int, window_s: float, think_s: float,
                 tokens: int, batch: int, judge: Any) -> None:
    """Pairs/min of one worker alone and under `labelers` polling labelers, into result."""
    with ctx.scratch("labelers-rate") as cfg:
        port = free_port()
        args = ["up", "--no-train", "--port", str(port), "--model", ctx.model, "--device", ctx.device,
                "--dtype", ctx.dtype, "--seed", str(ctx.seed), "--queue-size", str(NEVER_FULL),
                "--prompts-per-batch", str(batch), "--max-new-tokens", str(tokens), "--grace", "15"]
        child = Child.start(cfg, args, log_path=cfg.data_dir.parent / "up-rate.log", threads=ctx.threads)
        db = cfg.open_db()
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_http(url, timeout_s=START_TIMEOUT_S, child=child)
            _wait_pairs(db, 1, child)  # the worker has loaded and sampled: the rate is steady from here
            cpu = CpuByRole(child.proc.pid)
            alone, cpu_alone = _rate(db, window_s, child), cpu.lap()
            stop, stats = threading.Event(), [LabelerStats(name=f"rate-labeler-{i}") for i in range(labelers)]
            deadline = time.perf_counter() + window_s + 30
            threads = [threading.Thread(target=run_labeler, daemon=True, kwargs={
                "url": url, "stats": s, "decide": lambda pair: choose_side(judge, pair), "deadline": deadline,
                "think_s": think_s, "stop": stop, "poll_s": PAGE_POLL_S}) for s in stats]
            for t in threads:
                t.start()
            time.sleep(5)  # every labeler is polling before the window opens
            cpu.lap()
            loaded, cpu_loaded = _rate(db, window_s, child), cpu.lap()
            stop.set()
            for t in threads:
                t.join(30)
        finally:
            child.stop()
            db.close()
    votes = sum(s.votes for s in stats)
    result.metrics.update(rate_labelers=labelers, rate_window_s=window_s, worker_pairs_per_min_alone=alone,
                          worker_pairs_per_min_with_labelers=loaded, rate_poll_s=PAGE_POLL_S,
                          rate_ratio=round(loaded / alone, 3) if alone else None, rate_votes=votes,
                          cpu_share_alone=cpu_alone, cpu_share_with_labelers=cpu_loaded)
    result.row(f"worker pairs/min: alone / with {labelers} labelers polling",
               f"{alone:.1f} / {loaded:.1f} ({result.metrics['rate_ratio']}x; {votes} votes)")
    result.row("CPU cores used alone / with labelers (sample, serve, this bench)",
               " / ".join(", ".join(f"{cpu.get(r, 0):.2f}" for r in ("sample", "serve", "bench"))
                          for cpu in (cpu_alone, cpu_loaded)))
    result.targets.append(RATE_TARGET.evaluate(result.metrics))


def _count_pairs(db: Any) -> int:
    from sqlalchemy import func, select

    from odpo.db.models import Pair

    with db.sessions() as s:
        return s.scalar(select(func.count(Pair.id))) or 0


def _wait_pairs(db: Any, n: int, child: Child) -> None:
    started = time.monotonic()
    while _count_pairs(db) < n:
        if not child.alive() or time.monotonic() - started > START_TIMEOUT_S:
            raise RuntimeError(f"no pairs from the worker:\n{child.tail()}")
        time.sleep(1.0)


def _rate(db: Any, window_s: float, child: Child) -> float:
    """Pairs stored per minute over `window_s`, from the database's own count."""
    before, started = _count_pairs(db), time.monotonic()
    while time.monotonic() - started < window_s:
        if not child.alive():
            raise RuntimeError(f"odpo up exited:\n{child.tail()}")
        time.sleep(1.0)
    return (_count_pairs(db) - before) * 60.0 / (time.monotonic() - started)


class CpuByRole:
    """CPU cores each role used since the last lap (utime + stime from /proc), so the report says
    where the machine's cores went: the worker, the web app, or this bench's own labeler threads."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._last, self._at = self._seconds(), time.monotonic()

    def lap(self) -> dict[str, float]:
        now, at = self._seconds(), time.monotonic()
        span = max(at - self._at, 1e-9)
        used = {role: round((now.get(role, 0.0) - self._last.get(role, 0.0)) / span, 2) for role in now}
        self._last, self._at = now, at
        return used

    def _seconds(self) -> dict[str, float]:
        import os

        from odpo.bench.memory import _argv, descendants, role_of

        ticks = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {"bench": sum(os.times()[:2])}
        for pid in descendants(self.root):
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            role = role_of(_argv(pid))
            out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
        return out
