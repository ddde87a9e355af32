"""`odpo bench learn`: does a fixed label budget move the policy, online vs offline?

A rule judge plays the labeler (a rule: or py: spec; rule:finished_and_short by default). Both
arms use odpo's real parts in one process, driven step by step so the run is reproducible: the
Sampler (its own model copy and reload watcher), the judge worker's `judge_batch`, and the
DPOTrainer (its own copy, committing a version per step).

- online:  sample a batch from the serving policy, label it, train every full batch of trainable
           labels, hot-swap the new version into the sampler, repeat until the budget is spent.
- offline: sample the whole budget from the base once, label it, then train the same way.

Ties and both-bad labels count against the budget but are not trained on (odpo's default), so
each arm reports its steps. Both final policies are evaluated against the base with
trainer.evaluate.run_eval on the held-out starter prompts (same prompts and seed for both arms),
judged by the same rule: win rate with ties as half, Wilson 95% interval.

Which rule shows what on-policy labels add? Two built-in rules (trainer/judges/rule.py) were
measured on SmolLM2-135M (2 CPU cores):
- say_the_early ("the response that says 'the' earlier wins") is visible in the first tokens and
  decides most pairs, but 42% of the base model's samples already satisfy it early: pairs from the
  base carry the same signal, and at 200 labels online and offline tie (0.86 vs 0.87 vs base).
- finished_and_short (the default: an answer that ends its sentence beats one cut off, then the
  shorter wins) rewards what the base rarely does within the limit (~1 in 5 of its 48-token
  samples end). The online policy's own pairs contrast finished answers ever more often as it
  learns, offline pairs from the base seldom do: online 1.00 vs offline 0.86 with 96 labels,
  0.98 vs 0.90 with 200 (64 tokens).
A pure length rule is invisible once both samples hit max_new_tokens, hence the finished-first
tier. A plain first-word rule (rule:regex:^The\b) left ~80% of pairs tied: a budget spent on ties.

With `load_in_4bit` both arms sample and train on a 4-bit NF4 base (`--load-in-4bit`, QLoRA) and
the win rates are those of the 4-bit policies: whether the loop still learns when quantized.
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Any, Optional

from odpo.bench.common import BenchContext, BenchResult, Target
from odpo.bench.workspace import import_starter_prompts

log = logging.getLogger(__name__)

TARGETS = (Target("learn: online win rate vs base", "online_win_rate", ">=", 0.80),
           Target("learn: online minus offline win rate", "online_minus_offline", ">=", 0.10))
# label budget, max_new_tokens, eval prompts, learning rate (both arms use the same)
SIZES = {"full": (200, 96, 64, 5e-4), "quick": (96, 64, 32, 1e-3)}
DEFAULT_RULE = "rule:finished_and_short"
ARMS = ("online", "offline")


def run(ctx: BenchContext, *, rule: str = DEFAULT_RULE, budget: Optional[int] = None, batch_size: int = 8,
        max_new_tokens: Optional[int] = None, eval_n: Optional[int] = None, lr: Optional[float] = None,
        beta: float = 0.1, load_in_4bit: bool = False) -> BenchResult:
    from odpo.trainer.judges import load_judge

    size_b, size_t, size_n, size_lr = SIZES["quick" if ctx.quick else "full"]
    budget, tokens, eval_n, lr = budget or size_b, max_new_tokens or size_t, eval_n or size_n, lr or size_lr
    params = {"model": ctx.model, "rule": rule, "label_budget": budget, "batch_size": batch_size,
              "max_new_tokens": tokens, "eval_n": eval_n, "lr": lr, "beta": beta, "temperature": 0.9,
              "eval_temperature": 0.7, "seed": ctx.seed, "load_in_4bit": load_in_4bit}
    result = BenchResult(bench="learn", quick=ctx.quick, params=params)
    judge = load_judge(rule)
    arms = {}
    for mode in ARMS:
        arms[mode] = run_arm(ctx, mode, judge=judge, budget=budget, batch=batch_size, tokens=tokens,
                             eval_n=eval_n, lr=lr, beta=beta, load_in_4bit=load_in_4bit)
        gc.collect()
    fill(result, arms)
    if load_in_4bit:
        result.notes.append("both arms sampled, trained and were evaluated on a 4-bit NF4 base (--load-in-4bit)")
    result.check(TARGETS)
    return result


def run_arm(ctx: BenchContext, mode: str, *, judge: Any, budget: int, batch: int, tokens: int, eval_n: int,
            lr: float, beta: float, load_in_4bit: bool = False) -> dict[str, Any]:
    """One arm in its own scratch database: loop, then evaluate its final version vs the base."""
    from odpo.app.config import ServeConfig
    from odpo.app.serve import build_sampler, load_policy
    from odpo.trainer.train_config import TrainConfig
    from odpo.trainer.train_loop import DPOTrainer

    with ctx.scratch(f"learn-{mode}") as cfg:
        import_starter_prompts(cfg)
        db = cfg.open_db()
        serve_cfg = ServeConfig(model=ctx.model, device=ctx.device, dtype=ctx.dtype, seed=ctx.seed,
                                queue_size=batch if mode == "online" else budget, prompts_per_batch=batch,
                                max_new_tokens=tokens, temperature=0.9, load_in_4bit=load_in_4bit)
        model, tokenizer = load_policy(cfg, serve_cfg, db)
        sampler = build_sampler(cfg, serve_cfg, db, model=model, tokenizer=tokenizer)
        sampler.watcher.load_initial()
        trainer = DPOTrainer(TrainConfig(model=ctx.model, batch_size=batch, lr=lr, beta=beta, seed=ctx.seed,
                                         max_completion_tokens=tokens, device=ctx.device, dtype=ctx.dtype,
                                         load_in_4bit=load_in_4bit),
                             db=db, adapters_dir=cfg.adapters_dir(), model_cache_dir=cfg.model_cache_dir)
        trainer.start()
        try:
            loop = online_loop if mode == "online" else offline_loop
            started = time.perf_counter()
            arm = loop(db=db, sampler=sampler, trainer=trainer, judge=judge, budget=budget, batch=batch)
            arm["wall_seconds"] = time.perf_counter() - started
            arm.update(evaluate(db, trainer, judge=judge, n=eval_n, tokens=tokens, seed=ctx.seed,
                                base_dir=cfg.data_dir))
        finally:
            trainer.close()
            db.close()
    return arm


class _Counter:
    """Labels the judge worker stored, by choice, plus where the time went."""

    def __init__(self, judge: Any) -> None:
        from odpo.trainer.judge_worker import JudgeWorkerConfig, WorkerStats
        from odpo.trainer.judges import judge_labeler_name

        self.judge, self.stats, self.config = judge, WorkerStats(), JudgeWorkerConfig(poll_seconds=0)
        self.labeler = judge_labeler_name(judge.spec)
        self.seconds = {"sample": 0.0, "label": 0.0, "train": 0.0, "swap": 0.0}

    def label(self, db: Any, limit: int) -> int:
        from odpo.trainer.judge_worker import judge_batch

        t0 = time.perf_counter()
        handled = judge_batch(db, self.judge, config=self.config, stats=self.stats, labeler=self.labeler,
                              limit=limit)
        self.seconds["label"] += time.perf_counter() - t0
        return handled

    def timed(self, key: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.seconds[key] += time.perf_counter() - t0
        return out

    def train_all(self, trainer: Any) -> int:
        steps = 0
        while self.timed("train", trainer.train_available):
            steps += 1
        return steps


def online_loop(*, db: Any, sampler: Any, trainer: Any, judge: Any, budget: int, batch: int) -> dict[str, Any]:
    """Sample from the serving version, label, train, hot-swap; until the budget is spent."""
    c = _Counter(judge)
    steps, served = 0, []
    while c.stats.labeled < budget:
        made = c.timed("sample", sampler.step)
        handled = c.label(db, min(batch, budget - c.stats.labeled))
        if not made and not handled:
            log.warning("online arm: nothing left to sample or label; stopping at %d labels", c.stats.labeled)
            break
        steps += c.train_all(trainer)
        c.timed("swap", sampler.watcher.poll_once)
        served.append(sampler.watcher.serving_version)
    return _arm_facts(c, trainer, steps=steps, served=served)


def offline_loop(*, db: Any, sampler: Any, trainer: Any, judge: Any, budget: int, batch: int) -> dict[str, Any]:
    """Sample the whole budget from the base first, label it all, then train on it."""
    c = _Counter(judge)
    while sampler.queue < budget:
        if not c.timed("sample", sampler.step):
            break
    while c.stats.labeled < budget:
        if not c.label(db, min(batch, budget - c.stats.labeled)):
            break
    steps = c.train_all(trainer)
    return _arm_facts(c, trainer, steps=steps, served=[sampler.watcher.serving_version])


def _arm_facts(c: _Counter, trainer: Any, *, steps: int, served: list[int]) -> dict[str, Any]:
    return {"labels_used": c.stats.labeled, "choices": dict(c.stats.choices), "steps": steps,
            "final_version": trainer.version, "sampler_versions": served,
            "seconds": {k: round(v, 3) for k, v in c.seconds.items()}}


def evaluate(db: Any, trainer: Any, *, judge: Any, n: int, tokens: int, seed: int, base_dir: Any) -> dict[str, Any]:
    """Final version vs the base (v0) on held-out prompts, from the trainer's own weights."""
    from odpo.trainer.evaluate import run_eval
    from odpo.trainer.generation import SamplingParams

    if trainer.version == 0:
        return {"win_rate": None, "eval": None, "eval_note": "no DPO step was taken; the policy is the base"}
    t0 = time.perf_counter()
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=tokens, seed=seed + 7919)
    res = run_eval(db, policy=trainer.model, tokenizer=trainer.tokenizer, version_a=trainer.version, version_b=0,
                   judge=judge, n=n, params=params, holds=trainer.version, base_dir=base_dir)
    wr = res.win_rate
    return {"win_rate": wr.rate, "eval_seconds": time.perf_counter() - t0,
            "eval": {"wins": wr.wins, "losses": wr.losses, "ties": wr.ties, "n": wr.n, "low": wr.low,
                     "high": wr.high, "abstained": res.abstained, "examples": res.details.get("examples")}}


def fill(result: BenchResult, arms: dict[str, dict[str, Any]]) -> None:
    on, off = arms["online"], arms["offline"]
    diff = None if on["win_rate"] is None or off["win_rate"] is None else on["win_rate"] - off["win_rate"]
    result.metrics = {"online_win_rate": on["win_rate"], "offline_win_rate": off["win_rate"],
                      "online_minus_offline": diff, "arms": arms}
    for mode, arm in arms.items():
        ev = arm.get("eval")
        interval = f" [{ev['low']:.2f}, {ev['high']:.2f}] (W{ev['wins']}/L{ev['losses']}/T{ev['ties']})" if ev else ""
        rate = "-" if arm["win_rate"] is None else f"{arm['win_rate']:.2f}"
        result.row(f"{mode}: win rate vs base", rate + interval)
        result.row(f"{mode}: labels / DPO steps / wall", f"{arm['labels_used']} / {arm['steps']} / "
                                                          f"{arm['wall_seconds']:.0f} s")
        result.row(f"{mode}: label choices", ", ".join(f"{k} {v}" for k, v in sorted(arm["choices"].items())))
    result.row("online minus offline", diff)
    for mode, arm in arms.items():
        if arm.get("eval_note"):
            result.notes.append(f"{mode}: {arm['eval_note']}")
