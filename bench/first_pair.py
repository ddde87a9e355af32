"""`odpo bench first-pair`: seconds from `odpo up` to the page answering and to the first pair.

Each run starts `odpo up --no-train` on a fresh scratch data directory (the converted model is
linked in, so nothing converts; the starter prompts are imported as on a first start) and asks
`/next_pair` every 0.25 s until a pair comes back, as a labeler with the page open would see it.
The target (issue 13): the first pair within 15 s of the start on a converted model.
"""
from __future__ import annotations

import logging
import time
import urllib.request
from typing import Optional

from odpo.bench.common import BenchContext, BenchResult, Target, summarize
from odpo.bench.labeler_sim import ApiClient
from odpo.bench.workspace import Child, free_port

log = logging.getLogger(__name__)

TARGET = Target("first pair after odpo up starts (s, median)", "first_pair_s_p50", "<=", 15.0)
TIMEOUT_S = 600.0


def run(ctx: BenchContext, *, runs: Optional[int] = None) -> BenchResult:
    runs = runs or (2 if ctx.quick else 5)
    result = BenchResult(bench="first-pair", quick=ctx.quick,
                         params={"model": ctx.model, "runs": runs, "app": "odpo up --no-train (serve + one worker)"})
    pages, pairs = [], []
    for i in range(runs):
        page, pair = measure_once(ctx)
        log.info("run %d: page %.1f s, first pair %.1f s", i + 1, page, pair)
        pages.append(page)
        pairs.append(pair)
    page_s, pair_s = summarize(pages), summarize(pairs)
    result.metrics.update(page_s=pages, first_pair_s=pairs, first_pair_s_p50=pair_s["p50"], page_s_p50=page_s["p50"])
    result.row("page answers after (s): each run", ", ".join(f"{p:.1f}" for p in pages))
    result.row("first pair after (s): each run", ", ".join(f"{p:.1f}" for p in pairs))
    result.check([TARGET])
    return result


def measure_once(ctx: BenchContext) -> tuple[float, float]:
    """(page seconds, first pair seconds) of one fresh `odpo up`."""
    with ctx.scratch("first-pair") as cfg:
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        started = time.monotonic()
        child = Child.start(cfg, ["up", "--no-train", "--port", str(port), "--model", ctx.model, "--device",
                                  ctx.device, "--dtype", ctx.dtype, "--seed", str(ctx.seed)],
                            log_path=cfg.data_dir.parent / "up.log", threads=ctx.threads)
        try:
            page = _wait(lambda: urllib.request.urlopen(url, timeout=2).status == 200, started, child)
            client = ApiClient(url)
            pair = _wait(lambda: client.predict("bench", api_name="/next_pair")["pair"] is not None, started, child)
        finally:
            child.stop()
    return page, pair


def _wait(ready, started: float, child: Child) -> float:
    while time.monotonic() - started < TIMEOUT_S:
        if not child.alive():
            raise RuntimeError(f"odpo up exited:\n{child.tail()}")
        try:
            if ready():
                return time.monotonic() - started
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.25)
    raise RuntimeError(f"nothing after {TIMEOUT_S:.0f} s:\n{child.tail()}")
