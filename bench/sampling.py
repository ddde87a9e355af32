"""`odpo bench sampling`: pairs/minute of the sampler's batched generation vs one pair at a time.

Both modes call `trainer.sampling.generation.generate` exactly as the sampler does (the LoRA-wrapped policy,
serve's default sampling params, two samples per prompt), on the SAME prompts: each round generates
`prompts_per_batch` prompts in one call, then the same prompts again one pair per call. Rounds
interleave the two modes so that load from other processes on a shared machine hits both alike.

With `sampler="vllm"` and a server's URL, every round also samples its batch with the vLLM backend
(trainer/sampling/vllm_backend.py, the worker's own `generate`) on the same prompts and params, and
the first pair (one prompt, the first call) is timed on both backends. The server must serve the
bench's --model under that name (`odpo vllm-serve --model M` does); its start is not timed.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

from odpo.bench.common import BenchContext, BenchResult, Target, per_minute, ratio, summarize
from odpo.bench.model_setup import cycle, load_policy, starter_prompts
from odpo.trainer.options import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

log = logging.getLogger(__name__)

TARGETS = (Target("sampling: batched / one pair at a time", "speedup", ">=", 3.0),)
SIZES = {  # (prompts_per_batch, rounds, max_new_tokens); quick batches like `odpo serve` does by default
    "full": (16, 4, 96),
    "quick": (8, 2, 32),
}


def run(ctx: BenchContext, *, prompts_per_batch: Optional[int] = None, rounds: Optional[int] = None,
        max_new_tokens: Optional[int] = None, candidates: int = 2, sampler: str = "hf",
        vllm_url: Optional[str] = None) -> BenchResult:
    """Measure both modes and their ratio; see the module docstring."""
    from odpo.trainer.sampling.generation import SamplingParams

    size_b, size_r, size_t = SIZES["quick" if ctx.quick else "full"]
    batch, rounds, tokens = prompts_per_batch or size_b, rounds or size_r, max_new_tokens or size_t
    result = BenchResult(bench="sampling", quick=ctx.quick,
                         params={"model": ctx.model, "prompts_per_batch": batch, "rounds": rounds,
                                 "max_new_tokens": tokens, "temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P,
                                 "samples_per_prompt": 2, "seed": ctx.seed, "candidates": candidates,
                                 "sampler": sampler})
    policy = load_policy(ctx)
    remote = _vllm(ctx, policy, vllm_url, result) if sampler == "vllm" else None
    prompts = starter_prompts(held_out=False)
    params = SamplingParams(max_new_tokens=tokens, seed=ctx.seed)  # serve's temperature and top-p
    first = [_timed(policy, prompts[:1], params)]  # also the warm-up: first-call allocations are not speed
    if remote is not None:
        first.append(_timed(policy, prompts[:1], params, sample=remote))
    batched: list[dict[str, float]] = []
    vllm_batched: list[dict[str, float]] = []
    single: list[dict[str, float]] = []
    selected: list[dict[str, float]] = []
    unscored: list[dict[str, float]] = []
    for r in range(rounds):
        chosen = cycle(prompts, r * batch, batch)
        batched.append(_timed(policy, chosen, _seeded(params, 1000 * r)))
        if remote is not None:
            vllm_batched.append(_timed(policy, chosen, _seeded(params, 1000 * r), sample=remote))
        if candidates > 2:  # with the margin selector's scoring, and without (random, diverse)
            selected.append(_timed(policy, chosen, _seeded(params, 1000 * r), n=candidates, score=True))
            unscored.append(_timed(policy, chosen, _seeded(params, 1000 * r), n=candidates))
        for i, prompt in enumerate(chosen):
            single.append(_timed(policy, [prompt], _seeded(params, 1000 * r + i)))
    _fill(result, batched=batched, single=single)
    if selected:
        _fill_candidates(result, batched, selected, unscored, candidates)
    if remote is not None:
        remote.close()
        _fill_vllm(result, batched, vllm_batched, first)
    result.check(TARGETS)
    return result


def _seeded(params: Any, offset: int) -> Any:
    from odpo.trainer.sampling.generation import SamplingParams

    return SamplingParams(temperature=params.temperature, top_p=params.top_p,
                          max_new_tokens=params.max_new_tokens, seed=params.seed + offset)


def _timed(policy: Any, prompts: list[str], params: Any, *, n: int = 2, score: bool = False,
           sample: Any = None) -> dict[str, float]:
    """One generate call as the sampler makes it (n candidates per prompt; with `score`, the margin
    selector's implicit rewards of all of them too): shown pairs, seconds, generated tokens.
    `sample`: a vLLM backend, whose `generate` has the same contract, instead of the policy."""
    from odpo.trainer.sampling.generation import generate

    started = time.perf_counter()
    if sample is not None:
        out = sample.generate(prompts, params=params, n_per_prompt=n)
    else:
        out = generate(policy.model, policy.tokenizer, prompts, params=params, n_per_prompt=n, record_logps=score)
    if score:
        from odpo.trainer.training.rewards import implicit_rewards
        from odpo.trainer.training.train_config import TrainConfig

        implicit_rewards(policy.model, policy.tokenizer, prompts, out, TrainConfig())
    seconds = time.perf_counter() - started
    return {"pairs": float(len(prompts)), "seconds": seconds,
            "tokens": float(sum(g.tokens for pair in out for g in pair[:2])),
            "hit_limit": float(sum(g.finish_reason == "length" for pair in out for g in pair[:2]))}


def _fill_candidates(result: BenchResult, batched: list[dict[str, float]], selected: list[dict[str, float]],
                     unscored: list[dict[str, float]], k: int) -> None:
    """Seconds per shown pair with k candidates against two: margin-scored (margin, uncertain) and
    generated only (random, diverse), so the generate call's share and the scoring's are apart."""
    two = mode_metrics(batched)
    for suffix, calls, how in (("", selected, "margin-scored"), ("_unscored", unscored, "not scored")):
        many = mode_metrics(calls)
        cost = ratio(two["pairs_per_minute"], many["pairs_per_minute"])
        result.metrics.update({f"candidates_{k}{suffix}": many, f"candidates_cost_ratio{suffix}": cost})
        result.row(f"shown pairs/minute with {k} candidates per prompt ({how}) vs 2",
                   f"{many['pairs_per_minute']:.1f} vs {two['pairs_per_minute']:.1f}: {cost:.2f}x the time per pair")


def mode_metrics(calls: list[dict[str, float]]) -> dict[str, Any]:
    """Totals of one mode: pairs/minute, tokens/second, seconds per call."""
    pairs = sum(c["pairs"] for c in calls)
    seconds = sum(c["seconds"] for c in calls)
    tokens = sum(c["tokens"] for c in calls)
    return {"calls": len(calls), "pairs": pairs, "seconds": seconds,
            "pairs_per_minute": per_minute(pairs, seconds), "tokens_per_second": ratio(tokens, seconds),
            "mean_tokens_per_sample": ratio(tokens, 2 * pairs),
            "share_hit_max_new_tokens": ratio(sum(c["hit_limit"] for c in calls), 2 * pairs),
            "seconds_per_call": summarize([c["seconds"] for c in calls])}


def _fill(result: BenchResult, *, batched: list[dict[str, float]], single: list[dict[str, float]]) -> None:
    b, s = mode_metrics(batched), mode_metrics(single)
    speedup = ratio(b["pairs_per_minute"], s["pairs_per_minute"])
    result.metrics = {"batched": b, "one_pair_at_a_time": s, "speedup": speedup,
                      "batched_pairs_per_minute": b["pairs_per_minute"],
                      "single_pairs_per_minute": s["pairs_per_minute"]}
    result.row("batched pairs/minute", b["pairs_per_minute"])
    result.row("one-pair-at-a-time pairs/minute", s["pairs_per_minute"])
    result.row("speedup (batched / one pair)", speedup, "x")
    result.row("tokens/s batched vs one pair", f"{b['tokens_per_second']:.1f} vs {s['tokens_per_second']:.1f}")
    result.row("mean tokens/sample batched vs one pair",
               f"{b['mean_tokens_per_sample']:.1f} vs {s['mean_tokens_per_sample']:.1f}")
    result.notes.append("Both modes sample the same prompts with the same params; a batch lasts as long as "
                        "its longest row, so the batched pairs/minute already pays for length variance.")


def _vllm(ctx: BenchContext, policy: Any, url: Optional[str], result: BenchResult) -> Any:
    """The vLLM backend on `url`, serving the base model as --model (version 0: no adapter loaded,
    the same weights as the bench's fresh LoRA); the server's version goes into the params."""
    import httpx

    from odpo.trainer.sampling.vllm_backend import VllmBackend

    if not url:
        raise ValueError("--sampler vllm needs --vllm-url URL (a server started with `odpo vllm-serve --model M`)")
    backend = VllmBackend(db=None, urls=[url], run="bench", tokenizer=policy.tokenizer, base_model=ctx.model,
                          timeout_s=600.0)
    try:
        answer = httpx.get(f"{backend.servers[0].client.url}/version", timeout=30)
        result.params["vllm_version"] = answer.json()["version"]
    except (httpx.HTTPError, ValueError, KeyError):
        result.params["vllm_version"] = None
    return backend


def _fill_vllm(result: BenchResult, batched: list[dict[str, float]], remote: list[dict[str, float]],
               first: list[dict[str, float]]) -> None:
    """The vLLM rows beside hf's: batched pairs/minute and tokens/s on the same prompts, first pair."""
    hf, vllm = mode_metrics(batched), mode_metrics(remote)
    result.metrics.update({"vllm_batched": vllm,
                           "vllm_over_hf": ratio(vllm["pairs_per_minute"], hf["pairs_per_minute"]),
                           "first_pair_seconds": {"hf": first[0]["seconds"], "vllm": first[1]["seconds"]}})
    result.row("vLLM batched pairs/minute (same prompts)", vllm["pairs_per_minute"])
    result.row("vLLM / hf batched pairs/minute", result.metrics["vllm_over_hf"], "x")
    result.row("tokens/s batched: vLLM vs hf", f"{vllm['tokens_per_second']:.1f} vs {hf['tokens_per_second']:.1f}")
    result.row("mean tokens/sample batched: vLLM vs hf",
               f"{vllm['mean_tokens_per_sample']:.1f} vs {hf['mean_tokens_per_sample']:.1f}")
    result.row("first pair seconds: vLLM vs hf", f"{first[1]['seconds']:.2f} vs {first[0]['seconds']:.2f}")
    result.notes.append("vLLM samples through odpo's vllm backend (token-id prompts, ids returned) with the same "
                        "params; its random draws differ from hf's, so lengths differ: compare tokens/s too.")
