"""Batched sampling from the policy: N prompts x k samples in ONE `generate` call.

On the default model generation is overhead-bound (each decode step costs about the same for 1 row
as for 8), so the sampler, eval and the judges all go through this one function, which puts every
prompt and every sample of a prompt into a single left-padded batch with a KV cache.

Prompts are rendered by `trainer.policy.batching.prompt_token_ids` (the chat template, then the shared
prompt-length rule), and every `Generated` carries the prompt ids it was fed and the ids the model
emitted: the sampler stores both, and the trainer scores exactly those ids.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
)

from odpo.trainer.options import SamplingParams
from odpo.trainer.policy.batching import (
    FINISH_LENGTH,
    FINISH_STOP,
    PromptInput,
    left_pad,
    left_padded_positions,
    pad_id_of,
    prompt_token_ids,
)
from odpo.trainer.policy.loading import autocast_context
from odpo.trainer.policy.shared_prompt import cache_name, common_prefix_length, logit_positions, prefix_cache
from odpo.trainer.sampling.nucleus import NucleusSampler

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "Generated", "GenerationInterrupted", "SamplingParams", "generate",
           "left_pad", "stop_inside_forward"]


class GenerationInterrupted(RuntimeError):
    """`should_stop` asked to abandon a running batch (e.g. a newer adapter arrived); the partial
    outputs are dropped because they would mix unfinished and finished samples."""


@dataclass(frozen=True)
class Generated:
    """One completion. `seconds` is the wall time of the whole batched call that produced it
    (rows share it; divide by the batch's row count for an amortised cost).

    `prompt_token_ids` are the ids the model was conditioned on (already cut to the prompt-length
    rule) and `token_ids` the ids it emitted, ending with the eos it chose when it stopped by
    itself (finish_reason "stop"); padding is never included. They are the training data: `text`
    is for people and judges only (decoding then re-tokenising need not give the same ids).
    """

    text: str
    tokens: int  # generated tokens, excluding the eos and padding
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH
    seconds: float
    token_ids: tuple[int, ...] = ()
    prompt_token_ids: tuple[int, ...] = field(default=(), repr=False)
    # The policy's log-prob of token_ids given the prompt at temperature 1, summed; set when the
    # call was asked to record it (record_logps), so scoring the candidates needs no second forward.
    logp: Optional[float] = field(default=None, repr=False)


class _StopWhen(StoppingCriteria):
    """Checked after every decode step: lets another thread cut a batch short cheaply."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.fired = self.fired or bool(self.should_stop())
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class _LogpRecorder:
    """First of the logits processors: it sees the raw logits of every decode step. The token a
    step drew is known at the next call (the last column of input_ids), so each call scores the
    previous step's token, and `finish` the last one; one [rows, vocab] tensor is kept, not one per step."""

    def __init__(self) -> None:
        self.previous: Optional[torch.Tensor] = None
        self.per_token: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self._score(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _score(self, tokens: torch.Tensor) -> None:
        assert self.previous is not None
        self.per_token.append(self.previous.gather(1, tokens.view(-1, 1)).squeeze(1))

    def finish(self, new_tokens: torch.Tensor) -> list[list[float]]:
        """Per row, the log-prob of each generated token (padding after an eos included: cut by the caller)."""
        if self.previous is not None and len(self.per_token) < new_tokens.shape[1]:
            self._score(new_tokens[:, len(self.per_token)])
        return torch.stack(self.per_token, dim=1).tolist() if self.per_token else [[] for _ in new_tokens]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptInput],
    *,
    params: SamplingParams,
    n_per_prompt: int = 1,
    autocast_dtype: Optional[torch.dtype] = None,
    cache_implementation: Optional[str] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    record_logps: bool = False,
) -> list[list[Generated]]:
    """Sample `n_per_prompt` completions for every prompt in one batched call.

    Returns one list per prompt, in prompt order. Samples of one prompt are separate rows of the
    batch, hence independent random draws. `autocast_dtype` comes from
    `trainer.policy.loading.pick_device_dtype` (the caller decides it once per process);
    `cache_implementation` is passed to transformers ("static" or None for the dynamic cache).
    Raises GenerationInterrupted when `should_stop()` turns true mid-batch. `record_logps` fills each
    `Generated.logp` from the logits the call computed anyway.
    """
    if n_per_prompt < 1:
        raise ValueError("n_per_prompt must be >= 1")
    if not prompts:
        return []
    rows = [prompt_token_ids(tokenizer, p, max_tokens=params.max_prompt_tokens)
            for p in prompts for _ in range(n_per_prompt)]
    device = _model_device(model)
    pad_id = pad_id_of(tokenizer)
    input_ids, attention_mask, shared = _prompt_layout(rows, n_per_prompt=n_per_prompt, pad_id=pad_id, device=device,
                                                       share=not cache_implementation)
    eos_ids = _eos_ids(model, tokenizer)
    config = _generation_config(params, eos_ids=eos_ids, pad_id=pad_id,
                                cache_implementation=cache_implementation)
    stopper = _StopWhen(should_stop) if should_stop else None
    recorder = _LogpRecorder() if record_logps else None
    processors = _warpers(params)
    if recorder is not None:
        processors.insert(0, recorder)
    started = time.perf_counter()
    with torch.inference_mode(), autocast_context(device, autocast_dtype), _seeded(params.seed, device):
        prefix = {} if cache_implementation else _shared_prefix(model, input_ids, attention_mask, n_per_prompt,
                                                                shared)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                             logits_processor=processors, **prefix,
                             stopping_criteria=StoppingCriteriaList([stopper] if stopper else []))
    seconds = time.perf_counter() - started
    if stopper is not None and stopper.fired:
        raise GenerationInterrupted("generation interrupted")
    new_tokens = out[:, input_ids.shape[1]:]
    logps = recorder.finish(new_tokens) if recorder is not None else [None] * len(rows)
    flat = [_decode(tokenizer, ids, eos_ids=eos_ids, max_new_tokens=params.max_new_tokens, seconds=seconds,
                    prompt_ids=row, token_logps=lp)
            for ids, row, lp in zip(new_tokens.tolist(), rows, logps, strict=True)]
    return [flat[i * n_per_prompt:(i + 1) * n_per_prompt] for i in range(len(prompts))]


def _prompt_layout(rows: list[list[int]], *, n_per_prompt: int, pad_id: int, device: Any,
                   share: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, shared): the prompts' common prefix (a chat template's system
    turn and user header; trainer/policy/shared_prompt.py) in the first `shared` columns of every row,
    then each prompt's own tokens left padded, so the padding sits between the two. `generate`
    takes positions from the mask's running count, so the pads in the middle are as invisible as
    on the left. Plain left padding (shared 0) where no prefix is shared."""
    shared = common_prefix_length(rows[::n_per_prompt]) if share else 0
    ids, mask = left_pad([r[shared:] for r in rows], pad_id=pad_id, device=device)
    if not shared:
        return ids, mask, 0
    head = torch.tensor(rows[0][:shared], dtype=torch.long, device=ids.device).expand(len(rows), -1)
    return torch.cat([head, ids], dim=1), torch.cat([torch.ones_like(head), mask], dim=1), shared


def _shared_prefix(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   n_per_prompt: int, shared: int) -> dict[str, Any]:
    """The prefill, shared: a quarter of a sampling call's time here when every row ran its whole
    prompt (16 rows of ~44 tokens; the decode steps after it are overhead-bound). The prompts'
    common prefix (`shared` columns) runs once as one row; each prompt's columns but the last run
    once on top of it; the cache is repeated for the prompt's `n_per_prompt` rows (which sit next
    to each other), and `generate` continues from it with the last column, whose logits give the
    first token. Positions come from the mask as `generate` computes them."""
    width, prompts = input_ids.shape[1], input_ids.shape[0] // n_per_prompt
    if width < 2 or (n_per_prompt < 2 and not shared):
        return {}
    cache, _ = prefix_cache(model, input_ids[:1, :shared] if shared else None, prompts)
    if width - 1 > shared:
        ids, mask = input_ids[::n_per_prompt, :-1], attention_mask[::n_per_prompt, :-1]
        out = model(input_ids=ids[:, shared:], attention_mask=mask, use_cache=True,
                    logits_to_keep=logit_positions(ids, last=False),
                    position_ids=left_padded_positions(mask)[:, shared:], **cache)
        cache = {cache_name(out): out[cache_name(out)]}
    if n_per_prompt > 1:
        next(iter(cache.values())).batch_repeat_interleave(n_per_prompt)
    return cache


def _generation_config(params: SamplingParams, *, eos_ids: list[int], pad_id: int,
                       cache_implementation: Optional[str]) -> GenerationConfig:
    """A complete config, so a model's shipped defaults (repetition penalty, top_k, its own
    temperature) never silently change what the policy samples."""
    # do_sample stays off even when sampling: the last of _warpers draws the token itself
    # (trainer/sampling/nucleus.py), so generate's argmax takes it; none of generate's own warpers run.
    kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "eos_token_id": eos_ids,
                              "pad_token_id": pad_id, "use_cache": True, "do_sample": False,
                              "temperature": None, "top_p": None, "top_k": None}
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    return GenerationConfig(**kwargs)


def _warpers(params: SamplingParams) -> LogitsProcessorList:
    """Temperature, then the nucleus and the draw: transformers' own order for its warpers, with a
    top-p that keeps the same tokens without sorting the vocabulary every step, and a draw that
    needs random variates for those tokens only, not the whole vocabulary (trainer/sampling/nucleus.py).
    Empty for greedy decoding."""
    if params.greedy:
        return LogitsProcessorList()
    warpers: list[Any] = []
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    warpers.append(NucleusSampler(params.top_p))
    return LogitsProcessorList(warpers)


def _decode(tokenizer: Any, ids: list[int], *, eos_ids: list[int], max_new_tokens: int,
            seconds: float, prompt_ids: Sequence[int] = (), token_logps: Optional[list[float]] = None) -> Generated:
    """Cut after the first eos: everything after it is padding the batch added for the longer rows.

    The eos itself stays in `token_ids` (it is what the model emitted and what DPO should credit),
    but not in `text` or `tokens`."""
    eos = set(eos_ids)
    stop_at = next((i for i, t in enumerate(ids) if t in eos), None)
    if stop_at is None:
        kept, emitted, reason = ids, ids, FINISH_LENGTH
    else:
        kept, emitted, reason = ids[:stop_at], ids[:stop_at + 1], FINISH_STOP
    if stop_at is None and len(ids) < max_new_tokens:
        reason = FINISH_STOP  # ended by a stop criterion of the model's own, not by the budget
    text = tokenizer.decode(kept, skip_special_tokens=True)
    logp = None if token_logps is None else float(sum(token_logps[:len(emitted)]))
    return Generated(text=text, tokens=len(kept), finish_reason=reason, seconds=seconds,
                     token_ids=tuple(int(t) for t in emitted), prompt_token_ids=tuple(int(t) for t in prompt_ids),
                     logp=logp)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's eos (the chat template's end-of-turn) plus any the model config lists."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in configured if isinstance(configured, (list, tuple)) else [configured]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an eos token; cannot tell when to stop")
    return ids


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """A fixed seed reproduces a batch without disturbing the process's own random stream."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def stop_inside_forward(model: Any, stop: threading.Event) -> Iterator[None]:
    """While it is open, every block of the model's layer stacks checks `stop` before it runs and
    raises GenerationInterrupted when it is set.

    The decode-step check (generation's stopping criterion) comes too late for a shutdown: the
    prompt prefill of a batch is one forward pass, measured at 30+ s for 16 rows on a loaded
    2-core machine, and `odpo up` kills serve after its 15 s grace. Between blocks, a SIGTERM
    stops the sampler within one block's time (a few ms to a few hundred ms)."""
    def check(_module: Any, _args: Any) -> None:
        if stop.is_set():
            raise GenerationInterrupted("stopping")

    handles = [block.register_forward_pre_hook(check) for block in _layer_blocks(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _layer_blocks(model: Any) -> list[Any]:
    """The repeated blocks of a model (every ModuleList's members: a transformer's decoder layers,
    whatever the architecture calls them)."""
    return [block for module in model.modules() if isinstance(module, torch.nn.ModuleList) and len(module) > 1
            for block in module]
