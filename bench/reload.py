"""`odpo bench reload`: hot-swap time and commit-to-serving latency of new adapter versions.

A real Sampler (model, reload watcher and sampler threads, as `odpo serve` runs them) keeps
generating while a second copy of the model, standing in for the trainer, commits versions with
the trainer's own writer (`trainer.policy.checkpoint.write_version` + `store.commit_adapter_version`).
Each version gets fresh random LoRA weights. Per version we record the watcher's own numbers
(the `reloads` table: swap ms, commit-to-serving ms measured from the adapter row) and our own
stopwatch from the committed transaction until `sampler.state()` reports the new version.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any, Optional

from odpo.bench.common import BenchContext, BenchResult, Target, summarize
from odpo.bench.workspace import import_starter_prompts

log = logging.getLogger(__name__)

TARGETS = (Target("reload: swap p95 (ms)", "swap_ms_p95", "<=", 100.0),
           Target("reload: commit-to-serving p95 (ms)", "commit_to_serving_ms_p95", "<=", 2000.0))
# versions, max_new_tokens, prompts_per_batch, mean seconds between commits (~ a trainer's step time)
SIZES = {"full": (30, 96, 16, 2.0), "quick": (10, 32, 4, 8.0)}
SERVE_TIMEOUT_S = 30.0


def run(ctx: BenchContext, *, versions: Optional[int] = None, max_new_tokens: Optional[int] = None,
        prompts_per_batch: Optional[int] = None, interval_s: Optional[float] = None) -> BenchResult:
    size_n, size_t, size_b, size_i = SIZES["quick" if ctx.quick else "full"]
    n, tokens, batch = versions or size_n, max_new_tokens or size_t, prompts_per_batch or size_b
    interval = size_i if interval_s is None else interval_s
    result = BenchResult(bench="reload", quick=ctx.quick,
                         params={"model": ctx.model, "versions": n, "max_new_tokens": tokens,
                                 "prompts_per_batch": batch, "reload_poll_s": 0.5, "mean_commit_interval_s": interval})
    with ctx.scratch("reload") as cfg:
        observed, writes, rows, extra = _drive(ctx, cfg, versions=n, tokens=tokens, batch=batch, interval=interval)
    fill(result, observed_ms=observed, write_ms=writes, reload_rows=rows, extra=extra)
    result.check(TARGETS)
    return result


def _drive(ctx: BenchContext, cfg: Any, *, versions: int, tokens: int, batch: int,
           interval: float) -> tuple[list[float], list[float], list[dict[str, float]], dict[str, Any]]:
    from odpo.app.config import ServeConfig
    from odpo.app.sampler_worker import build_sampler, load_policy

    import_starter_prompts(cfg)
    db = cfg.open_db()
    serve_cfg = ServeConfig(model=ctx.model, device=ctx.device, dtype=ctx.dtype, queue_size=100_000,
                            prompts_per_batch=batch, max_new_tokens=tokens, seed=ctx.seed, reload_poll_s=0.5)
    model, tokenizer = load_policy(cfg, serve_cfg, db)
    sampler = build_sampler(cfg, serve_cfg, db, model=model, tokenizer=tokenizer)
    writer, optimizer = _trainer_side(ctx)
    base_ptr = model.get_input_embeddings().weight.data_ptr()
    observed: list[float] = []
    writes: list[float] = []
    rng = random.Random(ctx.seed)
    sampler.start()
    try:
        _wait(lambda: sampler.state()["generating"] or sampler.pairs_made > 0, SERVE_TIMEOUT_S * 4)
        for version in range(1, versions + 1):
            write_ms, committed_at = commit_version(cfg, db, writer, optimizer, version=version, seed=ctx.seed)
            writes.append(write_ms)
            served = _wait(lambda v=version: sampler.state()["serving_version"] == v, SERVE_TIMEOUT_S)
            observed.append((served - committed_at) * 1000 if served else float("nan"))
            # the trainer's cadence, jittered so commits land at random phases of poll and batch
            time.sleep(rng.uniform(0.5, 1.5) * interval)
        state = sampler.state()
    finally:
        sampler.stop()
    rows = reload_rows(db)
    extra = {"base_weights_reloaded": model.get_input_embeddings().weight.data_ptr() != base_ptr,
             "interrupted_batches": state.get("interrupted_batches"), "pairs_made": state.get("pairs_made"),
             "last_batch_seconds": state.get("last_batch_seconds"),
             "missed_versions": sum(1 for o in observed if o != o)}
    db.close()
    return observed, writes, rows, extra


def _trainer_side(ctx: BenchContext) -> tuple[Any, Any]:
    """The trainer's model and optimizer: what write_version saves."""
    from odpo.bench.model_setup import load_policy as load_bench_policy
    from odpo.trainer.training.step import make_optimizer
    from odpo.trainer.training.train_config import TrainConfig

    policy = load_bench_policy(ctx)
    return policy.model, make_optimizer(policy.model, TrainConfig(model=ctx.model))


def commit_version(cfg: Any, db: Any, model: Any, optimizer: Any, *, version: int, seed: int) -> tuple[float, float]:
    """New random LoRA weights, written and committed exactly as the trainer does; returns
    (write ms, perf_counter time right after the commit transaction)."""
    import torch

    from odpo.db import store
    from odpo.trainer.policy import checkpoint as ckpt

    gen = torch.Generator().manual_seed(seed * 100_003 + version)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    started = time.perf_counter()
    path = ckpt.write_version(model=model, optimizer=optimizer, adapters_dir=cfg.adapters_dir(), version=version,
                              state={"version": version, "bench": "reload"})
    write_ms = (time.perf_counter() - started) * 1000
    with db.sessions.begin() as s:
        store.commit_adapter_version(s, run="default", version=version, path=str(path), parent=version - 1,
                                     step=version, label_steps={}, metrics={})
    return write_ms, time.perf_counter()


def reload_rows(db: Any) -> list[dict[str, float]]:
    """The watcher's own records, one per swap."""
    from sqlalchemy import select

    from odpo.db.models import Reload

    with db.sessions() as s:
        return [{"version": r.version, "swap_ms": r.swap_ms, "commit_to_serving_ms": r.commit_to_serving_ms}
                for r in s.scalars(select(Reload).order_by(Reload.id))]


def _wait(predicate: Any, timeout_s: float) -> Optional[float]:
    """perf_counter time when predicate() became true (polled every 2 ms), or None on timeout."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if predicate():
            return time.perf_counter()
        time.sleep(0.002)
    return None


def fill(result: BenchResult, *, observed_ms: list[float], write_ms: list[float],
         reload_rows: list[dict[str, float]], extra: dict[str, Any]) -> None:
    swap = summarize([r["swap_ms"] for r in reload_rows])
    latency = summarize([r["commit_to_serving_ms"] for r in reload_rows])
    seen = summarize([o for o in observed_ms if o == o])
    result.metrics = {"versions_committed": len(observed_ms), "swaps_recorded": len(reload_rows),
                      "swap_ms": swap, "commit_to_serving_ms": latency, "observed_commit_to_serving_ms": seen,
                      "write_version_ms": summarize(write_ms), "swap_ms_p50": swap["p50"], "swap_ms_p95": swap["p95"],
                      "commit_to_serving_ms_p50": latency["p50"], "commit_to_serving_ms_p95": latency["p95"],
                      **extra}
    result.row("versions committed / swaps recorded", f"{len(observed_ms)} / {len(reload_rows)}")
    result.row("swap p50 / p95", f"{_ms(swap['p50'])} / {_ms(swap['p95'])}")
    result.row("commit-to-serving p50 / p95 (watcher)", f"{_ms(latency['p50'])} / {_ms(latency['p95'])}")
    result.row("commit-to-serving p50 / p95 (bench stopwatch)", f"{_ms(seen['p50'])} / {_ms(seen['p95'])}")
    result.row("trainer write_version p50", _ms(summarize(write_ms)["p50"]))
    result.row("base weights reloaded", extra.get("base_weights_reloaded"))
    result.row("sampler batch seconds (last) / batches interrupted by a swap",
               f"{_s(extra.get('last_batch_seconds'))} / {extra.get('interrupted_batches')}")
    result.notes.append("The sampler kept generating throughout. Commit-to-serving = the watcher's 0.5 s poll + "
                        "the running batch giving way at its next decode step + the swap; after "
                        "max_interrupts_in_a_row interrupted batches in a row the sampler finishes its batch "
                        "first (no starvation), so commits closer together than a batch wait up to a batch.")


def _s(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f} ms"
