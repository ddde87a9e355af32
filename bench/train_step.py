"""`odpo bench train-step`: odpo's cost per judged pair vs TRL's OnlineDPOTrainer, same work.

Both sides start from the same base weights with the same LoRA (odpo's defaults), dtype/autocast,
batch size, sampling params and generation length, and both generate two samples per prompt,
judge them with the same rule, and take one DPO (sigmoid, beta 0.1, AdamW, clip 1.0) step.

- odpo per pair = (sampling the pairs + judging + `trainer.training.step.dpo_step` + writing the
  version + the sampler's in-place swap) / batch: everything odpo does per pair, although in odpo
  the sampler and trainer run in different processes.
- TRL per pair = one `OnlineDPOTrainer` optimizer step / batch (its step generates, scores with a
  reward function that calls our judge on the (first, second) sample pairs, and updates).
- The update-only part is reported separately: odpo's dpo_step vs TRL's step minus its timed
  `_generate` and reward calls. odpo's step runs each pair's prompt once for both answers
  (trainer/policy/shared_prompt.py), its default.
- Beside it, on the same pairs of every round, two more odpo steps are timed and then undone
  (LoRA weights restored; a scratch optimizer): DPO in TRL's concatenated layout
  (`--no-shared-prompt`), and SimPO (reference-free: no reference pass). They show what the shared
  prompt and dropping the reference each save, on identical work.

Measurements interleave: each TRL step is followed (from a TrainerCallback) by one odpo round, so
load from other processes hits both alike. The first step of each side is a warm-up and dropped.
If TRL cannot run here, the result says why (status "unavailable") and reports odpo alone.

With `load_in_4bit`, a second odpo side runs the same rounds on a 4-bit NF4 base (QLoRA, as
`odpo train --load-in-4bit` builds it), interleaved with the full-precision side, and the rows
report its seconds per DPO step and per pair beside full precision's.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from odpo.bench.common import BenchContext, BenchResult, Target, ratio, summarize
from odpo.bench.model_setup import Policy, cycle, load_policy, starter_prompts
from odpo.trainer.options import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

log = logging.getLogger(__name__)

TARGETS = (Target("train-step: odpo / TRL seconds per judged pair", "odpo_over_trl_per_pair", "<=", 0.6),)
VARIANTS = ("dpo_step_concatenated", "simpo_step")  # timed beside the real step, then undone
SIZES = {"full": (8, 96, 5), "quick": (8, 32, 3)}  # batch, max_new_tokens, measured rounds
DEFAULT_RULE = "rule:shorter"


def run(ctx: BenchContext, *, batch_size: Optional[int] = None, max_new_tokens: Optional[int] = None,
        rounds: Optional[int] = None, rule: str = DEFAULT_RULE, lr: float = 2e-4,
        load_in_4bit: bool = False) -> BenchResult:
    from odpo.trainer.judges import load_judge

    size_b, size_t, size_r = SIZES["quick" if ctx.quick else "full"]
    batch, tokens, rounds = batch_size or size_b, max_new_tokens or size_t, rounds or size_r
    result = BenchResult(bench="train-step", quick=ctx.quick,
                         params={"model": ctx.model, "batch_size": batch, "max_new_tokens": tokens,
                                 "measured_rounds": rounds, "warmup_rounds": 1, "rule": rule, "lr": lr,
                                 "temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P,
                                 "load_in_4bit": load_in_4bit})
    judge = load_judge(rule)
    prompts = starter_prompts(held_out=False)
    with ctx.scratch("train-step") as cfg:
        sides = [OdpoSide(ctx, judge=judge, batch=batch, tokens=tokens, lr=lr, adapters_dir=cfg.adapters_dir())]
        if load_in_4bit:
            sides.append(OdpoSide(ctx, judge=judge, batch=batch, tokens=tokens, lr=lr,
                                  adapters_dir=cfg.adapters_dir("qlora"), load_in_4bit=True))
        odpo = sides[0]
        trl_steps, trl_error = _run_trl(ctx, sides, prompts=prompts, judge=judge, rounds=rounds,
                                        out_dir=cfg.data_dir / "trl")
        while len(odpo.rounds) < rounds + 1:  # TRL failed or stopped early: finish odpo's rounds alone
            round_all(sides, prompts)
    lora = odpo.cfg.lora  # what both sides train: odpo's config, read back rather than typed here
    result.params.update(beta=odpo.cfg.beta, loss=odpo.cfg.loss_type, passes=odpo.cfg.passes,
                         lora=f"r={lora.r} alpha={lora.alpha} dropout={lora.dropout} {lora.target_modules}")
    result.params["trl_version"] = _trl_version()
    result.params["autocast"] = str(odpo.policy.autocast_dtype)
    fill(result, odpo_rounds=odpo.rounds[1:], trl_steps=trl_steps[1:], batch=batch)
    if load_in_4bit:
        fill_4bit(result, full=odpo.rounds[1:], four_bit=sides[1].rounds[1:], batch=batch)
    if trl_error:
        result.status = "unavailable"
        result.notes.append(f"TRL's OnlineDPOTrainer could not run here: {trl_error}")
    result.check(TARGETS)
    return result


class OdpoSide:
    """odpo's per-pair work on one PeftModel: sample, judge, dpo_step, write version, swap."""

    def __init__(self, ctx: BenchContext, *, judge: Any, batch: int, tokens: int, lr: float, adapters_dir: Any,
                 load_in_4bit: bool = False) -> None:
        from odpo.trainer.sampling.generation import SamplingParams
        from odpo.trainer.training.step import make_optimizer
        from odpo.trainer.training.train_config import TrainConfig

        self.policy: Policy = load_policy(ctx, load_in_4bit=load_in_4bit)
        self.judge, self.batch, self.adapters_dir = judge, batch, adapters_dir
        # passes=1: one update per batch, as TRL's trainer takes, so the two are timed on the same work.
        self.cfg = TrainConfig(model=ctx.model, batch_size=batch, lr=lr, max_completion_tokens=max(tokens, 1),
                               device=ctx.device, dtype=ctx.dtype, seed=ctx.seed, load_in_4bit=load_in_4bit,
                               passes=1)
        self.optimizer = make_optimizer(self.policy.model, self.cfg)
        self.params = SamplingParams(max_new_tokens=tokens, seed=ctx.seed)  # serve's temperature and top-p
        self.rounds: list[dict[str, float]] = []

    def round(self, prompts: list[str]) -> dict[str, float]:
        from odpo.trainer.policy import checkpoint as ckpt
        from odpo.trainer.policy.batching import PairExample
        from odpo.trainer.sampling.generation import generate
        from odpo.trainer.training.step import dpo_step

        model, tok = self.policy.model, self.policy.tokenizer
        marks = [time.perf_counter()]
        out = generate(model, tok, prompts, params=self.params, n_per_prompt=2)
        marks.append(time.perf_counter())
        verdicts = self.judge.judge(prompts, [o[0].text for o in out], [o[1].text for o in out])
        # ties count as "first sample chosen", exactly as TRL's rewards[first] >= rewards[second]
        examples = [PairExample(prompt=p, chosen=o[1].text if v.choice == "b" else o[0].text,
                                rejected=o[0].text if v.choice == "b" else o[1].text)
                    for p, o, v in zip(prompts, out, verdicts, strict=True)]
        marks.append(time.perf_counter())
        loss = dpo_step(model=model, tokenizer=tok, optimizer=self.optimizer, examples=examples, cfg=self.cfg,
                        autocast=self.policy.autocast())["loss"]
        marks.append(time.perf_counter())
        path = ckpt.write_version(model=model, optimizer=self.optimizer, adapters_dir=self.adapters_dir,
                                  version=len(self.rounds) + 1, state={"bench": "train-step"})
        marks.append(time.perf_counter())
        ckpt.load_adapter_into(model, path)  # the sampler's hot swap (on its own copy in odpo serve)
        marks.append(time.perf_counter())
        parts = ("generate", "judge", "dpo_step", "write_version", "swap")
        row = {k: b - a for k, a, b in zip(parts, marks[:-1], marks[1:], strict=True)}
        row.update(self.variant_seconds(examples))  # after the round's own marks: not part of its cost
        row["tokens_per_sample"] = sum(g.tokens for o in out for g in o) / (2 * len(out))
        row["pairs"], row["loss"] = float(len(prompts)), loss
        self.rounds.append(row)
        return row

    def variant_seconds(self, examples: list[Any]) -> dict[str, float]:
        """Seconds of a DPO step in TRL's layout and of a SimPO step on `examples`; each is undone."""
        from dataclasses import replace

        import torch

        from odpo.trainer.training.losses import default_beta
        from odpo.trainer.training.step import dpo_step, trainable_parameters

        params = trainable_parameters(self.policy.model)
        saved = [p.detach().clone() for p in params]
        configs = (replace(self.cfg, shared_prompt=False),
                   replace(self.cfg, loss_type="simpo", beta=default_beta("simpo")))
        out = {}
        for key, cfg in zip(VARIANTS, configs, strict=True):
            started = time.perf_counter()
            dpo_step(model=self.policy.model, tokenizer=self.policy.tokenizer, examples=examples, cfg=cfg,
                     optimizer=torch.optim.AdamW(params, lr=cfg.lr), autocast=self.policy.autocast())
            out[key] = time.perf_counter() - started
            with torch.no_grad():
                for p, value in zip(params, saved, strict=True):
                    p.copy_(value)
        return out


def round_all(sides: list[OdpoSide], prompts: list[str]) -> None:
    """One round of every odpo side on the same prompts, back to back (load hits them alike)."""
    start = len(sides[0].rounds) * sides[0].batch
    for side in sides:
        side.round(cycle(prompts, start, side.batch))


def _trl_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("trl")
    except metadata.PackageNotFoundError:
        return None


def _run_trl(ctx: BenchContext, sides: list[OdpoSide], *, prompts: list[str], judge: Any, rounds: int,
             out_dir: Any) -> tuple[list[dict[str, float]], Optional[str]]:
    """TRL's steps, each followed by one round of every odpo side; ([] , reason) when TRL cannot run.
    TRL is configured like the first (full-precision) side."""
    steps: list[dict[str, float]] = []

    def after_step() -> None:
        try:
            round_all(sides, prompts)
        except Exception as exc:  # odpo's own failure: must not be blamed on TRL
            raise _OdpoRoundFailed() from exc

    try:
        trainer = build_trl_trainer(ctx, sides[0], prompts=prompts, judge=judge, steps=rounds + 1, out_dir=out_dir,
                                    record=steps, after_step=after_step)
        trainer.train()
    except _OdpoRoundFailed as failed:
        raise failed.__cause__ from None
    except Exception as exc:  # noqa: BLE001 - reported in the result instead of a made-up number
        log.warning("TRL OnlineDPOTrainer failed", exc_info=True)
        return steps, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return steps, None


class _OdpoRoundFailed(Exception):
    """Carries an odpo round's exception out of TRL's callback."""


def pair_reward(judge: Any) -> Callable[..., list[float]]:
    """A TRL reward function equivalent to a pairwise judge: TRL passes the first samples of all
    prompts, then the second samples; each (first, second) pair is judged and the winner gets 1,
    the loser 0 (0.5 each for a tie), so TRL picks the same chosen sample the judge would."""
    def odpo_judge_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        n = len(completions) // 2
        texts = [_text(c) for c in completions]
        verdicts = judge.judge([_text(p) for p in prompts[:n]], texts[:n], texts[n:])
        rewards = [0.5] * (2 * n)
        for i, v in enumerate(verdicts):
            if v.choice in ("a", "b"):
                rewards[i], rewards[n + i] = (1.0, 0.0) if v.choice == "a" else (0.0, 1.0)
        return rewards

    return odpo_judge_reward


def _text(item: Any) -> str:
    """Plain text of a TRL prompt/completion (a string, or a conversation: its last message)."""
    if isinstance(item, str):
        return item
    return str(item[-1]["content"]) if item else ""


def build_trl_trainer(ctx: BenchContext, odpo: OdpoSide, *, prompts: list[str], judge: Any, steps: int,
                      out_dir: Any, record: list[dict[str, float]], after_step: Callable[[], None]) -> Any:
    """An OnlineDPOTrainer configured like odpo: fresh base copy, same LoRA/dtype/sampling/optimizer."""
    import torch
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from odpo.trainer.policy.loading import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(ctx.model_config())
    policy, params = odpo.policy, odpo.params
    args = OnlineDPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=odpo.batch, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=odpo.cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", beta=odpo.cfg.beta, loss_type="sigmoid",
        max_new_tokens=params.max_new_tokens, max_length=odpo.cfg.max_prompt_tokens + params.max_new_tokens,
        temperature=params.temperature, top_p=params.top_p, top_k=0, gradient_checkpointing=False,
        bf16=policy.autocast_dtype == torch.bfloat16, fp16=False, use_cpu=policy.device.type == "cpu",
        disable_dropout=False, logging_steps=10_000, save_strategy="no", report_to="none", seed=ctx.seed,
        dataloader_num_workers=0)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    timer = _StepTimer(record, after_step)
    trainer = OnlineDPOTrainer(model=base, reward_funcs=pair_reward(judge), args=args, train_dataset=dataset,
                               processing_class=tokenizer, peft_config=odpo.cfg.lora.to_peft_config(),
                               callbacks=[_timer_callback(timer)])
    timer.wrap(trainer)
    return trainer


def _timer_callback(timer: "_StepTimer") -> Any:
    from transformers import TrainerCallback

    class StepTimerCallback(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            timer.begin()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            timer.end()

    return StepTimerCallback()


class _StepTimer:
    """Times TRL's optimizer steps and, inside them, its generate and reward calls."""

    def __init__(self, record: list[dict[str, float]], after_step: Callable[[], None]) -> None:
        self.record, self.after_step = record, after_step
        self.current: dict[str, float] = {}
        self.started = 0.0

    def wrap(self, trainer: Any) -> None:
        generate, rewards = trainer._generate, trainer._calculate_rewards_from_functions

        def timed_generate(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            self.current["generate"] = self.current.get("generate", 0.0) + time.perf_counter() - t0
            completion_mask = out[3]
            self.current["tokens_per_sample"] = float(completion_mask.sum()) / max(completion_mask.shape[0], 1)
            return out

        def timed_rewards(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = rewards(*args, **kwargs)
            self.current["judge"] = self.current.get("judge", 0.0) + time.perf_counter() - t0
            return out

        trainer._generate, trainer._calculate_rewards_from_functions = timed_generate, timed_rewards

    def begin(self) -> None:
        self.current, self.started = {}, time.perf_counter()

    def end(self) -> None:
        step = time.perf_counter() - self.started
        gen, judge = self.current.get("generate", 0.0), self.current.get("judge", 0.0)
        self.record.append({"step": step, "generate": gen, "judge": judge, "update": step - gen - judge,
                            "tokens_per_sample": self.current.get("tokens_per_sample", 0.0)})
        self.after_step()


def totals(rows: list[dict[str, float]], keys: tuple[str, ...]) -> float:
    return sum(r.get(k, 0.0) for r in rows for k in keys)


def fill(result: BenchResult, *, odpo_rounds: list[dict[str, float]], trl_steps: list[dict[str, float]],
         batch: int) -> None:
    """Per-pair seconds from totals over the measured rounds (warm-ups already dropped)."""
    o_pairs = batch * len(odpo_rounds)
    t_pairs = batch * len(trl_steps)
    full = ("generate", "judge", "dpo_step", "write_version", "swap")
    odpo_full = ratio(totals(odpo_rounds, full), o_pairs)
    odpo_update = ratio(totals(odpo_rounds, ("dpo_step",)), o_pairs)
    trl_full = ratio(totals(trl_steps, ("step",)), t_pairs)
    trl_update = ratio(totals(trl_steps, ("update",)), t_pairs)
    m = result.metrics
    m.update(odpo_seconds_per_pair=odpo_full, trl_seconds_per_pair=trl_full,
             odpo_over_trl_per_pair=ratio(odpo_full, trl_full),
             odpo_update_seconds_per_pair=odpo_update, trl_update_seconds_per_pair=trl_update,
             odpo_over_trl_update=ratio(odpo_update, trl_update),
             odpo_generate_seconds_per_pair=ratio(totals(odpo_rounds, ("generate",)), o_pairs),
             trl_generate_seconds_per_pair=ratio(totals(trl_steps, ("generate",)), t_pairs),
             odpo_overhead_seconds_per_pair=ratio(totals(odpo_rounds, ("write_version", "swap")), o_pairs),
             odpo_dpo_step_seconds=summarize([r["dpo_step"] for r in odpo_rounds]),
             odpo_round_seconds=summarize([totals([r], full) for r in odpo_rounds]),
             trl_step_seconds=summarize([r["step"] for r in trl_steps]),
             odpo_pairs_per_second=ratio(1.0, odpo_full), trl_pairs_per_second=ratio(1.0, trl_full),
             odpo_tokens_per_sample=ratio(totals(odpo_rounds, ("tokens_per_sample",)), len(odpo_rounds)),
             trl_tokens_per_sample=ratio(totals(trl_steps, ("tokens_per_sample",)), len(trl_steps)),
             odpo_rounds=odpo_rounds, trl_steps=trl_steps)
    _fill_variants(result, odpo_rounds, trl_update=trl_update, batch=batch)
    result.row("odpo s/judged pair (sample+judge+step+save+swap)", m["odpo_seconds_per_pair"])
    result.row("TRL s/judged pair (OnlineDPOTrainer step / batch)", m["trl_seconds_per_pair"])
    result.row("odpo / TRL per pair", m["odpo_over_trl_per_pair"], "x")
    result.row("update only: odpo / TRL s per pair",
               f"{_f(odpo_update)} / {_f(trl_update)} = {_f(m['odpo_over_trl_update'])}x")
    result.row("generation: odpo / TRL s per pair",
               f"{_f(m['odpo_generate_seconds_per_pair'])} / {_f(m['trl_generate_seconds_per_pair'])}")
    result.row("odpo DPO step p50 (s), pairs/s", f"{_f(m['odpo_dpo_step_seconds']['p50'])}, "
               f"{_f(ratio(batch, m['odpo_dpo_step_seconds']['p50']))}")
    result.row("tokens/sample odpo vs TRL", f"{_f(m['odpo_tokens_per_sample'])} vs {_f(m['trl_tokens_per_sample'])}")


def _fill_variants(result: BenchResult, rounds: list[dict[str, float]], *, trl_update: Optional[float],
                   batch: int) -> None:
    """The shared prompt's and the reference-free step's savings, p50 against p50 of the same rounds."""
    timed = [r for r in rounds if all(k in r for k in VARIANTS)]
    if not timed:
        return
    m = result.metrics
    step, concat, simpo = (summarize([r[k] for r in timed]) for k in ("dpo_step", *VARIANTS))
    m.update(odpo_dpo_step_concatenated_seconds=concat, odpo_simpo_step_seconds=simpo,
             odpo_shared_over_concatenated_step=ratio(step["p50"], concat["p50"]),
             odpo_simpo_over_dpo_step=ratio(simpo["p50"], step["p50"]),
             odpo_concatenated_over_trl_update=ratio(ratio(totals(timed, (VARIANTS[0],)), batch * len(timed)),
                                                     trl_update),
             odpo_simpo_over_trl_update=ratio(ratio(totals(timed, (VARIANTS[1],)), batch * len(timed)), trl_update))
    result.row("DPO step p50 (s): shared prompt vs TRL's layout",
               f"{_f(step['p50'])} vs {_f(concat['p50'])} = {_f(m['odpo_shared_over_concatenated_step'])}x")
    result.row("SimPO step p50 (s) vs DPO step (both shared prompt)",
               f"{_f(simpo['p50'])} vs {_f(step['p50'])} = {_f(m['odpo_simpo_over_dpo_step'])}x")
    result.row("update only / TRL: TRL's layout, SimPO",
               f"{_f(m['odpo_concatenated_over_trl_update'])}x, {_f(m['odpo_simpo_over_trl_update'])}x")


def fill_4bit(result: BenchResult, *, full: list[dict[str, float]], four_bit: list[dict[str, float]],
              batch: int) -> None:
    """The 4-bit NF4 side beside full precision: DPO step, generation and the whole round per pair."""
    parts = ("generate", "judge", "dpo_step", "write_version", "swap")
    step_full = summarize([r["dpo_step"] for r in full])
    step_4bit = summarize([r["dpo_step"] for r in four_bit])
    per_pair = ratio(totals(four_bit, parts), batch * len(four_bit))
    generate = ratio(totals(four_bit, ("generate",)), batch * len(four_bit))
    m = result.metrics
    m.update(odpo_4bit_seconds_per_pair=per_pair, odpo_4bit_dpo_step_seconds=step_4bit,
             odpo_4bit_generate_seconds_per_pair=generate,
             odpo_4bit_over_full_dpo_step=ratio(step_4bit["p50"], step_full["p50"]),
             odpo_4bit_over_full_per_pair=ratio(per_pair, m.get("odpo_seconds_per_pair")),
             odpo_4bit_losses=[r.get("loss") for r in four_bit], odpo_4bit_rounds=four_bit)
    result.row("odpo DPO step p50 (s): 4-bit NF4 vs full precision",
               f"{_f(step_4bit['p50'])} vs {_f(step_full['p50'])} = {_f(m['odpo_4bit_over_full_dpo_step'])}x")
    result.row("odpo generation s per pair: 4-bit NF4 vs full precision",
               f"{_f(generate)} vs {_f(m.get('odpo_generate_seconds_per_pair'))}")
    result.row("odpo s/judged pair: 4-bit NF4 vs full precision",
               f"{_f(per_pair)} vs {_f(m.get('odpo_seconds_per_pair'))} = {_f(m['odpo_4bit_over_full_per_pair'])}x")


def _f(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"
