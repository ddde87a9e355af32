"""`odpo bench labelers`: the real app under N simulated labelers voting over its HTTP API.

`odpo up` (web app + sampler + trainer, as a user starts it) runs as a child process on a free
127.0.0.1 port with a scratch data directory. Once its queue is full, N labeler threads each take
a pair (`/next_pair`), read it for `think_s` seconds, let a rule judge pick a side, and `/vote`,
which answers with the next pair. The wait for the next pair is the vote's round trip when the
queue had one; when it was empty, the labeler polls `/next_pair` and the whole wait counts as
queue-empty time. Every loop ends by itself at the deadline; the app is then stopped (SIGTERM to
its process group, SIGKILL after a grace period).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

from odpo.bench.common import BenchContext, BenchResult, Target, ratio, summarize
from odpo.bench.labeler_sim import (
    ApiClient,
    LabelerStats,
    Monitor,
    choose_side,
    idle_votes_ms,
    round_trips_ms,
    run_labeler,
)
from odpo.bench.workspace import Child, free_port, wait_http

log = logging.getLogger(__name__)

TARGETS = (Target("labelers: wait p50 while queue non-empty (ms)", "wait_ms_p50", "<=", 50.0),
           Target("labelers: wait p95 while queue non-empty (ms)", "wait_ms_p95", "<=", 200.0),
           Target("labelers: errors", "errors", "<=", 0.0))
# labelers, seconds, think_s, queue_size, max_new_tokens, prompts_per_batch
SIZES = {"full": (16, 300.0, 3.0, 64, 96, 16), "quick": (4, 120.0, 10.0, 16, 32, 4)}
DEFAULT_RULE = "rule:shorter"
START_TIMEOUT_S = 600.0
RATE_WINDOW_S = {True: 90.0, False: 180.0}  # by ctx.quick


def run(ctx: BenchContext, *, labelers: Optional[int] = None, seconds: Optional[float] = None,
        think_s: Optional[float] = None, queue_size: Optional[int] = None, max_new_tokens: Optional[int] = None,
        prompts_per_batch: Optional[int] = None, rule: str = DEFAULT_RULE, rate_labelers: int = 20,
        rate_window: Optional[float] = None, flooder: bool = False) -> BenchResult:
    from odpo.trainer.judges import load_judge

    size = SIZES["quick" if ctx.quick else "full"]
    n, duration, think = labelers or size[0], seconds or size[1], think_s or size[2]
    queue, tokens, batch = queue_size or size[3], max_new_tokens or size[4], prompts_per_batch or size[5]
    result = BenchResult(bench="labelers", quick=ctx.quick,
                         params={"model": ctx.model, "labelers": n, "seconds": duration, "think_s": think,
                                 "offered_labels_per_hour": n * 3600.0 / think, "queue_size": queue,
                                 "max_new_tokens": tokens, "prompts_per_batch": batch, "rule": rule,
                                 "train_batch_size": 8, "rate_labelers": rate_labelers, "flooder": flooder,
                                 "app": "odpo up (serve + a sample worker + train) as a child process"})
    judge = load_judge(rule)
    with ctx.scratch("labelers") as cfg:
        port = free_port()
        args = ["up", "--port", str(port), "--model", ctx.model, "--device", ctx.device, "--dtype", ctx.dtype,
                "--seed", str(ctx.seed), "--queue-size", str(queue), "--prompts-per-batch", str(batch),
                "--max-new-tokens", str(tokens), "--batch-size", "8", "--grace", "15",
                "--train-args", f"--max-completion-tokens {tokens} --poll-seconds 0.5"]
        child = Child.start(cfg, args, log_path=cfg.data_dir.parent / "up.log", threads=ctx.threads)
        try:
            url = f"http://127.0.0.1:{port}/"
            startup = wait_http(url, timeout_s=START_TIMEOUT_S, child=child)
            fill_s = wait_queue(url, want=queue, timeout_s=START_TIMEOUT_S, child=child)
            # queue full: the sampler idles and the trainer has no labels, so these are the floors
            floor, gc_floor = summarize(round_trips_ms(url)), summarize(round_trips_ms(url, gradio_client=True))
            idle_vote = summarize(idle_votes_ms(url))
            flood = Flooder(url) if flooder else None
            stats, monitor, elapsed = drive(url, n=n, seconds=duration, think_s=think, judge=judge, flood=flood)
        finally:
            code = child.stop()
        db = cfg.open_db()
        try:
            fill(result, stats=stats, monitor=monitor, elapsed=elapsed, db_facts=db_facts(db), labelers=n)
        finally:
            db.close()
    result.metrics.update(startup_seconds=startup, queue_fill_seconds=fill_s, app_exit_code=code,
                          idle_counters_round_trip_ms=floor, idle_counters_gradio_client_ms=gc_floor,
                          idle_vote_ms=idle_vote)
    if flooder:
        result.metrics.update(flood.counts)
        result.row("flooder: typed prompts accepted / refused; pair requests served / refused",
                   f"{flood.counts['asks_accepted']} / {flood.counts['asks_refused']}; "
                   f"{flood.counts['nexts_served']} / {flood.counts['nexts_refused']}")
    result.row("idle app: vote p50 (sampler and trainer idle)", _ms(idle_vote["p50"]))
    result.row("idle /counters round trip p50: plain HTTP / gradio_client",
               f"{_ms(floor['p50'])} / {_ms(gc_floor['p50'])}")
    result.check(TARGETS)
    if rate_labelers:  # the worker's pace with and without people on the app (bench/labelers_rate.py)
        from odpo.bench.labelers_rate import measure_rate

        measure_rate(ctx, result, labelers=rate_labelers, window_s=rate_window or RATE_WINDOW_S[ctx.quick],
                     think_s=1.0, tokens=tokens, batch=batch, judge=judge)
    return result


def wait_queue(url: str, *, want: int, timeout_s: float, child: Child) -> float:
    """Seconds until the app's queue holds `want` pairs (labeling starts with a full queue)."""
    client = ApiClient(url)
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not child.alive():
            raise RuntimeError(f"odpo up exited with code {child.proc.returncode}:\n{child.tail()}")
        if client.predict(api_name="/counters")["queue"] >= want:
            return time.monotonic() - started
        time.sleep(1.0)
    raise RuntimeError(f"the queue did not reach {want} pairs in {timeout_s:.0f}s:\n{child.tail()}")


class Flooder:
    """One labeler in a tight loop: a typed prompt, then a pair request, as fast as the app answers.
    Counts what was accepted and what the per-labeler limits refused."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.counts = {"asks_accepted": 0, "asks_refused": 0, "nexts_served": 0, "nexts_refused": 0}

    def run(self, *, deadline: float, stop: threading.Event) -> None:
        from odpo.bench.labeler_sim import ApiError

        client, i = ApiClient(self.url), 0
        while time.perf_counter() < deadline and not stop.is_set():
            for api, args, ok, refused in (("/ask_prompt", (f"flood {i}", "bench-flooder"), "asks_accepted",
                                            "asks_refused"),
                                           ("/next_pair", ("bench-flooder",), "nexts_served", "nexts_refused")):
                try:
                    client.predict(*args, api_name=api)
                    self.counts[ok] += 1
                except ApiError:
                    self.counts[refused] += 1
            i += 1
        client.close()


def drive(url: str, *, n: int, seconds: float, think_s: float, judge: Any,
          flood: Optional[Flooder] = None) -> tuple[list[LabelerStats], Monitor, float]:
    """Run n labeler threads and a queue monitor until the deadline; returns their stats."""
    stop = threading.Event()
    deadline = time.perf_counter() + seconds
    stats = [LabelerStats(name=f"bench-labeler-{i}") for i in range(n)]
    monitor = Monitor(url)
    threads = [threading.Thread(target=run_labeler, name=s.name, daemon=True,
                                kwargs={"url": url, "stats": s, "decide": lambda pair: choose_side(judge, pair),
                                        "deadline": deadline, "think_s": think_s, "stop": stop})
               for s in stats]
    threads.append(threading.Thread(target=monitor.run, kwargs={"deadline": deadline, "stop": stop},
                                    name="bench-monitor", daemon=True))
    if flood is not None:
        threads.append(threading.Thread(target=flood.run, kwargs={"deadline": deadline, "stop": stop},
                                        name="bench-flooder", daemon=True))
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(deadline - time.perf_counter(), 0) + 60)
    stop.set()
    return stats, monitor, time.perf_counter() - started


def db_facts(db: Any) -> dict[str, Any]:
    """What the database says happened: labels per labeler, trained steps' version lag."""
    from sqlalchemy import func, select

    from odpo.db.models import Adapter, Label, TrainStep

    with db.sessions() as s:
        labels = dict(s.execute(select(Label.labeler, func.count(Label.id)).where(Label.undone.is_(False))
                                .group_by(Label.labeler)).all())
        lags = [float(v) for v in s.scalars(select(TrainStep.version_lag).order_by(TrainStep.id))]
        versions = list(s.scalars(select(Adapter.version).order_by(Adapter.version)))
    return {"labels_by_labeler": labels, "version_lags": lags, "versions": versions}


def fill(result: BenchResult, *, stats: list[LabelerStats], monitor: Monitor, elapsed: float,
         db_facts: dict[str, Any], labelers: int) -> None:
    nonempty = [w * 1000 for s in stats for w, empty in s.waits if not empty]
    empty_waits = [w * 1000 for s in stats for w, empty in s.waits if empty]
    all_waits = nonempty + empty_waits
    waiting = sum(s.empty_seconds for s in stats)
    active = sum(s.active_seconds for s in stats)
    votes = sum(s.votes for s in stats)
    stored = sum(v for k, v in db_facts["labels_by_labeler"].items() if k.startswith("bench-labeler-"))
    errors = sum(len(s.errors) for s in stats)
    lag = summarize(db_facts["version_lags"])
    w = summarize(nonempty)
    m = result.metrics
    m.update(wait_ms_nonempty=w, wait_ms_all=summarize(all_waits), wait_ms_empty=summarize(empty_waits),
             wait_ms_p50=w["p50"], wait_ms_p95=w["p95"], queue_empty_share=ratio(waiting, active),
             monitor_queue_zero_share=monitor.zero_share(), votes=votes, labels_stored=stored, errors=errors,
             error_samples=[e for s in stats for e in s.errors][:5], labeling_seconds=elapsed,
             labels_per_hour=ratio(stored * 3600.0, elapsed), version_lag=lag,
             trained_steps=len(db_facts["version_lags"]), versions_committed=db_facts["versions"],
             choices=_merge([s.choices for s in stats]))
    result.row("labelers x think time", f"{labelers} x {result.params['think_s']:g} s")
    result.row("wait p50 / p95 (queue non-empty)", f"{_ms(w['p50'])} / {_ms(w['p95'])} (n={w['n']})")
    result.row("waits on an empty queue", f"{len(empty_waits)}, p50 {_ms(summarize(empty_waits)['p50'])}")
    result.row("queue-empty share of labeler time", m["queue_empty_share"])
    result.row("votes sent / labels stored / errors", f"{votes} / {stored} / {errors}")
    offered = result.params["offered_labels_per_hour"]
    result.row("labels/hour (offered)", f"{m['labels_per_hour'] or 0:.0f} ({offered:.0f})")
    result.row("trained steps, version lag mean / max",
               f"{len(db_facts['version_lags'])}, {_f(lag['mean'])} / {_f(lag['max'])}")


def _merge(counters: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counters:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _f(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"
