"""`odpo bench learn`: what a fixed label budget buys, per training mode and loss: the learn table.

A rule judge plays the labeler (rule: or py: specs). Every arm uses odpo's real parts in one
process, driven step by step so a run is reproducible: the Sampler (its own model copy and reload
watcher), the judge worker's `judge_batch`, and the DPOTrainer (its own copy). The grid is
rules x losses x modes x seeds, each arm in its own scratch database, with the same budget:

- online:    sample a batch from the serving policy, label it, train every full batch of trainable
             labels, commit a version per step, hot-swap it into the sampler, repeat.
- iterative: the sampler serves one frozen version while a round of `round_labels` is sampled and
             labeled; the trainer then trains on exactly that round and commits ONE version, which
             the sampler swaps in for the next round (RLHFlow-style rounds; `odpo train --mode
             iterative` in the product).
- offline:   sample the whole budget from the base once, then label and train on it in order.

Losses: sigmoid (DPO, beta 0.1) and simpo (reference-free, beta 2.0, gamma 1.0), each with its own
default beta unless --beta is given. The learning curve: after 50, 100, ... labels spent (the
`curve` points), the policy of that moment is evaluated against the base on the held-out starter
prompts with trainer.evaluation.win_rate.run_eval, judged by the same rule (ties as half, Wilson 95 %). The
table pools wins/losses/ties over seeds (learn_table.py). Ties and both-bad labels count against
the budget but are not trained on (odpo's default).

Which rules show what on-policy labels add (measured on SmolLM2-135M, 2 CPU cores, one seed):
- finished_and_short (default: an answer that ends its sentence beats one cut off, then the
  shorter wins) rewards what the base rarely does within the limit (~1 in 5 of its samples end):
  online 1.00 vs offline 0.86 with 96 labels, 0.98 vs 0.90 with 200 (one seed each); over three
  seeds with eval n 48 each, 0.95 vs 0.93 at 96 labels: the direction holds, the gap is small.
- say_the_early ("the response that says 'the' earlier wins") is visible in the first tokens, but
  42 % of the base model's samples already satisfy it: online and offline tied at 200 labels.

With `load_in_4bit` every arm samples and trains on a 4-bit NF4 base (QLoRA).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from odpo.bench.common import BenchContext, BenchResult
from odpo.bench.learn_table import MODES, TARGETS, arm_label, fill, write_curve_plot
from odpo.bench.workspace import import_starter_prompts
from odpo.trainer.options import DEFAULT_PASSES, DEFAULT_TEMPERATURE, EVAL_TEMPERATURE, EVAL_TOP_P

log = logging.getLogger(__name__)

DEFAULT_RULE = "rule:finished_and_short"
SECOND_RULE = "rule:say_the_early"
LOSSES = ("sigmoid", "simpo")
# online arms whose sampler draws `candidates` per prompt and shows the selector's pair
SELECTED_MODES = ("online+margin", "online+uncertain", "online+diverse")


@dataclass(frozen=True)
class Grid:
    """One size of the table: what runs and how big each arm is."""

    rules: tuple[str, ...]
    losses: tuple[str, ...]
    modes: tuple[str, ...]
    seeds: int
    budget: int
    curve: tuple[int, ...]
    max_new_tokens: int
    eval_n: int
    lr: float


SIZES = {"full": Grid(rules=(DEFAULT_RULE, SECOND_RULE), losses=LOSSES, modes=MODES, seeds=3, budget=200,
                      curve=(50, 100, 150, 200), max_new_tokens=64, eval_n=48, lr=5e-4),
         "quick": Grid(rules=(DEFAULT_RULE,), losses=("sigmoid",), modes=MODES, seeds=1, budget=48,
                       curve=(24, 48), max_new_tokens=48, eval_n=24, lr=1e-3)}


@dataclass(frozen=True)
class ArmSpec:
    """Everything one arm needs besides the model: same for every arm of a run but rule/loss/mode/seed."""

    rule: str
    loss: str
    mode: str
    seed: int
    budget: int
    batch: int
    tokens: int
    eval_n: int
    lr: float
    beta: Optional[float]
    curve: tuple[int, ...]
    round_labels: int
    load_in_4bit: bool = False
    candidates: int = 4  # per prompt, in the online+SELECTOR modes
    passes: int = DEFAULT_PASSES  # optimizer updates per batch of labels (TrainConfig.passes)

    @property
    def loop(self) -> str:
        """online, iterative or offline: how the arm spends its budget."""
        return self.mode.partition("+")[0]

    @property
    def selector(self) -> str:
        """The pair selector of an online+SELECTOR arm; random (two candidates) otherwise."""
        return self.mode.partition("+")[2] or "random"


def resolve_grid(quick: bool, **overrides: Any) -> Grid:
    """The size's grid with the options the user gave (None/empty = the size's own)."""
    base = SIZES["quick" if quick else "full"]
    given = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in overrides.items() if v}
    grid = Grid(**{**base.__dict__, **given})
    curve = tuple(sorted({p for p in grid.curve if p < grid.budget} | {grid.budget}))
    return Grid(**{**grid.__dict__, "curve": curve})


def run(ctx: BenchContext, *, rules: Sequence[str] = (), losses: Sequence[str] = (), modes: Sequence[str] = (),
        seeds: Optional[int] = None, budget: Optional[int] = None, curve: Sequence[int] = (), batch_size: int = 8,
        max_new_tokens: Optional[int] = None, eval_n: Optional[int] = None, lr: Optional[float] = None,
        beta: Optional[float] = None, round_labels: Optional[int] = None, load_in_4bit: bool = False,
        candidates: int = 4, passes: int = DEFAULT_PASSES) -> BenchResult:
    from odpo.trainer.evaluation.win_rate import BaseAnswers
    from odpo.trainer.judges import load_judge

    grid = resolve_grid(ctx.quick, rules=rules, losses=losses, modes=modes, seeds=seeds, budget=budget, curve=curve,
                        max_new_tokens=max_new_tokens, eval_n=eval_n, lr=lr)
    rounds = round_labels or grid.curve[0]
    params = {**grid.__dict__, "model": ctx.model, "batch_size": batch_size, "beta": beta or "the loss's default",
              "round_labels": rounds, "temperature": DEFAULT_TEMPERATURE, "eval_temperature": EVAL_TEMPERATURE,
              "first_seed": ctx.seed, "load_in_4bit": load_in_4bit, "candidates": candidates, "passes": passes}
    result = BenchResult(bench="learn", quick=ctx.quick, params=params)
    partial = ctx.out_dir / f"learn{'-quick' if ctx.quick else ''}-arms.partial.json"
    arms: list[dict[str, Any]] = []
    base_answers = BaseAnswers()  # every arm evaluates against the same base: its answers once per seed
    for rule in grid.rules:
        judge = load_judge(rule)
        for loss in grid.losses:
            for mode in grid.modes:
                for seed in range(ctx.seed, ctx.seed + grid.seeds):
                    spec = ArmSpec(rule=rule, loss=loss, mode=mode, seed=seed, budget=grid.budget, batch=batch_size,
                                   tokens=grid.max_new_tokens, eval_n=grid.eval_n, lr=grid.lr, beta=beta,
                                   curve=grid.curve, round_labels=rounds, load_in_4bit=load_in_4bit,
                                   candidates=candidates, passes=passes)
                    log.info("learn arm: %s %s %s seed %d", rule, loss, mode, seed)
                    arms.append({"rule": rule, "loss": loss, "mode": arm_label(mode, passes), "seed": seed,
                                 "passes": passes, **run_arm(ctx, spec, judge=judge, base_answers=base_answers)})
                    save_partial(partial, arms)
                    gc.collect()
    fill(result, arms)
    result.metrics["base_answers_reused"] = base_answers.reused  # evaluations that drew no base answers
    partial.unlink(missing_ok=True)  # the result JSON holds every arm now
    result.params["curve_plot"] = write_curve_plot(result, ctx.out_dir)
    if load_in_4bit:
        result.notes.append("every arm sampled, trained and was evaluated on a 4-bit NF4 base (--load-in-4bit)")
    result.check(TARGETS)
    return result


def save_partial(path: Path, arms: list[dict[str, Any]]) -> None:
    """Every finished arm, rewritten (atomically) after each: a table that runs for hours keeps
    what it measured when it is stopped early."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(arms, indent=1, default=str))
    os.replace(tmp, path)


def run_arm(ctx: BenchContext, spec: ArmSpec, *, judge: Any, base_answers: Any = None) -> dict[str, Any]:
    """One arm in its own scratch database: its loop with the curve's evaluations on the way."""
    from odpo.app.config import ServeConfig
    from odpo.app.sampler_worker import build_sampler, load_policy
    from odpo.trainer.training.loop import DPOTrainer
    from odpo.trainer.training.train_config import TrainConfig

    queue = {"online": spec.batch, "iterative": spec.round_labels, "offline": spec.budget}[spec.loop]
    selected = spec.selector != "random"
    with ctx.scratch(f"learn-{spec.loop}") as cfg:
        import_starter_prompts(cfg)
        db = cfg.open_db()
        serve_cfg = ServeConfig(model=ctx.model, device=ctx.device, dtype=ctx.dtype, seed=spec.seed,
                                queue_size=queue, prompts_per_batch=spec.batch, max_new_tokens=spec.tokens,
                                temperature=DEFAULT_TEMPERATURE, load_in_4bit=spec.load_in_4bit,
                                candidates=spec.candidates if selected else 2, selector=spec.selector)
        model, tokenizer = load_policy(cfg, serve_cfg, db)
        sampler = build_sampler(cfg, serve_cfg, db, model=model, tokenizer=tokenizer)
        sampler.watcher.load_initial()
        save_every = 10**6 if spec.loop == "iterative" else 1  # a round commits once, by hand
        trainer = DPOTrainer(TrainConfig(model=ctx.model, batch_size=spec.batch, lr=spec.lr, beta=spec.beta,
                                         loss_type=spec.loss, seed=spec.seed, max_completion_tokens=spec.tokens,
                                         device=ctx.device, dtype=ctx.dtype, load_in_4bit=spec.load_in_4bit,
                                         save_every=save_every, passes=spec.passes),
                             db=db, adapters_dir=cfg.adapters_dir(), model_cache_dir=cfg.model_cache_dir)
        trainer.start()
        try:
            c = _Counter(judge, lambda: evaluate(db, trainer, judge=judge, n=spec.eval_n, tokens=spec.tokens,
                                                 seed=spec.seed, base_dir=cfg.data_dir,
                                                 base_answers=base_answers))
            started = time.perf_counter()
            arm = LOOPS[spec.loop](db=db, sampler=sampler, trainer=trainer, c=c, spec=spec)
            arm["wall_seconds"] = time.perf_counter() - started - c.seconds["eval"]
            final = c.curve[-1] if c.curve else {"win_rate": None, "eval": None}
            arm.update({"win_rate": final["win_rate"], "eval": final.get("eval"), "curve": c.curve})
            if final.get("eval_note"):
                arm["eval_note"] = final["eval_note"]
        finally:
            trainer.close()
            db.close()
    return arm


class _Counter:
    """Labels the judge worker stored, by choice; where the time went; the curve so far."""

    def __init__(self, judge: Any, evaluate_now: Callable[[], dict[str, Any]]) -> None:
        from odpo.trainer.judges import judge_labeler_name
        from odpo.trainer.judges.worker import JudgeWorkerConfig, WorkerStats

        self.judge, self.stats, self.config = judge, WorkerStats(), JudgeWorkerConfig(poll_seconds=0)
        self.labeler = judge_labeler_name(judge.spec)
        self.seconds = {"sample": 0.0, "label": 0.0, "train": 0.0, "swap": 0.0, "eval": 0.0}
        self.evaluate_now = evaluate_now
        self.curve: list[dict[str, Any]] = []

    def label(self, db: Any, limit: int) -> int:
        from odpo.trainer.judges.worker import judge_batch

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

    def next_stop(self, spec: ArmSpec) -> int:
        """The next curve point (or the budget): loops label up to it exactly, then evaluate."""
        return next((p for p in spec.curve if p > self.stats.labeled), spec.budget)

    def checkpoint(self, spec: ArmSpec) -> None:
        """At a curve point, the policy of this moment against the base."""
        if self.stats.labeled in spec.curve and all(p["labels"] != self.stats.labeled for p in self.curve):
            point = self.timed("eval", self.evaluate_now)
            self.curve.append({"labels": self.stats.labeled, **point})


def online_loop(*, db: Any, sampler: Any, trainer: Any, c: _Counter, spec: ArmSpec) -> dict[str, Any]:
    """Sample from the serving version, label, train, hot-swap; until the budget is spent."""
    steps, served = 0, []
    while c.stats.labeled < spec.budget:
        made = c.timed("sample", sampler.step)
        handled = c.label(db, min(spec.batch, c.next_stop(spec) - c.stats.labeled))
        if not made and not handled:
            log.warning("online arm: nothing left to sample or label; stopping at %d labels", c.stats.labeled)
            break
        steps += c.train_all(trainer)
        c.timed("swap", sampler.watcher.poll_once)
        served.append(sampler.watcher.serving_version)
        c.checkpoint(spec)
    return _arm_facts(c, trainer, steps=steps, served=served)


def iterative_loop(*, db: Any, sampler: Any, trainer: Any, c: _Counter, spec: ArmSpec) -> dict[str, Any]:
    """Rounds: sample and label `round_labels` from one frozen version, train on exactly them, commit
    one version, swap it in."""
    steps, served, rounds = 0, [], 0
    while c.stats.labeled < spec.budget:
        want = min(spec.round_labels, spec.budget - c.stats.labeled)
        while c.timed("sample", sampler.step):  # fills the queue (its size: one round) and says 0 when full
            pass
        if not c.label(db, want):
            log.warning("iterative arm: nothing left to label; stopping at %d labels", c.stats.labeled)
            break
        served.append(sampler.watcher.serving_version)
        steps += c.train_all(trainer)
        if c.timed("train", trainer.commit_pending) is not None:
            rounds += 1
        c.timed("swap", sampler.watcher.poll_once)
        c.checkpoint(spec)
    return {**_arm_facts(c, trainer, steps=steps, served=served), "rounds": rounds}


def offline_loop(*, db: Any, sampler: Any, trainer: Any, c: _Counter, spec: ArmSpec) -> dict[str, Any]:
    """Sample the whole budget from the base first, then label and train on it in order."""
    while sampler.queue < spec.budget:
        if not c.timed("sample", sampler.step):
            break
    steps = 0
    while c.stats.labeled < spec.budget:
        if not c.label(db, min(spec.batch, c.next_stop(spec) - c.stats.labeled)):
            break
        steps += c.train_all(trainer)
        c.checkpoint(spec)
    return _arm_facts(c, trainer, steps=steps, served=[sampler.watcher.serving_version])


LOOPS = {"online": online_loop, "iterative": iterative_loop, "offline": offline_loop}


def _arm_facts(c: _Counter, trainer: Any, *, steps: int, served: list[int]) -> dict[str, Any]:
    return {"labels_used": c.stats.labeled, "choices": dict(c.stats.choices), "steps": steps,
            "final_version": trainer.version, "sampler_versions": served,
            "seconds": {k: round(v, 3) for k, v in c.seconds.items()}}


def evaluate(db: Any, trainer: Any, *, judge: Any, n: int, tokens: int, seed: int, base_dir: Any,
             base_answers: Any = None) -> dict[str, Any]:
    """The trainer's current version vs the base (v0) on held-out prompts, from its own weights;
    the base's answers from `base_answers` when an earlier evaluation drew them (same seed)."""
    from odpo.trainer.evaluation.win_rate import run_eval
    from odpo.trainer.sampling.generation import SamplingParams

    if trainer.version == 0:
        return {"win_rate": None, "eval": None, "version": 0,
                "eval_note": "no DPO step was taken; the policy is the base"}
    t0 = time.perf_counter()
    params = SamplingParams(temperature=EVAL_TEMPERATURE, top_p=EVAL_TOP_P, max_new_tokens=tokens, seed=seed + 7919)
    res = run_eval(db, policy=trainer.model, tokenizer=trainer.tokenizer, version_a=trainer.version, version_b=0,
                   judge=judge, n=n, params=params, holds=trainer.version, base_dir=base_dir,
                   base_answers=base_answers)
    wr = res.win_rate
    return {"win_rate": wr.rate, "version": trainer.version, "eval_seconds": time.perf_counter() - t0,
            "eval": {"wins": wr.wins, "losses": wr.losses, "ties": wr.ties, "n": wr.n, "low": wr.low,
                     "high": wr.high, "abstained": res.abstained},
            # the same held-out prompts and seed for every arm: head-to-head judges these (learn_h2h.py)
            "prompt_ids": res.details["prompt_ids"], "prompts": res.requests, "answers": res.answers_a}
