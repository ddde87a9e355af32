"""Win rate of one policy version against another on the held-out prompts (`odpo eval`).

Both policies come from ONE copy of the base model: a version's LoRA weights are copied into the
attached adapter (trainer.policy.checkpoint.load_adapter_into), and version 0, the base, is the same
module under `disable_adapter()`. Each policy answers every prompt with the same sampling params
and seed, so identical policies produce identical answers and score exactly 50%.

Scoring. Every pair is judged in both orders: judges that are order-free (rules, reward models,
and the hf:/openai: judges, which ask both orders inside each call) are called once; the others
(py: plugins) are called a second time with the responses swapped. Per order a win counts 1, a
tie or both_bad 0.5, a loss 0; an abstention is left out. A pair's score is the mean over its
orders: above 0.5 a win, below a loss, exactly 0.5 a tie; a pair abstained in every order is left
out of n (and counted in details). Win rate = (wins + ties/2) / n, with a Wilson score interval
(95%) on that proportion: ties count half a win, the usual convention of pairwise evals.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

from odpo.db import store
from odpo.db.engine import Database
from odpo.db.errors import OdpoError
from odpo.trainer.judges import Judge, Verdict, load_judge
from odpo.trainer.options import EVAL_MAX_NEW_TOKENS, EVAL_TEMPERATURE, EVAL_TOP_P
from odpo.trainer.policy.batching import PromptInput, transcript
from odpo.trainer.sampling.generation import Generated, SamplingParams, generate

log = logging.getLogger(__name__)
T = TypeVar("T")  # what each_version's answer gives per version

DEFAULT_PARAMS = SamplingParams(temperature=EVAL_TEMPERATURE, top_p=EVAL_TOP_P, max_new_tokens=EVAL_MAX_NEW_TOKENS,
                                seed=0)
_ORDER_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}


class EvalError(OdpoError):
    """An evaluation that cannot run (no held-out prompts, unknown version, nothing judged)."""


@dataclass(frozen=True)
class WinRate:
    wins: int
    losses: int
    ties: int
    n: int
    rate: float
    low: float
    high: float


@dataclass
class EvalResult:
    version_a: int
    version_b: int
    judge: str
    win_rate: WinRate
    abstained: int
    details: dict[str, Any] = field(default_factory=dict)
    eval_id: Optional[int] = None
    # Every answer of A, in prompt order (not stored with the eval: a head-to-head between two
    # policies evaluated on the same prompts and seed judges these instead of sampling again).
    answers_a: list[str] = field(default_factory=list, repr=False)
    requests: list[str] = field(default_factory=list, repr=False)  # the prompts as the judge read them

    def summary(self) -> dict[str, Any]:
        return {"eval_id": self.eval_id, "a": self.version_a, "b": self.version_b, "judge": self.judge,
                **asdict(self.win_rate), "abstained": self.abstained}


def wilson_interval(wins: int, losses: int, ties: int, *, z: float = 1.96) -> WinRate:
    """Win rate with ties as half wins, and the Wilson score interval of that proportion."""
    n = wins + losses + ties
    if n == 0:
        raise EvalError("no pair was judged (the judge abstained on all of them); nothing to report")
    p = (wins + 0.5 * ties) / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return WinRate(wins=wins, losses=losses, ties=ties, n=n, rate=p, low=max(0.0, centre - half),
                   high=min(1.0, centre + half))


def pair_scores(judge: Judge, prompts: Sequence[str], outs_a: Sequence[str],
                outs_b: Sequence[str]) -> list[Optional[float]]:
    """Per pair: mean order score of A over the orders where the judge did not abstain, or None."""
    first = judge.judge(prompts, outs_a, outs_b)
    second: list[Optional[Verdict]] = [None] * len(first)
    if not judge.order_free:
        second = [v.swapped() for v in judge.judge(prompts, outs_b, outs_a)]
    scores: list[Optional[float]] = []
    for v1, v2 in zip(first, second, strict=True):
        parts = [_ORDER_SCORE[v.choice] for v in (v1, v2) if v is not None and v.choice in _ORDER_SCORE]
        scores.append(sum(parts) / len(parts) if parts else None)
    return scores


def tally(scores: Sequence[Optional[float]]) -> tuple[WinRate, int]:
    """(win rate, number of pairs abstained in every order)."""
    if scores and all(s is None for s in scores):
        raise EvalError(f"the judge abstained on all {len(scores)} pairs, nothing to report: an LM judge abstains "
                        "when its answer follows the position, not the content (too small a model?); use a "
                        "stronger judge, or --abstain-threshold 1 to count such pairs as ties")
    wins = sum(1 for s in scores if s is not None and s > 0.5)
    losses = sum(1 for s in scores if s is not None and s < 0.5)
    ties = sum(1 for s in scores if s == 0.5)
    return wilson_interval(wins, losses, ties), sum(1 for s in scores if s is None)


EVAL_BATCH = 16  # prompts per generate call when answering eval prompts


def policy_answers(policy: Any, tokenizer: Any, prompts: Sequence[PromptInput], *, version: int,
                   params: SamplingParams, autocast_dtype: Any = None) -> list[Generated]:
    """One answer per prompt from the policy as it stands (version 0: the base, the adapter
    switched off), EVAL_BATCH prompts a call, each chunk seeded `params.seed + its offset` so a
    seeded request draws the same answers however it is cut. The one loop behind `odpo eval` and
    the blind eval pairs (trainer/evaluation/blind_pairs.py)."""
    was_training = policy.training
    policy.eval()
    answers: list[Generated] = []
    try:
        for start in range(0, len(prompts), EVAL_BATCH):
            chunk = list(prompts[start:start + EVAL_BATCH])
            chunk_params = params if params.seed is None else dataclasses.replace(params, seed=params.seed + start)
            adapter_off = policy.disable_adapter() if version == 0 else contextlib.nullcontext()
            with adapter_off:
                out = generate(policy, tokenizer, chunk, params=chunk_params, n_per_prompt=1,
                               autocast_dtype=autocast_dtype)
            answers += [rows[0] for rows in out]
    finally:
        policy.train(was_training)
    return answers


class BaseAnswers:
    """The base's answers to seeded eval requests, kept for the next eval of the same requests.

    Version 0 is the same frozen weights under disable_adapter() every time, and a seeded request
    draws the same tokens, so a trainer evaluating every k versions against the base (or a bench
    evaluating each arm at several points) regenerated identical text: half of each eval's
    generation. One instance belongs to one base model (the key does not name the model); unseeded
    requests are never kept, since their answers are meant to differ."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self.reused = 0
        self._kept: dict[str, list[str]] = {}

    def get(self, prompts: Sequence[PromptInput], params: SamplingParams, autocast_dtype: Any,
            make: Callable[[], list[str]]) -> list[str]:
        """The kept answers for these requests, or make() them (and keep them when seeded)."""
        if params.seed is None:
            return make()
        key = json.dumps([list(prompts), params.as_dict(), str(autocast_dtype)], sort_keys=True, default=str)
        if key in self._kept:
            self.reused += 1
            return list(self._kept[key])
        answers = make()
        if len(self._kept) >= self.limit:
            self._kept.pop(next(iter(self._kept)))  # the oldest request: evals repeat the latest
        self._kept[key] = list(answers)
        return answers


def eval_prompts(db: Database, *, n: int) -> list[tuple[int, PromptInput]]:
    """n (prompt id, what the policy is conditioned on: the text or the whole conversation) from the
    held-out set, cycling through it when it has fewer than n."""
    if n < 1:
        raise EvalError("n must be >= 1")
    with db.sessions() as s:
        rows = [(p.id, p.conditioning()) for p in store.held_out_prompts(s, limit=n)]
    if not rows:
        raise EvalError("no held-out prompts to evaluate on: import some with "
                        "`odpo prompts import FILE --held-out 0.1`")
    if len(rows) < n:
        log.info("only %d held-out prompts: sampling each up to %d times for n=%d", len(rows),
                 math.ceil(n / len(rows)), n)
    return [rows[i % len(rows)] for i in range(n)]


def adapter_path(db: Database, *, version: int, run: str, base_dir: Optional[Path] = None) -> Path:
    """The directory of a committed version, or an EvalError naming the versions that exist."""
    from odpo.trainer.policy.checkpoint import committed_dir_problem
    from odpo.trainer.sampling.hotreload import resolve_adapter_path

    with db.sessions() as s:
        row = store.get_adapter(s, version=version, run=run)
        known = [a.version for a in store.list_versions(s, run=run)]
    if row is None:
        have = ", ".join(f"v{v}" for v in known) or "none yet"
        raise EvalError(f"no adapter version v{version} in run {run!r} (versions: {have})")
    path = resolve_adapter_path(row.path, base_dir)
    problem = committed_dir_problem(str(path))
    if problem:
        raise EvalError(f"adapter v{version} is unusable: {problem}")
    return path


def each_version(policy: Any, *, paths: dict[Any, Path], versions: Sequence[Any], holds: Any,
                 answer: Callable[[Any], T]) -> dict[Any, T]:
    """answer(v) for each version in turn, with the policy's adapter holding v when it is called
    (`paths` from adapter_path; a version is a number, or (run, number) across runs; 0 is the base,
    which answers with the adapter off). A version the adapter already `holds` is not reloaded;
    the others are copied into it in place."""
    out: dict[Any, T] = {}
    for version in versions:
        if _number(version) and version != holds:
            from odpo.trainer.policy.checkpoint import load_adapter_into

            load_adapter_into(policy, paths[version])
            holds = version
        out[version] = answer(version)
    return out


def _number(version: Any) -> int:
    return version[1] if isinstance(version, tuple) else int(version)


def run_eval(db: Database, *, policy: Any, tokenizer: Any, version_a: int, version_b: int,
             judge: Union[Judge, str], n: int = 64, params: SamplingParams = DEFAULT_PARAMS,
             run: str = "default", holds: Optional[int] = None, base_dir: Optional[Path] = None,
             autocast_dtype: Any = None, record: bool = True,
             base_answers: Optional[BaseAnswers] = None, run_b: Optional[str] = None) -> EvalResult:
    """Sample both versions on n held-out prompts, judge every pair, store the result in `evals`.

    `policy` is a PeftModel whose adapter fits the versions; `holds` names the version its adapter
    holds now, so that one is not reloaded (the trainer passes its live version). Other versions
    are copied in place into the adapter, so the caller's weights change unless `holds` covers it.
    `base_answers` (kept by the caller across evals of one base) answers for version 0 when it has
    seen the same seeded requests. `run_b` puts version B in another run (head to head across runs:
    both adapters on the same base); `holds` is then a version of `run`.
    """
    run_b = run_b or run
    key_a, key_b = (run, version_a), (run_b, version_b)
    if key_a == key_b or version_a == version_b == 0:
        raise EvalError(f"--a and --b are the same policy (v{version_a}); pick two versions")
    paths = {k: adapter_path(db, version=k[1], run=k[0], base_dir=base_dir) for k in (key_a, key_b) if k[1]}
    judge_impl = load_judge(judge) if isinstance(judge, str) else judge
    chosen = eval_prompts(db, n=n)
    prompts = [text for _, text in chosen]
    started = time.perf_counter()

    def answer(key: tuple[str, int]) -> list[str]:
        def make() -> list[str]:
            return [g.text for g in policy_answers(policy, tokenizer, prompts, version=key[1], params=params,
                                                   autocast_dtype=autocast_dtype)]

        if key[1] == 0 and base_answers is not None:
            return base_answers.get(prompts, params, autocast_dtype, make)
        return make()

    held = holds if holds is None or isinstance(holds, tuple) else (run, holds)
    answers = each_version(policy, paths=paths, versions=(key_a, key_b), holds=held, answer=answer)
    outs_a, outs_b = answers[key_a], answers[key_b]
    generated = time.perf_counter()
    requests = [transcript(p) for p in prompts]  # a judge reads a conversation with its earlier turns
    scores = pair_scores(judge_impl, requests, outs_a, outs_b)
    judged = time.perf_counter()
    win_rate, abstained = tally(scores)
    details = {"run": run, **({"run_b": run_b} if run_b != run else {}), "abstained": abstained,
               "interval": "wilson", "z": 1.96, "ties_count": 0.5,
               "orders": "one call (order-free judge)" if judge_impl.order_free else "two calls, order swapped",
               "params": params.as_dict(), "prompt_ids": [pid for pid, _ in chosen], "scores": scores,
               "generate_seconds": round(generated - started, 3), "judge_seconds": round(judged - generated, 3),
               "examples": _examples(requests, outs_a, outs_b, scores)}
    result = EvalResult(version_a=version_a, version_b=version_b, judge=judge_impl.spec, win_rate=win_rate,
                        abstained=abstained, details=details, answers_a=list(outs_a),
                        requests=list(requests))
    if record:
        with db.sessions.begin() as s:
            row = store.record_eval(s, version_a=version_a, version_b=version_b, judge=judge_impl.spec,
                                          n=win_rate.n, wins=win_rate.wins, losses=win_rate.losses,
                                          ties=win_rate.ties, win_rate=win_rate.rate, ci_low=win_rate.low,
                                          ci_high=win_rate.high, details=details)
            result.eval_id = row.id
    log.info("eval %s:v%d vs %s:v%d with %s: win rate %.3f [%.3f, %.3f] n=%d (%d abstained)", run, version_a,
             run_b, version_b, judge_impl.spec, win_rate.rate, win_rate.low, win_rate.high, win_rate.n, abstained)
    return result


def _examples(prompts: Sequence[str], outs_a: Sequence[str], outs_b: Sequence[str],
              scores: Sequence[Optional[float]], k: int = 3) -> list[dict[str, Any]]:
    """The first k compared pairs (clipped), stored with the eval for the dashboard to show."""
    rows = zip(prompts[:k], outs_a[:k], outs_b[:k], scores[:k], strict=True)
    return [{"prompt": p[:500], "a": a[:500], "b": b[:500], "score": s} for p, a, b, s in rows]


def maybe_auto_eval(db: Database, *, policy: Any, tokenizer: Any, version: int, every: int,
                    judge: Union[Judge, str], n: int = 32, params: SamplingParams = DEFAULT_PARAMS,
                    run: str = "default", autocast_dtype: Any = None,
                    base_answers: Optional[BaseAnswers] = None) -> Optional[EvalResult]:
    """For the trainer, right after it commits `version` while `policy` holds exactly that version:
    every `every` versions, evaluate it against the base (no weights are loaded or changed; the
    base is the same model under disable_adapter). Skipped when `every` <= 0, when this version
    was already evaluated by this judge, or (logged, not raised) when the eval cannot run, e.g.
    without held-out prompts: an eval problem never stops training. Build `judge` once and pass
    the instance; a spec string loads the judge on every call."""
    if every <= 0 or version <= 0 or version % every:
        return None
    spec = judge if isinstance(judge, str) else judge.spec
    with db.sessions() as s:
        if store.find_eval(s, version_a=version, version_b=0, judge=spec, run=run) is not None:
            return None
    try:
        return run_eval(db, policy=policy, tokenizer=tokenizer, version_a=version, version_b=0, judge=judge,
                        n=n, params=params, run=run, holds=version, autocast_dtype=autocast_dtype,
                        base_answers=base_answers)
    except OdpoError as exc:
        log.warning("auto-eval of v%d skipped: %s", version, exc)
        return None


def load_eval_policy(*, model_spec: str, adapter_dir: Path, cache_dir: Optional[Path] = None,
                     device: str = "auto", dtype: str = "auto", load_in_4bit: bool = False) -> tuple[Any, Any, Any]:
    """(PeftModel holding `adapter_dir`, tokenizer, autocast dtype): one base copy for both policies;
    `load_in_4bit` evaluates on the 4-bit NF4 base a QLoRA trainer trained against."""
    from peft import PeftModel

    from odpo.trainer.policy.loading import ModelConfig, load_model_and_tokenizer, pick_device_dtype

    try:
        base, tokenizer = load_model_and_tokenizer(ModelConfig.for_spec(model_spec, cache_dir=cache_dir,
                                                                        device=device, dtype=dtype,
                                                                        load_in_4bit=load_in_4bit))
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot load the base model {model_spec!r}: {exc}") from None
    policy = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    policy.eval()
    _, _, autocast_dtype = pick_device_dtype(device, dtype)
    return policy, tokenizer, autocast_dtype
